"""Streaming throughput and peak memory of `python -m cli separability` (run by hand; prints figures).

    python benchmarks/separability.py [--rows 300000] [--shard-size 1000] [--dir /tmp/bench_separability]
                                      [--workers 2] [--bootstrap 1000] [--stages summaries command]

Builds (once) a float32 store of one 4x32x32 map (`deu`, the format-2 guidance-map dtype) with ReLU-like
LaRE-like values, then, each in a fresh process so the figures are its own: (1) the streaming summaries
alone (rows/s, peak RSS), (2) the whole command without the double-JPEG reference (the store has no images):
summaries, format-only reference, 1000 bootstrap replicates per cell, tables and plots. The whole map
array would take rows x 16 KiB of RAM if loaded at once (4.9 GB at 300k rows).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from feature_cache.provenance import (DatasetProvenance, ExtractorProvenance, FeatureSpec,  # noqa: E402
                                      PixelProvenance, StoreProvenance)
from feature_cache.store import FeatureStore, store_lock  # noqa: E402

SHAPE = (4, 32, 32)


def build_store(path: Path, rows: int, shard_size: int) -> None:
    """Two generators (one real-only, as DRCT's MSCOCO), format metadata, and a LaRE-like map (squares of
    smooth noise: positive, continuous) that rises slightly with the label; a format-2 store whose dataset
    provenance names a shard directory without images (the double-JPEG reference is not timed here)."""
    if FeatureStore.exists(path):
        return
    tars = [{"name": f"shard-{k:06d}.tar", "first_row": k * shard_size, "num_samples": min(shard_size, rows - k * shard_size),
             "bytes": 0, "mtime_ns": 0} for k in range(-(-rows // shard_size))]
    labels = np.arange(rows) % 2
    provenance = StoreProvenance(DatasetProvenance(str(path.parent / "no_shards"), "drct", "val", "0" * 64, tars, {}),
                                 PixelProvenance(resolution=256))
    columns = {"key": [f"k{r}" for r in range(rows)], "sha256": [f"{r:064x}" for r in range(rows)], "label": labels,
               "generator": labels, "format": np.where(labels == 0, "JPEG", "PNG"),
               "jpeg_quality": np.where(labels == 0, 90, -1), "width": np.full(rows, 256), "height": np.full(rows, 256),
               "path": [f"k{r}.png" for r in range(rows)]}
    with store_lock(path):
        store = FeatureStore.create(path, provenance=provenance, rows=columns, generator_names=["real", "fake"])
        group = store.add_group({"deu": FeatureSpec(SHAPE, "float32", "zstd", "guidance")}, ExtractorProvenance({}, {"deu": {}}))
    rng = np.random.default_rng(0)
    for k, entry in enumerate(tars):
        n, first = entry["num_samples"], entry["first_row"]
        smooth = rng.standard_normal((n, *SHAPE), dtype=np.float32).cumsum(-1) / 8
        maps = np.square(smooth + 0.1 * labels[first:first + n, None, None, None]).astype(np.float32)
        store.write_tar(group, k, {"deu": maps}, [""] * n, np.zeros((n, 2), np.int32))


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(stage: str, path: Path, workers: int, bootstrap: int) -> dict:
    """Run one stage in this process; returns seconds, rows/s (wall and per CPU-second), RSS after the imports
    and peak RSS (the difference is what streaming holds)."""
    from reports.separability import separability_report, summarise_store

    store = FeatureStore.open(path)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start, cpu = time.perf_counter(), _cpu_seconds()
    if stage == "summaries":
        summarise_store(store, ["deu"], workers)
    else:
        separability_report([path], path.parent / "report", bootstrap=bootstrap, double_jpeg=False, workers=workers)
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    return {"stage": stage, "seconds": seconds, "rows_per_s": store.num_rows / seconds,
            "rows_per_cpu_s": store.num_rows / cpu, "rss_after_imports_mib": baseline,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/bench_separability"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--stages", nargs="+", choices=["summaries", "command"], default=["summaries", "command"])
    parser.add_argument("--stage", choices=["summaries", "command"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    path = args.dir / f"store_{args.rows}_{args.shard_size}.zarr"
    if args.stage:
        print(json.dumps(measure(args.stage, path, args.workers, args.bootstrap)))
        return
    start = time.perf_counter()
    build_store(path, args.rows, args.shard_size)
    print(f"store {path}: {args.rows} rows of deu {SHAPE} float32 ({args.rows * 16 / 2**20:.2f} GiB as float32 "
          f"in RAM), built/opened in {time.perf_counter() - start:.0f} s")
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'stage':10s} {'seconds':>8s} {'rows/s':>9s} {'rows/CPU-s':>11s} {'RSS after imports MiB':>22s} "
          f"{'peak RSS MiB':>13s}")
    for stage in args.stages:
        output = subprocess.run([sys.executable, __file__, "--rows", str(args.rows), "--shard-size", str(args.shard_size),
                                 "--dir", str(args.dir), "--workers", str(args.workers), "--bootstrap",
                                 str(args.bootstrap), "--stage", stage], capture_output=True, text=True, check=True)
        figures = json.loads(output.stdout.strip().splitlines()[-1])
        print(f"{stage:10s} {figures['seconds']:8.1f} {figures['rows_per_s']:9.0f} {figures['rows_per_cpu_s']:11.0f} "
              f"{figures['rss_after_imports_mib']:22.0f} {figures['peak_rss_mib']:13.0f}")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
