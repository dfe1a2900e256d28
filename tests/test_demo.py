"""The demo end to end (smaller), then `predict` and `robustness` on what it trained.

One real `python -m cli demo` subprocess builds data, shards, posterior, stores, two detectors, their
test tables and plots; the tests check those artefacts against each other and reuse the DEUA
checkpoint for the raw-image commands.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from feature_cache.store import FeatureStore
from reports.evaluation import Predictions, protocol_table

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=900)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "out"
    result = _cli("demo", "--out", str(out), "--images_per_class", "8", "--epochs", "2", cwd=out.parent)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "pipeline demonstration, not a detector result" in result.stdout
    assert f"tensorboard --logdir {out / 'runs'}" in result.stdout
    assert f"python -m cli fit --config {out / 'configs' / 'deua.yaml'}" in result.stdout
    return out


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_demo_writes_consistent_stores_checkpoints_events_and_tables(demo):
    for split, generators in (("train", ["demo_upsample"]), ("val", ["demo_smooth", "demo_upsample"])):
        store = FeatureStore.open(demo / "cache" / f"{split}.zarr")
        assert len(store.done_shards()) == len(store.shard_table) and store.generator_names == generators
        assert {"deu", "lare", "clip_layer3", "clip_pooled"} <= set(store.feature_names)
    for name in ("precompute", "laplace_fit", "deua", "lare2"):
        assert (demo / "configs" / f"{name}.yaml").is_file()
    for detector in ("deua", "lare2"):
        run = demo / "runs" / detector / "demo-seed0"
        assert (run / "checkpoints" / "last.ckpt").is_file()
        assert list(run.glob("events.out.tfevents.*"))
        table = {row["generator"]: row for row in _read_csv(run / "protocol_table.csv")}
        assert set(table) == {"demo_smooth", "demo_upsample", "average", "format-only reference"}
        predictions = _read_csv(run / "test_predictions.csv")
        assert len(predictions) == int(table["average"]["n_real"]) + int(table["average"]["n_fake"]) == 16
        threshold = float((run / "protocol_table.md").read_text().split("threshold ")[1].split(" ")[0])
        recomputed = protocol_table(Predictions(np.array([float(r["p_fake"]) for r in predictions]),
                                                np.array([int(r["label"]) for r in predictions]),
                                                np.array([r["generator"] for r in predictions])), threshold)
        for row in recomputed:
            for column in ("real_acc", "fake_acc", "acc", "ap", "auroc"):
                assert float(table[row["generator"]][column]) == pytest.approx(row[column], abs=2e-3)
        # Demo images are all PNG tiles of one size: format alone cannot separate them.
        assert float(table["format-only reference"]["auroc"]) == pytest.approx(0.5)
        for plot in ("roc_pr", "map_histograms"):
            assert (run / "plots" / f"{plot}.png").read_bytes()[:4] == b"\x89PNG"


def test_predict_scores_every_file_and_reports_unreadable_ones(demo, tmp_path):
    folder = tmp_path / "incoming"
    (folder / "nested").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)).save(folder / "photo.png")
    Image.fromarray(rng.integers(0, 256, (90, 120, 4), dtype=np.uint8), "CMYK").save(folder / "nested" / "cmyk.jpg")
    (folder / "broken.jpg").write_bytes((folder / "photo.png").read_bytes()[:100])
    out = tmp_path / "predictions.csv"
    result = _cli("predict", "--ckpt", str(demo / "runs" / "deua" / "demo-seed0" / "checkpoints" / "last.ckpt"),
                  "--data", str(folder), "--out", str(out), "--num_workers", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {Path(r["path"]).name: r for r in _read_csv(out)}
    assert set(rows) == {"photo.png", "cmyk.jpg", "broken.jpg"}
    assert rows["broken.jpg"]["error"] and not rows["broken.jpg"]["p_fake"]
    for name in ("photo.png", "cmyk.jpg"):
        assert not rows[name]["error"] and 0 <= float(rows[name]["p_fake"]) <= 1
        assert rows[name]["prediction"] in ("real", "fake")


def test_robustness_sweep_gives_one_row_per_perturbation(demo, tmp_path):
    result = _cli("robustness", "--ckpt", str(demo / "runs" / "lare2" / "demo-seed0" / "checkpoints" / "last.ckpt"),
                  "--shards", str(demo / "shards" / "val"), "--out", str(tmp_path), "--num_workers", "0",
                  cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _read_csv(tmp_path / "robustness.csv")
    assert [r["perturbation"] for r in rows] == ["none", "jpeg 95", "jpeg 75", "jpeg 50", "downscale 0.75",
                                                 "downscale 0.5", "blur 1", "blur 2"]
    assert all(int(r["images"]) == 16 and 0 <= float(r["acc"]) <= 1 for r in rows)
