"""A feature's inner chunks read straight from its Zarr shard files into the caller's row buffers.

Each tar of a feature is one Zarr v3 shard file (`sharding_indexed`, index at the end: an (offset, nbytes)
uint64 pair per inner chunk, then a crc32c). An inner chunk is the rows' little-endian bytes, either as
they are (codec `none`) or blosc-compressed (`lz4`, `zstd`), followed in format-3 stores by the crc32c of
those bytes (zarr's `crc32c` codec). Reading a chunk's byte range with one `preadv` that scatters it into the
destination rows is one kernel copy from the page cache; Zarr's own read copies each chunk out of the store
and again into `out`, with ~0.5 ms of per-call overhead (the reader was 3–5x slower with it, from the page
cache and from cold disk: docs/phase2_reading.md). Every chunk's crc32c is checked as Zarr would, by the reading
thread right after the read, while the chunk is still in the CPU's cache (a compressed chunk's before it is
decompressed: it is read into a reused buffer, checked, decoded and copied to its rows; an uncompressed one is
read straight into its rows and checked there, and so is a blosc chunk stored as it is, MEMCPYED, its 16-byte
header read beside the rows). A mismatch raises before `read` returns, so no row of a damaged chunk is handed
out. Parallel reads use one reader per thread (`SplitRows.read`'s lanes). A shard file that is missing although
its tar is done is an error, never fill values. Zarr stays the format: `RawChunks.of` returns None for any other
layout (then the caller reads through Zarr), and tests compare every value with Zarr's read.
"""

from __future__ import annotations

import os
import sys
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import zarr
from numcodecs import blosc
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation
from zarr.storage import LocalStore

from feature_cache.integrity import chunk_crc, damaged_chunk, missing_chunk, stored_crc

EMPTY = np.iinfo(np.uint64).max  # an index entry of a chunk Zarr did not write (all fill value)
IOV_MAX = os.sysconf("SC_IOV_MAX")
BLOSC_HEADER, BLOSC_MEMCPYED = 16, 0x02  # a blosc chunk's header bytes; its flag "stored uncompressed"


class RawChunks:
    """Rows of one sharded feature array read by byte range (see the module docstring). Not thread-safe: reused
    buffers receive compressed chunks and the rows of a checksummed chunk the caller did not ask for."""

    def __init__(self, array: zarr.Array, root: Path, compressed: bool, checksummed: bool,
                 written: Callable[[int], bool]) -> None:
        self.array, self.root, self.compressed, self.checksummed = array, root, compressed, checksummed
        self.written = written
        self.shard_rows, self.chunk_rows = int(array.shards[0]), int(array.chunks[0])
        self.row_bytes = int(np.prod(array.shape[1:])) * array.dtype.itemsize
        self.fill = array.fill_value
        self._index: dict[int, np.ndarray] = {}
        self._held: list = [None, -1]  # (shard, fd) of the open shard file, closed with the reader
        weakref.finalize(self, _close, self._held)
        # reused buffers, allocated on first use: a compressed chunk's bytes and its decoded rows (Zarr pads a short
        # last chunk); the rows of a checksummed chunk the caller did not ask for (the crc covers the whole chunk)
        self._packed = self._unpacked = self._spare = np.empty(0, np.uint8)
        self.store, self.name = root.parents[1], f"{root.parent.name}/{root.name}"  # STORE/GROUP/FEATURE

    @classmethod
    def of(cls, path: str | Path, written: Callable[[int], bool] = lambda shard: True) -> RawChunks | None:
        """The raw reader of the Zarr array at `path`, or None unless it is sharded along rows only (whole rows per
        shard and chunk), index at the end, bytes (little-endian) plus at most one blosc codec and a crc32c, on a
        local store. `written(shard)`: whether that shard's file was written (a missing one is then an error; an
        unwritten one, all fill value, reads as the fill value)."""
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
                     and [type(c) for c in inner[1:]] in ([], [BloscCodec], [Crc32cCodec], [BloscCodec, Crc32cCodec])
                     and tuple(array.shards[1:]) == tuple(array.shape[1:]) == tuple(array.chunks[1:])
                     and array.dtype.byteorder in "=|<" and sys.byteorder == "little")
        if not layout_ok:
            return None
        return cls(array, Path(array.store.root) / array.path, compressed=any(isinstance(c, BloscCodec) for c in inner),
                   checksummed=isinstance(inner[-1], Crc32cCodec), written=written)

    def _damaged(self, shard: int, where: str) -> ValueError:
        first = shard * self.shard_rows
        return ValueError(damaged_chunk(self.store, self.name, f"shard file {self._file(shard).relative_to(self.store)} "
                                        f"{where} (rows {first}..{min(first + self.shard_rows, self.array.shape[0]) - 1})"))

    def _file(self, shard: int) -> Path:
        return self.root / self.array.metadata.encode_chunk_key((shard, *[0] * (self.array.ndim - 1)))

    def _chunk_index(self, shard: int, fd: int) -> np.ndarray:
        """(chunks, 2) uint64 (offset, nbytes) of a shard file, read once and checked (crc32c, bounds)."""
        if shard not in self._index:
            chunks = self.shard_rows // self.chunk_rows  # the index covers the full shard shape, even the last one's
            size, index_bytes = os.fstat(fd).st_size, chunks * 16 + 4
            damaged = self._damaged(shard, "index")
            if size < index_bytes:
                raise damaged
            data = os.pread(fd, index_bytes, size - index_bytes)
            if chunk_crc([memoryview(data)[:-4]]) != stored_crc(data[-4:]):
                raise damaged
            index = np.frombuffer(data, "<u8", count=2 * chunks).reshape(chunks, 2)
            written = index[index[:, 0] != EMPTY]
            if (written[:, 0] + written[:, 1] > size - index_bytes).any():
                raise damaged
            self._index[shard] = index
        return self._index[shard]

    def read(self, start: int, stop: int, rows: Sequence[np.ndarray]) -> None:
        """Rows [start, stop) into `rows`: one C-contiguous array per row, of the row's shape and the array's
        dtype (e.g. rows of a batch buffer in any order). Raises on a checksum mismatch (the rows are then garbage)."""
        if len(rows) != stop - start:
            raise ValueError(f"RawChunks.read: rows [{start}, {stop}) need {stop - start} targets, got {len(rows)}")
        for shard in range(start // self.shard_rows, (stop - 1) // self.shard_rows + 1):
            base = shard * self.shard_rows
            lo, hi = max(start, base), min(stop, base + self.shard_rows)
            self._read_shard(shard, lo - base, hi - base, rows[lo - start:hi - start])

    def _read_shard(self, shard: int, first: int, stop: int, rows: Sequence[np.ndarray]) -> None:
        """Rows [first, stop) of one shard (counted from its first row) into `rows`."""
        try:
            fd = self._open(shard)
        except FileNotFoundError:
            if self.written(shard):
                start = shard * self.shard_rows
                raise ValueError(missing_chunk(self.store, self.name, str(self._file(shard).relative_to(self.store)),
                                               (start, min(start + self.shard_rows, self.array.shape[0])))) from None
            for row in rows:  # Zarr writes no file for a shard that is all fill value (recorded so by its tar)
                row[...] = self.fill
            return
        index = self._chunk_index(shard, fd)
        for chunk in range(first // self.chunk_rows, (stop - 1) // self.chunk_rows + 1):
            lo, hi = max(first, chunk * self.chunk_rows), min(stop, (chunk + 1) * self.chunk_rows)
            self._read_chunk(fd, shard, chunk, index[chunk], lo - chunk * self.chunk_rows, rows[lo - first:hi - first])

    def _open(self, shard: int) -> int:
        """The shard file's descriptor, kept open while reads stay in that shard (a window's sorted reads mostly do:
        one open per shard and window instead of one per chunk)."""
        if self._held[0] != shard:
            if self._held[1] >= 0:
                os.close(self._held[1])
            self._held[:] = [None, -1]
            self._held[:] = [shard, os.open(self._file(shard), os.O_RDONLY)]
        return self._held[1]

    def _read_chunk(self, fd: int, shard: int, chunk: int, entry: np.ndarray, skip: int,
                    rows: Sequence[np.ndarray]) -> None:
        """Rows skip..skip+len(rows) of one inner chunk into `rows`."""
        offset, nbytes = int(entry[0]), int(entry[1])
        if offset == EMPTY:
            for row in rows:
                row[...] = self.fill
            return
        first_row = shard * self.shard_rows + chunk * self.chunk_rows
        where = f"shard file {self._file(shard).relative_to(self.store)} inner chunk {chunk} " \
                f"(rows {first_row}..{min(first_row + self.chunk_rows, self.array.shape[0]) - 1})"
        crc, whole = (4 if self.checksummed else 0), self.chunk_rows * self.row_bytes
        if not self.compressed and nbytes != whole + crc:
            raise ValueError(damaged_chunk(self.store, self.name, f"{where}: {nbytes} bytes, expected {whole + crc}"))
        # blosc stores a chunk it cannot shrink as its header and the raw bytes (MEMCPYED): read those like an
        # uncompressed chunk, straight into the rows (float noise under lz4 does this; one copy instead of three)
        header = BLOSC_HEADER if self.compressed and nbytes == whole + BLOSC_HEADER + crc else 0
        if self.compressed and not header:  # checked before it is decompressed
            self._read_compressed(fd, offset, nbytes, crc, where, skip, rows)
            return
        head, tail = np.empty(header, np.uint8), np.empty(crc, np.uint8)
        views = [memoryview(row).cast("B") for row in rows]
        position = offset + header + skip * self.row_bytes
        if crc or header:  # the whole chunk is read (the crc covers it): rows not asked for go to a spare buffer
            spare = self._spare_rows(len(rows) < self.chunk_rows)
            stop = (skip + len(rows)) * self.row_bytes
            views = [memoryview(head), spare[:skip * self.row_bytes], *views, spare[stop:whole]]
            position = offset
        targets = [v for v in views if len(v)] + ([memoryview(tail)] if crc else [])
        for first in range(0, len(targets), IOV_MAX):
            part = targets[first:first + IOV_MAX]
            expected = sum(len(v) for v in part)
            if os.preadv(fd, part, position) != expected:
                raise ValueError(damaged_chunk(self.store, self.name, f"{where}: short read at byte {position} "
                                               "(truncated file?)"))
            position += expected
        if header and not (head[2] & BLOSC_MEMCPYED and int.from_bytes(head[4:8].tobytes(), "little") == whole):
            self._read_compressed(fd, offset, nbytes, crc, where, skip, rows)  # compressed after all: decode it
            return
        if crc and chunk_crc([v for v in views if len(v)]) != stored_crc(tail):
            raise ValueError(damaged_chunk(self.store, self.name, where))

    def _read_compressed(self, fd: int, offset: int, nbytes: int, crc: int, where: str, skip: int,
                         rows: Sequence[np.ndarray]) -> None:
        """One compressed chunk read into a reused buffer, checked, decoded, and its rows `skip..` copied to `rows`."""
        if len(self._packed) < nbytes:
            self._packed = np.empty(nbytes, np.uint8)
        if not len(self._unpacked):
            self._unpacked = np.empty(self.chunk_rows * self.row_bytes, np.uint8)
        data = memoryview(self._packed)[:nbytes]
        if os.preadv(fd, [data], offset) != nbytes:
            raise ValueError(damaged_chunk(self.store, self.name, f"{where}: short read (truncated file?)"))
        payload = data[:nbytes - crc]
        if crc and chunk_crc([payload]) != stored_crc(data[nbytes - crc:]):
            raise ValueError(damaged_chunk(self.store, self.name, where))
        blosc.decompress(payload, self._unpacked)
        chunk = self._unpacked.view(self.array.dtype).reshape(self.chunk_rows, *self.array.shape[1:])
        for k, row in enumerate(rows):
            np.copyto(row, chunk[skip + k])

    def _spare_rows(self, needed: bool) -> memoryview:
        """The reused buffer for a chunk's rows the caller did not ask for; empty when it asked for the whole chunk."""
        if not needed:
            return memoryview(b"")
        if not len(self._spare):
            self._spare = np.empty(self.chunk_rows * self.row_bytes, np.uint8)
        return memoryview(self._spare)


def _close(held: list) -> None:
    if held[1] >= 0:
        os.close(held[1])
        held[:] = [None, -1]
