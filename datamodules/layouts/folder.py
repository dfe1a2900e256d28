"""Plain folders: `ROOT/real` and `ROOT/fake`, or any folder of unlabelled images."""

from __future__ import annotations

from pathlib import Path

from datamodules.layouts.registry import LayoutWalk, ShardsInputError, Split, register_layout, walk_files


@register_layout("folder")
def folder(root: Path, split: Split, walk: LayoutWalk) -> None:
    """ROOT/real (0) and ROOT/fake (1) when either exists, else every file unlabelled (-1); the split is not a folder.

    Labelled: generator is "real" or "fake", and files outside those folders are rejected (not silently
    dropped). Unlabelled: generator is the root folder's name.
    """
    labelled = [(name, label) for name, label in (("fake", 1), ("real", 0)) if (root / name).is_dir()]
    if not labelled:
        walk.add(root, -1, root.resolve().name or "images")
        if not walk.files:
            raise ShardsInputError(f"--root {root}: no files found")
        return
    for name, label in labelled:
        walk.add(root / name, label, name)
    everything, skipped = walk_files(root)
    inside = {name for name, _ in labelled}
    for path in everything:
        if path.relative_to(root).parts[0] not in inside:
            walk.reject(path, "outside real/ and fake/ in a labelled folder layout")
    for path, reason in skipped:
        if path.relative_to(root).parts[0] not in inside:
            walk.reject(path, reason)
    if not walk.files:
        raise ShardsInputError(f"--root {root}: real/ and fake/ hold no files")
