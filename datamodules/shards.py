"""Convert a dataset tree into WebDataset shards plus a global-row manifest.

Which files are images of which label and generator is the layout's (`datamodules/layouts/`, registered by
name: genimage, drct, folder, or a user's).

The shard directory format is the one in docs/contracts.md; this module writes it and reads shards.json
(`read_shard_index`); manifest.csv has one parser, `feature_cache.manifest.read_manifest_rows`, which
the feature store needs too. Images are stored as their original bytes (format bias is a research
question here, so nothing is re-encoded); every file is read once, fully decoded and hashed, and the
bytes that were checked are the bytes written, so unreadable files land in rejected.csv instead of
failing phase 1 hours later and a file changed or deleted meanwhile cannot slip in unchecked.
Exact duplicates (same sha256 of the original bytes) within the split and against other shard
directories are reported in duplicates.csv: a train/test overlap inflates every number.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tarfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from rich.progress import track

from core.progress import ProgressLine, plain_output, print_line
from datamodules.image_io import FORMAT_EXTENSIONS, KNOWN_EXTENSIONS, decode_rgb, describe_error, \
    estimate_jpeg_quality, read_regular_file
from datamodules.layouts import LayoutWalk, ShardsInputError, SourceFile, Split, layout_named
from feature_cache.manifest import read_manifest_rows

MANIFEST_COLUMNS = ("key", "row", "label", "generator", "path", "shard", "format", "jpeg_quality", "width",
                    "height", "class_name", "sha256")
REJECTED_COLUMNS = ("path", "reason")
DUPLICATE_COLUMNS = ("sha256", "path", "duplicate_of", "duplicate_in")
SHARD_PATTERN = "shard-{:06d}.tar"
EXTENSION_ALIASES = {"jpeg": "jpg", "jpe": "jpg", "jfif": "jpg", "tiff": "tif"}


@dataclass(frozen=True)
class FileInfo:
    """Result of reading and fully decoding one file: metadata for the manifest, or the reason it was rejected."""

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
    duplicates_within: int = 0
    duplicates_across: dict[str, int] | None = None


def discover(layout: str, root: Path, split: Split,
             generators: list[str] | None = None) -> tuple[list[SourceFile], list[tuple[str, str]]]:
    """Candidate files sorted by relative path (rows follow this order), and (path, reason) of what the layout
    (a registered name) or the folder walk rejected."""
    spec = layout_named(layout)
    if not root.is_dir():
        raise ShardsInputError(f"--root {root}: not a directory")
    walk = LayoutWalk(root)
    spec.fn(root, split, walk)
    files, rejected = walk.files, walk.rejected
    if not files:
        raise ShardsInputError(f"--root {root}: --layout {layout} found no files ({spec.description})")
    if generators is not None:
        found = sorted({f.generator for f in files})
        unknown = sorted(set(generators) - set(found))
        if unknown:
            raise ShardsInputError(f"--generators {','.join(unknown)}: not found under {root}; found {','.join(found)}")
        files = [f for f in files if f.generator in generators]
        dropped = tuple(folder for name in found if name not in generators for folder in walk.folders.get(name, []))
        rejected = [(path, reason) for path, reason in rejected if not path.startswith(dropped)]
    # Python's codepoint order, not the locale's: the same tree gives the same rows on every machine.
    return sorted(files, key=lambda f: f.rel), sorted(rejected)


def _member_extension(path: Path, image_format: str) -> str:
    """The file's own extension, lower-case with aliases merged (jpeg→jpg); the format's if it has none."""
    extension = path.suffix.lower().lstrip(".")
    extension = EXTENSION_ALIASES.get(extension, extension)
    if extension in KNOWN_EXTENSIONS:
        return extension
    return FORMAT_EXTENSIONS.get(image_format, image_format.lower() or "bin")


def check_file(path: Path) -> tuple[FileInfo, bytes]:
    """Read the file once, decode all of it and hash it: (metadata, the checked bytes) or (reason, b"").

    Any failure (truncated, empty, not an image, vanished, not a regular file, too many pixels) becomes
    a reason; the bytes returned are the ones that were decoded, so they are what the tar will hold.
    """
    try:
        data = read_regular_file(path)
        original, _ = decode_rgb(data)
    except Exception as error:  # noqa: BLE001  every failure is recorded in rejected.csv, none is fatal
        return FileInfo(reason=describe_error(error)), b""
    image_format = original.format or ""
    return FileInfo(format=image_format, jpeg_quality=estimate_jpeg_quality(original), width=original.width,
                    height=original.height, extension=_member_extension(path, image_format),
                    sha256=hashlib.sha256(data).hexdigest()), data


def _tar_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    """A member with fixed owner, mode and mtime so the same input gives byte-identical tars."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, io.BytesIO(data)


class ShardSequence:
    """Consecutive tars of `shard_size` samples, each written to a temp file and renamed when full.

    `close()` finishes the last tar; `abort()` removes an unfinished one, so a failed run leaves no
    `.tar.tmp` behind (and no shards.json, so the directory reads as unfinished).
    """

    def __init__(self, out: Path, shard_size: int) -> None:
        self.out, self.shard_size = out, shard_size
        self.table: list[dict] = []
        self._tar: tarfile.TarFile | None = None
        self._temp = self._final = Path()

    def shard_of(self, row: int) -> str:
        return SHARD_PATTERN.format(row // self.shard_size)

    def add(self, key: str, extension: str, data: bytes, record: dict) -> None:
        if record["row"] % self.shard_size == 0:
            self.close()
            self._final = self.out / self.shard_of(record["row"])
            self._temp = self._final.with_name(self._final.name + ".tmp")
            self._tar = tarfile.open(self._temp, "w", format=tarfile.PAX_FORMAT)
            self.table.append({"name": self._final.name, "first_row": record["row"], "num_samples": 0})
        self._tar.addfile(*_tar_member(f"{key}.{extension}", data))
        self._tar.addfile(*_tar_member(f"{key}.json", json.dumps(record, sort_keys=True).encode()))
        self.table[-1]["num_samples"] += 1

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            os.replace(self._temp, self._final)
            self._tar = None

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._temp.unlink(missing_ok=True)
            self._tar = None


def _ordered_map(function: Callable, items: list, workers: int, description: str) -> Iterator:
    """Ordered map with a progress bar; a process pool when workers > 1 (decoding is CPU-bound).

    At most `16 * workers` results are in flight, so memory stays flat however large the dataset.
    A worker that dies (killed, out of memory, a crashing codec) is an error naming the files in flight
    instead of the endless wait `multiprocessing.Pool` gives.
    """
    if workers <= 1 or len(items) <= 1:
        yield from track(map(function, items), description=description, total=len(items), disable=plain_output())
        return
    with ProcessPoolExecutor(workers) as pool:
        source = iter(items)
        window = deque((item, pool.submit(function, item)) for item in islice(source, 16 * workers))
        for _ in track(range(len(items)), description=description, disable=plain_output()):
            item, future = window.popleft()
            try:
                result = future.result()
            except BrokenProcessPool:
                suspects = [item] + [other for other, _ in islice(window, workers)]
                raise ShardsInputError(f"a {description} process died (killed, out of memory or a crashing decoder) "
                                       f"while reading one of {', '.join(map(str, suspects))}; the output is "
                                       "unfinished (no shards.json): rerun with --overwrite true") from None
            window.extend((next_item, pool.submit(function, next_item)) for next_item in islice(source, 1))
            yield result


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
    for path in [*existing, out / "rejected.csv", out / "duplicates.csv", *out.glob("shard-*.tar.tmp")]:
        path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _hashes_of(shard_dir: Path) -> dict[str, str]:
    """sha256 → first path of another shard directory's manifest, for the cross-split duplicate check."""
    rows = read_manifest_rows(shard_dir)
    if rows and not all(r.get("sha256") for r in rows):
        raise ShardsInputError(f"--check_against {shard_dir}: its manifest.csv has no sha256 column (converted "
                               "before content hashes were recorded); convert it again")
    first: dict[str, str] = {}
    for r in rows:
        first.setdefault(r["sha256"], r["path"])
    return first


def find_duplicates(manifest: list[dict], others: dict[str, dict[str, str]]) -> list[dict]:
    """Rows of duplicates.csv: each later copy of an image within the split (duplicate_in empty), and each
    image of the split also found in another shard directory (duplicate_in = that directory)."""
    found: list[dict] = []
    first: dict[str, str] = {}
    for record in manifest:
        if record["sha256"] in first:
            found.append({"sha256": record["sha256"], "path": record["path"],
                          "duplicate_of": first[record["sha256"]], "duplicate_in": ""})
        first.setdefault(record["sha256"], record["path"])
    for directory, theirs in others.items():
        found += [{"sha256": r["sha256"], "path": r["path"], "duplicate_of": theirs[r["sha256"]],
                   "duplicate_in": directory} for r in manifest if r["sha256"] in theirs]
    return found


def convert(layout: str, root: Path, split: Split, out: Path, shard_size: int = 1000,
            generators: list[str] | None = None, workers: int | None = None,
            overwrite: bool = False, check_against: list[Path] | None = None) -> ConversionSummary:
    """Discover, read once, decode-check, hash and shard the images of one split; shards.json is written last.

    `check_against`: other shard directories (e.g. the other splits) whose images must not reappear here;
    shared images are reported, not removed (which copy to drop is the user's call).
    """
    root, out = Path(root), Path(out)
    layout_named(layout)  # an unknown layout fails before anything is read
    if shard_size < 1:
        raise ShardsInputError(f"--shard_size {shard_size}: must be at least 1")
    workers = (os.cpu_count() or 1) if workers is None else workers
    # Every input is checked before any work: a bad --check_against fails now, not after an hour of decoding.
    others = {str(Path(d)): _hashes_of(Path(d)) for d in check_against or []}
    files, rejected = discover(layout, root, split, generators)
    _prepare_out(out, root, overwrite)

    manifest: list[dict] = []
    shards = ShardSequence(out, shard_size)
    try:
        checked = _ordered_map(check_file, [f.path for f in files], workers, "decoding")
        # In a log (not a terminal): a line per filled tar and at least every 30 s, images read of all found.
        line = ProgressLine("shards", len(files), "images") if plain_output() else None
        for source, (info, data) in zip(files, checked):
            if info.reason:
                rejected.append((source.rel, info.reason))
            else:
                row = len(manifest)
                key = f"{row:09d}"  # dot-free and unique: WebDataset splits keys from extensions at the first dot
                record = {"key": key, "row": row, "label": source.label, "generator": source.generator,
                          "path": source.rel, "shard": shards.shard_of(row), "format": info.format,
                          "jpeg_quality": "" if info.jpeg_quality is None else info.jpeg_quality,
                          "width": info.width, "height": info.height,
                          # No layout names the class in a folder; parsing file names for it is what STYLE.md
                          # warns against.
                          "class_name": "", "sha256": info.sha256}
                shards.add(key, info.extension, data, record)
                manifest.append(record)
            if line is not None:
                filled = not info.reason and len(manifest) % shard_size == 0
                print_line(line.advance(1, f"{len(shards.table)} tars of at most {-(-len(files) // shard_size)}, "
                                           f"{len(rejected)} rejected", force=filled))
        shards.close()
    finally:
        shards.abort()
    _write_csv(out / "rejected.csv", REJECTED_COLUMNS,
               ({"path": path, "reason": reason} for path, reason in sorted(rejected)))
    if not manifest:
        raise ShardsInputError(f"--root {root}: all {len(rejected)} files were rejected; see {out / 'rejected.csv'}")
    _write_csv(out / "manifest.csv", MANIFEST_COLUMNS, manifest)
    duplicates = find_duplicates(manifest, others)
    _write_csv(out / "duplicates.csv", DUPLICATE_COLUMNS, duplicates)

    names = sorted({r["generator"] for r in manifest})
    index = {"shard_size": shard_size, "num_samples": len(manifest), "generators": names, "layout": layout,
             "split": split, "root": str(root.resolve()), "num_rejected": len(rejected), "shards": shards.table}
    (out / "shards.json").write_text(json.dumps(index, indent=1) + "\n")
    across = {d: sum(r["duplicate_in"] == d for r in duplicates) for d in others}
    return ConversionSummary(out, len(manifest), len(rejected), len(shards.table), names,
                             sum(not r["duplicate_in"] for r in duplicates), across)


def read_shard_index(shard_dir: str | Path) -> dict:
    """shards.json of a complete shard directory; one clear error if it is not one."""
    path = Path(shard_dir) / "shards.json"
    if not path.is_file():
        raise FileNotFoundError(f"{shard_dir}: no shards.json (not a finished `python -m cli shards` output)")
    return json.loads(path.read_text())

