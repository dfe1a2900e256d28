"""Run the fake extractor through ZarrFeatureWriter in its own process (DDP re-executes this script per rank).

Prints rank 0's summary and exits 1 naming unfinished tars, as `python -m cli precompute` does.
Usage: python feature_writer_run.py STORE SHARD_DIR [--devices 2] [--kill-at-row R] [--drop-row R] [--rows-log DIR]
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
    parser.add_argument("--drop-row", type=int, action="append", default=[])
    parser.add_argument("--rows-log", default=None)
    args = parser.parse_args()
    writer = run_predict(args.store, args.shard_dir, devices=args.devices, kill_at_row=args.kill_at_row,
                         rows_log=args.rows_log, drop_rows=tuple(args.drop_row))
    summary = writer.summary
    if summary is not None:  # rank 0
        print(summary.text)
        if summary.unfinished:
            sys.exit(f"{args.store}: {summary.done}/{summary.total} tars done; unfinished: "
                     f"{', '.join(summary.unfinished)}")


if __name__ == "__main__":
    main()
