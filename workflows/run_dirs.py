"""One run = one directory: `<save_dir>/<name>/<row>-seed<S>[-r<k>]`, never shared by two fits.

`fit` takes the next free directory of its row and seed (a rerun or a retry after a failed fit gets
`-r2`, `-r3`, ...), so event files, tables and configs of different runs never mix. `test` and
`validate` go back to the newest fitted directory of the same row and seed and score its checkpoint.
Plain path logic, no Lightning: `grid` uses it too.
"""

from __future__ import annotations

import re
from pathlib import Path


def run_base(row: str, seed: int) -> str:
    """The directory name of a row's first run with this seed."""
    return f"{row}-seed{seed}"


def _runs_of(parent: Path, base: str) -> list[tuple[int, Path]]:
    pattern = re.compile(rf"{re.escape(base)}(?:-r(\d+))?")
    found = []
    for path in parent.glob(f"{base}*") if parent.is_dir() else []:
        match = pattern.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1) or 1), path))
    return sorted(found)


def next_run_dir(parent: Path, base: str) -> Path:
    """`parent/base` if unused, else `parent/base-r<k>` with k one above the highest existing run."""
    runs = _runs_of(parent, base)
    return parent / (base if not runs else f"{base}-r{runs[-1][0] + 1}")


def latest_fitted_run(parent: Path, base: str) -> Path | None:
    """The newest run directory of this row and seed that holds a `checkpoints/last.ckpt`."""
    fitted = [path for _, path in _runs_of(parent, base) if (path / "checkpoints" / "last.ckpt").is_file()]
    return fitted[-1] if fitted else None


def run_checkpoint(run_dir: Path, which: str) -> Path:
    """The run's `best` checkpoint (ModelCheckpoint's best_model_path, recorded in last.ckpt) or its `last`."""
    from core.checkpoint_io import safe_torch_load  # imports torch: not for `grid --help`

    last = run_dir / "checkpoints" / "last.ckpt"
    if which == "last":
        return last
    states = safe_torch_load(last, "checkpoint").get("callbacks", {})
    # By file name inside this run's checkpoints/: the recorded path may be relative to another cwd.
    best = [run_dir / "checkpoints" / Path(state["best_model_path"]).name for key, state in states.items()
            if key.startswith("ModelCheckpoint") and state.get("best_model_path")]
    return next((path for path in best if path.is_file()), last)  # nothing monitored: last is the only one
