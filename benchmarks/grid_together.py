"""Wall time of a grid's rows fitted one after another vs together on shared batches (run by hand).

    python benchmarks/grid_together.py [--rows-dir configs/ablations/deua] [--store-rows 3000] [--epochs 1]

Uses the RN50-shaped store of benchmarks/cache_read.py (clip_layer3 1024x14x14 float16 + deu) and the
grid's real row configs on configs/<grid>.yaml, with the store as train data (5 % validation), no test,
`in_memory: device`. Prints each row's time alone (setup + fit, in its own process like `grid` runs
it), the sum, and the time of all rows together (`python -m cli grid --together`'s engine).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cache_read import build_store  # noqa: E402
from workflows.grid import run_together  # noqa: E402
from feature_cache.store import FeatureStore  # noqa: E402


def row_args(base: Path, row: Path, store: Path, runs: Path, epochs: int) -> list[str]:
    return ["--config", str(base), "--config", str(row), "--data.init_args.train", f"[{store}]",
            "--data.init_args.test", "[]", "--data.init_args.val_fraction", "0.05", "--data.init_args.in_memory", "device",
            "--trainer.max_epochs", str(epochs), "--trainer.logger.init_args.save_dir", str(runs),
            "--trainer.enable_progress_bar", "false"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows-dir", type=Path, default=Path("configs/ablations/deua"))
    parser.add_argument("--store-rows", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "cache_read_bench")
    args = parser.parse_args()
    store = args.dir / f"store-{args.store_rows}-float16-none"
    if not FeatureStore.exists(store):
        build_store(store, args.store_rows, 500, "float16", "none")
    base = args.rows_dir.parent.parent / f"{args.rows_dir.name}.yaml"
    rows = sorted(args.rows_dir.glob("*.yaml"))
    with tempfile.TemporaryDirectory(prefix="grid_bench_") as runs:
        alone = {}
        for row in rows:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "cli", "fit", *row_args(base, row, store, Path(runs) / "alone", args.epochs)],
                           check=True, capture_output=True)
            alone[row.stem] = time.perf_counter() - start
            print(f"alone {row.stem}: {alone[row.stem]:.1f} s", flush=True)
        start = time.perf_counter()
        failed = run_together({row.stem: row_args(base, row, store, Path(runs) / "together", args.epochs) for row in rows})
        together = time.perf_counter() - start
    if failed:
        raise SystemExit(f"rows failed together: {failed}")
    one = sum(alone.values()) / len(alone)
    print(f"{len(rows)} rows one after another: {sum(alone.values()):.1f} s; together: {together:.1f} s "
          f"= {together / one:.2f}x the time of one row ({args.store_rows} rows x {args.epochs} epochs)")


if __name__ == "__main__":
    main()
