"""A feature's inner chunks read straight from its Zarr shard files into the caller's row buffers.

Each tar of a feature is one Zarr v3 shard file (`sharding_indexed`, index at the end: an (offset, nbytes)
uint64 pair per inner chunk, then a crc32c). An inner chunk is the rows' little-endian bytes, either as
they are (codec `none`) or blosc-compressed (`lz4`, `zstd`). Reading a chunk's byte range with one
`preadv` that scatters it into the destination rows is one kernel copy from the page cache; Zarr's
own read copies each chunk out of the store and again into `out`, with ~0.5 ms of per-call overhead
(the reader was 3–5x slower with it, from the page cache and from cold disk: docs/phase2_reading.md).
Zarr stays the format: `RawChunks.of` returns None for any other layout (then the caller reads through
Zarr), and tests compare every value with Zarr's read.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import zarr
from numcodecs import CRC32C, blosc
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation
from zarr.storage import LocalStore

EMPTY = np.iinfo(np.uint64).max  # an index entry of a chunk Zarr did not write (all fill value)
IOV_MAX = os.sysconf("SC_IOV_MAX")


class RawChunks:
    """Rows of one sharded feature array read by byte range (see the module docstring). Not thread-safe:
    one reusable scratch buffer receives compressed chunks."""

    def __init__(self, array: zarr.Array, root: Path, compressed: bool) -> None:
        self.array, self.root, self.compressed = array, root, compressed
        self.shard_rows, self.chunk_rows = int(array.shards[0]), int(array.chunks[0])
        self.row_bytes = int(np.prod(array.shape[1:])) * array.dtype.itemsize
        self.fill = array.fill_value
        self._index: dict[int, np.ndarray] = {}
        self._scratch = np.empty(self.chunk_rows * self.row_bytes if compressed else 0, np.uint8)

    @classmethod
    def of(cls, path: str | Path) -> RawChunks | None:
        """The raw reader of the Zarr array at `path`, or None unless it is sharded along rows only (whole rows per
        shard and chunk), index at the end, bytes (little-endian) plus at most one blosc codec, on a local store."""
        array = zarr.open_array(str(path), mode="r")
        codecs = array.metadata.codecs
        if not (isinstance(array.store, LocalStore) and len(codecs) == 1 and isinstance(codecs[0], ShardingCodec)):
            return None
        sharding = codecs[0]
        inner = sharding.codecs
        layout_ok = (sharding.index_location == ShardingCodecIndexLocation.end
                     and [type(c) for c in sharding.index_codecs] == [BytesCodec, Crc32cCodec]
                     and isinstance(inner[0], BytesCodec)
                     and (array.dtype.itemsize == 1 or getattr(inner[0].endian, "value", None) == "little")
                     and (len(inner) == 1 or (len(inner) == 2 and isinstance(inner[1], BloscCodec)))
                     and tuple(array.shards[1:]) == tuple(array.shape[1:]) == tuple(array.chunks[1:])
                     and array.dtype.byteorder in "=|<" and sys.byteorder == "little")
        if not layout_ok:
            return None
        return cls(array, Path(array.store.root) / array.path, compressed=len(inner) == 2)

    def _file(self, shard: int) -> Path:
        return self.root / self.array.metadata.encode_chunk_key((shard, *[0] * (self.array.ndim - 1)))

    def _chunk_index(self, shard: int, fd: int) -> np.ndarray:
        """(chunks, 2) uint64 (offset, nbytes) of a shard file, read once and checked (crc32c, bounds)."""
        if shard not in self._index:
            chunks = self.shard_rows // self.chunk_rows  # the index covers the full shard shape, even the last one's
            size, index_bytes = os.fstat(fd).st_size, chunks * 16 + 4
            damaged = ValueError(f"{self._file(shard)}: damaged shard index (run `python -m cli verify` on the store)")
            if size < index_bytes:
                raise damaged
            try:
                index = np.frombuffer(CRC32C().decode(os.pread(fd, index_bytes, size - index_bytes)), "<u8")
            except RuntimeError:  # checksum mismatch
                raise damaged from None
            index = index.reshape(chunks, 2)
            written = index[index[:, 0] != EMPTY]
            if (written[:, 0] + written[:, 1] > size - index_bytes).any():
                raise damaged
            self._index[shard] = index
        return self._index[shard]

    def read(self, start: int, stop: int, rows: Sequence[np.ndarray]) -> None:
        """Rows [start, stop) into `rows`: one C-contiguous array per row, of the row's shape and the array's
        dtype (e.g. rows of a batch buffer in any order)."""
        if len(rows) != stop - start:
            raise ValueError(f"RawChunks.read: rows [{start}, {stop}) need {stop - start} targets, got {len(rows)}")
        for shard in range(start // self.shard_rows, (stop - 1) // self.shard_rows + 1):
            base = shard * self.shard_rows
            lo, hi = max(start, base), min(stop, base + self.shard_rows)
            self._read_shard(shard, lo - base, hi - base, rows[lo - start:hi - start])

    def _read_shard(self, shard: int, first: int, stop: int, rows: Sequence[np.ndarray]) -> None:
        """Rows [first, stop) of one shard (counted from its first row) into `rows`."""
        try:
            fd = os.open(self._file(shard), os.O_RDONLY)
        except FileNotFoundError:  # Zarr writes no file for a shard that is all fill value
            for row in rows:
                row[...] = self.fill
            return
        try:
            index = self._chunk_index(shard, fd)
            for chunk in range(first // self.chunk_rows, (stop - 1) // self.chunk_rows + 1):
                lo, hi = max(first, chunk * self.chunk_rows), min(stop, (chunk + 1) * self.chunk_rows)
                self._read_chunk(fd, shard, index[chunk], lo - chunk * self.chunk_rows, rows[lo - first:hi - first])
        finally:
            os.close(fd)

    def _read_chunk(self, fd: int, shard: int, entry: np.ndarray, skip: int, rows: Sequence[np.ndarray]) -> None:
        """Rows skip..skip+len(rows) of one inner chunk into `rows`."""
        offset, nbytes = int(entry[0]), int(entry[1])
        if offset == EMPTY:
            for row in rows:
                row[...] = self.fill
            return
        if self.compressed:
            data = os.pread(fd, nbytes, offset)
            chunk = self._scratch  # inner chunks are whole (Zarr pads a short last one to the chunk shape)
            blosc.decompress(data, chunk)
            for k, row in enumerate(rows):
                memoryview(row).cast("B")[:] = chunk[(skip + k) * self.row_bytes:(skip + k + 1) * self.row_bytes]
            return
        if nbytes != self.chunk_rows * self.row_bytes:
            raise ValueError(f"{self._file(shard)}: an uncompressed chunk of {nbytes} bytes, expected "
                             f"{self.chunk_rows * self.row_bytes} (run `python -m cli verify` on the store)")
        views = [memoryview(row).cast("B") for row in rows]
        position = offset + skip * self.row_bytes
        for first in range(0, len(views), IOV_MAX):
            part = views[first:first + IOV_MAX]
            expected = sum(len(v) for v in part)
            if os.preadv(fd, part, position) != expected:
                raise ValueError(f"{self._file(shard)}: short read at byte {position} (truncated shard file?)")
            position += expected
