"""Phase-2 read throughput of FeatureCacheDataModule beside the machine's ceilings (run by hand; prints figures).

    python benchmarks/cache_read.py [--rows 3000] [--clip-dtype float16] [--clip-codec none] [--dir DIR]
                                    [--formats 3] [--repeat 1]

Builds (once per setting) a format-2 store of RN50-shaped rows: clip_layer3 1024x14x14 (dtype/codec as
given) + deu 4x32x32 float32 zstd, through the store's own writer API. Before each mode it measures that
mode's ceilings (the load of a shared machine moves): memcpy and a plain-numpy gather of the resident rows
into RING_SLOTS reused batches (ram, device), a page-cache read of the store's files (page_cache; or the
codec's decode speed when lower), an O_DIRECT read of the same files (cold_disk). Then two shuffled training
epochs of the data module, the second timed (steady state: reused buffers already faulted in; the first
epoch's rate is shown beside it), one line per ceiling: `<mode>: <N> rows/s (<GB/s>, <percent> of
<ceiling>)`. Cold reads evict the store's files from the page cache with posix_fadvise(DONTNEED) (no root
needed) before the timed epoch. Also prints the shuffle's quality on a store sorted by label: the spread
of each batch's fake fraction against an ideal shuffle's. `--formats 2,3` builds the same store in both
formats and times each mode on each, alternating `--repeat` times in one run: the cost of verifying every
chunk's crc32c (format 3) against the same reads without checksums (format 2).
"""

from __future__ import annotations

import argparse
import hashlib
import mmap
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import numcodecs
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.cached_features import FeatureCacheDataModule  # noqa: E402
from datamodules.row_batches import RING_SLOTS, epoch_order  # noqa: E402
from feature_cache.codecs import encode, storage_dtype  # noqa: E402
from feature_cache.provenance import (DatasetProvenance, ExtractorProvenance, FeatureSpec,  # noqa: E402
                                      PixelProvenance, StoreProvenance)
from feature_cache.store import FeatureStore, store_lock  # noqa: E402

CLIP_SHAPE, DEU_SHAPE = (1024, 14, 14), (4, 32, 32)


def build_store(path: Path, rows: int, shard_size: int, clip_dtype: str, clip_codec: str, store_format: int) -> None:
    """Synthetic ReLU-like activations (|normal|), labels sorted like a GenImage split (fakes first)."""
    specs = {"clip_layer3": FeatureSpec(CLIP_SHAPE, clip_dtype, clip_codec, "clip"),
             "deu": FeatureSpec(DEU_SHAPE, "float32", "zstd", "guidance")}
    tars = [{"name": f"shard-{k:06d}.tar", "first_row": k * shard_size, "num_samples": min(shard_size, rows - k * shard_size)}
            for k in range(-(-rows // shard_size))]
    provenance = StoreProvenance(DatasetProvenance(str(path.parent), "benchmark", "train", "0" * 64, tars, {}),
                                 PixelProvenance(resolution=256))
    table = {"key": [f"k{r}" for r in range(rows)], "label": [int(r < rows // 2) for r in range(rows)],
             "generator": [0] * rows, "format": ["png"] * rows, "jpeg_quality": [-1] * rows, "width": [256] * rows,
             "height": [256] * rows, "sha256": [hashlib.sha256(str(r).encode()).hexdigest() for r in range(rows)],
             "path": [f"k{r}.png" for r in range(rows)]}
    with store_lock(path):
        store = FeatureStore.create(path, provenance=provenance, rows=table, generator_names=["sdv4"],
                                    format_version=store_format)
        group = store.add_group(specs, ExtractorProvenance({"benchmark": True}, {name: {} for name in specs}))
    rng = np.random.default_rng(0)
    for k, tar in enumerate(tars):
        n, arrays = tar["num_samples"], {}
        for name, spec in specs.items():
            encoded = encode(spec.dtype, np.abs(rng.standard_normal((n, *spec.shape), dtype=np.float32)))
            arrays[name] = encoded.values
            if encoded.scale is not None:
                arrays[f"{name}__scale"] = encoded.scale
        store.write_tar(group, k, arrays, [""] * n, np.zeros((n, 2), np.int32))
        print(f"\rwrote tar {k + 1}/{len(tars)}", end="", flush=True)
    print()


def store_files(path: Path) -> list[Path]:
    return [p for p in sorted(path.rglob("*")) if p.is_file() and "/c/" in str(p)]


def evict(files: list[Path]) -> None:
    """Drop the files' clean pages from the page cache (what a cold read sees)."""
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def timed(action: Callable[[], int]) -> float:
    """Bytes per second of `action` (which returns the bytes it moved)."""
    start = time.perf_counter()
    moved = action()
    return moved / (time.perf_counter() - start)


def memcpy_ceiling(bytes_: int = 1 << 29) -> float:
    source, target = np.ones(bytes_, np.uint8), np.empty(bytes_, np.uint8)
    np.copyto(target, source)  # fault the target's pages in first
    return max(timed(lambda: (np.copyto(target, source), bytes_)[1]) for _ in range(3))


def file_read(files: list[Path], direct: bool) -> int:
    """Read every file into one reused page-aligned buffer (O_DIRECT needs alignment); returns bytes read."""
    buffer = mmap.mmap(-1, 64 << 20)
    total = 0
    for file in files:
        fd = os.open(file, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        try:
            while (count := os.readv(fd, [buffer])) > 0:
                total += count
        finally:
            os.close(fd)
    return total


def gather_ceiling(path: Path, batch_size: int) -> float:
    """Bytes per second of plain numpy copying every resident row once, in random order, into RING_SLOTS reused
    batches in turn: the resident reader's work without any of its code (its batches must outlive RING_SLOTS
    steps, so their 77 MB do not stay in a 32 MB L3 cache, unlike a single reused batch)."""
    store = FeatureStore.open(path)
    arrays = [store.read(name) for name in ("clip_layer3", "deu")]
    outs = [[np.zeros((batch_size, *a.shape[1:]), a.dtype) for a in arrays] for _ in range(RING_SLOTS)]
    order = np.random.default_rng(0).permutation(len(arrays[0]))

    def gather() -> int:
        for i, row in enumerate(order.tolist()):
            for array, out in zip(arrays, outs[i // batch_size % RING_SLOTS]):
                np.copyto(out[i % batch_size], array[row])
        return sum(a.nbytes for a in arrays)
    return timed(gather)


def decode_ceiling(dtype: str, codec: str) -> float | None:
    """Single-core decode speed of one tar's worth of CLIP maps (bytes out per second); None for `none`."""
    if codec == "none":
        return None
    values = encode(dtype, np.abs(np.random.default_rng(1).standard_normal((32, *CLIP_SHAPE), dtype=np.float32))).values
    itemsize = storage_dtype(dtype).itemsize
    blosc = numcodecs.Blosc(cname=codec, clevel=1, shuffle=numcodecs.Blosc.SHUFFLE if itemsize > 1 else numcodecs.Blosc.NOSHUFFLE,
                            typesize=itemsize)
    blosc.numthreads = 1
    packed = blosc.encode(values)
    return max(timed(lambda: (blosc.decode(packed), values.nbytes)[1]) for _ in range(3))


def epoch_rate(path: Path, in_memory: bool | str, batch_size: int, block_rows: int, shuffle_blocks: int,
               before: Callable[[], object]) -> tuple[str, float, float, float]:
    """(the source the data module chose, setup seconds, rows/s of the first epoch, rows/s of the second) of
    shuffled training epochs; `before` runs before the second (steady state: reused buffers already faulted in).
    The source shows when `in_memory` fell back to disk reads (the split takes over half the free RAM)."""
    start = time.perf_counter()
    dm = FeatureCacheDataModule(features=["clip_layer3", "deu"], train=[str(path)], batch_size=batch_size,
                                in_memory=in_memory, block_rows=block_rows, shuffle_blocks=shuffle_blocks)
    if torch.cuda.is_available():  # batches go to the GPU as in training (pinned buffers, asynchronous copies)
        dm.trainer = pl.Trainer(accelerator="gpu", devices=1, logger=False, enable_progress_bar=False)
    dm.setup("fit")
    setup, loader, rates = time.perf_counter() - start, dm.train_dataloader(), []
    for epoch in range(2):
        if epoch:
            before()
        start, count = time.perf_counter(), 0
        for batch in loader:
            count += len(batch["row"])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        rates.append(count / (time.perf_counter() - start))
    source = dm.sources["train"]
    return f"{type(source).__name__}({getattr(source, 'device', 'disk')})", setup, *rates


def shuffle_quality(rows: int, batch_size: int, block_rows: int, shuffle_blocks: int) -> str:
    """Std of the per-batch fake fraction on a half-fake store sorted by label, vs an ideal shuffle's."""
    step = np.lcm(block_rows, batch_size)
    window = int(np.ceil(block_rows * shuffle_blocks / step) * step)
    fractions = []
    for epoch in range(5):
        order = epoch_order(rows, shuffle=True, block_rows=block_rows, window_rows=window, seed=0, epoch=epoch)
        labels = (order < rows // 2).astype(float)
        whole = len(labels) // batch_size * batch_size
        fractions.append(labels[:whole].reshape(-1, batch_size).mean(axis=1))
    ideal = np.sqrt(0.25 / batch_size * (rows - batch_size) / (rows - 1))
    return (f"shuffle quality (block_rows {block_rows}, shuffle_blocks {shuffle_blocks}, batch {batch_size}): "
            f"std of a batch's fake fraction {np.concatenate(fractions).std():.3f} vs {ideal:.3f} for a full shuffle")


def line(mode: str, rows_per_s: float, row_bytes: int, ceiling_name: str, ceiling: float | None) -> str:
    rate = rows_per_s * row_bytes / 1e9
    share = f"{100 * rate / (ceiling / 1e9):.0f}% of {ceiling_name}" if ceiling else f"{ceiling_name} unavailable"
    return f"{mode}: {rows_per_s:,.0f} rows/s ({rate:.2f} GB/s, {share})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--block-rows", type=int, default=32)
    parser.add_argument("--shuffle-blocks", type=int, default=32)
    parser.add_argument("--clip-dtype", default="float16", choices=["float16", "int8_rowscale", "float8_e4m3"])
    parser.add_argument("--clip-codec", default="none", choices=["none", "lz4", "zstd"])
    parser.add_argument("--modes", default="ram,device,page_cache,cold_disk")
    parser.add_argument("--formats", default="3", help="store formats to time, e.g. 2,3 (3: chunk checksums)")
    parser.add_argument("--repeat", type=int, default=1, help="times each (mode, format) is timed, alternating")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "cache_read_bench",
                        help="where the store is built (kept, reused by later runs with the same settings)")
    args = parser.parse_args()
    formats = [int(f) for f in args.formats.split(",")]
    paths = {f: args.dir / f"store-{args.rows}-{args.clip_dtype}-{args.clip_codec}-format{f}" for f in formats}
    for store_format, store_path in paths.items():
        if not FeatureStore.exists(store_path):
            build_store(store_path, args.rows, args.shard_size, args.clip_dtype, args.clip_codec, store_format)
    path = paths[formats[-1]]
    files = store_files(path)
    row_bytes = sum(int(np.prod(s)) * storage_dtype(d).itemsize for s, d in ((CLIP_SHAPE, args.clip_dtype), (DEU_SHAPE, "float32")))
    row_bytes += 1024 * 4 if args.clip_dtype == "int8_rowscale" else 0
    print(f"store {path}: {args.rows} rows, {row_bytes / 1e3:.0f} KB per row stored, "
          f"{sum(f.stat().st_size for f in files) / 1e9:.2f} GB of chunk files, {os.cpu_count()} CPUs")

    decode = decode_ceiling(args.clip_dtype, args.clip_codec)
    if decode:
        print(f"ceiling {args.clip_codec} decode (1 core): {decode / 1e9:.2f} GB/s ({decode / row_bytes:,.0f} rows/s)")

    def page_cache_read() -> float:
        file_read(files, direct=False)
        return timed(lambda: file_read(files, direct=False))

    def direct_read() -> float | None:
        try:
            return timed(lambda: file_read(files, direct=True))
        except OSError as error:  # tmpfs and some overlay file systems refuse O_DIRECT
            print(f"O_DIRECT unavailable here: {error}")
            return None

    # Each mode's ceilings are measured right before it: on a machine shared with other jobs the load moves.
    ceilings = {"ram": {"memcpy": memcpy_ceiling,
                        "resident gather (numpy)": lambda: gather_ceiling(path, args.batch_size)},
                "page_cache": {"page-cache read": page_cache_read}, "cold_disk": {"O_DIRECT read": direct_read}}
    ceilings["device"] = ceilings["ram"]
    before = {"ram": lambda: None, "device": lambda: None, "page_cache": lambda: file_read(files, direct=False),
              "cold_disk": lambda: evict(files)}
    for mode in args.modes.split(","):
        measured = {name: measure() for name, measure in ceilings[mode].items()}
        for name, value in measured.items():
            if value:
                print(f"ceiling {name}: {value / 1e9:.2f} GB/s ({value / row_bytes:,.0f} rows/s)")
        if mode == "page_cache" and decode and decode < measured["page-cache read"]:
            measured = {f"{args.clip_codec} decode": decode}
        in_memory = {"ram": True, "device": "device", "page_cache": False, "cold_disk": False}[mode]
        for _ in range(args.repeat):
            for store_format, store_path in paths.items():
                store_files_of = store_files(store_path)
                prepare = {"page_cache": lambda: file_read(store_files_of, direct=False),
                           "cold_disk": lambda: evict(store_files_of)}.get(mode, before[mode])
                source, setup, first, rate = epoch_rate(store_path, in_memory, args.batch_size, args.block_rows,
                                                        args.shuffle_blocks, prepare)
                for name, value in measured.items():
                    print(f"{line(mode, rate, row_bytes, name, value)}  [format {store_format}, {source}, first epoch "
                          f"{first:,.0f} rows/s, setup {setup:.1f} s, load {os.getloadavg()[0]:.1f}]", flush=True)
    print(shuffle_quality(324_000, args.batch_size, args.block_rows, args.shuffle_blocks))


if __name__ == "__main__":
    main()
