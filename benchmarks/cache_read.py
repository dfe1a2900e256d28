"""Phase-2 read throughput of FeatureCacheDataModule's train loader (run by hand; prints a table).

    python benchmarks/cache_read.py [--rows 5000] [--shard-size 500] [--dir /tmp/bench_store]

Builds (once) a synthetic float16 store with realistic per-row sizes: deu and lare 4x32x32 (256 px
input), clip_layer3 1024x14x14, clip_pooled 1024 (~420 KB per row), then reads one shuffled epoch
with 0, 1 and 2 workers, in RAM and lazily from disk. Setup time includes loading into RAM.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.cached_features import FeatureCacheDataModule  # noqa: E402
from feature_cache.store import FeatureStore  # noqa: E402

SHAPES = {"deu": (4, 32, 32), "lare": (4, 32, 32), "clip_layer3": (1024, 14, 14), "clip_pooled": (1024,)}


def build_store(path: Path, rows: int, shard_size: int) -> float:
    """Write the synthetic store; returns seconds per row spent in `write_shard`."""
    table = [{"name": f"shard-{k:06d}.tar", "first_row": k * shard_size,
              "num_samples": min(shard_size, rows - k * shard_size)} for k in range(-(-rows // shard_size))]
    store = FeatureStore.create(path, shards=table, keys=[f"k{r}" for r in range(rows)], labels=[r % 2 for r in range(rows)],
                                generators=[r % 4 for r in range(rows)], generator_names=["a", "b", "c", "d"],
                                feature_shapes=SHAPES, feature_dtype="float16", provenance={"benchmark": "cache_read"})
    rng = np.random.default_rng(0)
    spent = 0.0
    for k, entry in enumerate(table):
        n = entry["num_samples"]
        arrays = {name: rng.standard_normal((n, *shape), dtype=np.float32).astype(np.float16)
                  for name, shape in SHAPES.items()}
        start = time.perf_counter()
        store.write_shard(k, arrays, [""] * n)
        spent += time.perf_counter() - start
    return spent / rows


def read_epoch(path: Path, in_memory: bool, workers: int, batch_size: int) -> tuple[float, float, int]:
    """(setup seconds, samples per second over one shuffled epoch, samples read)."""
    start = time.perf_counter()
    dm = FeatureCacheDataModule(features=list(SHAPES), train=[str(path)], batch_size=batch_size,
                                num_workers=workers, in_memory=in_memory)
    dm.setup("fit")
    loader = dm.train_dataloader()
    setup = time.perf_counter() - start
    start, count = time.perf_counter(), 0
    for batch in loader:
        count += len(batch["row"])
    return setup, count / (time.perf_counter() - start), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--dir", type=Path, default=None, help="store location (kept); default: a temporary dir")
    args = parser.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="cache_read_"))
    path = root / "store"
    try:
        if not (path / "zarr.json").exists():
            per_row = build_store(path, args.rows, args.shard_size)
            print(f"wrote {args.rows} rows ({args.shard_size} per tar) in {per_row * 1e3:.2f} ms/row")
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        print(f"store {path}: {size / 2**30:.2f} GiB on disk\n")
        print(f"{'in_memory':>9} {'workers':>7} {'setup s':>8} {'samples/s':>10}")
        for in_memory in (True, False):
            for workers in (0, 1, 2):
                setup, rate, count = read_epoch(path, in_memory, workers, args.batch_size)
                assert count == args.rows
                print(f"{str(in_memory):>9} {workers:>7} {setup:>8.1f} {rate:>10.0f}", flush=True)
    finally:
        if args.dir is None:
            shutil.rmtree(root)


if __name__ == "__main__":
    main()
