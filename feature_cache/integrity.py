"""What makes a feature store refuse damaged bytes instead of reading them (store format 3).

- **Chunk checksums.** Every chunk of every array ends with a crc32c: zarr v3's `crc32c` codec, last in the
  chunk's codecs (`checksummed`); in a shard each inner chunk carries its own and the shard index its own. Zarr
  checks it on every read (`FeatureStore` turns its error into `damaged_chunk`'s one line); `RawChunks` checks
  the same bytes with the `crc32c` package (hardware CRC, ~2x zarr's google_crc32c) right after reading them.
- **Whole-file digests.** A done marker (and `rows.checksums.json`) records each file's size and crc32c
  (format 2: sha256), so `verify` checks a store at crc speed and also sees a file replaced by another valid one.
- **Attribute digests.** The attributes that give rows their meaning (root: generator names, provenance,
  groups, rejected inputs, ...; every array's and group's own) are digested into the root attribute
  `attrs_sha256` in the same write that changes them; `FeatureStore.open` and `verify` recompute them, so an
  edited `generator_names` is refused instead of silently relabelling the generators.
- **Leftovers.** A kill during a write leaves zarr's `NAME.<uuid>.partial` or our `.NAME.<pid>.tmp`; the next
  run that holds the lock removes them (`remove_leftovers`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import crc32c
import numpy as np
from zarr.codecs import BloscCodec, Crc32cCodec

__all__ = ["CHECKSUMMED_FORMAT", "DIGESTS_ATTR", "checksummed", "chunk_crc", "file_crc32c", "is_zarr_checksum_error",
           "damaged_chunk", "missing_chunk", "attribute_digests", "changed_attributes", "is_leftover",
           "remove_leftovers", "stored_crc"]

CHECKSUMMED_FORMAT = 3  # the first store format whose chunks carry a crc32c and whose attributes are digested
DIGESTS_ATTR = "attrs_sha256"
_ZARR_CHECKSUM_ERROR = "Stored and computed checksum do not match"  # zarr.codecs.crc32c_.Crc32cCodec's ValueError
_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")  # zarr.storage._local._atomic_write's temporary name
_REPAIR = "rerun the same `python -m cli precompute` command to recompute it"


def checksummed(compressor: BloscCodec | None) -> list[Any]:
    """The bytes-to-bytes codecs of a format-3 chunk: the compressor (if any), then the crc32c of its output."""
    return [*([compressor] if compressor is not None else []), Crc32cCodec()]


def chunk_crc(parts: Sequence[Any], value: int = 0) -> int:
    """crc32c of the concatenation of `parts` (buffers), computed part by part (rows scattered in memory)."""
    for part in parts:
        value = crc32c.crc32c(part, value)
    return value


def file_crc32c(path: Path, block: int = 8 << 20) -> int:
    """crc32c of a whole file, read in blocks into one reused buffer."""
    buffer = bytearray(block)
    view, value = memoryview(buffer), 0
    with path.open("rb", buffering=0) as f:
        while count := f.readinto(buffer):
            value = crc32c.crc32c(view[:count], value)
    return value


def is_zarr_checksum_error(error: BaseException) -> bool:
    return isinstance(error, ValueError) and str(error).startswith(_ZARR_CHECKSUM_ERROR)


def damaged_chunk(store: Path | str, array: str, where: str) -> str:
    """The one line a read that met a checksum mismatch raises."""
    return (f"feature store {store}: array {array} {where} fails its crc32c checksum (bytes changed on disk); "
            f"{_REPAIR}")


def missing_chunk(store: Path | str, array: str, file: str, rows: tuple[int, int]) -> str:
    """The one line a read of a chunk file that was written and is now gone raises (never fill values)."""
    return (f"feature store {store}: array {array} chunk file {file} (rows {rows[0]}..{rows[1] - 1}) is missing "
            f"although its tar is done (deleted?); {_REPAIR}")


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()).hexdigest()


def attribute_digests(root: Mapping[str, Any], nodes: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """sha256 of each root attribute (by name) and of each array's or group's attributes (by relative path)."""
    digests = {name: _digest(value) for name, value in root.items() if name != DIGESTS_ATTR}
    digests.update({f"{path}/": _digest(dict(attrs)) for path, attrs in nodes.items()})
    return digests


def changed_attributes(recorded: Mapping[str, str], current: Mapping[str, str]) -> list[str]:
    """What differs: `generator_names` (a root attribute), `attributes of rows/label` (an array's), added/removed."""
    names = sorted({*recorded, *current})

    def label(name: str) -> str:
        return f"attributes of {name.rstrip('/')}" if name.endswith("/") else f"attribute {name}"
    return [label(n) + ("" if n in recorded and n in current else " (added)" if n in current else " (removed)")
            for n in names if recorded.get(n) != current.get(n)]


def is_leftover(name: str) -> bool:
    """A temporary file of a write that was killed: zarr's `NAME.<uuid>.partial` or our `.NAME.<pid>.tmp`."""
    return bool(_PARTIAL.search(name)) or (name.startswith(".") and name.endswith(".tmp"))


def remove_leftovers(root: Path) -> list[str]:
    """Delete the leftovers of killed writes under `root` (hold the store's lock); returns their relative paths."""
    removed = []
    for directory, _, files in os.walk(root):
        for name in files:
            if is_leftover(name):
                path = Path(directory, name)
                path.unlink(missing_ok=True)
                removed.append(str(path.relative_to(root)))
    return sorted(removed)


def stored_crc(tail: bytes | np.ndarray) -> int:
    """The crc32c the codec appended (4 bytes, little-endian)."""
    return int.from_bytes(bytes(tail), "little")
