"""DRCT-2M: reals from MS COCO, fakes per generator."""

from __future__ import annotations

from pathlib import Path

from datamodules.layouts.registry import LayoutWalk, ShardsInputError, Split, register_layout

REAL_GENERATOR = "MSCOCO"  # a real class, not a generator: tables pool it with every fake generator's rows


@register_layout("drct")
def drct(root: Path, split: Split, walk: LayoutWalk) -> None:
    """ROOT/MSCOCO/<split>2017 (real, 0) and ROOT/DRCT-2M/<generator>/<split>2017 (fake, 1)."""
    subdir = f"{split}2017"
    real = root / REAL_GENERATOR / subdir
    if real.is_dir():
        walk.add(real, 0, REAL_GENERATOR)
    fakes = root / "DRCT-2M"
    if fakes.is_dir():
        for generator_dir in walk.subfolders(fakes):
            if (generator_dir / subdir).is_dir():
                walk.add(generator_dir / subdir, 1, generator_dir.name)
    if not walk.files:
        raise ShardsInputError(f"--root {root}: no MSCOCO/{subdir} or DRCT-2M/<generator>/{subdir} folders with "
                               "files (is --layout drct right?)")
