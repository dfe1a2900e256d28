"""Run the fake extractor through ZarrFeatureWriter in its own process (DDP re-executes this script per rank).

Usage: python feature_writer_run.py STORE SHARD_DIR [--devices 2] [--kill-at-row R] [--rows-log DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS.parent), str(TESTS)]

from feature_cache_fakes import run_predict  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("store", type=Path)
    parser.add_argument("shard_dir", type=Path)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--kill-at-row", type=int, default=None)
    parser.add_argument("--rows-log", default=None)
    args = parser.parse_args()
    run_predict(args.store, args.shard_dir, devices=args.devices, kill_at_row=args.kill_at_row,
                rows_log=args.rows_log)


if __name__ == "__main__":
    main()
