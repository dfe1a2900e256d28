"""`compare` through the command line: one line per row (mean ± std over seeds), settings from the fit's config."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml
from torch.utils.tensorboard import SummaryWriter

from cli.__main__ import main
from reports.evaluation import Predictions, protocol_table, write_table


def _run(root, row: str, seed: int, asym: float, acc: float, protocol: str = "raw", rerun: str = "") -> None:
    run = root / f"{row}-seed{seed}{rerun}"
    run.mkdir(parents=True)
    fit = {"seed_everything": seed, "model": {"init_args": {"asym_weight": asym, "lr": 1e-4, "guidance": []}},
           "trainer": {"logger": {"init_args": {"version": row}}}}
    (run / "config.yaml").write_text(yaml.safe_dump(fit))
    # A later test's config must not be read as the run's settings.
    (run / "test_config.yaml").write_text(yaml.safe_dump({**fit, "model": {"init_args": {"asym_weight": 9.0}}}))
    writer = SummaryWriter(str(run))
    writer.add_scalar("hp/test_acc", float("nan"), 0)  # the fit's placeholder
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
    assert rows[2][3] == f"{np.mean([0.9, 0.8]):.4f} ± {np.std([0.9, 0.8], ddof=1):.4f}"
    assert rows[3][3] == f"{np.mean([0.70, 0.74]):.4f} ± {np.std([0.70, 0.74], ddof=1):.4f}"
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
