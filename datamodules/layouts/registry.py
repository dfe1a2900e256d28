"""The dataset-layout registry: a layout is a named function that says which files of a dataset tree are images
of which label and generator.

A module registers its layouts with `@register_layout`; `python -m cli shards --layout NAME` takes any registered
name, and `--layout_modules MODULE` imports a user's module first, so a new layout is one file. The folder walk
(regular files only, each folder once, hidden and unreadable entries rejected with a reason) is `LayoutWalk`'s,
so a layout only names folders.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from core.registries import import_modules
from datamodules.image_io import describe_error

Split = Literal["train", "val"]


class ShardsInputError(ValueError):
    """Bad converter input; the message is one line naming the input and what is wrong with it."""


@dataclass(frozen=True)
class SourceFile:
    """One candidate image: where it is and what the layout says about it."""

    path: Path
    rel: str  # posix path relative to the root: location-independent, so manifests are reproducible
    label: int  # 1 fake, 0 real, -1 unlabelled
    generator: str


_FILE_KINDS = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
               (stat.S_ISBLK, "a device"))


def walk_files(folder: Path, visited: set[tuple[int, int]] | None = None,
               tree: Path | None = None) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Regular files under `folder` (sorted), and everything else found there with the reason it was skipped.

    Symlinks are followed (datasets are often linked in), but each real folder and file is read once, by its
    real identity (device, inode), so two links to one folder cannot repeat rows and a loop cannot run forever.
    A link that leads back into `tree` (the dataset root; default `folder`) or to a folder above the link is
    skipped: what it reaches is read at its real location, so a link `fake/loop -> ..` cannot relabel `real/`
    as fake (whichever folder the layout walks first). Only regular files are returned: opening a FIFO named
    `*.png` would block forever. Hidden names are skipped, but recorded, as are broken links and unreadable
    folders. `visited` is shared across calls that must not read a folder or file twice.
    """
    visited = set() if visited is None else visited
    tree_real = os.path.realpath(folder if tree is None else tree)
    if tree is not None:  # the layout's folder itself reached through a link inside the tree (`sdv5 -> sdv4`)
        real = os.path.realpath(folder)
        if real != os.path.normpath(os.path.join(tree_real, os.path.relpath(os.path.abspath(folder),
                                                                              os.path.abspath(tree)))) \
                and Path(real).is_relative_to(tree_real):
            return [], [(folder, _LINK_BACK.format(target=real))]
    files: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    pending = [folder]
    while pending:
        directory = pending.pop()
        try:
            identity = os.stat(directory)
            if (identity.st_dev, identity.st_ino) in visited:
                skipped.append((directory, f"folder already walked (same folder as {os.path.realpath(directory)})"))
                continue
            visited.add((identity.st_dev, identity.st_ino))
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as error:
            skipped.append((directory, f"folder not readable: {describe_error(error)}"))
            continue
        subfolders = []
        for entry in entries:
            path = Path(entry.path)
            if entry.name.startswith("."):
                skipped.append((path, "hidden folder, not searched" if entry.is_dir() else "hidden file"))
                continue
            try:
                info = os.stat(path)  # follows links; ELOOP for a link to itself
            except OSError as error:
                skipped.append((path, f"broken or looping symlink: {describe_error(error)}"))
                continue
            if entry.is_symlink() and (reason := _link_back(path, tree_real)):
                skipped.append((path, reason))
            elif stat.S_ISDIR(info.st_mode):
                subfolders.append(path)
            elif not stat.S_ISREG(info.st_mode):
                skipped.append((path, "not a regular file: " + next(n for test, n in _FILE_KINDS if test(info.st_mode))))
            elif (info.st_dev, info.st_ino) in visited:
                skipped.append((path, f"file already read (same file as {os.path.realpath(path)})"))
            else:
                visited.add((info.st_dev, info.st_ino))
                files.append(path)
        pending.extend(reversed(subfolders))
    return sorted(files), skipped


_LINK_BACK = "symlink back into the dataset tree (to {target}): its files are read once, at their real location, " \
             "never relabelled"


def _link_back(link: Path, tree_real: str) -> str:
    """Why following `link` would read a file under another label (inside the tree, or a folder above the link),
    or "" when it leads elsewhere (a dataset linked in)."""
    target = os.path.realpath(link)
    if Path(target).is_relative_to(tree_real):
        return _LINK_BACK.format(target=target)
    if Path(os.path.realpath(link.parent)).is_relative_to(target):
        return f"symlink to a folder above it ({target}): a loop, its files are read at their real location"
    return ""



@dataclass
class LayoutWalk:
    """What a layout function fills: the files of the labelled folders it names (`add`) and what it rejects.

    Each folder is walked once per conversion, whatever links or repeated `add`s say; what the walk skips
    (hidden, unreadable, not a regular file) is rejected with its reason. `folders` remembers where each
    generator's files are, so `--generators` drops the rejections of the generators it leaves out.
    """

    root: Path
    files: list[SourceFile] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    folders: dict[str, list[str]] = field(default_factory=dict)
    visited: set[tuple[int, int]] = field(default_factory=set)

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def add(self, folder: Path, label: int, generator: str) -> None:
        """Every regular file under `folder` is an image of `label` (1 fake, 0 real, -1 unknown) and `generator`."""
        files, skipped = walk_files(folder, self.visited, tree=self.root)
        self.rejected += [(self.relative(path), reason) for path, reason in skipped]
        self.files += [SourceFile(path, self.relative(path), label, generator) for path in files]
        if folder != self.root:
            self.folders.setdefault(generator, []).append(f"{self.relative(folder)}/")

    def reject(self, path: Path, reason: str) -> None:
        self.rejected.append((self.relative(path), reason))

    def subfolders(self, folder: Path) -> list[Path]:
        """The visible folders directly in `folder`, sorted by name (e.g. one per generator)."""
        return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


LayoutFunction = Callable[[Path, Split, LayoutWalk], None]


@dataclass(frozen=True)
class LayoutSpec:
    """One registered layout: its name, what it expects (the function's docstring) and the function."""

    name: str
    description: str
    fn: LayoutFunction


LAYOUTS: dict[str, LayoutSpec] = {}


def register_layout(name: str) -> Callable[[LayoutFunction], LayoutFunction]:
    """Decorator: register `fn(root, split, walk)`, which calls `walk.add(folder, label, generator)` for each
    labelled folder of the tree (a name may be registered once)."""
    def decorate(fn: LayoutFunction) -> LayoutFunction:
        if name in LAYOUTS and LAYOUTS[name].fn is not fn:
            raise ValueError(f"layout {name!r} is already registered by {LAYOUTS[name].fn.__module__}")
        LAYOUTS[name] = LayoutSpec(name, next(iter((fn.__doc__ or "").strip().splitlines()), ""), fn)
        return fn
    return decorate


def available_layouts() -> list[str]:
    """Names of the registered layouts, sorted."""
    return sorted(LAYOUTS)


def layout_named(name: str) -> LayoutSpec:
    """The registered layout `name`, or one line naming the registered ones."""
    if name not in LAYOUTS:
        raise ShardsInputError(f"--layout {name!r}: not a registered layout; registered: "
                               f"{', '.join(available_layouts())} (a layout of your own: --layout_modules MODULE)")
    return LAYOUTS[name]


def import_layout_modules(modules: Iterable[str]) -> None:
    """Import the modules that register layouts (a user's); one line if one is missing."""
    import_modules(modules, "--layout_modules", ShardsInputError)
