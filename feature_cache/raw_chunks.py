"""A feature's inner chunks read straight from its Zarr shard files into the caller's row buffers.

Each tar of a feature is one Zarr v3 shard file (`sharding_indexed`, index at the end: an (offset, nbytes)
uint64 pair per inner chunk, then a crc32c). An inner chunk is the rows' little-endian bytes, either as
they are (codec `none`) or blosc-compressed (`lz4`, `zstd`), followed in format-3 stores by the crc32c of
those bytes (zarr's `crc32c` codec). Reading a chunk's byte range with one `preadv` that scatters it into the
destination rows is one kernel copy from the page cache; Zarr's own read copies each chunk out of the store
and again into `out`, with ~0.5 ms of per-call overhead (the reader was 3–5x slower with it, from the page
cache and from cold disk: docs/phase2_reading.md). Every chunk's crc32c is checked as Zarr would: a
compressed chunk's before it is decompressed, both on the `ChecksumQueue`'s threads while the next chunk is read
(a compressed chunk is read into one of `DECODES` reused buffers, then checked, decoded and copied to its rows
there; an uncompressed one is read straight into its rows and checked there, and so is a blosc chunk stored as it
is, MEMCPYED, its 16-byte header read beside the rows); the caller calls `wait()` before using the rows. A shard
file that is missing although its tar is done is an error, never fill values. Zarr stays the format: `RawChunks.of` returns None for any other
layout (then the caller reads through Zarr), and tests compare every value with Zarr's read.
"""

from __future__ import annotations

import os
import sys
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import zarr
from numcodecs import blosc
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation
from zarr.storage import LocalStore

from feature_cache.integrity import ChecksumQueue, chunk_crc, damaged_chunk, missing_chunk, stored_crc

EMPTY = np.iinfo(np.uint64).max  # an index entry of a chunk Zarr did not write (all fill value)
IOV_MAX = os.sysconf("SC_IOV_MAX")
SPARES = 4  # buffers for the rows of a checksummed chunk the caller did not ask for, while their check is queued
BLOSC_HEADER, BLOSC_MEMCPYED = 16, 0x02  # a blosc chunk's header bytes; its flag "stored uncompressed"
DECODES = 4  # compressed chunks in flight: one being read while earlier ones are checked and decoded (bounds memory)


class RawChunks:
    """Rows of one sharded feature array read by byte range (see the module docstring). Not thread-safe: reused
    buffers receive compressed (or partly read checksummed) chunks."""

    def __init__(self, array: zarr.Array, root: Path, compressed: bool, checksummed: bool,
                 written: Callable[[int], bool], checks: ChecksumQueue) -> None:
        self.array, self.root, self.compressed, self.checksummed = array, root, compressed, checksummed
        self.written, self.checks = written, checks
        self.shard_rows, self.chunk_rows = int(array.shards[0]), int(array.chunks[0])
        self.row_bytes = int(np.prod(array.shape[1:])) * array.dtype.itemsize
        self.fill = array.fill_value
        self._index: dict[int, np.ndarray] = {}
        self._held: list = [None, -1]  # (shard, fd) of the open shard file, closed with the reader
        weakref.finalize(self, _close, self._held)
        # per slot: the compressed bytes, the decoded chunk, the decode in flight (allocated on first use)
        self._packed: list[np.ndarray] = []
        self._unpacked: list[np.ndarray] = []
        self._decoding: list[Future[None] | None] = []
        self._spares: list[np.ndarray] = []  # allocated on first use (a partial read of a whole-chunk read)
        self._spare_checks: list[Future[None] | None] = []
        self._spare_turn = self._decode_turn = 0  # next slot of each (counts reads; slots allocated in order)
        self.store, self.name = root.parents[1], f"{root.parent.name}/{root.name}"  # STORE/GROUP/FEATURE

    @classmethod
    def of(cls, path: str | Path, written: Callable[[int], bool] = lambda shard: True,
           checks: ChecksumQueue | None = None) -> RawChunks | None:
        """The raw reader of the Zarr array at `path`, or None unless it is sharded along rows only (whole rows per
        shard and chunk), index at the end, bytes (little-endian) plus at most one blosc codec and a crc32c, on a
        local store. `written(shard)`: whether that shard's file was written (a missing one is then an error; an
        unwritten one, all fill value, reads as the fill value). `checks`: where uncompressed chunks' checksums are
        verified (the caller's `wait()` raises a mismatch); by default a queue of the reader's own (`wait()`)."""
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
                   checksummed=isinstance(inner[-1], Crc32cCodec), written=written, checks=checks or ChecksumQueue())

    def wait(self) -> None:
        """Raise a checksum mismatch of a chunk read so far (checked on the queue's thread)."""
        self.checks.wait()

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
        dtype (e.g. rows of a batch buffer in any order). Call `wait()` before using them (checksums)."""
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
        one open per shard and window instead of one per chunk; every syscall hands the GIL to the check threads)."""
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
        if self.compressed and not header:  # checked before it is decompressed, both on the queue's threads
            self._read_compressed(fd, offset, nbytes, crc, where, skip, rows)
            return
        head, tail = np.empty(header, np.uint8), np.empty(crc, np.uint8)
        views = [memoryview(row).cast("B") for row in rows]
        position = offset + header + skip * self.row_bytes
        slot = None
        if crc or header:  # the whole chunk is read (the crc covers it): rows not asked for go to a spare buffer
            spare, slot = self._spare(len(rows) < self.chunk_rows)
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
        if crc:  # checked on the queue's thread while the caller reads on; `wait()` raises a mismatch
            future = self.checks.submit([v for v in views if len(v)], stored_crc(tail),
                                        damaged_chunk(self.store, self.name, where))
            if slot is not None:
                self._spare_checks[slot] = future

    def _read_compressed(self, fd: int, offset: int, nbytes: int, crc: int, where: str, skip: int,
                         rows: Sequence[np.ndarray]) -> None:
        """One compressed chunk read into the next of DECODES reused buffers (once that buffer's earlier decode is
        done), then checked, decoded and copied to `rows` on the queue's threads while the caller reads on."""
        slot = self._decode_turn % DECODES
        self._decode_turn += 1
        if len(self._packed) <= slot:
            self._packed.append(np.empty(nbytes, np.uint8))
            self._unpacked.append(np.empty(self.chunk_rows * self.row_bytes, np.uint8))  # Zarr pads a short last chunk
            self._decoding.append(None)
        previous, self._decoding[slot] = self._decoding[slot], None
        if previous is not None:
            previous.result()
        if len(self._packed[slot]) < nbytes:
            self._packed[slot] = np.empty(nbytes, np.uint8)
        data = memoryview(self._packed[slot])[:nbytes]
        if os.preadv(fd, [data], offset) != nbytes:
            raise ValueError(damaged_chunk(self.store, self.name, f"{where}: short read (truncated file?)"))
        self._decoding[slot] = self.checks.call(self._decode, data, crc, damaged_chunk(self.store, self.name, where),
                                                self._unpacked[slot], skip, rows)

    def _decode(self, data: memoryview, crc: int, damaged: str, scratch: np.ndarray, skip: int,
                rows: Sequence[np.ndarray]) -> None:
        payload = data[:len(data) - crc]
        if crc and chunk_crc([payload]) != stored_crc(data[len(data) - crc:]):
            raise ValueError(damaged)
        blosc.decompress(payload, scratch)
        chunk = scratch.view(self.array.dtype).reshape(self.chunk_rows, *self.array.shape[1:])
        for k, row in enumerate(rows):
            np.copyto(row, chunk[skip + k])

    def _spare(self, needed: bool) -> tuple[memoryview, int | None]:
        """The next spare buffer and its slot, once the check that last read into it is done (a mismatch is raised
        here); an empty view and no slot when the caller asked for the whole chunk."""
        if not needed:
            return memoryview(b""), None
        slot = self._spare_turn % SPARES
        self._spare_turn += 1
        if len(self._spares) <= slot:
            self._spares.append(np.empty(self.chunk_rows * self.row_bytes, np.uint8))
            self._spare_checks.append(None)
        previous, self._spare_checks[slot] = self._spare_checks[slot], None
        if previous is not None:
            previous.result()
        return memoryview(self._spares[slot]), slot


def _close(held: list) -> None:
    if held[1] >= 0:
        os.close(held[1])
        held[:] = [None, -1]
