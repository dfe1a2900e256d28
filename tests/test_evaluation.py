"""The protocol table equals metrics recomputed independently from the same predictions."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from lightning_modules.detectors import DEUADetector
from reports.evaluation import (PUBLISHED, Predictions, choose_threshold, hparams_settings, protocol_table,
                                published_for, write_table)
from reports.plots import map_histograms, overlay_figure, roc_pr_figure, save_figure


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney: probability a fake outscores a real, ties counting half."""
    fake, real = scores[labels == 1], scores[labels == 0]
    wins = (fake[:, None] > real[None, :]).sum() + 0.5 * (fake[:, None] == real[None, :]).sum()
    return wins / (len(fake) * len(real))


def _average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean over fakes of the precision among images scored at least as high."""
    return float(np.mean([(labels[scores >= s] == 1).mean() for s in scores[labels == 1]]))


@pytest.fixture
def predictions() -> Predictions:
    rng = np.random.default_rng(0)
    gens = np.array(["sdv4"] * 60 + ["midjourney"] * 40)
    labels = np.concatenate([rng.integers(0, 2, 60), rng.integers(0, 2, 40)])
    # Continuous scores (no ties) that separate sdv4 well and midjourney poorly.
    scores = np.where(gens == "sdv4", 0.3 * labels, 0.05 * labels) + rng.uniform(0, 0.7, 100)
    return Predictions(scores, labels, gens)


def test_table_equals_independent_metrics(predictions, tmp_path):
    threshold = 0.5
    rows = protocol_table(predictions, threshold)
    by_gen = {row["generator"]: row for row in rows}
    for gen in ("sdv4", "midjourney"):
        m = predictions.generator == gen
        s, y = predictions.p_fake[m], predictions.label[m]
        assert by_gen[gen]["real_acc"] == pytest.approx((s[y == 0] < threshold).mean())
        assert by_gen[gen]["fake_acc"] == pytest.approx((s[y == 1] >= threshold).mean())
        assert by_gen[gen]["acc"] == pytest.approx(((s >= threshold) == (y == 1)).mean())
        assert by_gen[gen]["auroc"] == pytest.approx(_auroc(s, y), abs=1e-6)
        assert by_gen[gen]["ap"] == pytest.approx(_average_precision(s, y), abs=1e-6)
    assert by_gen["average"]["acc"] == pytest.approx((by_gen["sdv4"]["acc"] + by_gen["midjourney"]["acc"]) / 2)
    assert by_gen["sdv4"]["auroc"] > by_gen["midjourney"]["auroc"]

    csv_path, md_path = write_table(rows, tmp_path, "genimage", "GenImage", published=PUBLISHED["deua"])
    with open(csv_path, newline="") as handle:
        read_back = list(csv.DictReader(handle))
    assert [r["generator"] for r in read_back] == ["midjourney", "sdv4", "average"]
    assert float(read_back[1]["auroc"]) == pytest.approx(by_gen["sdv4"]["auroc"])
    markdown = md_path.read_text()
    table_lines = [line for line in markdown.splitlines() if line.startswith("|")]
    assert [line.split("|")[1].strip() for line in table_lines if "85.6" in line] == ["average"]
    assert f"{100 * by_gen['sdv4']['acc']:.1f}" in markdown


def test_threshold_comes_from_validation_and_balances_classes():
    val = Predictions(np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.8]), np.array([0, 0, 0, 1, 1, 1]),
                      np.array(["g"] * 6))
    threshold = choose_threshold(val)
    assert 0.3 < threshold <= 0.6
    shifted = Predictions(val.p_fake * 0.5, val.label, val.generator)  # all scores below 0.5
    assert 0.15 < choose_threshold(shifted) <= 0.3


def test_predictions_csv_round_trip_and_bad_file(tmp_path, predictions):
    path = tmp_path / "preds.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["p_fake", "label", "generator"])
        writer.writerows(zip(predictions.p_fake, predictions.label, predictions.generator))
    back = Predictions.from_csv(path)
    np.testing.assert_allclose(back.p_fake, predictions.p_fake)
    assert (back.generator == predictions.generator).all()
    (tmp_path / "bad.csv").write_text("score,label\n0.1,0\n")
    with pytest.raises(ValueError, match=r"bad.csv lacks the columns \['generator', 'p_fake'\]"):
        Predictions.from_csv(tmp_path / "bad.csv")


def test_plots_are_valid_pngs(predictions, tmp_path):
    rng = np.random.default_rng(1)
    figures = {
        "roc_pr": roc_pr_figure(predictions, "test"),
        "hist": map_histograms({"deu": rng.random(100), "lare": rng.random(100)}, predictions.label,
                               predictions.generator),
        "overlay": overlay_figure(rng.uniform(-1, 1, (3, 3, 32, 32)), rng.random((3, 4, 4)), ["a", "b", "c"]),
    }
    for name, fig in figures.items():
        path = save_figure(fig, tmp_path / f"{name}.png")
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        from PIL import Image

        with Image.open(path) as image:
            image.load()
            assert image.width > 200 and image.height > 200


def test_drct_style_reals_are_pooled_against_each_fake_generator():
    """MSCOCO holds the reals, each DRCT generator only fakes: each generator row = its fakes + all reals."""
    rng = np.random.default_rng(3)
    gens = np.array(["MSCOCO"] * 30 + ["ldm"] * 20 + ["sdxl"] * 20)
    labels = np.array([0] * 30 + [1] * 40)
    scores = rng.uniform(0, 1, 70) + 0.3 * labels * (gens == "ldm")
    preds = Predictions(scores, labels, gens)
    rows = {row["generator"]: row for row in protocol_table(preds, 0.5)}
    assert set(rows) == {"ldm", "sdxl", "average"}
    for gen in ("ldm", "sdxl"):
        m = (gens == gen) | (gens == "MSCOCO")
        assert rows[gen]["n_real"] == 30 and rows[gen]["n_fake"] == 20
        assert rows[gen]["auroc"] == pytest.approx(_auroc(scores[m], labels[m]), abs=1e-6)
        assert rows[gen]["acc"] == pytest.approx(((scores[m] >= 0.5) == (labels[m] == 1)).mean())
    assert rows["ldm"]["auroc"] > rows["sdxl"]["auroc"]


def test_fast_threshold_equals_brute_force_search():
    rng = np.random.default_rng(4)
    for _ in range(5):
        labels = rng.integers(0, 2, 300)
        scores = np.round(rng.uniform(0, 1, 300) * 0.7 + 0.2 * labels, 2)  # ties included
        val = Predictions(scores, labels, np.array(["g"] * 300))
        candidates = np.unique(np.concatenate([scores, [0.5]]))
        balanced = [((scores[labels == 0] < t).mean() + (scores[labels == 1] >= t).mean()) for t in candidates]
        best = max(balanced)
        ties = [t for t, b in zip(candidates, balanced) if np.isclose(b, best)]
        assert choose_threshold(val) == pytest.approx(min(ties, key=lambda t: abs(t - 0.5)))


FULL_DEUA = dict(DEUADetector.paper_setting)
PAPER = DEUADetector.paper_setting


def test_published_number_only_for_its_own_configuration():
    """Bugs caught: DEUA's full-model 85.6 beside the CLIP baseline; a frozen sweep given the finetuned paper's
    number; a number shown for jpeg_aligned or non-GenImage data; an unknown paper_row silently ignored; a run
    whose CLIP saw resized images (not the papers' native-resolution crops) given the published number."""
    sdv4 = ["imagenet_ai_0419_sdv4"]
    row, why = published_for("deua", "DEUADetector", FULL_DEUA, PAPER, "genimage", "raw", sdv4,
                             clip_input="native_crop")
    assert row.acc == 85.6 and why == ""
    row, why = published_for("deua", "DEUADetector", FULL_DEUA, PAPER, "genimage", "raw", sdv4, clip_input="resize")
    assert row is None and "CLIP input resize (paper: native_crop" in why
    baseline = {**FULL_DEUA, "guidance": [], "asym_weight": 0.0}
    assert published_for("deua_baseline", "DEUADetector", baseline, PAPER, "genimage", "raw", sdv4,
                         clip_input="native_crop")[0].acc == 76.1
    row, why = published_for("deua", "DEUADetector", baseline, PAPER, "genimage", "raw", sdv4,
                             clip_input="native_crop")
    assert row is None and "guidance=[] (paper: ['deu'])" in why and "asym_weight=0.0 (paper: 0.5)" in why
    row, why = published_for("deua", "DEUADetector", {**FULL_DEUA, "backbone": "frozen"}, PAPER, "genimage",
                             "jpeg_aligned", ["imagenet_glide"], clip_input="native_crop")
    assert row is None and "backbone='frozen'" in why and "protocol jpeg_aligned" in why and "imagenet_glide" in why
    assert published_for(None, "DEUADetector", FULL_DEUA, PAPER, "genimage", "raw", sdv4,
                         clip_input="native_crop") == (None, "")
    assert published_for("deua_drct", "DEUADetector", FULL_DEUA, PAPER, "drct", "raw", ["ldm", "sdxl"],
                         clip_input="native_crop")[0].acc == 90.5
    with pytest.raises(ValueError, match="paper_row 'deua_full' is not a published row"):
        published_for("deua_full", "DEUADetector", FULL_DEUA, PAPER, "genimage", "raw", sdv4,
                      clip_input="native_crop")


def test_hparams_settings_spell_out_lists_and_drop_bookkeeping():
    """Bugs caught: an empty guidance list dropped by TensorBoard (blank on the main ablation axis);
    jsonargparse's `_class_path`/`_instantiator` cluttering every row."""
    settings = hparams_settings("DEUADetector", {"guidance": [], "asym_weight": 0.5, "_class_path": "x",
                                                 "_instantiator": "y"}, {"features": ["deu", "clip_layer3"]}, 3)
    assert settings == {"detector": "DEUADetector", "seed": 3, "guidance": "none", "asym_weight": 0.5,
                        "data.features": "deu+clip_layer3"}
    assert hparams_settings("LaRE2Detector", {"guidance": ["lare", "deu"]}, {}, 0)["guidance"] == "lare+deu"


def test_plots_use_the_same_generator_definition_as_the_table():
    """Bug caught: ROC curves and histograms per generator skipping DRCT's fake-only generators (one class each)
    and drawing MSCOCO as if it were a generator."""
    gens = np.array(["MSCOCO"] * 20 + ["ldm"] * 10 + ["sdxl"] * 10)
    labels = np.array([0] * 20 + [1] * 20)
    preds = Predictions(np.random.default_rng(5).uniform(0, 1, 40), labels, gens)
    roc = roc_pr_figure(preds, "drct")
    assert roc.axes[0].get_legend_handles_labels()[1] == ["all", "ldm", "sdxl"]
    hist = map_histograms({"deu": preds.p_fake}, labels, gens)
    assert [ax.get_title().splitlines()[0] for ax in hist.axes] == ["ldm", "sdxl"]
    assert [len(ax.patches) for ax in hist.axes] == [60, 60]  # 30 bins of reals (pooled) + 30 of fakes


def _overlapping(labels) -> bool:
    boxes = [label.get_window_extent() for label in labels if label.get_text()]
    return any(a.x1 > b.x0 for a, b in zip(boxes, boxes[1:]))


def test_histograms_fit_a_paper_log_axes_readable_ticks_auroc_interval_in_titles(tmp_path):
    """Bugs caught: DEU's tick labels running together (`0.000140.000142...`); unlabelled y axes; linear axes for
    heavy-tailed maps spanning decades; no AUROC on the figure (checked against separability's score_table)."""
    from reports.separability import score_table

    rng = np.random.default_rng(3)
    label = np.repeat([0, 1], 60)
    generator = np.array(["sdv4"] * 120)
    heavy = np.exp(rng.normal(-9, 2, 120) + 0.8 * label)  # a variance map: positive, six decades
    narrow = 1.4e-4 + 2e-6 * rng.random(120) + 1e-6 * label  # DEU-like: tiny values in a narrow range
    fig = map_histograms({"deu": heavy, "narrow": narrow}, label, generator)
    fig.canvas.draw()
    heavy_ax, narrow_ax = fig.axes
    assert heavy_ax.get_xscale() == "log" and narrow_ax.get_xscale() == "linear"
    for ax in (heavy_ax, narrow_ax):
        assert ax.get_xlabel().startswith("per-image mean of") and ax.get_ylabel() == "images"
        assert not _overlapping(ax.get_xticklabels()), [t.get_text() for t in ax.get_xticklabels()]
        assert len([t for t in ax.get_xticklabels() if t.get_text()]) <= 5
    expected = next(r for r in score_table(heavy, label, generator, 200, 0) if r["generator"] == "sdv4")
    assert f"AUROC {expected['auroc']:.2f} [{expected['auroc_low']:.2f}, {expected['auroc_high']:.2f}]" \
        in heavy_ax.get_title()
    save_figure(fig, tmp_path / "map_histograms.png")
