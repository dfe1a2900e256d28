"""`python -m cli grid configs/ablations/deua`: fit and test every ablation row of a grid.

A grid is a directory of small override YAMLs, one per row, each stacked on the detector's base
config (`configs/<grid name>.yaml` unless `--base` says otherwise) and then on any `--extra` configs
(e.g. a git-ignored local.yaml with the store paths). Every row runs as its own `python -m cli fit`
and `python -m cli test` subprocess: a DDP launch re-executes its command line per rank, so each
Trainer run must be a whole process, and one failed row must not take the others' results with it.
The test run loads the row's `last.ckpt` from its run directory, which is known because every row
names its own `trainer.logger.init_args.version`. Compare the rows afterwards with
`python -m cli compare runs/<name>` or TensorBoard's hparams tab.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from cli.grid_together import run_together


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli", *args]


def run_directory(configs: list[str]) -> Path:
    """save_dir/name/version of the row's TensorBoardLogger, from the resolved config."""
    printed = subprocess.run(_cli("fit", *configs, "--print_config"), capture_output=True, text=True)
    if printed.returncode:
        raise SystemExit(f"python -m cli grid: {' '.join(configs)} does not resolve:\n{printed.stderr.strip()}")
    logger = (yaml.safe_load(printed.stdout).get("trainer") or {}).get("logger")
    init = logger.get("init_args", {}) if isinstance(logger, dict) else {}
    if init.get("version") is None or init.get("save_dir") is None:
        raise SystemExit(f"python -m cli grid: {' '.join(configs)} gives no trainer.logger with save_dir and "
                         "version; each row must name its own version")
    return Path(init["save_dir"]) / str(init.get("name") or "") / str(init["version"])


def grid(rows: Path, base: Path | None = None, extra: list[Path] | None = None, test: bool = True,
         dry_run: bool = False, together: bool = False) -> list[Path]:
    """Fit (and test) every ablation row in ROWS, one subprocess per Trainer run; returns the run directories.

    A row whose fit fails is reported and skipped (no test); the others still run, and the command
    exits non-zero at the end naming the failed rows.

    Args:
        rows: directory of override YAMLs, one per row (run in name order).
        base: base config; default `configs/<rows directory name>.yaml` next to `configs/ablations/`.
        extra: configs stacked after each row (machine-specific paths, shorter schedules).
        test: after fitting, test the row's last checkpoint (writes test_predictions.csv to its run dir).
        dry_run: print the commands instead of running them.
        together: fit the rows in one process on the same batches, one read of the stores for all of them
            (cli/grid_together.py; rows must share their data and training loop), then test each row.
    """
    rows, extra = Path(rows), [Path(p) for p in extra or []]
    base = Path(base) if base is not None else rows.parent.parent / f"{rows.name}.yaml"
    row_files = sorted(rows.glob("*.yaml"))
    missing = [str(p) for p in [base, *extra] if not p.is_file()]
    if missing or not row_files:
        raise SystemExit(f"python -m cli grid: missing config files {missing}" if missing
                         else f"python -m cli grid: no *.yaml rows in {rows}")
    run_dirs, failed = [], []
    row_configs = {row.stem: [arg for path in (base, row, *extra) for arg in ("--config", str(path))] for row in row_files}
    if together:
        print(f"grid rows {', '.join(row_configs)}: fit together in one process", flush=True)
        failed = [] if dry_run else [f"{name} (fit)" for name in run_together(row_configs)]
    for row in row_files:
        configs = row_configs[row.stem]
        run_dir = run_directory(configs)
        if f"{row.stem} (fit)" in failed:
            continue
        commands = [] if together else [_cli("fit", *configs)]
        if test:
            commands.append(_cli("test", *configs, "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt")))
        for command in commands:
            shown = "python " + " ".join(command[1:])
            print(shown if dry_run else f"grid row {row.stem}: {shown}", flush=True)
            if not dry_run and subprocess.run(command).returncode:
                failed.append(f"{row.stem} ({command[3]})")
                break
        run_dirs.append(run_dir)
    if failed:
        raise SystemExit(f"python -m cli grid: rows failed: {', '.join(failed)}")
    return run_dirs
