"""`compare` puts runs side by side with exactly the settings that differ."""

from __future__ import annotations

import csv

import numpy as np
import yaml
from torch.utils.tensorboard import SummaryWriter

from reports.compare import compare_runs
from reports.evaluation import Predictions, protocol_table, write_table


def _run(root, name: str, asym: float, acc: float, protocol: str) -> None:
    run = root / name
    run.mkdir(parents=True)
    config = {"model": {"init_args": {"asym_weight": asym, "lr": 1e-4}},
              "trainer": {"logger": {"init_args": {"version": name}}}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    writer = SummaryWriter(str(run))
    writer.add_scalar("test_acc", acc - 0.1, 0)
    writer.add_scalar("test_acc", acc, 1)  # the last value counts
    writer.close()
    preds = Predictions(np.array([0.1, 0.9, 0.4, 0.6]), np.array([0, 1, 0, 1]), np.array(["sdv4"] * 4))
    write_table(protocol_table(preds), run, "protocol_table", f"DEUADetector, protocol {protocol}, threshold 0.5")


def test_compare_sorts_runs_and_shows_only_differing_settings(tmp_path, capsys):
    _run(tmp_path, "baseline", 0.0, 0.70, "raw")
    _run(tmp_path, "both", 0.5, 0.90, "jpeg_aligned")
    rows = compare_runs(tmp_path, sort_by="test_acc")
    assert [r["run"] for r in rows] == ["both", "baseline"]
    assert rows[0]["model.init_args.asym_weight"] == 0.5 and rows[0]["test_acc"] == np.float32(0.9)
    assert "model.init_args.lr" not in rows[0]  # equal in every run
    with open(tmp_path / "compare.csv", newline="") as handle:
        assert [r["run"] for r in csv.DictReader(handle)] == ["both", "baseline"]
    side_by_side = (tmp_path / "protocol_tables.md").read_text()
    assert "baseline (raw) ACC" in side_by_side and "both (jpeg_aligned) AUROC" in side_by_side
    assert "| sdv4 | 100.0 | 100.0 | 100.0 | 100.0 |" in side_by_side
