"""`compare` through the command line: one line per row (mean ± std over seeds), settings from the fit's config."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml
from torch.utils.tensorboard import SummaryWriter

from cli.__main__ import main
from reports.evaluation import Predictions, protocol_table, write_table


def _run(root, row: str, seed: int, asym: float, acc: float | None, protocol: str = "raw", rerun: str = "",
         data: dict | None = None) -> None:
    """A fitted run directory as `fit` leaves it; `acc=None`: never tested (only the fit's NaN placeholder)."""
    run = root / f"{row}-seed{seed}{rerun}"
    run.mkdir(parents=True)
    fit = {"seed_everything": seed, "model": {"init_args": {"asym_weight": asym, "lr": 1e-4, "guidance": []}},
           "trainer": {"logger": {"init_args": {"version": row}}}, **({"data": {"init_args": data}} if data else {})}
    (run / "config.yaml").write_text(yaml.safe_dump(fit))
    # A later test's config must not be read as the run's settings.
    (run / "test_config.yaml").write_text(yaml.safe_dump({**fit, "model": {"init_args": {"asym_weight": 9.0}}}))
    writer = SummaryWriter(str(run))
    writer.add_scalar("hp/test_acc", float("nan"), 0)  # the fit's placeholder
    writer.add_scalar("hp/val_auroc", 0.6, 0)
    if acc is None:
        writer.close()
        return
    writer.add_scalar("hp/test_acc", acc, 5)  # the test's value: the last one counts
    writer.add_scalar("hp/test_auroc", acc + 0.05, 5)
    writer.close()
    preds = Predictions(np.array([0.1, 0.9, 0.4, 0.6]), np.array([0, 1, 0, 1]), np.array(["sdv4"] * 4))
    write_table(protocol_table(preds), run, "protocol_table", f"DEUADetector, protocol {protocol}, threshold 0.5")


def test_compare_groups_seeds_and_shows_only_differing_settings(tmp_path, capsys):
    """Bugs caught: one line per seed instead of per row; std of a population instead of the sample; settings
    read from the last command's config; an older rerun counted beside the newest; NaN placeholders read as
    the result."""
    _run(tmp_path, "baseline", 0, 0.0, 0.70)
    _run(tmp_path, "baseline", 1, 0.0, 0.74)
    _run(tmp_path, "both", 0, 0.5, 0.10)  # superseded by its rerun below
    _run(tmp_path, "both", 0, 0.5, 0.90, rerun="-r2")
    _run(tmp_path, "both", 1, 0.5, 0.80, protocol="jpeg_aligned")
    main(["compare", str(tmp_path), "--metrics", "test_acc", "test_auroc"])
    printed = capsys.readouterr().out
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in printed.splitlines() if line.startswith("|")]
    assert rows[0] == ["row", "seeds", "model.asym_weight", "test_acc", "test_auroc"]
    assert rows[2][:3] == ["both", "0,1", "0.5"] and rows[3][:3] == ["baseline", "0,1", "0.0"]
    assert rows[2][3] == f"{np.mean([0.9, 0.8]):.4f} ± {np.std([0.9, 0.8], ddof=1):.4f} (n=2)"
    assert rows[3][3] == f"{np.mean([0.70, 0.74]):.4f} ± {np.std([0.70, 0.74], ddof=1):.4f} (n=2)"
    every_run = pd.read_csv(tmp_path / "compare.csv")
    assert sorted(every_run["run"]) == ["baseline-seed0", "baseline-seed1", "both-seed0-r2", "both-seed1"]
    side_by_side = (tmp_path / "protocol_tables.md").read_text()
    assert "both-seed1 (jpeg_aligned) AUROC" in side_by_side


def test_compare_refuses_unknown_metric_names(tmp_path, capsys):
    """Bug caught: a misspelt --sort_by sorting by nothing and printing a table that looks fine."""
    _run(tmp_path, "baseline", 0, 0.0, 0.70)
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", str(tmp_path), "--sort_by", "test_accuracy"])
    assert "unknown metric 'test_accuracy'" in str(exit_info.value) and "test_acc" in str(exit_info.value)
    with pytest.raises(SystemExit, match="unknown metric 'val_f1'"):
        main(["compare", str(tmp_path), "--metrics", "test_acc", "val_f1"])


def _table(printed: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in printed.splitlines() if line.startswith("|")]


def test_compare_keeps_older_tested_rerun_and_flags_untested_seeds(tmp_path, capsys):
    """Bugs caught: an untested newest rerun (`-r2`, fit only) replacing the older tested run of its seed, so the
    seed's result silently vanished; a seeds column `0,1` over a mean of one value, with no n and no flag; a
    setting only some configs have (missing = NaN) crashing the grouping."""
    _run(tmp_path, "both", 0, 0.5, 0.90)
    _run(tmp_path, "both", 0, 0.5, None, rerun="-r2")  # a rerun fitted, never tested
    _run(tmp_path, "both", 1, 0.5, 0.80)
    _run(tmp_path, "baseline", 0, 0.0, 0.70, data={"batch_size": 16})
    _run(tmp_path, "baseline", 1, 0.0, None, data={"batch_size": 16})  # this seed has no test result at all
    main(["compare", str(tmp_path), "--metrics", "test_acc", "val_auroc"])
    printed = capsys.readouterr().out
    rows = {r[0]: r for r in _table(printed)[2:]}
    header = _table(printed)[0]
    assert header[:3] == ["row", "seeds", "untested seeds"]
    acc, val = header.index("test_acc"), header.index("val_auroc")
    assert rows["both"][acc] == f"{np.mean([0.9, 0.8]):.4f} ± {np.std([0.9, 0.8], ddof=1):.4f} (n=2)"
    assert rows["both"][2] == ""
    assert rows["baseline"][acc] == "0.7000 (n=1)" and rows["baseline"][2] == "1"
    assert rows["baseline"][val] == "0.6000 ± 0.0000 (n=2)"  # the untested fit still counts for val metrics
    assert "Not tested (no test result, left out of the test means): baseline seed 1" in printed
    batch = header.index("data.batch_size")
    assert rows["baseline"][batch] == "16.0" and rows["both"][batch] == "nan"
    chosen = sorted(pd.read_csv(tmp_path / "compare.csv")["run"])
    assert chosen == ["baseline-seed0", "baseline-seed1", "both-seed0", "both-seed1"]


def test_compare_separates_runs_of_one_row_with_different_settings(tmp_path, capsys):
    """Bug caught: a rerun of a row with another setting (asym 0.5 then 1.0) averaged with the original as if it
    were another seed of the same configuration."""
    _run(tmp_path, "both", 0, 0.5, 0.90)
    _run(tmp_path, "both", 1, 0.5, 0.80)
    _run(tmp_path, "both", 0, 1.0, 0.20, rerun="-r2")
    main(["compare", str(tmp_path), "--metrics", "test_acc"])
    rows = {r[0]: r for r in _table(capsys.readouterr().out)[2:]}
    assert set(rows) == {"both#1", "both#2"}
    assert rows["both#1"][1:] == ["0,1", "0.5", f"{np.mean([0.9, 0.8]):.4f} ± {np.std([0.9, 0.8], ddof=1):.4f} (n=2)"]
    assert rows["both#2"][1:] == ["0", "1.0", "0.2000 (n=1)"]


def test_matrix_never_pools_different_ablation_rows(tmp_path, capsys):
    """Bug caught: `compare --matrix` over a directory holding several ablation rows trained on the same generator
    pooled them into one matrix row labelled "seeds 4"; each configuration must be its own row, with its own n."""
    from workflow_stores import build_store

    store = build_store(tmp_path / "stores" / "sdv4.zarr", ["sdv4"], {"sdv4": 1.0}, 8)
    runs = tmp_path / "runs"
    for row, asym in (("baseline", 0.0), ("both", 0.5)):
        for seed in (0, 1):
            _run(runs, row, seed, asym, 0.7, data={"train": [store]})
    main(["compare", str(runs), "--matrix"])
    printed = capsys.readouterr().out
    rows = {r[0]: r for r in _table(printed)[2:]}
    assert set(rows) == {"sdv4 (baseline)", "sdv4 (both)"} and all(r[1] == "2" for r in rows.values())
    assert "one matrix row per configuration" in printed
    stats = pd.read_csv(runs / "matrix.csv")
    assert set(stats["seeds"]) == {2}
