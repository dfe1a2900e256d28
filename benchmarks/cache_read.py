"""Phase-2 read throughput of FeatureCacheDataModule beside the machine's ceilings (run by hand; prints figures).

    python benchmarks/cache_read.py [--rows 3000] [--clip-dtype float16] [--clip-codec lz4]
                                    [--guidance-codec none] [--guidance-values exp] [--dir DIR]
                                    [--formats 3] [--repeat 3]

Builds (once per setting) a store of RN50-shaped rows the way `precompute` writes one by default (codecs from
feature_cache/codecs.py: CLIP_CODEC, GUIDANCE_CODEC): clip_layer3 1024x14x14 (dtype/codec as given) + deu
4x32x32 float32 (codec as given), through the store's own writer API. CLIP maps are |normal| (ReLU-like), DEU
maps exp(normal) (a variance: positive, heavy-tailed; `--guidance-values abs` for |normal|). Every mode is
timed `--repeat` times; before each run it measures that mode's ceilings (the load of a shared machine moves):
memcpy and a plain-numpy gather of the resident rows into RING_SLOTS reused batches (ram, device), a
page-cache read of the store's files, by one thread (the target's ceiling) and by two (`in_two_lanes`, as the
reader reads: what the machine can give it) (page_cache), an O_DIRECT read of the same files (cold_disk). A run is
shuffled training epochs of the data module: the first one untimed (reused buffers faulted in), then epochs
until `--seconds` have passed, timed together; the page-cache read is likewise repeated for `--seconds` (a
3,000-row epoch from the page cache takes a quarter of a second, shorter than the machine's swings). Cold
reads evict the store's files from the page cache with posix_fadvise(DONTNEED) (no root needed) before each
timed epoch. Every figure includes the crc32c checks of a format-3 store. Per mode it
prints each run (`<mode>: <N> rows/s (<GB/s>, <percent> of <ceiling>)`), then min/median/max of rows/s and of
the share of the mode's first ceiling; the load average at start and end; and the shuffle's quality on a store
sorted by label (std of each batch's fake fraction: the block shuffle as the data module draws it, the
same without the label-dealt windows, a full shuffle, and their ratio). `--guidance-codec none,lz4,zstd` builds
one store per guidance codec and times each (alternating within a run), printing each DEU array's bytes on disk
and single-core decode speed; `--formats 2,3` does the same for the store format (checksums or not).
Everything the README's phase-2 reader table needs comes from the default command.
"""

from __future__ import annotations

import argparse
import hashlib
import mmap
import os
import sys
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import numcodecs
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.threads import in_two_lanes  # noqa: E402
from datamodules.cached_features import FeatureCacheDataModule  # noqa: E402
from datamodules.row_batches import RING_SLOTS, epoch_order  # noqa: E402
from feature_cache.codecs import CLIP_CODEC, CODECS, GUIDANCE_CODEC, compressor, encode, storage_dtype  # noqa: E402
from feature_cache.provenance import (DatasetProvenance, ExtractorProvenance, FeatureSpec,  # noqa: E402
                                      PixelProvenance, StoreProvenance)
from feature_cache.store import FeatureStore, store_lock  # noqa: E402

CLIP_SHAPE, DEU_SHAPE = (1024, 14, 14), (4, 32, 32)


def guidance_values(kind: str, rng: np.random.Generator, rows: int) -> np.ndarray:
    """DEU-like maps: exp(normal) (a variance: positive, heavy-tailed, like tests/workflow_stores.py) or |normal|."""
    normal = rng.standard_normal((rows, *DEU_SHAPE), dtype=np.float32)
    return np.exp(normal) if kind == "exp" else np.abs(normal)


def build_store(path: Path, rows: int, shard_size: int, clip_dtype: str, clip_codec: str, guidance_codec: str,
                guidance_kind: str, store_format: int) -> None:
    """Synthetic ReLU-like CLIP activations (|normal|), DEU maps per `guidance_values`, labels sorted like a
    GenImage split (fakes first)."""
    specs = {"clip_layer3": FeatureSpec(CLIP_SHAPE, clip_dtype, clip_codec, "clip"),
             "deu": FeatureSpec(DEU_SHAPE, "float32", guidance_codec, "guidance")}
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
        n = tar["num_samples"]
        raw = {"clip_layer3": np.abs(rng.standard_normal((n, *CLIP_SHAPE), dtype=np.float32)),
               "deu": guidance_values(guidance_kind, rng, n)}
        arrays = {}
        for name, spec in specs.items():
            encoded = encode(spec.dtype, raw[name])
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


def timed(action: Callable[[], int], seconds: float = 0.0) -> float:
    """Bytes per second of `action` (which returns the bytes it moved), repeated until `seconds` have passed."""
    start, moved = time.perf_counter(), 0
    while not moved or time.perf_counter() - start < seconds:
        moved += action()
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


def decode_speed(values: np.ndarray, codec: str) -> tuple[float, float] | None:
    """(compression ratio, single-core decode bytes out per second) of one chunk of `values` under a codec (blosc
    as the store writes it, crc32c excluded); None for `none`."""
    if codec == "none":
        return None
    zarr_codec = compressor(codec, values.dtype.itemsize)
    blosc = numcodecs.Blosc(cname=codec, clevel=zarr_codec.clevel,
                            shuffle=numcodecs.Blosc.SHUFFLE if values.dtype.itemsize > 1 else numcodecs.Blosc.NOSHUFFLE,
                            typesize=values.dtype.itemsize)
    blosc.numthreads = 1
    packed, out = blosc.encode(values), np.empty_like(values)
    return values.nbytes / len(packed), max(timed(lambda: (blosc.decode(packed, out), values.nbytes)[1]) for _ in range(5))


def epoch_rate(path: Path, in_memory: bool | str, batch_size: int, block_rows: int | None, shuffle_blocks: int,
               before: Callable[[], object], seconds: float) -> tuple[str, float, float, float]:
    """(the source the data module chose, setup seconds, rows/s of the first epoch, rows/s of the following ones)
    of shuffled training epochs, the following ones run until `seconds` have passed (steady state: reused buffers
    already faulted in); `before` runs before each of them. The source shows when `in_memory` fell back to disk
    reads (the split takes over half the free RAM)."""
    start = time.perf_counter()
    dm = FeatureCacheDataModule(features=["clip_layer3", "deu"], train=[str(path)], batch_size=batch_size,
                                in_memory=in_memory, block_rows=block_rows, shuffle_blocks=shuffle_blocks)
    if torch.cuda.is_available():  # batches go to the GPU as in training (pinned buffers, asynchronous copies)
        dm.trainer = pl.Trainer(accelerator="gpu", devices=1, logger=False, enable_progress_bar=False)
    dm.setup("fit")
    setup, loader = time.perf_counter() - start, dm.train_dataloader()

    def epoch() -> int:
        count = sum(len(batch["row"]) for batch in loader)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return count
    first = timed(epoch)
    elapsed, count = 0.0, 0
    while not count or elapsed < seconds:
        before()  # untimed: the page-cache warm-up or cold-read eviction of the next epoch
        start = time.perf_counter()
        count += epoch()
        elapsed += time.perf_counter() - start
    source = dm.sources["train"]
    return f"{type(source).__name__}({getattr(source, 'device', 'disk')})", setup, first, count / elapsed


def shuffle_quality(rows: int, batch_size: int, block_rows: int, shuffle_blocks: int) -> str:
    """Std of the per-batch fake fraction on a half-fake store sorted by label (5 epochs): the block shuffle as the
    data module draws it (blocks dealt into windows by label), without that dealing, and a full shuffle."""
    step = np.lcm(block_rows, batch_size)
    window = int(np.ceil(block_rows * shuffle_blocks / step) * step)
    labels = (np.arange(rows) < rows // 2).astype(np.int64)

    def spread(block: int, dealt: bool) -> float:
        fractions = []
        for epoch in range(5):
            order = epoch_order(rows, shuffle=True, block_rows=block, window_rows=window, seed=0, epoch=epoch,
                                labels=labels if dealt else None)
            whole = len(order) // batch_size * batch_size
            fractions.append(labels[order[:whole]].reshape(-1, batch_size).mean(axis=1))
        return float(np.concatenate(fractions).std())
    block, plain, full = spread(block_rows, True), spread(block_rows, False), spread(1, False)
    return (f"shuffle quality ({rows:,} rows sorted by label, half fake; block_rows {block_rows}, shuffle_blocks "
            f"{shuffle_blocks}, batch {batch_size}): std of a batch's fake fraction {block:.3f} (block shuffle, "
            f"windows dealt by label) vs {full:.3f} (full shuffle) = {block / full:.2f}x; without the dealing "
            f"{plain:.3f} = {plain / full:.2f}x")


def line(mode: str, rows_per_s: float, row_bytes: int, ceiling_name: str, ceiling_rows: float | None) -> str:
    """One run: rows/s, the decoded bytes it delivered, and its share of a ceiling given in rows/s."""
    share = f"{rows_per_s / ceiling_rows:.0%} of {ceiling_name}" if ceiling_rows else f"{ceiling_name} unavailable"
    return f"{mode}: {rows_per_s:,.0f} rows/s ({rows_per_s * row_bytes / 1e9:.2f} GB/s decoded, {share})"


def summary(mode: str, rates: list[float], shares: list[float], ceiling: str) -> str:
    low, mid, high = min(rates), statistics.median(rates), max(rates)
    return (f"{mode} over {len(rates)} runs: rows/s min {low:,.0f} / median {mid:,.0f} / max {high:,.0f}; "
            f"share of {ceiling} min {min(shares):.0%} / median {statistics.median(shares):.0%} / max {max(shares):.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--block-rows", type=int, default=None, help="default: the store's inner chunk rows")
    parser.add_argument("--shuffle-blocks", type=int, default=32)
    parser.add_argument("--clip-dtype", default="float16", choices=["float16", "int8_rowscale", "float8_e4m3"])
    parser.add_argument("--clip-codec", default=CLIP_CODEC, choices=CODECS)
    parser.add_argument("--guidance-codec", default=GUIDANCE_CODEC,
                        help=f"guidance codecs to time, comma-separated from {list(CODECS)}")
    parser.add_argument("--guidance-values", default="exp", choices=["exp", "abs"])
    parser.add_argument("--modes", default="ram,device,page_cache,cold_disk")
    parser.add_argument("--formats", default="3", help="store formats to time, e.g. 2,3 (3: chunk checksums)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each mode (each store timed once per run)")
    parser.add_argument("--seconds", type=float, default=1.0,
                        help="timed epochs (and page-cache reads) repeated for at least this long per run")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "cache_read_bench",
                        help="where the store is built (kept, reused by later runs with the same settings)")
    args = parser.parse_args()
    start_load = os.getloadavg()
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in start_load)} ({os.cpu_count()} CPUs)")
    formats = [int(f) for f in args.formats.split(",")]
    codecs = args.guidance_codec.split(",")
    unknown = sorted(set(codecs) - set(CODECS))
    if unknown:
        raise SystemExit(f"--guidance-codec: {unknown} not in {list(CODECS)}")
    variants = [(f, c) for f in formats for c in codecs]
    paths = {(f, c): args.dir / (f"store-{args.rows}-{args.shard_size}-{args.clip_dtype}-{args.clip_codec}-deu-{c}-"
                                 f"{args.guidance_values}-format{f}") for f, c in variants}
    for (store_format, codec), store_path in paths.items():
        if not FeatureStore.exists(store_path):
            build_store(store_path, args.rows, args.shard_size, args.clip_dtype, args.clip_codec, codec,
                        args.guidance_values, store_format)
    path = paths[variants[-1]]
    files = store_files(path)
    row_bytes = sum(int(np.prod(s)) * storage_dtype(d).itemsize for s, d in ((CLIP_SHAPE, args.clip_dtype), (DEU_SHAPE, "float32")))
    row_bytes += 1024 * 4 if args.clip_dtype == "int8_rowscale" else 0
    chunk_rows = FeatureStore.open(path).chunk_rows("clip_layer3")
    block_rows = args.block_rows or chunk_rows
    print(f"store {path}: {args.rows} rows, {row_bytes / 1e3:.0f} KB per row decoded, "
          f"{sum(f.stat().st_size for f in files) / 1e9:.2f} GB of chunk files; CLIP {args.clip_dtype} "
          f"{args.clip_codec}, DEU float32 {args.guidance_values}(normal); {args.shard_size}-row tars, "
          f"{chunk_rows}-row inner chunks, block_rows {block_rows}, batch {args.batch_size}")

    clip_sample = encode(args.clip_dtype, np.abs(np.random.default_rng(1).standard_normal(
        (chunk_rows, *CLIP_SHAPE), dtype=np.float32))).values
    decode = decode_speed(clip_sample, args.clip_codec)
    if decode:
        print(f"CLIP {args.clip_codec} decode (1 core, one chunk): ratio {decode[0]:.2f}, {decode[1] / 1e9:.2f} GB/s "
              f"({decode[1] / row_bytes:,.0f} rows/s)")
    for (store_format, codec), store_path in paths.items():
        deu_bytes = sum(f.stat().st_size for f in store_files(store_path) if "/deu/" in str(f))
        speeds = []
        for kind in ("exp", "abs"):
            measured = decode_speed(guidance_values(kind, np.random.default_rng(2), chunk_rows), codec)
            speeds.append(f"{kind}(normal) " + (f"ratio {measured[0]:.3f}, decode {measured[1] / 1e9:.2f} GB/s"
                                                 if measured else "ratio 1, no decode"))
        print(f"DEU codec {codec} (format {store_format}): {deu_bytes / 1e6:.1f} MB on disk "
              f"({deu_bytes / (args.rows * 4 * 4096):.3f} of float32); 1 core, one chunk: {'; '.join(speeds)}")

    def page_cache_read() -> float:
        file_read(files, direct=False)
        return timed(lambda: file_read(files, direct=False), args.seconds)

    def page_cache_read_two_threads() -> float:
        moved, dealt = [0, 0], files[0::2] + files[1::2]  # halves alike in bytes (the files go feature by feature)

        def read(lane: int, start: int, stop: int) -> None:
            moved[lane] = file_read(dealt[start:stop], direct=False)
        return timed(lambda: (in_two_lanes(len(dealt), read), sum(moved))[1], args.seconds)

    def direct_read() -> float | None:
        try:
            return timed(lambda: file_read(files, direct=True))
        except OSError as error:  # tmpfs and some overlay file systems refuse O_DIRECT
            print(f"O_DIRECT unavailable here: {error}")
            return None

    # Each run's ceilings are measured right before it: on a machine shared with other jobs the load moves. The
    # first ceiling of a mode is the one its target is stated against (issue 31). In rows/s: memory ceilings move
    # a row's decoded bytes, file reads a row's share of the store's files (what a compressed row costs to read).
    file_bytes = {v: sum(f.stat().st_size for f in store_files(p)) / args.rows for v, p in paths.items()}
    ceilings = {"ram": {"memcpy": memcpy_ceiling,
                        "resident gather (numpy)": lambda: gather_ceiling(path, args.batch_size)},
                "page_cache": {"page-cache read": page_cache_read,
                               "page-cache read by two threads": page_cache_read_two_threads},
                "cold_disk": {"O_DIRECT read": direct_read}}
    ceilings["device"] = ceilings["ram"]
    in_memory = {"ram": True, "device": "device", "page_cache": False, "cold_disk": False}
    summaries = []
    for mode in args.modes.split(","):
        results: dict[tuple[int, str], tuple[list[float], list[float]]] = {v: ([], []) for v in variants}
        for _ in range(args.repeat):
            measured = {name: measure() for name, measure in ceilings[mode].items()}
            per_row = row_bytes if mode in ("ram", "device") else file_bytes[variants[-1]]
            for name, value in measured.items():
                if value:
                    print(f"ceiling {name}: {value / 1e9:.2f} GB/s ({value / per_row:,.0f} rows/s)")
            for variant, store_path in paths.items():
                files_of = store_files(store_path)
                prepare = {"page_cache": lambda: file_read(files_of, direct=False),
                           "cold_disk": lambda: evict(files_of)}.get(mode, lambda: None)
                source, setup, first, rate = epoch_rate(store_path, in_memory[mode], args.batch_size, args.block_rows,
                                                        args.shuffle_blocks, prepare, args.seconds)
                per_row = row_bytes if mode in ("ram", "device") else file_bytes[variant]
                ceiling_rows = {name: value / per_row if value else None for name, value in measured.items()}
                for name, value in ceiling_rows.items():
                    print(f"{line(mode, rate, row_bytes, name, value)}  [format {variant[0]}, DEU {variant[1]}, "
                          f"{source}, first epoch {first:,.0f} rows/s, setup {setup:.1f} s, "
                          f"load {os.getloadavg()[0]:.1f}]", flush=True)
                target = next(iter(ceiling_rows.values()))
                results[variant][0].append(rate)
                results[variant][1].append(rate / target if target else float("nan"))
        for (store_format, codec), (rates, shares) in results.items():
            label = mode if len(variants) == 1 else f"{mode} [format {store_format}, DEU {codec}]"
            summaries.append(summary(label, rates, shares, next(iter(ceilings[mode]))))
    print("\n".join(summaries))
    print(shuffle_quality(324_000, args.batch_size, block_rows, args.shuffle_blocks))
    end_load = os.getloadavg()
    print(f"load average at end: {' '.join(f'{v:.2f}' for v in end_load)} (at start "
          f"{' '.join(f'{v:.2f}' for v in start_load)})")


if __name__ == "__main__":
    from core.runtime import with_streaming_copies

    with_streaming_copies()  # what `python -m cli` runs with
    main()
