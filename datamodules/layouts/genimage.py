"""GenImage: `ROOT/<generator>/{train,val}/{ai,nature}`."""

from __future__ import annotations

from pathlib import Path

from datamodules.layouts.registry import LayoutWalk, ShardsInputError, Split, register_layout

CLASSES = (("ai", 1), ("nature", 0))


@register_layout("genimage")
def genimage(root: Path, split: Split, walk: LayoutWalk) -> None:
    """ROOT/<generator>/{train,val}/{ai,nature}: ai is fake (1), nature real (0); generator = folder name."""
    for generator_dir in walk.subfolders(root):
        for class_folder, label in CLASSES:
            folder = generator_dir / split / class_folder
            if folder.is_dir():
                walk.add(folder, label, generator_dir.name)
    if not walk.files:
        raise ShardsInputError(f"--root {root}: no <generator>/{split}/ai or <generator>/{split}/nature folders "
                               "with files (is --layout genimage right?)")
