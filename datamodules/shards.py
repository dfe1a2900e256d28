"""Convert GenImage, DRCT-2M or plain image folders into WebDataset shards plus a global-row manifest.

The shard directory format is the one in docs/contracts.md; this module writes it and reads shards.json
(`read_shard_index`); manifest.csv has one parser, `feature_cache.manifest.read_manifest_rows`, which
the feature store needs too. Images are stored as their original bytes (format bias is a research
question here, so nothing is re-encoded); every file is fully decoded once so unreadable
files land in rejected.csv instead of failing phase 1 hours later.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path
from typing import Literal

from rich.progress import track

from datamodules.image_io import FORMAT_EXTENSIONS, KNOWN_EXTENSIONS, decode_rgb, describe_error, \
    estimate_jpeg_quality

Layout = Literal["genimage", "drct", "folder"]
Split = Literal["train", "val"]

MANIFEST_COLUMNS = ("key", "row", "label", "generator", "path", "shard", "format", "jpeg_quality", "width",
                    "height", "class_name", "sha256")
REJECTED_COLUMNS = ("path", "reason")
SHARD_PATTERN = "shard-{:06d}.tar"
EXTENSION_ALIASES = {"jpeg": "jpg", "jpe": "jpg", "jfif": "jpg", "tiff": "tif"}
GENIMAGE_CLASSES = (("ai", 1), ("nature", 0))
DRCT_REAL_GENERATOR = "MSCOCO"


class ShardsInputError(ValueError):
    """Bad converter input; the message is one line naming the input and what is wrong with it."""


@dataclass(frozen=True)
class SourceFile:
    """One candidate image: where it is and what the layout says about it."""

    path: Path
    rel: str  # posix path relative to the root: location-independent, so manifests are reproducible
    label: int
    generator: str


@dataclass(frozen=True)
class FileInfo:
    """Result of fully decoding one file: metadata for the manifest, or the reason it was rejected."""

    reason: str = ""
    format: str = ""
    jpeg_quality: int | None = None
    width: int = 0
    height: int = 0
    extension: str = ""
    sha256: str = ""  # hex sha256 of the original file bytes: the row's identity in feature stores


@dataclass(frozen=True)
class ConversionSummary:
    """What a conversion wrote."""

    out: Path
    num_samples: int
    num_rejected: int
    num_shards: int
    generators: list[str]


def walk_files(folder: Path) -> Iterator[Path]:
    """Every non-hidden regular file under `folder`, following symlinks (datasets are often linked in)."""
    for directory, subdirs, files in os.walk(folder, followlinks=True):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        for name in files:
            if not name.startswith("."):
                yield Path(directory) / name


def _collect(root: Path, folder: Path, label: int, generator: str) -> list[SourceFile]:
    return [SourceFile(path, path.relative_to(root).as_posix(), label, generator) for path in walk_files(folder)]


def _discover_genimage(root: Path, split: Split) -> list[SourceFile]:
    """`<root>/<generator>/<split>/{ai,nature}`: ai is fake (1), nature real (0)."""
    files: list[SourceFile] = []
    for generator_dir in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
        for class_folder, label in GENIMAGE_CLASSES:
            folder = generator_dir / split / class_folder
            if folder.is_dir():
                files += _collect(root, folder, label, generator_dir.name)
    if not files:
        raise ShardsInputError(f"--root {root}: no <generator>/{split}/ai or <generator>/{split}/nature folders "
                               "with files (is --layout genimage right?)")
    return files


def _discover_drct(root: Path, split: Split) -> list[SourceFile]:
    """Reals in `<root>/MSCOCO/<split>2017` (label 0), fakes in `<root>/DRCT-2M/<generator>/<split>2017`."""
    subdir = f"{split}2017"
    files: list[SourceFile] = []
    real = root / DRCT_REAL_GENERATOR / subdir
    if real.is_dir():
        files += _collect(root, real, 0, DRCT_REAL_GENERATOR)
    fakes = root / "DRCT-2M"
    if fakes.is_dir():
        for generator_dir in sorted(d for d in fakes.iterdir() if d.is_dir() and not d.name.startswith(".")):
            if (generator_dir / subdir).is_dir():
                files += _collect(root, generator_dir / subdir, 1, generator_dir.name)
    if not files:
        raise ShardsInputError(f"--root {root}: no MSCOCO/{subdir} or DRCT-2M/<generator>/{subdir} folders with "
                               "files (is --layout drct right?)")
    return files


def _discover_folder(root: Path) -> tuple[list[SourceFile], list[tuple[str, str]]]:
    """`<root>/real` (0) and `<root>/fake` (1) when either exists, else every file unlabelled (-1).

    Labelled: generator is "real" or "fake", and files outside those folders are rejected (not silently
    dropped). Unlabelled: generator is the root folder's name.
    """
    labelled = [(name, label) for name, label in (("fake", 1), ("real", 0)) if (root / name).is_dir()]
    if not labelled:
        files = _collect(root, root, -1, root.resolve().name or "images")
        if not files:
            raise ShardsInputError(f"--root {root}: no files found")
        return files, []
    files = [f for name, label in labelled for f in _collect(root, root / name, label, name)]
    inside = {name for name, _ in labelled}
    outside = [(p.relative_to(root).as_posix(), "outside real/ and fake/ in a labelled folder layout")
               for p in walk_files(root) if p.relative_to(root).parts[0] not in inside]
    if not files:
        raise ShardsInputError(f"--root {root}: real/ and fake/ hold no files")
    return files, outside


def discover(layout: Layout, root: Path, split: Split,
             generators: list[str] | None = None) -> tuple[list[SourceFile], list[tuple[str, str]]]:
    """Candidate files sorted by relative path (rows follow this order), and files rejected by the layout."""
    if not root.is_dir():
        raise ShardsInputError(f"--root {root}: not a directory")
    if layout == "genimage":
        files, outside = _discover_genimage(root, split), []
    elif layout == "drct":
        files, outside = _discover_drct(root, split), []
    elif layout == "folder":
        files, outside = _discover_folder(root)
    else:
        raise ShardsInputError(f"--layout {layout!r}: expected one of genimage, drct, folder")
    if generators is not None:
        found = sorted({f.generator for f in files})
        unknown = sorted(set(generators) - set(found))
        if unknown:
            raise ShardsInputError(f"--generators {','.join(unknown)}: not found under {root}; found {','.join(found)}")
        files = [f for f in files if f.generator in generators]
    # Python's codepoint order, not the locale's: the same tree gives the same rows on every machine.
    return sorted(files, key=lambda f: f.rel), sorted(outside)


def _member_extension(path: Path, image_format: str) -> str:
    """The file's own extension, lower-case with aliases merged (jpeg→jpg); the format's if it has none."""
    extension = path.suffix.lower().lstrip(".")
    extension = EXTENSION_ALIASES.get(extension, extension)
    if extension in KNOWN_EXTENSIONS:
        return extension
    return FORMAT_EXTENSIONS.get(image_format, image_format.lower() or "bin")


def inspect_file(path: Path) -> FileInfo:
    """Decode the whole file; any failure (truncated, empty, not an image, unreadable) becomes a reason."""
    try:
        data = path.read_bytes()
        original, _ = decode_rgb(data)
    except Exception as error:  # noqa: BLE001  every failure is recorded in rejected.csv, none is fatal
        return FileInfo(reason=describe_error(error))
    image_format = original.format or ""
    return FileInfo(format=image_format, jpeg_quality=estimate_jpeg_quality(original), width=original.width,
                    height=original.height, extension=_member_extension(path, image_format),
                    sha256=hashlib.sha256(data).hexdigest())


def _tar_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    """A member with fixed owner, mode and mtime so the same input gives byte-identical tars."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, io.BytesIO(data)


def write_shard(out_path: Path, samples: list[tuple[str, Path, str, dict]]) -> None:
    """Write (key, source, extension, metadata) samples to one tar, atomically (temp file, then rename)."""
    temp = out_path.with_name(out_path.name + ".tmp")
    with tarfile.open(temp, "w", format=tarfile.PAX_FORMAT) as tar:
        for key, source, extension, metadata in samples:
            tar.addfile(*_tar_member(f"{key}.{extension}", source.read_bytes()))
            tar.addfile(*_tar_member(f"{key}.json", json.dumps(metadata, sort_keys=True).encode()))
    os.replace(temp, out_path)


def _write_shard_args(args: tuple[Path, list[tuple[str, Path, str, dict]]]) -> None:
    write_shard(*args)


def _parallel_map(function: Callable, items: list, workers: int, description: str) -> Iterator:
    """Ordered map with a progress bar; a process pool when workers > 1 (decoding is CPU-bound)."""
    if workers <= 1 or len(items) <= 1:
        yield from track(map(function, items), description=description, total=len(items))
        return
    with Pool(workers) as pool:
        yield from track(pool.imap(function, items, chunksize=16), description=description, total=len(items))


def _write_csv(path: Path, columns: tuple[str, ...], rows: Iterable[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _prepare_out(out: Path, root: Path, overwrite: bool) -> None:
    if out.resolve().is_relative_to(root.resolve()):
        raise ShardsInputError(f"--out {out}: lies inside --root {root}; choose a directory outside the images")
    existing = [p for p in (out / "shards.json", out / "manifest.csv") if p.exists()] + sorted(out.glob("shard-*.tar"))
    if existing and not overwrite:
        raise ShardsInputError(f"--out {out}: already holds shards; pass --overwrite true or choose another directory")
    for path in [*existing, out / "rejected.csv"]:
        path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def convert(layout: Layout, root: Path, split: Split, out: Path, shard_size: int = 1000,
            generators: list[str] | None = None, workers: int | None = None,
            overwrite: bool = False) -> ConversionSummary:
    """Discover, decode-check, and shard the images of one split; shards.json is written last (= complete)."""
    root, out = Path(root), Path(out)
    if shard_size < 1:
        raise ShardsInputError(f"--shard_size {shard_size}: must be at least 1")
    workers = (os.cpu_count() or 1) if workers is None else workers
    files, rejected = discover(layout, root, split, generators)
    _prepare_out(out, root, overwrite)

    infos = list(_parallel_map(inspect_file, [f.path for f in files], workers, "decoding"))
    accepted: list[tuple[SourceFile, FileInfo]] = []
    for source, info in zip(files, infos):
        if info.reason:
            rejected.append((source.rel, info.reason))
        else:
            accepted.append((source, info))
    _write_csv(out / "rejected.csv", REJECTED_COLUMNS,
               ({"path": path, "reason": reason} for path, reason in sorted(rejected)))
    if not accepted:
        raise ShardsInputError(f"--root {root}: all {len(rejected)} files were rejected; see {out / 'rejected.csv'}")

    manifest: list[dict] = []
    shard_jobs: list[tuple[Path, list[tuple[str, Path, str, dict]]]] = []
    for row, (source, info) in enumerate(accepted):
        shard = SHARD_PATTERN.format(row // shard_size)
        key = f"{row:09d}"  # dot-free and unique: WebDataset splits keys from extensions at the first dot
        record = {"key": key, "row": row, "label": source.label, "generator": source.generator, "path": source.rel,
                  "shard": shard, "format": info.format,
                  "jpeg_quality": "" if info.jpeg_quality is None else info.jpeg_quality,
                  "width": info.width, "height": info.height,
                  # No layout names the class in a folder; parsing file names for it is what STYLE.md warns against.
                  "class_name": "", "sha256": info.sha256}
        manifest.append(record)
        if row % shard_size == 0:
            shard_jobs.append((out / shard, []))
        shard_jobs[-1][1].append((key, source.path, info.extension, record))
    for _ in _parallel_map(_write_shard_args, shard_jobs, workers, "writing shards"):
        pass
    _write_csv(out / "manifest.csv", MANIFEST_COLUMNS, manifest)

    names = sorted({r["generator"] for r in manifest})
    index = {"shard_size": shard_size, "num_samples": len(manifest), "generators": names, "layout": layout,
             "split": split, "root": str(root.resolve()), "num_rejected": len(rejected),
             "shards": [{"name": path.name, "first_row": int(samples[0][3]["row"]), "num_samples": len(samples)}
                        for path, samples in shard_jobs]}
    (out / "shards.json").write_text(json.dumps(index, indent=1) + "\n")
    return ConversionSummary(out, len(manifest), len(rejected), len(shard_jobs), names)


def read_shard_index(shard_dir: str | Path) -> dict:
    """shards.json of a complete shard directory; one clear error if it is not one."""
    path = Path(shard_dir) / "shards.json"
    if not path.is_file():
        raise FileNotFoundError(f"{shard_dir}: no shards.json (not a finished `python -m cli shards` output)")
    return json.loads(path.read_text())

