"""RawChunks: a feature's rows read by byte range from its Zarr shard files equal Zarr's own read."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from datamodules.row_batches import Rows, SplitRows
from feature_cache.provenance import FeatureSpec
from feature_cache.raw_chunks import RawChunks
from feature_cache.store import FeatureStore
from feature_cache_fakes import write_store

SHAPE = (3, 2, 2)


def make_store(path: Path, dtype: str, codec: str, noise: bool = False) -> FeatureStore:
    """100 rows in 40-row tars (20-row inner chunks, a short last tar); rows 20..39 are all zero, so Zarr leaves
    that inner chunk unwritten (its index entry says empty). `noise`: rows 40.. are random (blosc cannot shrink
    them and stores them as they are, MEMCPYED; the other chunks are compressed)."""
    def values(rows: np.ndarray) -> dict[str, np.ndarray]:
        grid = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(1, *SHAPE)
        maps = (rows.reshape(-1, 1, 1, 1) + 1) * (1 + grid) * np.float32(0.37)
        if noise:
            random = np.random.default_rng(rows).random((len(rows), *SHAPE), dtype=np.float32) + 0.5
            maps = np.where((rows >= 40).reshape(-1, 1, 1, 1), random, maps)
        maps[(rows >= 20) & (rows < 40)] = 0
        return {"m": maps}
    return write_store(path, values, {"m": FeatureSpec(SHAPE, dtype, codec, "guidance")}, ["sdv4"], num_rows=100, shard_size=40)


@pytest.mark.parametrize(("dtype", "codec", "noise"), [
    ("float16", "none", False), ("float16", "lz4", False), ("float16", "lz4", True), ("float32", "none", True),
    ("float32", "lz4", True), ("float32", "zstd", True), ("int8_rowscale", "none", False),
    ("float8_e4m3", "none", False)])
def test_rows_read_by_byte_range_equal_zarrs_read(tmp_path: Path, dtype: str, codec: str, noise: bool) -> None:
    """Catches a wrong byte offset (a row or chunk off by one, the index read from the wrong end of the file),
    rows of a call crossing an inner-chunk or shard boundary sent to the wrong targets, an unwritten (all-zero)
    chunk read as garbage, a compressed chunk decoded into the wrong rows, and a chunk blosc stored as it is
    (MEMCPYED: noise under lz4) read with its header's bytes as values or decoded from the wrong offset."""
    store = make_store(tmp_path / "s", dtype, codec, noise)
    names = ["m", "m__scale"] if dtype == "int8_rowscale" else ["m"]
    for name in names:
        raw = RawChunks.of(store.path / "g0" / name)
        assert raw is not None and raw.compressed == (codec != "none" or name.endswith("__scale"))
        expected = store.read(name)
        places = np.random.default_rng(0).permutation(100)  # row r goes to out[places[r]]
        out = np.full_like(expected, 7)
        for start, stop in [(0, 7), (7, 45), (45, 100)]:  # across chunks (20 rows) and shards (40 rows)
            raw.read(start, stop, [out[places[r]] for r in range(start, stop)])
        np.testing.assert_array_equal(out[places], expected)
    assert not store.read("m")[20:40].any() and store.read("m")[40:].all()
    whole = 20 * store.read("m", 0, 1).nbytes + 4  # rows 40..59, 80..99: noise under lz4 is MEMCPYED (header + bytes)
    memcpyed = [first_chunk_bytes(store, shard) == whole + 16 for shard in (1, 2)]
    assert memcpyed == [noise and codec == "lz4" and dtype == "float16"] * 2


def first_chunk_bytes(store: FeatureStore, shard: int) -> int:
    """Stored bytes of a shard file's first inner chunk, from the shard index (two inner chunks, then a crc32c)."""
    data = (store.path / f"g0/m/c/{shard}/0/0/0").read_bytes()
    return int(np.frombuffer(data[-36:-4], "<u8")[1])


@pytest.mark.parametrize("offset", [2, 16 + 100])  # the blosc header's MEMCPYED flag; a value byte
def test_a_flipped_bit_in_a_chunk_stored_as_it_is_is_refused(tmp_path: Path, offset: int) -> None:
    """Catches the MEMCPYED shortcut (a chunk blosc could not shrink is read straight into the rows) leaving the
    header out of the checksum or skipping the check, on a partial read as on a whole one."""
    store = make_store(tmp_path / "s", "float16", "lz4", noise=True)
    shard = store.path / "g0/m/c/1/0/0/0"
    data = bytearray(shard.read_bytes())
    data[offset] ^= 0x02
    shard.write_bytes(bytes(data))
    for start, stop in [(40, 60), (45, 50)]:
        raw = RawChunks.of(store.path / "g0" / "m")
        with pytest.raises(ValueError, match=r"array g0/m shard file g0/m/c/1/0/0/0 inner chunk 0 \(rows 40..59\) "
                                             r"fails its crc32c checksum"):
            raw.read(start, stop, list(np.empty((stop - start, *SHAPE), np.float16)))


def test_unwritten_chunk_is_read_as_the_fill_value(tmp_path: Path) -> None:
    """Catches a reader that trusts an empty index entry's offset (2^64 - 1) or leaves the rows untouched."""
    store = make_store(tmp_path / "s", "float16", "none")
    shard = store.path / "g0/m/c/0/0/0/0"
    assert shard.stat().st_size < 40 * 12 * 2  # only one of the shard's two 20-row chunks was written
    out = np.full((20, *SHAPE), 7, np.float16)
    raw = RawChunks.of(store.path / "g0" / "m")
    raw.read(20, 40, list(out))
    assert not out.any()


def test_damaged_shard_index_and_other_layouts(tmp_path: Path) -> None:
    """Catches offsets taken from a corrupt index (checked by its crc32c) and a raw read attempted on an array
    that is not sharded along rows (it must fall back to Zarr)."""
    store = make_store(tmp_path / "s", "float16", "none")
    shard = store.path / "g0/m/c/1/0/0/0"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    raw = RawChunks.of(store.path / "g0" / "m")
    with pytest.raises(ValueError, match=r"array g0/m shard file g0/m/c/1/0/0/0 index \(rows 40..79\) fails its crc32c"):
        raw.read(40, 41, [np.empty(SHAPE, np.float16)])
    assert RawChunks.of(store.path / "g0" / "flags") is None


def test_split_reads_through_zarr_equal_raw_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches the Zarr fallback (layouts RawChunks does not read) scattering its scratch block to the wrong
    rows, and either path mishandling unsorted or repeated positions (a DDP rank's wrapped order)."""
    store = make_store(tmp_path / "s", "float16", "lz4")
    rows = np.flatnonzero(np.arange(100) % 7 != 3)  # gaps: runs of several calls
    part = Rows(0, rows, rows % 2, np.zeros_like(rows), rows.astype(str), rows.astype(str))
    positions = np.concatenate([np.random.default_rng(1).permutation(len(rows)), [5, 5, 60]])
    raw = SplitRows([str(store.path)], [part], ["m"]).read(positions)["m"]
    monkeypatch.setattr(FeatureStore, "raw_reader", lambda self, name: None)
    through_zarr = SplitRows([str(store.path)], [part], ["m"]).read(positions)["m"]
    expected = store.read("m")[rows[positions]]
    np.testing.assert_array_equal(raw, expected)
    np.testing.assert_array_equal(through_zarr, expected)


def test_a_split_read_runs_two_lanes_each_with_its_own_readers(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches `SplitRows.read` quietly reading on one thread (half the page-cache speed, issue 31), two lanes
    sharing one RawChunks (its open shard file and reused buffers are not thread-safe), and a lane handing some
    of its rows to Zarr's slower read path instead."""
    from core.threads import LANES

    store = make_store(tmp_path / "s", "float16", "lz4")
    readers: dict[int, set[int]] = {}
    rows_read: list[int] = []
    read = RawChunks.read

    def recording(self: RawChunks, start: int, stop: int, rows: list[np.ndarray]) -> None:
        readers.setdefault(threading.get_ident(), set()).add(id(self))
        rows_read.extend(range(start, stop))
        read(self, start, stop, rows)

    monkeypatch.setattr(RawChunks, "read", recording)
    rows = np.arange(100)
    part = Rows(0, rows, rows % 2, np.zeros_like(rows), rows.astype(str), rows.astype(str))
    split = SplitRows([str(store.path)], [part], ["m"])
    for _ in range(2):  # the second read: each lane's readers made by the first (a shared one would be reused)
        np.testing.assert_array_equal(split.read(rows[::-1].copy())["m"], store.read("m")[::-1])
    assert sorted(rows_read) == sorted([*range(100)] * 2)  # every row of both reads through the lanes' RawChunks
    assert len(readers) == LANES
    if LANES > 1:
        assert not set.intersection(*readers.values())


@pytest.mark.parametrize(("shard", "rows"), [(0, "0..19"), (2, "80..99")])  # in the helper's half; in the caller's
def test_a_damaged_chunk_in_either_lane_is_refused_by_the_split_read(tmp_path: Path, shard: int, rows: str) -> None:
    """Catches a checksum error on one of the two reading threads being lost, so that its rows are handed out."""
    store = make_store(tmp_path / "s", "float16", "none")
    path = store.path / f"g0/m/c/{shard}/0/0/0"
    data = bytearray(path.read_bytes())
    data[30] ^= 0x04
    path.write_bytes(bytes(data))
    every = np.arange(100)
    part = Rows(0, every, every % 2, np.zeros_like(every), every.astype(str), every.astype(str))
    with pytest.raises(ValueError, match=rf"array g0/m shard file g0/m/c/{shard}/0/0/0 inner chunk 0 \(rows {rows}\) "
                                         r"fails its crc32c checksum"):
        SplitRows([str(store.path)], [part], ["m"]).read(every)
