"""`python -m cli grid configs/ablations/deua --extra local.yaml --seeds 0 1 2`: fit and test every row × seed.

A grid is a directory of small override YAMLs, one per row, each stacked on the detector's base
config (`configs/<grid name>.yaml` unless `--base` says otherwise) and then on any `--extra` configs
(e.g. a git-ignored local.yaml with the store paths). The rows can be ablations, or training generators
(each row sets `data.init_args.train`) for the cross-generator matrix (`compare --matrix`).
Each row's config is resolved in this process before any run starts (a bad row fails the grid at once).
Every run is its own `python -m cli fit` then `python -m cli test` subprocess: a DDP launch re-executes
its command line per rank, so each Trainer run must be a whole process, and one failed row must not
take the others' results with it. `fit` makes the run directory `<row>-seed<S>` (a rerun gets `-r2`)
and `test` scores that run's best checkpoint; at the end the grid prints `compare`'s summary.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from workflows.run_dirs import latest_fitted_run, next_run_dir, run_base


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli", *args]


def _logger_target(configs: list[str], resolve: Callable[[list[str]], dict]) -> tuple[Path, str, int]:
    """(save_dir/name, version, seed) of the row's TensorBoardLogger, from the config `resolve` gives."""
    try:
        resolved = resolve(["fit", *configs])
    except ValueError as error:
        raise ValueError(f"{' '.join(configs)} does not resolve: {error}") from None
    logger = (resolved.get("trainer") or {}).get("logger")
    init = logger.get("init_args", {}) if isinstance(logger, dict) else {}
    if init.get("version") is None or init.get("save_dir") is None:
        raise ValueError(f"{' '.join(configs)} gives no trainer.logger with save_dir and version; "
                         "each row must name its own version")
    return Path(init["save_dir"]) / str(init.get("name") or ""), str(init["version"]), resolved.get("seed_everything")


def run_together(rows: dict[str, list[str]]) -> list[str]:
    """Fit `rows` ({name: fit arguments}) together (workflows/grid_together.py) in one subprocess, built by cli's
    one builder (`python -m cli.together`; a crash there cannot take the grid with it); returns the names of rows
    that did not fit."""
    with tempfile.TemporaryDirectory(prefix="grid_together_") as folder:
        spec, result = Path(folder) / "rows.json", Path(folder) / "failed.json"
        spec.write_text(json.dumps({"names": list(rows), "args": list(rows.values()), "result": str(result)}))
        code = subprocess.run([sys.executable, "-m", "cli.together", str(spec)]).returncode
        return json.loads(result.read_text()) if result.is_file() else (list(rows) if code else [])


def grid(rows: Path, base: Path | None = None, extra: list[Path] | None = None, seeds: list[int] | None = None,
         test: bool = True, dry_run: bool = False, together: bool = False, *,
         resolve: Callable[[list[str]], dict]) -> list[Path]:
    """`python -m cli grid` (its options: cli/plain_commands.py `grid`); `resolve` turns a Trainer command line into
    its resolved config (cli's `resolve_config`, handed down: workflows never import cli). Returns the run
    directories."""
    from core.progress import report_progress

    rows, extra = Path(rows), [Path(p) for p in extra or []]
    base = Path(base) if base is not None else rows.parent.parent / f"{rows.name}.yaml"
    row_files = sorted(rows.glob("*.yaml"))
    missing = [str(p) for p in [base, *extra] if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"missing config files {missing}")
    if not row_files:
        raise FileNotFoundError(f"no *.yaml rows in {rows}")
    plan = []  # (row, configs, parent, version, seed): every run known before the first starts
    # Each row's config is resolved before any run starts (a bad row fails the grid at once): a line per row.
    for row in report_progress(row_files, len(row_files), "grid: resolving row configs", "rows", every_s=0,
                               always=True):
        configs = [arg for path in (base, row, *extra) for arg in ("--config", str(path))]
        parent, version, config_seed = _logger_target(configs, resolve)
        plan += [(row, configs, parent, version, seed) for seed in (seeds if seeds else [config_seed])]
    run_dirs, failed, parents = [], [], sorted({parent for _, _, parent, _, _ in plan})
    if together:
        for seed in dict.fromkeys(seed for *_, seed in plan):
            rows_of_seed = {f"{row.stem} seed {seed}": [*configs, "--seed_everything", str(seed)]
                            for row, configs, _, _, s in plan if s == seed}
            print(f"grid rows {', '.join(rows_of_seed)}: fit together in one process", flush=True)
            failed += [] if dry_run else [f"{name} (fit)" for name in run_together(rows_of_seed)]
    steps = plan if dry_run else report_progress(plan, len(plan), "grid", "runs", every_s=0, always=True)
    for row, configs, parent, version, seed in steps:
        seeded = [*configs, "--seed_everything", str(seed)]
        label = f"{row.stem} seed {seed}"
        if f"{label} (fit)" in failed:
            continue
        run_dir = latest_fitted_run(parent, run_base(version, seed)) if together and not dry_run \
            else next_run_dir(parent, run_base(version, seed))
        commands = ([] if together else [_cli("fit", *seeded)]) + ([_cli("test", *seeded)] if test else [])
        for command in commands:
            shown = "python " + " ".join(command[1:])
            print(shown if dry_run else f"grid {label}: {shown}", flush=True)
            if not dry_run and subprocess.run(command).returncode:
                failed.append(f"{label} ({command[3]})")
                break
        fitted = run_dir if dry_run else latest_fitted_run(parent, run_base(version, seed))
        if fitted is not None:
            run_dirs.append(fitted)
    if not dry_run and run_dirs:
        from reports.compare import compare_runs

        for parent in parents:
            print(f"\ngrid summary: python -m cli compare {parent}", flush=True)
            compare_runs(parent, sort_by="test_acc" if test else "val_auroc")
    if failed:
        raise SystemExit(f"python -m cli grid: runs failed: {', '.join(failed)}")
    return run_dirs
