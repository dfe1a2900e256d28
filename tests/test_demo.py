"""The demo end to end (smaller), then `predict` and `robustness` on what it trained.

One `python -m cli demo` (the session's `demo_run`, tests/shared_speedwf.py, which test_demo_learning.py reads
too; each of its phases is a real subprocess) builds data, shards, posterior, stores, two detectors, their
test tables and plots; the tests check those artefacts against each other and reuse the DEUA
checkpoint for the raw-image commands (run in-process, tests/cli_runner.py).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from feature_cache.store import FeatureStore
from reports.evaluation import Predictions, protocol_table

from cli_runner import run_cli
from shared_speedwf import DEMO_IMAGES_PER_CLASS

pytestmark = pytest.mark.slow
# The demo's test store: half the training size per class, for each of the two generators.
TEST_ROWS = 2 * 2 * (DEMO_IMAGES_PER_CLASS // 2)


@pytest.fixture(scope="module")
def demo(demo_run: tuple[Path, str]) -> Path:
    out, stdout = demo_run
    assert "pipeline demonstration, not a detector result" in stdout
    assert f"tensorboard --logdir {out / 'runs'}" in stdout
    assert f"python -m cli fit --config {out / 'configs' / 'deua.yaml'}" in stdout
    return out


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_demo_writes_consistent_stores_checkpoints_events_and_tables(demo):
    for split, generators in (("train", ["demo_upsample"]), ("val", ["demo_smooth", "demo_upsample"])):
        store = FeatureStore.open(demo / "cache" / f"{split}.zarr")
        assert not store.incomplete_groups() and not store.verify() and store.generator_names == generators
        assert {"deu", "lare", "clip_layer3", "clip_pooled"} <= set(store.feature_names)
    for name in ("precompute", "laplace_fit", "deua", "lare2"):
        assert (demo / "configs" / f"{name}.yaml").is_file()
    for detector in ("deua", "lare2"):
        run = demo / "runs" / detector / "demo-seed0"
        assert (run / "checkpoints" / "last.ckpt").is_file()
        assert list(run.glob("events.out.tfevents.*"))
        table = {row["generator"]: row for row in _read_csv(run / "protocol_table.csv")}
        assert set(table) == {"demo_smooth", "demo_upsample", "average", "format-only reference",
                              "double-JPEG reference"}
        predictions = _read_csv(run / "test_predictions.csv")
        assert len(predictions) == int(table["average"]["n_real"]) + int(table["average"]["n_fake"]) == TEST_ROWS
        threshold = float((run / "protocol_table.md").read_text().split("threshold ")[1].split(" ")[0])
        recomputed = protocol_table(Predictions(np.array([float(r["p_fake"]) for r in predictions]),
                                                np.array([int(r["label"]) for r in predictions]),
                                                np.array([r["generator"] for r in predictions])), threshold)
        for row in recomputed:
            for column in ("real_acc", "fake_acc", "acc", "ap", "auroc"):
                assert float(table[row["generator"]][column]) == pytest.approx(row[column], abs=2e-3)
        # Demo images are all PNG tiles of one size: format alone cannot separate them.
        assert float(table["format-only reference"]["auroc"]) == pytest.approx(0.5)
        assert float(table["double-JPEG reference"]["auroc"]) == pytest.approx(0.5)  # no JPEG at all
        for plot in ("roc_pr", "map_histograms"):
            assert (run / "plots" / f"{plot}.png").read_bytes()[:4] == b"\x89PNG"


def test_predict_scores_every_file_and_reports_unreadable_ones(demo, tmp_path):
    """Bugs caught: a hidden file or a FIFO without a row (or a hang on the FIFO), metadata columns missing,
    an unreadable file scored."""
    folder = tmp_path / "incoming"
    (folder / "nested").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)).save(folder / "photo.png")
    Image.fromarray(rng.integers(0, 256, (90, 120, 4), dtype=np.uint8), "CMYK").save(folder / "nested" / "cmyk.jpg",
                                                                                     quality=80)
    (folder / "broken.jpg").write_bytes((folder / "photo.png").read_bytes()[:100])
    (folder / ".hidden.png").write_bytes((folder / "photo.png").read_bytes())
    os.mkfifo(folder / "pipe.png")
    out = tmp_path / "predictions.csv"
    result = run_cli(["predict", "--ckpt", str(demo / "runs" / "deua" / "demo-seed0" / "checkpoints" / "last.ckpt"),
                      "--data", str(folder), "--out", str(out), "--num_workers", "0"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    table = _read_csv(out)
    assert list(table[0]) == ["path", "key", "sha256", "generator", "label", "format", "jpeg_quality", "width",
                              "height", "p_fake", "threshold", "prediction", "error"]
    rows = {r["key"]: r for r in table}
    assert set(rows) == {"photo.png", "nested/cmyk.jpg", "broken.jpg", ".hidden.png", "pipe.png"}
    assert rows[".hidden.png"]["error"] == "skipped: hidden file"
    assert rows["pipe.png"]["error"] == "skipped: not a regular file: a named pipe (FIFO)"
    assert rows["broken.jpg"]["error"] and not rows["broken.jpg"]["p_fake"]
    assert (rows["nested/cmyk.jpg"]["format"], rows["nested/cmyk.jpg"]["jpeg_quality"]) == ("JPEG", "80")
    assert (rows["photo.png"]["width"], rows["photo.png"]["height"]) == ("200", "300")
    for name in ("photo.png", "nested/cmyk.jpg"):
        assert not rows[name]["error"] and 0 <= float(rows[name]["p_fake"]) <= 1
        assert rows[name]["prediction"] == ("fake" if float(rows[name]["p_fake"]) >= float(rows[name]["threshold"])
                                            else "real")


def test_predict_with_other_weights_is_refused_naming_the_hashes(demo, tmp_path):
    """Bug caught: `--sd` pointing at other weights would give features the detector never saw; the override
    is checked against the checkpoint's weight hashes. The demo's own models under another path pass."""
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(image)
    checkpoint = str(demo / "runs" / "deua" / "demo-seed0" / "checkpoints" / "last.ckpt")
    assert run_cli(["tiny-models", str(tmp_path / "other"), "--seed", "1"], cwd=tmp_path).returncode == 0
    result = run_cli(["predict", "--ckpt", checkpoint, "--data", str(image), "--out", str(tmp_path / "a.csv"),
                      "--sd", str(tmp_path / "other" / "sd"), "--num_workers", "0"], cwd=tmp_path)
    # Refused at the first mismatch found: the posterior (fitted for the demo's UNet) or the weight hashes.
    message = result.stderr.strip().splitlines()[-1]
    assert result.returncode != 0 and message.startswith("python -m cli predict: ") and "unet_hash" in message
    os.symlink(demo / "models", tmp_path / "moved")
    result = run_cli(["predict", "--ckpt", checkpoint, "--data", str(image), "--out", str(tmp_path / "b.csv"),
                      "--sd", str(tmp_path / "moved" / "sd"), "--num_workers", "0"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


def test_robustness_sweep_caches_features_and_reports_per_generator(demo, tmp_path):
    """Bugs caught: features recomputed for every checkpoint, a level list that cannot be chosen, only an overall
    row. DEUA after LaRE² (same extractor) grows each level's store by its own map only; a checkpoint run again
    reuses every tar."""
    cache = tmp_path / "cache"
    outputs = {}
    for run, detector in enumerate(("lare2", "deua", "lare2")):
        checkpoint = demo / "runs" / detector / "demo-seed0" / "checkpoints" / "last.ckpt"
        result = run_cli(["robustness", "--ckpt", str(checkpoint),
                          "--shards", str(demo / "shards" / "val"), "--out", str(tmp_path / f"{detector}-{run}"),
                          "--num_workers", "0", "--levels", "none,jpeg:75,blur:1", "--cache", str(cache)], cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        outputs[run] = result.stdout
    tars = len(list((demo / "shards" / "val").glob("*.tar")))
    assert "robustness [3/3] blur 1: done in" in outputs[1] and f"0/{tars} tars reused" in outputs[1]
    # stdout is a pipe (as under SLURM): each level's feature pass logs batches and tars with totals and ETA
    logged = [line for line in outputs[0].splitlines() if line.startswith(("predict: ", "writing "))]
    assert sum(line.startswith("writing ") and f"tar {tars}/{tars}" in line for line in logged) == 3, logged
    assert all("/" in line.split(":")[1] and "ETA" in line for line in logged), logged
    assert outputs[2].count(f"{tars}/{tars} tars reused") == 3
    # Bugs caught: "features from the cache" printed before computing them; no level progress; tables' place unsaid
    assert f"robustness blur 1: features: 0/{tars} tars already in the cache" in outputs[0]
    assert f", computing {tars}" in outputs[0]
    assert outputs[2].count("tars already in the cache") == 3 and "computing" not in outputs[2]
    levels = [line for line in outputs[0].splitlines() if line.startswith("robustness: ") and " levels" in line]
    assert [line.split(",")[0] for line in levels] == [f"robustness: {k}/3 levels ({100 * k / 3:.0f}%)" for k in (1, 2, 3)]
    assert all("levels/s" in line and "ETA" in line for line in levels)
    assert f"robustness: tables written to {tmp_path / 'lare2-0' / 'robustness.md'}" in outputs[0]
    rows = _read_csv(tmp_path / "deua-1" / "robustness.csv")
    assert [r["perturbation"] for r in rows] == ["none", "jpeg 75", "blur 1"]
    assert all(int(r["n_real"]) + int(r["n_fake"]) == TEST_ROWS and 0 <= float(r["acc"]) <= 1 for r in rows)
    per_generator = _read_csv(tmp_path / "deua-1" / "robustness_per_generator.csv")
    assert [(r["perturbation"], r["generator"]) for r in per_generator[:3]] == [
        ("none", "demo_smooth"), ("none", "demo_upsample"), ("none", "average")]
    assert len(list(cache.iterdir())) == 3


def test_cached_robustness_scores_equal_on_the_fly_scores(demo, tmp_path):
    """Bug caught: the cache scoring other rows, other features or a wrong decoding of the stored dtypes than
    the on-the-fly path (the two must agree up to the CLIP maps' float16 storage)."""
    from workflows.robustness import cached_features, on_the_fly_scores, score_store
    from datamodules.image_shards import ImageShardDataModule, pixel_settings
    from lightning_modules.on_the_fly import OnTheFlyDetector

    model, provenance = OnTheFlyDetector.from_checkpoint(str(demo / "runs" / "deua" / "demo-seed0" / "checkpoints" /
                                                             "last.ckpt"))
    settings = {**pixel_settings(provenance.store.pixels), "perturbation": ("jpeg", 75.0)}

    def data() -> ImageShardDataModule:
        return ImageShardDataModule(str(demo / "shards" / "val"), batch_size=8, num_workers=0, **settings)

    store, reused = cached_features(model, data(), tmp_path, "jpeg 75", "cpu")
    cached = score_store(model.detector, store, list(model.extractor.outputs))
    direct = on_the_fly_scores(model, data(), "cpu")
    assert reused == 0 and store.pixels.perturbation == ["jpeg", 75.0]
    np.testing.assert_array_equal(cached.label, direct.label)
    np.testing.assert_array_equal(cached.generator, direct.generator)
    np.testing.assert_allclose(cached.p_fake, direct.p_fake, atol=2e-3)
    assert cached_features(model, data(), tmp_path, "jpeg 75", "cpu")[1] == len(store.shard_table)
