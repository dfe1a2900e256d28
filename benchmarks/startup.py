"""Start-up time of `python -m cli` (run by hand): wall time of fresh processes, min and median over repeats.

    python benchmarks/startup.py [--repeats 5] [--repo PATH ...]

Several `--repo` checkouts (e.g. `git worktree add /tmp/base <commit>` for a before/after) are measured
interleaved, one process of each in turn, so a change in the machine's load hits both alike; each process runs
in its checkout with PYTHONPATH=REPO. Start-up is dominated by imports (torch ~1.4 s, lightning.pytorch ~5 s on
an idle machine), so the load average is printed with the figures: compare only figures taken together.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = (("--help",), ("compare", "--help"), ("verify", "--help"), ("fit", "--help"))


def wall_time(repo: Path, args: tuple[str, ...]) -> float:
    """Seconds from start to exit of `python -m cli ARGS` in `repo` (output discarded; a failure stops the run)."""
    env = {**os.environ, "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cli", *args], cwd=repo, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"python -m cli {' '.join(args)} failed in {repo}: {done.stderr.strip()[-500:]}")
    return seconds


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--repo", type=Path, nargs="+", default=[Path(__file__).resolve().parents[1]])
    args = parser.parse_args()
    print(f"{args.repeats} repeats, interleaved over {len(args.repo)} checkout(s); load average {load()}")
    print(f"{'command':30s} {'checkout':28s} {'min s':>7s} {'median s':>9s}")
    for command in COMMANDS:
        times: dict[Path, list[float]] = {repo: [] for repo in args.repo}
        for _ in range(args.repeats):
            for repo in args.repo:
                times[repo].append(wall_time(repo, command))
        for repo, seconds in times.items():
            print(f"{'python -m cli ' + ' '.join(command):30s} {str(repo)[-28:]:28s} {min(seconds):7.2f} "
                  f"{statistics.median(seconds):9.2f}", flush=True)
        print(f"  load average now {load()}", flush=True)


if __name__ == "__main__":
    main()
