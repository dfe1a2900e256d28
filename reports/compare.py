"""`python -m cli compare RUNS_DIR`: one table of all runs, with only the settings that differ.

A run is a directory holding TensorBoard event files; its settings come from the `config.yaml`
LightningCLI saved there (or `hparams.yaml`), its metrics from the last value of every scalar.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from reports.evaluation import markdown_table, save_rows


def _flatten(tree: object, prefix: str = "") -> dict[str, object]:
    if isinstance(tree, dict):
        flat: dict[str, object] = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): tree if not isinstance(tree, list) else ",".join(map(str, tree))}


def _run_settings(run_dir: Path) -> dict[str, object]:
    for name in ("config.yaml", "hparams.yaml"):
        for candidate in (run_dir / name, run_dir.parent / name):
            if candidate.is_file():
                return _flatten(yaml.safe_load(candidate.read_text()) or {})
    return {}


def _run_metrics(run_dir: Path) -> dict[str, float]:
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: accumulator.Scalars(tag)[-1].value for tag in accumulator.Tags()["scalars"]}


def collect_runs(runs_dir: Path) -> list[dict[str, object]]:
    """Every directory under runs_dir with event files becomes one row: its path, settings, metrics."""
    run_dirs = sorted({p.parent for p in Path(runs_dir).rglob("events.out.tfevents.*")})
    return [{"run": str(d.relative_to(runs_dir)), "settings": _run_settings(d), "metrics": _run_metrics(d)}
            for d in run_dirs]


def comparison_table(runs: list[dict[str, object]], metrics: list[str] | None, sort_by: str) -> list[dict]:
    """Rows of run name, the settings whose values differ between runs, and the chosen metrics."""
    all_keys = sorted({k for run in runs for k in run["settings"]})
    differing = [k for k in all_keys if len({repr(run["settings"].get(k)) for run in runs}) > 1
                 and not k.endswith(("version", "save_dir", "default_root_dir", "dirpath", "name"))]
    metric_names = metrics or sorted({m for run in runs for m in run["metrics"]
                                      if m.startswith(("test", "val")) and "step" not in m})
    rows = [{"run": run["run"], **{k: run["settings"].get(k, "") for k in differing},
             **{m: run["metrics"].get(m, float("nan")) for m in metric_names}} for run in runs]

    def key(row: dict) -> float:
        value = row.get(sort_by, float("nan"))
        return -value if isinstance(value, float) and not math.isnan(value) else math.inf

    return sorted(rows, key=key)


def protocol_tables_side_by_side(runs_dir: Path) -> str | None:
    """Every run's protocol table (from `test`) as ACC and AUROC columns per run, one row per generator.

    Runs of one detector under different protocols (raw, jpeg_aligned, ...) then read side by side,
    with the format-only reference row showing which of them are confounded.
    """
    tables = {}
    for path in sorted(Path(runs_dir).rglob("protocol_table.csv")):
        title = (path.with_suffix(".md").read_text().splitlines() or [""])[0]
        protocol = title.split("protocol ")[1].split(",")[0] if "protocol " in title else "?"
        with open(path, newline="") as handle:
            tables[f"{path.parent.relative_to(runs_dir)} ({protocol})"] = {r["generator"]: r for r in csv.DictReader(handle)}
    if not tables:
        return None
    generators = list(dict.fromkeys(g for table in tables.values() for g in table))
    header = ["generator"] + [f"{run} {metric}" for run in tables for metric in ("ACC", "AUROC")]
    cells = [[generator] + [f"{100 * float(table[generator][m]):.1f}" if generator in table else ""
                            for table in tables.values() for m in ("acc", "auroc")] for generator in generators]
    return markdown_table(header, cells)


def compare_runs(runs_dir: Path, sort_by: str = "test_acc", metrics: list[str] | None = None) -> list[dict]:
    """Print the table as Markdown and write RUNS_DIR/compare.{md,csv} (and protocol_tables.md after `test`)."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise SystemExit(f"python -m cli compare: {runs_dir} is not a directory")
    runs = collect_runs(runs_dir)
    if not runs:
        raise SystemExit(f"python -m cli compare: no TensorBoard runs (events.out.tfevents.*) under {runs_dir}")
    rows = comparison_table(runs, metrics, sort_by)
    print(save_rows(rows, runs_dir, "compare", lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)))
    side_by_side = protocol_tables_side_by_side(runs_dir)
    if side_by_side:
        (runs_dir / "protocol_tables.md").write_text(side_by_side)
        print(side_by_side)
    return rows
