"""`python -m cli compare RUNS_DIR`: one table of all runs (mean ± std over seeds), or the cross-generator matrix.

A run is a directory that `fit` made (`<row>-seed<S>[-r<k>]`, see `workflows.run_dirs`) and holds TensorBoard
event files. Its settings come from the `config.yaml` that `fit` saved (never from a later `test`'s
config), its metrics from the last value of every scalar, read with TensorBoard's own EventAccumulator.
Runs are grouped by their resolved configuration (the row and every setting but seeds, paths and versions):
runs of one configuration with different seeds are one line, each metric the mean ± std over the runs that have
it, with its n. Per configuration and seed the newest *tested* rerun counts (an untested newest rerun never hides
an older tested one); configurations with seeds that have no test result are flagged.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from reports.tables import markdown_table

RUN_NAME = re.compile(r"(?P<row>.+)-seed(?P<seed>-?\d+)(?:-r(?P<rerun>\d+))?")
# What the screen table shows by default (everything else is in compare.csv).
DEFAULT_METRICS = ("test_acc", "test_auroc", "test_mean_generator_acc", "test_mean_generator_auroc",
                   "test_format_only_auroc", "val_auroc")
NOT_SETTINGS = ("version", "save_dir", "default_root_dir", "dirpath", "name", "seed_everything", "ckpt_path")


def _flatten(tree: object, prefix: str = "") -> dict[str, object]:
    if isinstance(tree, dict):
        flat: dict[str, object] = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    if isinstance(tree, list):  # as in the hparams tab: items joined, an empty list is "none"
        return {prefix.rstrip("."): ",".join(map(str, tree)) if tree else "none"}
    return {prefix.rstrip("."): tree}


def _short(key: str) -> str:
    return key.replace("model.init_args.", "model.").replace("data.init_args.", "data.")


def run_settings(run_dir: Path) -> dict[str, object]:
    """The fit's resolved config (config.yaml), flattened; `hparams.yaml` for runs made outside the CLI."""
    for name in ("config.yaml", "hparams.yaml"):
        if (run_dir / name).is_file():
            return _flatten(yaml.safe_load((run_dir / name).read_text()) or {})
    return {}


def run_metrics(run_dir: Path) -> dict[str, float]:
    """Last value of every scalar; `hp/x` is reported as `x` (the hparams tab's copy of the same number)."""
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    values = {tag: accumulator.Scalars(tag)[-1].value for tag in accumulator.Tags()["scalars"]}
    return {tag.removeprefix("hp/"): value for tag, value in sorted(values.items(), key=lambda kv: kv[0].startswith("hp/"))}


def collect_runs(runs_dir: Path) -> pd.DataFrame:
    """One line per run directory under runs_dir: group (row path), configuration, seed, rerun, settings, metrics.

    Of several reruns of one configuration and seed only one counts: the newest that was tested (has a finite
    `test_*` metric), else the newest (older ones are failed or superseded fits).
    """
    records, settings = [], {}
    for run_dir in sorted({p.parent for p in Path(runs_dir).rglob("events.out.tfevents.*")}):
        name = RUN_NAME.fullmatch(run_dir.name)
        relative = run_dir.relative_to(runs_dir)
        row = str(relative.parent / name["row"]) if name else str(relative)
        config = {_short(k): v for k, v in run_settings(run_dir).items()}
        settings.update(dict.fromkeys(config))
        records.append({"run": str(relative), "row": row, "seed": int(name["seed"]) if name else None,
                        "rerun": int(name["rerun"] or 1) if name else 1, **config, **run_metrics(run_dir)})
    frame = pd.DataFrame(records)
    if frame.empty:
        return frame
    frame.attrs["settings"] = list(settings)  # the config's keys: every other column is a metric or bookkeeping
    tests = [c for c in frame.columns if c.startswith("test_") and pd.api.types.is_numeric_dtype(frame[c])]
    frame["tested"] = frame[tests].notna().any(axis=1) if tests else False
    frame["configuration"] = configuration_labels(frame)
    frame = frame.sort_values(["tested", "rerun"])  # the last per configuration and seed: newest tested
    chosen = frame.groupby(["configuration", frame["seed"].fillna(-1)]).tail(1).sort_values("run")
    chosen = chosen.reset_index(drop=True)
    chosen.attrs["settings"] = frame.attrs["settings"]
    return chosen


def _settings_columns(frame: pd.DataFrame) -> list[str]:
    """Columns of the fit's config that are settings (not paths, versions or seeds)."""
    return [c for c in frame.attrs.get("settings", []) if c in frame.columns and not c.endswith(NOT_SETTINGS)]


def configuration_labels(frame: pd.DataFrame) -> list[str]:
    """Each run's configuration: its row name, with `#k` appended when runs of one row differ in a setting."""
    settings = _settings_columns(frame)
    signature = frame[settings].map(str).agg("|".join, axis=1) if settings else pd.Series("", index=frame.index)
    labels = []
    for row, sig in zip(frame["row"], signature):
        variants = list(dict.fromkeys(signature[frame["row"] == row]))
        labels.append(row if len(variants) == 1 else f"{row}#{variants.index(sig) + 1}")
    return labels


def metric_columns(frame: pd.DataFrame) -> list[str]:
    return sorted(c for c in frame.columns if c.startswith(("test", "val", "train")) and "step" not in c
                  and pd.api.types.is_numeric_dtype(frame[c]))


def differing_settings(frame: pd.DataFrame, metrics: list[str]) -> list[str]:
    """Settings whose values differ between rows (not paths, versions or seeds)."""
    return [c for c in _settings_columns(frame) if c not in metrics and frame[c].map(str).nunique() > 1]


def _mean_std(values: pd.Series) -> str:
    """`mean ± std (n=k)` over the runs that have the metric (a test metric: the tested runs only)."""
    values = values.dropna()
    if values.empty:
        return ""
    if len(values) == 1:
        return f"{values.iloc[0]:.4f} (n=1)"
    return f"{values.mean():.4f} ± {values.std(ddof=1):.4f} (n={len(values)})"


def summary(frame: pd.DataFrame, metrics: list[str], sort_by: str) -> pd.DataFrame:
    """One line per configuration: seeds, seeds without test results, differing settings, each metric as
    mean ± std (n) over seeds; best `sort_by` first."""
    settings = differing_settings(frame, metrics)
    grouped = frame.groupby("configuration", sort=False)
    table = pd.DataFrame({"row": list(grouped.groups), "seeds": [",".join(str(int(s)) for s in g["seed"].dropna())
                                                                  for _, g in grouped]})
    untested = [",".join(str(int(s)) if pd.notna(s) else "?" for s in g.loc[~g["tested"], "seed"]) for _, g in grouped]
    if any(untested):
        table["untested seeds"] = untested
    for column in settings:
        table[column] = [",".join(sorted(set(g[column].map(str)))) for _, g in grouped]
    for metric in metrics:
        table[metric] = [_mean_std(g[metric]) if metric in g else "" for _, g in grouped]
    order = grouped[sort_by].mean() if sort_by in frame else pd.Series(dtype=float)
    table["_key"] = [-order.get(row, math.nan) for row in table["row"]]
    return table.sort_values("_key", na_position="last").drop(columns="_key").reset_index(drop=True)


def _check_names(frame: pd.DataFrame, sort_by: str, metrics: list[str] | None) -> list[str]:
    known = metric_columns(frame)
    unknown = [m for m in [sort_by, *(metrics or [])] if m not in known]
    if unknown:
        raise ValueError(f"unknown metric {', '.join(map(repr, unknown))}; these runs have {', '.join(known)}")
    return list(metrics) if metrics else [m for m in DEFAULT_METRICS if m in known]


def train_generators(settings: pd.Series) -> list[str]:
    """Generators with fake training rows in the run's train stores (real-only groups such as MSCOCO are not one)."""
    from feature_cache.store import FeatureStore  # imports torch and zarr: only `--matrix` reads stores

    paths = settings.get("data.train")
    wanted = settings.get("data.generators")
    names = set()
    for path in str(paths).split(",") if isinstance(paths, str) and paths else []:
        store = FeatureStore.open(path)
        codes = np.unique(store.rows("generator")[store.rows("label") == 1])
        names |= {store.generator_names[c] for c in codes}
    if isinstance(wanted, str) and wanted:
        names &= set(wanted.split(","))
    return sorted(names)


def generalisation_matrix(frame: pd.DataFrame, runs_dir: Path) -> tuple[pd.DataFrame, str]:
    """Rows = training generator, columns = test generator (+ row mean), cells ACC / AUROC (mean ± std over seeds).

    Read from each run's protocol_table.csv (written by `test`); the training generator from its train stores.
    Runs of different configurations (ablation rows) trained on the same generators are never pooled: each gets
    its own matrix row, `generator (configuration)`.
    """
    frame = frame.assign(trained_on=["+".join(train_generators(run)) or run["row"] for _, run in frame.iterrows()])
    # Configurations apart from the training data: one per matrix row, or the rows are told apart by name.
    apart = _settings_columns(frame.drop(columns=["data.train"], errors="ignore"))
    shared = {trained: group[apart].map(str).drop_duplicates().shape[0] == 1
              for trained, group in frame.groupby("trained_on")}
    records = []
    for _, run in frame.iterrows():
        table = Path(runs_dir) / run["run"] / "protocol_table.csv"
        if not table.is_file():
            continue
        trained_on = run["trained_on"] if shared[run["trained_on"]] else f"{run['trained_on']} ({run['configuration']})"
        rows = pd.read_csv(table, dtype={"generator": str})
        rows = rows[~rows["generator"].str.endswith(" reference")]  # format-only, double-JPEG: not generators
        rows["generator"] = rows["generator"].replace({"average": "mean"})
        records += [{"train": trained_on, "test": r.generator, "seed": run["seed"], "acc": r.acc, "auroc": r.auroc}
                    for r in rows.itertuples()]
    if not records:
        raise ValueError(f"no run under {runs_dir} has a protocol_table.csv (run `test` first)")
    long = pd.DataFrame(records)
    stats = long.groupby(["train", "test"])[["acc", "auroc"]].agg(["mean", "std", "count"]).reset_index()
    stats.columns = ["train", "test", "acc_mean", "acc_std", "seeds", "auroc_mean", "auroc_std", "auroc_count"]
    stats = stats.drop(columns="auroc_count")

    def cell(record: pd.Series) -> str:
        spread = "" if record["seeds"] < 2 else f" ± {100 * record['acc_std']:.1f}"
        spread_auc = "" if record["seeds"] < 2 else f" ± {100 * record['auroc_std']:.1f}"
        return f"{100 * record['acc_mean']:.1f}{spread} / {100 * record['auroc_mean']:.1f}{spread_auc}"

    stats["cell"] = stats.apply(cell, axis=1)
    wide = stats.pivot(index="train", columns="test", values="cell").fillna("")
    columns = [c for c in wide.columns if c != "mean"] + ["mean"]
    seeds = stats.groupby("train")["seeds"].max()
    cells = [[train, str(int(seeds[train]))] + list(wide.loc[train, columns]) for train in wide.index]
    markdown = markdown_table(["train \\ test", "seeds", *columns], cells)
    separate = [trained for trained, alone in shared.items() if not alone]
    note = (f"\nRuns trained on {', '.join(separate)} differ in other settings: one matrix row per configuration "
            "(never pooled).\n" if separate else "")
    return stats, markdown + "\nCells: ACC / AUROC in % at the validation threshold (mean ± std over the tested " \
                             "seeds, n in the seeds column); `mean` is the mean over test generators.\n" + note


def protocol_tables_side_by_side(runs_dir: Path) -> str | None:
    """Every run's protocol table (from `test`) as ACC and AUROC columns per run, one row per generator.

    Runs of one detector under different protocols (raw, jpeg_aligned, ...) then read side by side,
    with the format-only reference row showing which of them are confounded.
    """
    tables = {}
    for path in sorted(Path(runs_dir).rglob("protocol_table.csv")):
        title = (path.with_suffix(".md").read_text().splitlines() or [""])[0]
        protocol = title.split("protocol ")[1].split(",")[0] if "protocol " in title else "?"
        tables[f"{path.parent.relative_to(runs_dir)} ({protocol})"] = pd.read_csv(path, dtype={"generator": str}).set_index("generator")
    if not tables:
        return None
    generators = list(dict.fromkeys(g for table in tables.values() for g in table.index))
    header = ["generator"] + [f"{run} {metric}" for run in tables for metric in ("ACC", "AUROC")]
    cells = [[generator] + [f"{100 * float(table.loc[generator, m]):.1f}" if generator in table.index else ""
                            for table in tables.values() for m in ("acc", "auroc")] for generator in generators]
    return markdown_table(header, cells)


def compare_runs(runs_dir: Path, sort_by: str = "test_acc", metrics: list[str] | None = None,
                 matrix: bool = False) -> pd.DataFrame:
    """Print the table and write RUNS_DIR/compare.{md,csv} (every run, every metric), or matrix.{md,csv}."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"{runs_dir} is not a directory")
    frame = collect_runs(runs_dir)
    if frame.empty:
        raise FileNotFoundError(f"no TensorBoard runs (events.out.tfevents.*) under {runs_dir}")
    if matrix:
        stats, markdown = generalisation_matrix(frame, runs_dir)
        stats.to_csv(runs_dir / "matrix.csv", index=False)
        (runs_dir / "matrix.md").write_text(markdown)
        print(markdown)
        return stats
    shown = _check_names(frame, sort_by, metrics)
    frame.to_csv(runs_dir / "compare.csv", index=False)
    table = summary(frame, shown, sort_by)
    markdown = markdown_table(list(table.columns), table.map(str).values.tolist())
    if "untested seeds" in table:
        flagged = table[table["untested seeds"] != ""]
        markdown += ("\nNot tested (no test result, left out of the test means): " +
                     "; ".join(f"{r['row']} seed {r['untested seeds']}" for _, r in flagged.iterrows()) +
                     ". Run `python -m cli test` with the row's configs and seed.\n")
    (runs_dir / "compare.md").write_text(markdown)
    print(markdown + f"\n(mean ± std over the seeds that have the metric, n runs; every run and metric: "
                     f"{runs_dir / 'compare.csv'})")
    side_by_side = protocol_tables_side_by_side(runs_dir)
    if side_by_side:
        (runs_dir / "protocol_tables.md").write_text(side_by_side)
    return table
