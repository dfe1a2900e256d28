"""The feature store, format 3: one Zarr v3 group per dataset split, features in groups that grow.

Layout (docs/contracts.md, "Feature store, format 3"; S = shard size, n = rows, sample axis first):

- `rows/{key, sha256, label, generator, format, jpeg_quality, width, height, path}`: per-row facts written once
  at creation, one chunk per tar; `sha256` (of the image's original bytes) is the row's identity; `path` is the
  image file relative to the dataset root (stores written before it have no rows/path).
  `rows.checksums.json` records every rows/ file (and is the creation marker of rows/).
- `GROUP/FEATURE`: one array per feature, one Zarr shard file per tar (`shards=(S, ...)`), so the process
  that computed a tar is the only writer of its files (NOTES: writers sharing a shard lose data); inner
  chunks of `CHUNK_ROWS` rows (the largest divisor of S within it, so a chunk never spans two tars),
  because reads are bound by Zarr's per-chunk cost, not by bytes: the phase-2 reader's 32-row block is then
  one chunk decode instead of 32 (CLIP rows of 400 KB were one row per chunk at the old ~64 KiB target).
  Stores written with other inner chunks read unchanged (the chunk shape is per-array Zarr metadata,
  `chunk_rows`). Dtype and codec per feature (`codecs`).
  `FEATURE__scale` (n, C) float32 for int8_rowscale; `error` str and `flags` int32 (n, 2) =
  (non-finite values, underflowed values) per row.
- `GROUP/done/TAR.json`: a tar's done marker with the size and crc32c (format 2: sha256) of each file it wrote,
  written atomically after the files are on disk; a file zarr did not write (chunk = fill value) is recorded
  as {bytes: 0, crc32c: null}.
- attrs: `feature_store` {format: 3, complete}, `provenance` (`StoreProvenance`), `groups`
  ({name: `GroupInfo`}), `generator_names`, `rejected_inputs`, `attrs_sha256` (digests of all of them and of
  every array's attributes). Only the holder of `.lock` writes them.
- Format 3 (`feature_cache/integrity.py`): every chunk ends with a crc32c checked on every read, done markers
  record crc32c instead of sha256, attributes are digested. Format-2 stores are read unchanged (no per-read
  check); phase 2 checks their files' sha256 at open instead.
- Every array describes itself (`describe`): Zarr v3 `dimension_names` (`row` first) and attributes `kind`,
  `description`, `units`, `codes`, so a plain `zarr.open_group` reader needs neither this code nor the docs.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.core.buffer.cpu import NDBuffer

from core.hashing import file_sha256
from feature_cache import describe
from feature_cache.codecs import compressor, has_scale, scale_channels, storage_dtype
from feature_cache.integrity import (CHECKSUMMED_FORMAT, DIGESTS_ATTR, attribute_digests,
                                     changed_attributes, checksummed, damaged_chunk, file_crc32c,
                                     is_leftover, is_zarr_checksum_error, missing_chunk)
from feature_cache.locks import LOCK_FILE, LockHeld, lock_file, lock_mode
from feature_cache.provenance import (ExtractorProvenance, FeatureKind, FeatureProvenance, FeatureSpec, GroupInfo,
                                      StoreProvenance, config_differences, normalized, upgrade_attrs)
from feature_cache.raw_chunks import RawChunks

__all__ = ["FeatureStore", "FeatureInfo", "Damage", "ProvenanceMismatchError", "StoreLockedError", "store_lock",
           "config_differences", "CHUNK_ROWS", "FORMAT_VERSION", "ROW_COLUMNS", "FLAG_COLUMNS"]

FORMAT_VERSION = 3  # 3: chunk checksums, crc32c done markers, attribute digests (feature_cache/integrity.py)
READABLE_FORMATS = (2, 3)
ROW_COLUMNS = {"key": str, "sha256": str, "label": "int8", "generator": "int16", "format": str,
               "jpeg_quality": "int16", "width": "int32", "height": "int32", "path": str}
FLAG_COLUMNS = ("non_finite", "underflow")
_ROW_FILL = {"label": -1, "generator": -1, "jpeg_quality": -1, "width": 0, "height": 0}
CHUNK_ROWS = 32  # rows per inner chunk of a feature array: the phase-2 reader's default block (block_rows)
_ROWS_CHECKSUMS = "rows.checksums.json"
_LOCK = ".lock"
_T = TypeVar("_T")
_LOCKS = (_LOCK, LOCK_FILE)  # kept when a half-made store is wiped


class ProvenanceMismatchError(ValueError):
    """A store exists but was made with a different configuration or other data than the one requested."""


class StoreLockedError(ValueError):
    """Another run is creating or growing the store."""


@dataclass(frozen=True)
class Damage:
    """One damaged file: which group (or `rows`) and tar it belongs to (None: every tar), and what is wrong."""

    group: str
    tar: str | None
    file: str
    problem: str

    def __str__(self) -> str:
        return f"{self.group} {self.tar or 'all tars'}: {self.file} {self.problem}"


@dataclass(frozen=True)
class FeatureInfo:
    """Where a feature lives and how it is stored."""

    group: str
    shape: tuple[int, ...]
    dtype: str  # stored dtype name (codecs.DTYPES)
    codec: str
    kind: FeatureKind  # as the map registry declared it (provenance.FeatureKind)

    @property
    def storage_dtype(self) -> np.dtype:
        return storage_dtype(self.dtype)

    @property
    def has_scale(self) -> bool:
        return has_scale(self.dtype)


@contextmanager
def store_lock(path: str | Path) -> Iterator[None]:
    """Exclusive, non-blocking lock on `path/.lock`; the loser gets one line naming the holder's pid.

    FEATURE_STORE_LOCK=file: the atomic lock file of `feature_cache.locks` instead, for shared filesystems
    whose flock does not hold between hosts (docs/cluster.md)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"feature store {path}: is a file, not a store directory; choose another --store")
    path.mkdir(parents=True, exist_ok=True)
    if lock_mode() == "file":
        try:
            with lock_file(path):
                yield
        except LockHeld as held:
            raise StoreLockedError(f"feature store {path} is being created/grown by another run "
                                   f"(lock held by {held.holder})") from None
        return
    handle = (path / _LOCK).open("a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise StoreLockedError(f"feature store {path} is being created/grown by another run "
                                   f"(lock held by pid {holder})") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        handle.close()  # closing releases the flock


def _inner_rows(shard_size: int) -> int:
    """Rows per inner chunk: the largest divisor of the shard size within CHUNK_ROWS (chunks tile each tar)."""
    return max(d for d in range(1, min(CHUNK_ROWS, shard_size) + 1) if shard_size % d == 0)


def _chunk_file(array: str, index: int, ndim: int) -> str:
    """Relative path of the chunk (or shard) file `index` along the sample axis of an array."""
    return "/".join([array, "c", str(index), *["0"] * (ndim - 1)])


def _file_record(path: Path, store_format: int) -> dict[str, Any]:
    """Size and digest of a file after fsync (so a done marker never points at data still in flight): crc32c from
    format 3 on (checked at reading speed), sha256 in format 2."""
    key = "crc32c" if store_format >= CHECKSUMMED_FORMAT else "sha256"
    if not path.exists():
        return {"bytes": 0, key: None}
    with path.open("rb") as f:
        os.fsync(f.fileno())
    return {"bytes": path.stat().st_size, key: file_crc32c(path) if key == "crc32c" else file_sha256(path)}


def _write_atomically(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as f:
        json.dump(payload, f, indent=0, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _file_problem(path: Path, record: Mapping[str, Any], checksums: bool) -> str | None:
    """What is wrong with one recorded file, or None."""
    key = "crc32c" if "crc32c" in record else "sha256"
    if record[key] is None:
        return "present but recorded as fill value (absent)" if path.exists() else None
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != record["bytes"]:
        return f"size {size} != recorded {record['bytes']} (truncated or replaced)"
    if checksums and (file_crc32c(path) if key == "crc32c" else file_sha256(path)) != record[key]:
        return f"{key} mismatch (bytes changed)"
    return None


def _check_tars(tars: Sequence[Mapping[str, Any]]) -> int:
    """The common shard size S, after checking the tars tile rows 0..n-1 as the contract says."""
    if not tars:
        raise ValueError("feature store: the shard table is empty")
    size, expected_first = int(tars[0]["num_samples"]), 0
    for index, tar in enumerate(tars):
        first, count = int(tar["first_row"]), int(tar["num_samples"])
        is_last = index == len(tars) - 1
        if first != expected_first or count <= 0 or (count != size if not is_last else count > size):
            raise ValueError(f"feature store: shard table entry {tar['name']} (first_row {first}, "
                             f"num_samples {count}) breaks the layout rows [k*{size}, k*{size}+n_k)")
        expected_first += count
    return size


class FeatureStore:
    """A format-2 store: `create` (under `store_lock`) or `open`, then `add_group`/`write_tar` or read."""

    def __init__(self, path: Path, root: zarr.Group) -> None:
        self.path = path
        self._root = root
        attrs = upgrade_attrs(root.attrs.asdict())  # older stores' attrs in today's shape
        self.format = int(attrs["feature_store"]["format"])
        self.provenance = StoreProvenance.from_attrs(attrs["provenance"])
        self.groups: dict[str, GroupInfo] = {g: GroupInfo.from_attrs(v) for g, v in attrs.get("groups", {}).items()}
        self.generator_names: list[str] = list(attrs["generator_names"])
        self._rejected_inputs: list[dict[str, str]] = list(attrs.get("rejected_inputs", []))
        self.shard_size = _check_tars(self.shard_table)
        self._arrays: dict[str, zarr.Array] = {}
        self._records: dict[tuple[str, int], dict[str, Any]] = {}  # files records of rows/ and of done tars
        if attrs["feature_store"].get("complete"):
            changed = self.changed_attributes()
            if changed:
                raise ValueError(f"feature store {path}: {changed[0]} changed since it was written (its sha256 in "
                                 f"{DIGESTS_ATTR} no longer matches), so its rows' meaning cannot be trusted; restore "
                                 "the store's zarr.json files or recompute it with precompute into a new path")

    # ---- creation, opening, growing --------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | Path, *, provenance: StoreProvenance, rows: Mapping[str, Sequence[Any]],
               generator_names: Sequence[str], rejected: Sequence[Mapping[str, str]] = (),
               format_version: int = FORMAT_VERSION) -> FeatureStore:
        """Write a new store's rows/ and attrs (hold `store_lock(path)`); an incomplete one is wiped first.
        `format_version` 2 writes the older layout (no chunk checksums): only to compare the two."""
        path = Path(path)
        if (path / "zarr.json").exists():
            if cls._marker(path).get("complete"):
                raise ValueError(f"feature store {path}: already exists (open it instead)")
        elif any(p.name not in _LOCKS and not is_leftover(p.name) for p in path.iterdir()):
            raise ValueError(f"feature store {path}: the directory exists and is not a feature store; "
                             "choose another path")
        for entry in path.iterdir():  # a creation killed halfway (even in its first write): start over, keep the lock
            if entry.name not in _LOCKS:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        _check_tars(provenance.dataset.tars)
        if format_version not in READABLE_FORMATS:
            raise ValueError(f"feature store {path}: cannot write format {format_version} ({READABLE_FORMATS})")
        root = zarr.open_group(path, mode="a")
        root.attrs.update(normalized({"feature_store": {"format": format_version, "complete": False},
                                      "provenance": provenance.to_attrs(), "groups": {},
                                      "generator_names": list(generator_names),
                                      "rejected_inputs": [{"path": r["path"], "reason": r["reason"]}
                                                          for r in rejected]}))
        store = cls(path, root)
        store.write_rows(rows)
        store._seal(feature_store={"format": format_version, "complete": True})  # one write: complete and sealed
        return store

    @staticmethod
    def _marker(path: Path) -> dict[str, Any]:
        return zarr.open_group(path, mode="r").attrs.get("feature_store", {})

    @classmethod
    def exists(cls, path: str | Path) -> bool:
        """Whether `path` holds a store whose creation finished (any format)."""
        path = Path(path)
        return (path / "zarr.json").is_file() and bool(cls._marker(path).get("complete"))

    @classmethod
    def open(cls, path: str | Path, writable: bool = False) -> FeatureStore:
        """Open a complete format-2 store; format 1 is refused with what to do."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise ValueError(f"feature store {path}: is a file, not a store directory")
        if not (path / "zarr.json").is_file():
            raise FileNotFoundError(f"feature store {path}: no complete feature store there "
                                    "(run `python -m cli precompute` with this path as --store)")
        marker = cls._marker(path)
        if marker.get("format") == 1:
            raise ValueError(f"feature store {path} is format 1 (noise keyed by row number); recompute it with "
                             "python -m cli precompute into a new path")
        if marker.get("format") not in READABLE_FORMATS:
            raise ValueError(f"feature store {path}: unknown format {marker.get('format')!r} (this code reads "
                             f"formats {', '.join(map(str, READABLE_FORMATS))})")
        if not marker.get("complete"):
            raise FileNotFoundError(f"feature store {path}: its creation did not finish (rerun precompute)")
        return cls(path, zarr.open_group(path, mode="r+" if writable else "r"))

    def write_rows(self, rows: Mapping[str, Sequence[Any]]) -> None:
        """(Re)write every rows/ array from the manifest's columns, then record their checksums."""
        missing = sorted(set(ROW_COLUMNS) - set(rows))
        if missing:
            raise ValueError(f"feature store {self.path}: row columns {missing} are missing")
        group = self._root.require_group("rows")
        for name, dtype in ROW_COLUMNS.items():
            values = np.asarray(list(rows[name]), dtype=dtype)
            if len(values) != self.num_rows:
                raise ValueError(f"feature store {self.path}: row column {name} has {len(values)} values for "
                                 f"{self.num_rows} rows")
            kwargs = {} if dtype is str else {"fill_value": _ROW_FILL.get(name, 0)}
            dimensions, attributes = describe.row_column(name, self.generator_names)
            array = group.create_array(name, shape=(self.num_rows,), chunks=(self.shard_size,), dtype=dtype,
                                       overwrite=True, dimension_names=dimensions, attributes=attributes, **kwargs,
                                       **self._compressors(ZstdCodec(level=0)))
            array[:] = values
        self._arrays = {}
        files = ["rows/zarr.json"] + [f"rows/{name}/zarr.json" for name in ROW_COLUMNS]
        files += [_chunk_file(f"rows/{name}", k, 1) for name in ROW_COLUMNS for k in range(len(self.shard_table))]
        _write_atomically(self.path / _ROWS_CHECKSUMS, {rel: _file_record(self.path / rel, self.format) for rel in files})
        self._records = {}

    def add_group(self, features: Mapping[str, FeatureSpec], extractor: ExtractorProvenance) -> str:
        """A new feature group (hold the lock): preallocate its arrays, record it in attrs; returns its name."""
        clash = sorted(set(features) & set(self.feature_names))
        if clash:
            raise ValueError(f"feature store {self.path}: features {clash} are already in group "
                             f"{self.group_of(clash[0])}")
        if set(features) != set(extractor.maps):
            raise ValueError(f"feature store {self.path}: the extractor provenance covers {sorted(extractor.maps)}, "
                             f"the new group holds {sorted(features)}")
        name = f"g{len(self.groups)}"
        info = GroupInfo(dict(features), extractor)
        self._create_group_arrays(name, info)
        self.groups[name] = info
        self._seal(groups={g: i.to_attrs() for g, i in self.groups.items()})  # one write: the group and its digest
        return name

    def _create_group_arrays(self, group: str, info: GroupInfo, only: set[str] | None = None) -> None:
        """Preallocate a group's arrays (or just `only`, e.g. one whose metadata was lost), overwriting."""
        zgroup = self._root.require_group(group)
        n, size = self.num_rows, self.shard_size
        for feature, spec in info.features.items():
            dtype = storage_dtype(spec.dtype)
            arrays = {feature: (spec.shape, dtype, compressor(spec.codec, dtype.itemsize),
                                describe.feature(feature, spec))}
            if has_scale(spec.dtype):
                arrays[f"{feature}__scale"] = ((scale_channels(spec.shape),), np.dtype("float32"),
                                               compressor("zstd", 4), describe.scale(feature, spec))
            for name, (shape, array_dtype, codec, (dimensions, attributes)) in arrays.items():
                if only is None or name in only:
                    zgroup.create_array(name, shape=(n, *shape), dtype=array_dtype, fill_value=0, overwrite=True,
                                        chunks=(_inner_rows(size), *shape),
                                        shards=(size, *shape), dimension_names=dimensions, attributes=attributes,
                                        **self._compressors(codec))
        if only is None or "error" in only:
            dimensions, attributes = describe.error()
            zgroup.create_array("error", shape=(n,), chunks=(size,), dtype=str, overwrite=True,
                                dimension_names=dimensions, attributes=attributes,
                                **self._compressors(ZstdCodec(level=0)))
        if only is None or "flags" in only:
            dimensions, attributes = describe.flags(FLAG_COLUMNS)
            zgroup.create_array("flags", shape=(n, len(FLAG_COLUMNS)), chunks=(size, len(FLAG_COLUMNS)),
                                dtype="int32", fill_value=0, overwrite=True, dimension_names=dimensions,
                                attributes=attributes, **self._compressors(ZstdCodec(level=0)))
        self._arrays = {}

    def _compressors(self, codec: Any) -> dict[str, Any]:
        """`compressors=` of a new array: the codec, then (format 3) the chunk's crc32c; format 2 keeps its old
        arrays' codecs (zarr's default where `codec` is zstd level 0), so a grown format-2 store stays one format."""
        if self.format >= CHECKSUMMED_FORMAT:
            return {"compressors": checksummed(codec)}
        return {"compressors": codec} if not isinstance(codec, ZstdCodec) else {}

    # ---- integrity: attribute digests, written chunks ---------------------------------------------------------

    def _node_attributes(self) -> dict[str, dict[str, Any]]:
        """Own attributes of rows/, its arrays, each group and its arrays (from their zarr.json); a node whose
        metadata is lost is left out (`verify` reports it and a precompute rerun recreates it)."""
        nodes = ["rows", *(f"rows/{column}" for column in ROW_COLUMNS)]
        for group in self.groups:
            nodes += [group, *(f"{group}/{name}" for name in self._group_arrays(group))]
        attributes = {}
        for node in nodes:
            metadata = self.path / node / "zarr.json"
            if metadata.is_file():
                attributes[node] = json.loads(metadata.read_text()).get("attributes", {})
        return attributes

    def _seal(self, **updates: Any) -> None:
        """Write root attributes `updates` together with the digests of every attribute (format 3; hold the lock)."""
        updates = json.loads(json.dumps(normalized(updates)))  # digested as read back
        if self.format >= CHECKSUMMED_FORMAT:
            updates[DIGESTS_ATTR] = attribute_digests({**self._root.attrs.asdict(), **updates}, self._node_attributes())
        self._root.attrs.update(updates)

    def changed_attributes(self) -> list[str]:
        """Attributes whose digest no longer matches the one written with them (format 3), e.g. `attribute
        generator_names`; a node whose metadata is lost is not compared (it is damage, repaired by precompute)."""
        if self.format < CHECKSUMMED_FORMAT:
            return []
        attrs = self._root.attrs.asdict()
        if DIGESTS_ATTR not in attrs:
            return [f"attribute {DIGESTS_ATTR} (removed)"]
        nodes = self._node_attributes()
        recorded = {k: v for k, v in attrs[DIGESTS_ATTR].items() if not k.endswith("/") or k[:-1] in nodes}
        return changed_attributes(recorded, attribute_digests(attrs, nodes))

    def _files_record(self, group: str, index: int) -> dict[str, Any] | None:
        """{file: {bytes, digest}} of rows/ (`group` "rows") or of tar `index` of a group; None: tar not done."""
        key = (group, -1 if group == "rows" else index)
        if key not in self._records:
            path = (self.path / _ROWS_CHECKSUMS if group == "rows"
                    else self._marker_path(group, self.shard_table[index]["name"]))
            try:
                record = json.loads(path.read_text())
            except FileNotFoundError:
                return None  # not done (yet): its files are legitimately absent
            except ValueError:
                raise ValueError(f"feature store {self.path}: {path.relative_to(self.path)} is unreadable; rerun the "
                                 "same `python -m cli precompute` command to recompute it") from None
            self._records[key] = record if group == "rows" else record["files"]
        return self._records[key]

    def chunk_written(self, array: str, index: int) -> bool:
        """Whether chunk file `index` (along rows) of array `array` (e.g. `g0/deu`) was written: its tar is done (rows/:
        created) and its record does not say "equal to the fill value, not stored". A missing written file is damage."""
        record = self._files_record(array.split("/")[0], index)
        ndim = 1 + len(self._array(array).shape[1:])
        return record is not None and bool(record.get(_chunk_file(array, index, ndim), {}).get("bytes"))

    def _checked_read(self, array: str, start: int, stop: int, read: Callable[[zarr.Array], _T]) -> _T:
        """`read(zarr array)` of rows [start, stop) of `array`, refusing what Zarr would return as fill values or
        raise as a checksum error: a missing written chunk file, a chunk whose crc32c fails (one line each)."""
        zarray = self._array(array)
        per_file = int((zarray.shards or zarray.chunks)[0])
        for index in range(start // per_file, (stop - 1) // per_file + 1 if stop > start else 0):
            file = _chunk_file(array, index, zarray.ndim)
            if not (self.path / file).is_file() and self.chunk_written(array, index):
                raise ValueError(missing_chunk(self.path, array, file,
                                               (index * per_file, min((index + 1) * per_file, self.num_rows))))
        try:
            return read(zarray)
        except ValueError as error:
            if not is_zarr_checksum_error(error):
                raise
            raise ValueError(damaged_chunk(self.path, array, self._bad_chunk(array, zarray, start, stop))) from None

    def _bad_chunk(self, array: str, zarray: zarr.Array, start: int, stop: int) -> str:
        """Which chunk of rows [start, stop) fails its checksum, found by reading them one at a time."""
        per_chunk, per_file = int(zarray.chunks[0]), int((zarray.shards or zarray.chunks)[0])
        for chunk in range(start // per_chunk, (stop - 1) // per_chunk + 1):
            lo, hi = chunk * per_chunk, min((chunk + 1) * per_chunk, self.num_rows)
            try:
                zarray[lo:hi]
            except ValueError as error:
                if not is_zarr_checksum_error(error):
                    raise
                file = _chunk_file(array, lo // per_file, zarray.ndim)
                if zarray.shards:  # the same words as RawChunks: shard file, inner chunk counted within it
                    return f"shard file {file} inner chunk {(lo % per_file) // per_chunk} (rows {lo}..{hi - 1})"
                return f"chunk file {file} (rows {lo}..{hi - 1})"
        return f"rows {start}..{stop - 1}"

    def raw_reader(self, name: str) -> RawChunks | None:
        """The byte-range reader of a feature (or `NAME__scale`), knowing which shard files were written (a missing
        one is an error); None when its layout is not one RawChunks reads (read through `read` then)."""
        array = f"{self.group_of(name.removesuffix('__scale'))}/{name}"
        return RawChunks.of(self.path / array, written=lambda shard: self.chunk_written(array, shard))

    def _group_arrays(self, group: str) -> list[str]:
        """Array names of a group (features, their scales, error, flags)."""
        return [name for name, _, _ in self.tar_array_shapes(group)] + ["error", "flags"]

    # ---- layout ----------------------------------------------------------------------------------------------

    @property
    def dataset(self):  # noqa: ANN201  (DatasetProvenance)
        return self.provenance.dataset

    @property
    def pixels(self):  # noqa: ANN201  (PixelProvenance)
        return self.provenance.pixels

    @property
    def shard_table(self) -> list[dict[str, Any]]:
        """The tars: name, first_row, num_samples (plus bytes and mtime_ns when the store was made)."""
        return self.provenance.dataset.tars

    @property
    def num_rows(self) -> int:
        last = self.shard_table[-1]
        return int(last["first_row"]) + int(last["num_samples"])

    @property
    def feature_names(self) -> list[str]:
        return [name for info in self.groups.values() for name in info.features]

    def group_of(self, name: str) -> str:
        for group, info in self.groups.items():
            if name in info.features:
                return group
        raise KeyError(f"feature store {self.path}: no feature {name!r} (features: {', '.join(self.feature_names)})")

    def feature_info(self, name: str) -> FeatureInfo:
        group = self.group_of(name)
        spec = self.groups[group].features[name]
        return FeatureInfo(group, spec.shape, spec.dtype, spec.codec, spec.kind)

    def feature_provenance(self, names: Sequence[str]) -> FeatureProvenance:
        """These features' full provenance: the store's, and each one's stored form and extractor settings (what a
        checkpoint records, and what `test` compares it with)."""
        for name in names:
            self.group_of(name)  # one clear error for a feature the store lacks
        return FeatureProvenance.of_store(self.provenance, self.groups, list(names))

    def tar_rows(self, index: int) -> tuple[int, int]:
        """Row range [start, stop) of tar `index`."""
        if not 0 <= index < len(self.shard_table):
            raise IndexError(f"feature store {self.path}: tar index {index} outside 0..{len(self.shard_table) - 1}")
        tar = self.shard_table[index]
        return int(tar["first_row"]), int(tar["first_row"]) + int(tar["num_samples"])

    def _array(self, rel: str) -> zarr.Array:
        if rel not in self._arrays:
            try:
                self._arrays[rel] = self._root[rel]
            except (KeyError, FileNotFoundError):
                raise KeyError(f"feature store {self.path}: array {rel} is missing (run `python -m cli verify "
                               f"{self.path}`; a precompute rerun repairs it)") from None
        return self._arrays[rel]

    def _feature_array(self, name: str) -> str:
        """The array path of `name` or `name__scale` of any group."""
        feature = name.removesuffix("__scale")
        if name != feature and not self.feature_info(feature).has_scale:
            raise KeyError(f"feature store {self.path}: feature {feature} has no scale (dtype "
                           f"{self.feature_info(feature).dtype})")
        return f"{self.group_of(feature)}/{name}"

    # ---- reads -----------------------------------------------------------------------------------------------

    def read(self, name: str, start: int = 0, stop: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, stop) of a feature (or `NAME__scale`) in its stored dtype; whole tars decode fastest.

        `out` (C-contiguous, the rows' shape and storage dtype) receives the rows instead of a new array: a
        reader that reuses its buffers avoids page-faulting fresh memory on every read."""
        stop = self.num_rows if stop is None else stop
        if out is None:
            return self._checked_read(self._feature_array(name), start, stop, lambda array: array[start:stop])
        self._checked_read(self._feature_array(name), start, stop, lambda array: array.get_basic_selection(
            slice(start, stop), out=NDBuffer.from_numpy_array(out)))
        return out

    def chunk_rows(self, name: str) -> int:
        """Rows per inner chunk of a feature (or `NAME__scale`), from its Zarr metadata (older stores differ)."""
        return int(self._array(self._feature_array(name)).chunks[0])

    def read_rows(self, name: str, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Sorted rows of a feature (or `NAME__scale`), one contiguous read per tar they fall in."""
        rows = np.asarray(rows, dtype=np.int64)
        path = self._feature_array(name)
        array = self._array(path)
        if rows.size == 0:
            return np.zeros((0, *array.shape[1:]), dtype=array.dtype)
        if (np.diff(rows) < 0).any() or rows[0] < 0 or rows[-1] >= self.num_rows:
            raise ValueError(f"feature store {self.path}: read_rows needs sorted rows within 0..{self.num_rows - 1}")
        tars = rows // self.shard_size
        parts = []
        for tar in np.unique(tars):
            block = rows[tars == tar]
            lo = int(block[0])
            hi = int(block[-1]) + 1
            parts.append(self._checked_read(path, lo, hi, lambda array: array[lo:hi])[block - lo])
        return np.concatenate(parts)

    def rows(self, column: str) -> np.ndarray:
        """A rows/ column (key, sha256, label, generator, format, jpeg_quality, width, height, path) for every row."""
        if column not in ROW_COLUMNS:
            raise KeyError(f"feature store {self.path}: no row column {column!r} (columns: {', '.join(ROW_COLUMNS)})")
        if column == "path" and not (self.path / "rows" / "path" / "zarr.json").is_file():
            raise KeyError(f"feature store {self.path}: written before image paths were stored (no rows/path); "
                           "the shard directory's manifest.csv has them")
        return self._checked_read(f"rows/{column}", 0, self.num_rows, lambda array: array[:])

    def _group_name(self, group_or_feature: str) -> str:
        return group_or_feature if group_or_feature in self.groups else self.group_of(group_or_feature)

    def errors(self, group_or_feature: str) -> np.ndarray:
        """Per-row decode errors ("" = fine) of a group (or of the group holding a feature)."""
        return self._checked_read(f"{self._group_name(group_or_feature)}/error", 0, self.num_rows, lambda array: array[:])

    def flags(self, group_or_feature: str) -> np.ndarray:
        """(n, 2) int32 per row: non-finite values, underflowed values (FLAG_COLUMNS)."""
        return self._checked_read(f"{self._group_name(group_or_feature)}/flags", 0, self.num_rows, lambda array: array[:])

    def rejected(self) -> list[dict[str, Any]]:
        """Converter rejects ({path, reason}) then rows that failed in phase 1 ({key, row, reason})."""
        records: list[dict[str, Any]] = [dict(r) for r in self._rejected_inputs]
        reasons: dict[int, str] = {}
        for group in self.groups:
            errors = self.errors(group)
            for row in np.flatnonzero(errors != ""):
                reasons.setdefault(int(row), str(errors[row]))
        if reasons:
            keys = self.rows("key")
            records += [{"key": str(keys[row]), "row": row, "reason": reason} for row, reason in sorted(reasons.items())]
        return records

    # ---- tars: done markers, writing, integrity ---------------------------------------------------------------

    def _marker_path(self, group: str, tar: str) -> Path:
        return self.path / group / "done" / f"{tar}.json"

    def done_tars(self, group: str) -> set[str]:
        """Tars of `group` whose done marker exists (read fresh: other processes write them)."""
        return {t["name"] for t in self.shard_table if self._marker_path(group, t["name"]).is_file()}

    def incomplete_groups(self) -> list[str]:
        return [g for g in self.groups if len(self.done_tars(g)) < len(self.shard_table)]

    def tar_files(self, group: str, index: int) -> list[str]:
        """Relative paths of the files a tar owns in a group."""
        ndims = {name: 1 + len(shape) for name, shape, _ in self.tar_array_shapes(group)}
        ndims.update(error=1, flags=2)
        return [_chunk_file(f"{group}/{name}", index, ndim) for name, ndim in ndims.items()]

    def write_tar(self, group: str, index: int, values: Mapping[str, np.ndarray], errors: Sequence[str],
                  flags: np.ndarray) -> None:
        """Write every row of tar `index` in `group` (whole shard files only), then its done marker.

        `values` holds each feature in its stored dtype, plus `NAME__scale` for int8_rowscale features.
        """
        start, stop = self.tar_rows(index)
        count, tar = stop - start, self.shard_table[index]["name"]
        expected = {name: ((count, *shape), dtype) for name, shape, dtype in self.tar_array_shapes(group)}
        if set(values) != set(expected):
            raise ValueError(f"feature store {self.path}: tar {tar} of {group} got arrays {sorted(values)}, "
                             f"expected {sorted(expected)}")
        for name, (shape, dtype) in expected.items():
            if tuple(values[name].shape) != shape or values[name].dtype != dtype:
                raise ValueError(f"feature store {self.path}: tar {tar} array {name} is {values[name].dtype} "
                                 f"{tuple(values[name].shape)}, expected {dtype} {shape}")
        if len(errors) != count or tuple(flags.shape) != (count, len(FLAG_COLUMNS)):
            raise ValueError(f"feature store {self.path}: tar {tar} got {len(errors)} errors and flags "
                             f"{tuple(flags.shape)} for {count} rows")
        for name, array in values.items():
            self._array(f"{group}/{name}")[start:stop] = array
        self._array(f"{group}/error")[start:stop] = np.asarray(list(errors), dtype=str)
        self._array(f"{group}/flags")[start:stop] = flags.astype(np.int32)
        files = {rel: _file_record(self.path / rel, self.format) for rel in self.tar_files(group, index)}
        _write_atomically(self._marker_path(group, tar), {"rows": count, "files": files,
                                                          "flagged": int((flags.sum(axis=1) > 0).sum())})

    def tar_array_shapes(self, group: str) -> list[tuple[str, tuple[int, ...], np.dtype]]:
        """(array name, per-row shape, stored numpy dtype) of what `write_tar` takes for a group."""
        shapes = []
        for feature, spec in self.groups[group].features.items():
            shapes.append((feature, spec.shape, storage_dtype(spec.dtype)))
            if has_scale(spec.dtype):
                shapes.append((f"{feature}__scale", (scale_channels(spec.shape),), np.dtype("float32")))
        return shapes

    def verify(self, checksums: bool = False) -> list[Damage]:
        """Damage: changed attributes, presence and size of every recorded file (and its digest with `checksums`:
        crc32c, sha256 in format 2), files of a tar whose done marker is gone."""
        damage = [Damage("attrs", None, "zarr.json", f"{change} since it was written")
                  for change in self.changed_attributes()]
        tar_names = [t["name"] for t in self.shard_table]
        record_path = self.path / _ROWS_CHECKSUMS
        if not record_path.is_file():
            damage.append(Damage("rows", None, _ROWS_CHECKSUMS, "missing"))
        else:
            for rel, record in json.loads(record_path.read_text()).items():
                problem = _file_problem(self.path / rel, record, checksums)
                if problem:
                    tar = tar_names[int(rel.split("/")[3])] if "/c/" in rel else None
                    damage.append(Damage("rows", tar, rel, problem))
        for group in self.groups:
            for name in self._group_arrays(group):
                if not (self.path / group / name / "zarr.json").is_file():
                    damage.append(Damage(group, None, f"{group}/{name}/zarr.json", "missing (array metadata)"))
            for tar in self.done_tars(group):
                marker = self._marker_path(group, tar)
                try:
                    files = json.loads(marker.read_text())["files"]
                except (ValueError, KeyError):
                    damage.append(Damage(group, tar, str(marker.relative_to(self.path)), "unreadable done marker"))
                    continue
                for rel, record in files.items():
                    problem = _file_problem(self.path / rel, record, checksums)
                    if problem:
                        damage.append(Damage(group, tar, rel, problem))
            done = self.done_tars(group)
            for index, tar in enumerate(tar_names):
                if tar not in done and any((self.path / rel).exists() for rel in self.tar_files(group, index)):
                    damage.append(Damage(group, tar, str(self._marker_path(group, tar).relative_to(self.path)),
                                         "missing while the tar's files exist (deleted done marker?)"))
        return damage

    def drop_group(self, group: str) -> None:
        """Delete an incomplete group, its files and its entry (hold the lock): what a failed grow left behind
        (e.g. bound to a members file that turned out unusable), so a rerun can grow the store afresh. Only the
        newest group can go (group names are `g<count>`) and only while incomplete (a complete group is data)."""
        if group not in self.groups:
            raise ValueError(f"feature store {self.path}: no group {group!r} (groups: {', '.join(self.groups)})")
        if group not in self.incomplete_groups():
            raise ValueError(f"feature store {self.path}: group {group} is complete; only an incomplete group is dropped")
        if group != list(self.groups)[-1]:
            raise ValueError(f"feature store {self.path}: group {group} is not the newest group; drop "
                             f"{list(self.groups)[-1]} first")
        del self.groups[group]
        self._seal(groups={g: i.to_attrs() for g, i in self.groups.items()})  # forgotten first, then deleted
        shutil.rmtree(self.path / group, ignore_errors=True)
        self._arrays = {}
        self._records = {key: record for key, record in self._records.items() if key[0] != group}

    def drop_tars(self, group: str, tars: Sequence[str]) -> None:
        """Forget tars of a group (marker first, then their files) so a rerun recomputes them."""
        tar_names = [t["name"] for t in self.shard_table]
        for tar in tars:
            self._marker_path(group, tar).unlink(missing_ok=True)
            self._records.pop((group, tar_names.index(tar)), None)
            for rel in self.tar_files(group, [t["name"] for t in self.shard_table].index(tar)):
                (self.path / rel).unlink(missing_ok=True)

    def repair(self, damage: Sequence[Damage], rows: Mapping[str, Sequence[Any]] | None) -> list[str]:
        """Undo damage so a rerun recomputes it (hold the lock): rows/ rewritten from `rows`, damaged tars
        dropped, a group whose array metadata is gone recreated and dropped whole. Returns what was done."""
        actions: list[str] = []
        if any(d.group == "rows" for d in damage):
            if rows is None:
                raise ValueError(f"feature store {self.path}: rows/ is damaged and no manifest was given to rewrite it")
            self.write_rows(rows)
            actions.append("rows/ rewritten from the manifest")
        tar_names = [t["name"] for t in self.shard_table]
        for group in self.groups:
            lost = [d for d in damage if d.group == group and d.tar is None]
            if lost:
                self._create_group_arrays(group, self.groups[group],
                                          only={d.file.split("/")[1] for d in lost})
                self.drop_tars(group, tar_names)
                actions.append(f"{group}: arrays {sorted({d.file.split('/')[1] for d in lost})} recreated, "
                               "every tar to recompute")
                continue
            tars = sorted({d.tar for d in damage if d.group == group and d.tar is not None})
            if tars:
                self.drop_tars(group, tars)
                actions.append(f"{group}: tars {', '.join(tars)} to recompute")
        if actions:
            self._seal()  # recreated arrays have new metadata files: digest them
        return actions

    def summary(self) -> str:
        """Groups, done tars, flagged rows (phase 2 refuses rows with non-finite values), rejects."""
        lines = [f"feature store {self.path}: {self.num_rows} rows in {len(self.shard_table)} tars"]
        for group, info in self.groups.items():
            done = len(self.done_tars(group))
            flags = self.flags(group)
            line = (f"  {group} ({', '.join(info.features)}): {done}/{len(self.shard_table)} tars done, "
                    f"{int((flags[:, 0] > 0).sum())} rows with non-finite values")
            underflow = int((flags[:, 1] > 0).sum())
            if underflow:
                line += f", {underflow} rows with values that underflow their stored dtype"
            lines.append(line)
        lines.append(f"  {len(self.rejected())} rejected images recorded")
        return "\n".join(lines)
