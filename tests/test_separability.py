"""`python -m cli separability`: summaries against hand computations, metrics against torchmetrics/sklearn,
and the command on real Zarr stores with real tars (direction from a separate store, references, files)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torchmetrics.functional.classification import binary_auroc, binary_average_precision

from feature_cache.provenance import (DatasetProvenance, ExtractorProvenance, FeatureSpec, PixelProvenance,
                                      StoreProvenance)
from feature_cache.store import FeatureStore, store_lock
from cli_runner import run_cli
from feature_cache_fakes import make_shard_dir
from reports.separability import (SUMMARIES, bootstrap_weights, map_summaries, score_table, summarise_store,
                                  weighted_auroc_ap)

REPO = Path(__file__).resolve().parents[1]
ROWS, SHARD = 120, 40
NAMES = ["coco", "glide", "sd"]  # DRCT-style: the reals ("coco") are their own group, pooled per fake generator


def test_map_summaries_by_hand():
    """Catches summaries over the wrong axes (per channel instead of per row), an off-by-one quantile
    interpolation, or a high-pass that includes border pixels: a 2×3×3 map computed by hand."""
    channel0 = np.array([[0, 1, 2], [3, 4, 5], [6, 7, 8]], dtype=np.float32)
    channel1 = np.full((3, 3), 9, dtype=np.float32)
    maps = np.stack([channel0, channel1])[None].astype(np.float16)  # stored dtype: float16
    mean, median, p95, spatial_std, highpass = map_summaries(maps)[0]
    values = sorted(range(9)) + [9] * 9  # the 18 values, sorted
    assert mean == pytest.approx(sum(values) / 18)
    assert median == pytest.approx((values[8] + values[9]) / 2)  # position 8.5
    assert p95 == pytest.approx(values[16] + 0.15 * (values[17] - values[16]))  # position 17·0.95 = 16.15
    channel_mean = (channel0 + 9) / 2
    assert spatial_std == pytest.approx(np.sqrt(np.mean((channel_mean - channel_mean.mean()) ** 2)))
    # only pixel (1,1) is interior: channel 0: 4·4 − 1 − 7 − 3 − 5 = 0; channel 1: 4·9 − 4·9 = 0
    assert highpass == 0
    spike = np.zeros((1, 1, 3, 3), dtype=np.float32)
    spike[0, 0, 1, 1] = 2
    assert map_summaries(spike)[0, SUMMARIES.index("highpass_energy")] == pytest.approx(64.0)  # (4·2)² over 1 pixel


def test_quantiles_equal_numpy_on_random_maps():
    """Catches a partition index that is right for the hand case only (other sizes, odd and even counts)."""
    maps = np.random.default_rng(0).normal(size=(5, 3, 7, 5)).astype(np.float32)
    got = map_summaries(maps)
    flat = maps.reshape(5, -1).astype(np.float64)
    np.testing.assert_allclose(got[:, 1], np.quantile(flat, 0.5, axis=1), rtol=1e-6)
    np.testing.assert_allclose(got[:, 2], np.quantile(flat, 0.95, axis=1), rtol=1e-6)


def test_summaries_over_many_slabs_equal_numpy():
    """Catches the fast path's own bugs: the int32 sort keys misordering negative values or ±0, rows lost or
    shifted between the 64-row slabs, a flat-row Laplacian that wraps across rows or channels at the borders,
    and a NaN row given a number where numpy.quantile gives NaN. 150 maps of 3x5x7 (non-square, odd sizes)
    of signed values with ties, against numpy.quantile and a float64 Laplacian over 4-D slices."""
    rng = np.random.default_rng(1)
    maps = np.round(rng.normal(size=(150, 3, 5, 7)), 1).astype(np.float32)  # rounded: many ties
    maps[3] = -0.0
    maps[4, 0] = 0.0
    maps[7, 1, 2, 3] = np.nan
    got = map_summaries(maps)
    wide = maps.astype(np.float64)
    flat = wide.reshape(150, -1)
    np.testing.assert_allclose(got[:, 0], flat.mean(1), rtol=1e-12, equal_nan=True)
    np.testing.assert_array_equal(got[:, 1], np.quantile(flat, 0.5, axis=1))
    np.testing.assert_allclose(got[:, 2], np.quantile(flat, 0.95, axis=1), rtol=1e-12, equal_nan=True)
    assert np.isnan(got[7, 1]) and np.isnan(got[7, 2])
    laplacian = (4 * wide[..., 1:-1, 1:-1] - wide[..., :-2, 1:-1] - wide[..., 2:, 1:-1] - wide[..., 1:-1, :-2]
                 - wide[..., 1:-1, 2:])
    np.testing.assert_allclose(got[:, 4], (laplacian ** 2).mean(axis=(1, 2, 3)), rtol=1e-5, equal_nan=True)
    np.testing.assert_allclose(got[:, 3], wide.mean(1).reshape(150, -1).std(1), rtol=1e-5, atol=1e-7,
                               equal_nan=True)


def test_weighted_auroc_ap_equal_torchmetrics_and_duplication():
    """Catches ties counted as 0 or 1 instead of ½, or an AP that interpolates: with unit weights the bootstrap
    metric equals torchmetrics (the protocol table's definition); with weight 2 it equals the duplicated rows."""
    rng = np.random.default_rng(1)
    score = rng.integers(0, 6, 200).astype(np.float64)  # many ties
    label = rng.integers(0, 2, 200)
    auroc, ap = weighted_auroc_ap(score, label, np.ones((1, 200), dtype=np.int32))
    target = torch.from_numpy(label)
    assert auroc[0] == pytest.approx(float(binary_auroc(torch.from_numpy(score).float(), target)), abs=1e-6)
    assert ap[0] == pytest.approx(float(binary_average_precision(torch.from_numpy(score).float(), target)), abs=1e-6)
    weights = np.ones((1, 200), dtype=np.int32)
    weights[0, :50] = 2
    auroc, ap = weighted_auroc_ap(score, label, weights)
    doubled = np.r_[score, score[:50]], np.r_[label, label[:50]]
    assert auroc[0] == pytest.approx(roc_auc_score(doubled[1], doubled[0]))
    assert ap[0] == pytest.approx(float(binary_average_precision(torch.from_numpy(doubled[0]).float(),
                                                                 torch.from_numpy(doubled[1]))), abs=1e-6)


@pytest.mark.parametrize("scale", [1e-45, 1.0, 1e3])
def test_score_table_scores_summaries_at_any_magnitude(scale):
    """Catches the point AUROC/AP computed on the raw summaries through torchmetrics: float32 flushed DEU's
    high-pass energy (~1e-40) to ties (AUROC 0.500 with a bootstrap interval excluding 0.5), and values above 1
    are taken for logits and squashed by a sigmoid into ties."""
    rng = np.random.default_rng(2)
    label = np.repeat([0, 1], 40)
    score = np.exp(rng.normal(size=80) + 1.5 * label) * scale
    rows = {row["generator"]: row for row in score_table(score, label, np.full(80, "sd"), replicates=50, seed=0)}
    assert rows["sd"]["auroc"] == pytest.approx(roc_auc_score(label, score))
    assert rows["sd"]["auroc"] > 0.8
    assert rows["sd"]["auroc_low"] <= rows["sd"]["auroc"] <= rows["sd"]["auroc_high"]


def test_bootstrap_weights_keep_class_sizes():
    """Catches an unstratified resample (a replicate could hold one class only and have no AUROC)."""
    label = np.array([0] * 7 + [1] * 3)
    weights = bootstrap_weights(label, 50, np.random.default_rng(0))
    assert np.all(weights[:, label == 0].sum(1) == 7) and np.all(weights[:, label == 1].sum(1) == 3)
    assert len({tuple(w) for w in weights}) > 40


def _layout() -> tuple[np.ndarray, np.ndarray]:
    """Labels and generator codes: every third row a real 'coco' image, the rest fakes of glide or sd."""
    rows = np.arange(ROWS)
    generators = np.where(rows % 3 == 0, 0, np.where(rows % 3 == 1, 1, 2))
    return (generators != 0).astype(np.int64), generators


def _store(path: Path, shard_dir: Path, deu_sign: float, seed: int) -> None:
    """A real format-2 store over real tars: deu's values rise (deu_sign > 0) or fall with the label, lare is
    noise, a float16 CLIP map is not a guidance map. The rows say reals are JPEGs of mixed sizes and fakes
    256×256 PNGs (a format confound for the format-only reference)."""
    labels, generators = _layout()
    rng = np.random.default_rng(seed)
    maps = {"deu": (rng.random((ROWS, 4, 8, 8)) + deu_sign * 0.6 * labels[:, None, None, None]).astype(np.float32),
            "lare": rng.random((ROWS, 4, 8, 8)).astype(np.float32),
            "clip_layer3": rng.random((ROWS, 8, 4, 4)).astype(np.float16)}
    real, rows = labels == 0, np.arange(ROWS)
    table = json.loads((shard_dir / "shards.json").read_text())["shards"]
    provenance = StoreProvenance(DatasetProvenance.from_shard_dir(shard_dir, "drct", "val", table),
                                 PixelProvenance(resolution=32))
    columns = {"key": [f"img{r:05d}" for r in rows], "sha256": [f"{r:064x}" for r in rows], "label": labels,
               "generator": generators, "format": np.where(real, "JPEG", "PNG"),
               "jpeg_quality": np.where(real, 90, -1), "width": np.where(real, 300 + rows % 7, 256),
               "height": np.where(real, 200 + rows % 5, 256), "path": [f"img{r:05d}.png" for r in rows]}
    specs = {"deu": FeatureSpec((4, 8, 8), "float32", "zstd", "guidance"),
             "lare": FeatureSpec((4, 8, 8), "float32", "zstd", "guidance"),
             "clip_layer3": FeatureSpec((8, 4, 4), "float16", "lz4", "clip")}
    with store_lock(path):
        store = FeatureStore.create(path, provenance=provenance, rows=columns, generator_names=NAMES)
        group = store.add_group(specs, ExtractorProvenance({"seed": 0}, {name: {} for name in specs}))
    for index in range(ROWS // SHARD):
        start, stop = store.tar_rows(index)
        store.write_tar(group, index, {k: v[start:stop] for k, v in maps.items()}, [""] * (stop - start),
                        np.zeros((stop - start, 2), np.int32))


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("separability")
    shard_dir = make_shard_dir(root / "shards", ROWS, SHARD)
    paths = {"val": root / "val.zarr", "train": root / "train.zarr"}
    _store(paths["val"], shard_dir, deu_sign=+1, seed=0)
    _store(paths["train"], shard_dir, deu_sign=-1, seed=1)  # deu is LOWER on fakes in the direction store
    return paths


def test_summarise_store_streams_every_tar_into_place(stores: dict[str, Path]):
    """Catches blocks written to the wrong rows, a tar skipped, or the thread split dropping rows: the
    streamed table equals the summaries of the whole array read at once."""
    store = FeatureStore.open(stores["val"])
    streamed = summarise_store(store, ["deu"], workers=3)["deu"]
    np.testing.assert_allclose(streamed, map_summaries(store.read("deu")).astype(np.float32), rtol=1e-6)


@pytest.mark.slow
def test_separability_command(stores: dict[str, Path], tmp_path: Path):
    """The command end to end on real stores and tars.

    Catches: a direction picked on the scored rows (deu falls with the label in the direction store, so
    scoring the val store "lower = fake" must give AUROC far below 0.5); reals not pooled per fake generator
    (n_real must be every 'coco' row for glide and for sd); a metric that disagrees with sklearn on the same
    rows; CLIP features summarised as guidance maps; the format-only reference missing beside each generator;
    missing files."""
    out = tmp_path / "report"
    result = run_cli(["separability", "--stores", f"[{stores['val']}]", "--out", str(out), "--direction_from",
                      str(stores["train"]), "--bootstrap", "200", "--tb", "true"], cwd=REPO)
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(out / "separability.csv")
    summaries = table[table["method"] == "summary"]
    assert set(summaries["map"]) == {"deu", "lare"}  # the float16 CLIP map is probed, not summarised
    assert set(table.loc[table["method"] == "probe", "map"]) == {"clip_layer3"}
    deu_mean = summaries[(summaries["map"] == "deu") & (summaries["summary"] == "mean")]
    assert len(deu_mean) == 3  # (glide, sd, average), one direction: the shift is clear on the direction split
    labels, generators = _layout()
    maps = FeatureStore.open(stores["val"]).read("deu")
    for name, code in (("glide", 1), ("sd", 2)):
        row = table[(table["map"] == "deu") & (table["summary"] == "mean") & (table["generator"] == name)].iloc[0]
        mask = (generators == code) | (generators == 0)
        assert (row["n_real"], row["n_fake"]) == ((generators == 0).sum(), (generators == code).sum())
        assert row["direction"] == "lower" and row["direction_source"] == f"chosen on {stores['train']}"
        expected = roc_auc_score(labels[mask], -maps[mask].reshape(mask.sum(), -1).mean(1))
        assert row["auroc"] == pytest.approx(expected, abs=1e-6) and row["auroc"] < 0.1
        assert row["auroc_low"] <= row["auroc"] <= row["auroc_high"]
        assert row["format_only_auroc"] > 0.95
    markdown = (out / "separability.md").read_text()
    assert "**Confounded:** the format-only reference" in markdown
    assert {p.name for p in (out / "plots").iterdir()} == {"val_deu.png", "val_lare.png"}
    assert list((out / "tb").glob("events.out.tfevents.*"))


def test_conflicting_direction_options_are_one_line(stores: dict[str, Path], tmp_path: Path):
    """Catches a traceback (or a silent choice) when both a direction store and a declared direction are given."""
    result = run_cli(["separability", "--stores", f"[{stores['val']}]", "--out", str(tmp_path), "--direction_from",
                      str(stores["train"]), "--direction", "higher"], cwd=REPO)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith(
        "python -m cli separability: separability: give --direction_from or --direction, not both")


# ---- what is chosen where: summary and direction on the direction split, undetermined, the linear probe ----

CHOICE_ROWS = 160


def _row_maps(rows: np.ndarray, split: str) -> dict[str, np.ndarray]:
    """Per-row maps, each a function of (split, row) only.

    deu: on the direction split ("train") fakes are shifted up by 0.8 (the mean separates, the spread does not);
    on the scored split ("val") fakes are spread 2.5x wider around 0 (p95 and spatial_std separate, the mean is
    at chance). lare: rows 2m and 2m+1 (a real and a fake) share one map on the direction split, so every
    summary is at AUROC 0.5 there exactly; on the scored split fakes are shifted up. clip_layer3 (float16,
    16 channels): channel 3's mean rises with the label on both splits, by a little against the others' noise."""
    label = (rows % 2).astype(np.float32)
    out = {"deu": [], "lare": [], "clip_layer3": []}
    for row, fake in zip(rows.tolist(), label.tolist()):
        rng = np.random.default_rng([row, split == "train"])
        noise = rng.normal(size=(4, 8, 8)).astype(np.float32)
        if split == "train":
            out["deu"].append(noise + 0.8 * fake)
            out["lare"].append(np.random.default_rng([row // 2, 7]).normal(size=(4, 8, 8)).astype(np.float32))
        else:
            out["deu"].append(noise * (1 + 1.5 * fake))
            out["lare"].append(rng.normal(size=(4, 8, 8)).astype(np.float32) + 0.5 * fake)
        clip = rng.normal(size=(16, 4, 4)).astype(np.float32)
        clip[3] += 0.4 * fake
        out["clip_layer3"].append(clip)
    return {name: np.stack(values) for name, values in out.items()}


@pytest.fixture(scope="module")
def choice_report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A direction split and a scored split (real stores through the store API, no tars), and the reports with
    and without --direction_from."""
    from feature_cache_fakes import write_store
    from reports.separability import separability_report

    root = tmp_path_factory.mktemp("choices")
    specs = {"deu": FeatureSpec((4, 8, 8), "float32", "zstd", "guidance"), "lare": FeatureSpec((4, 8, 8), "float32", "zstd", "guidance"),
             "clip_layer3": FeatureSpec((16, 4, 4), "float16", "lz4", "clip")}
    generators = [(r // 2) % 2 for r in range(CHOICE_ROWS)]  # both generators hold reals and fakes
    paths = {}
    for split in ("train", "val"):
        paths[split] = root / split / "store.zarr"
        paths[split].parent.mkdir()
        write_store(paths[split], lambda rows, split=split: _row_maps(rows, split), specs, ["glide", "sd"],
                    num_rows=CHOICE_ROWS, shard_size=40, generators=generators, identity=split)
    chosen = separability_report([paths["val"]], root / "chosen", direction_from=paths["train"], bootstrap=200,
                                 double_jpeg=False)
    scored_rows = separability_report([paths["val"]], root / "scored_rows", bootstrap=0, double_jpeg=False)
    return {"paths": paths, "chosen": chosen, "chosen_md": (root / "chosen" / "separability.md").read_text(),
            "scored_rows": scored_rows, "scored_rows_md": (root / "scored_rows" / "separability.md").read_text()}


def _average_auroc(score: np.ndarray) -> float:
    """Mean over the two generators of sklearn's AUROC (each generator holds both classes)."""
    rows = np.arange(CHOICE_ROWS)
    label, generator = rows % 2, (rows // 2) % 2
    return float(np.mean([roc_auc_score(label[generator == g], score[generator == g]) for g in (0, 1)]))


def test_summary_and_direction_are_chosen_on_the_direction_split(choice_report: dict):
    """Catches the best of five summaries picked on the scored rows (the flattering choice): on the scored rows
    p95 beats the mean by far, on the direction split only the mean separates, and the report must use the
    mean, oriented as the direction split says, and show only it in the Markdown."""
    val = _row_maps(np.arange(CHOICE_ROWS), "val")["deu"].reshape(CHOICE_ROWS, -1).astype(np.float64)
    on_scored = {"mean": _average_auroc(val.mean(1)), "p95": _average_auroc(np.quantile(val, 0.95, axis=1))}
    assert on_scored["p95"] > on_scored["mean"] + 0.3  # the trap: the scored rows prefer p95
    table = choice_report["chosen"]
    deu = table[(table["map"] == "deu") & table["chosen"]]
    assert set(deu["summary"]) == {"mean"} and set(deu["direction"]) == {"higher"}
    assert set(deu["summary_source"]) == {f"chosen on {choice_report['paths']['train']}"}
    average = deu[deu["generator"] == "average"].iloc[0]
    assert average["auroc"] == pytest.approx(on_scored["mean"], abs=1e-6)
    assert average["split_auroc_low"] > 0.5  # the direction split decided it
    markdown = choice_report["chosen_md"]
    section = markdown.split("### deu")[1].split("###")[0]
    assert "summary mean, direction higher = fake" in section and "| p95" not in section


def test_without_direction_split_the_best_summary_is_named_as_picked_on_the_scored_rows(choice_report: dict):
    """Catches a report that hides where its best summary came from: without --direction_from the heading says
    it was picked on the scored rows (p95 or another spread summary here, not the mean) and all five are shown."""
    table = choice_report["scored_rows"]
    deu = table[(table["map"] == "deu")]
    assert set(deu["summary"]) == set(SUMMARIES)
    assert set(deu.loc[deu["chosen"], "summary"]) != {"mean"}
    section = choice_report["scored_rows_md"].split("### deu")[1].split("###")[0]
    assert "best summary on the scored rows" in section and "optimistic" in section
    assert all(f"| {summary}" in section for summary in SUMMARIES)


def test_a_map_at_chance_on_the_direction_split_is_undetermined_and_scored_both_ways(choice_report: dict):
    """Catches a direction committed to on a split at chance (in a small study that turned a map into AUROC
    0.20): lare's real and fake rows share maps on the direction split, so every summary's interval there holds
    0.5; the report must say "undetermined" and score both orientations (AUROCs summing to 1 per generator)."""
    table = choice_report["chosen"]
    lare = table[table["map"] == "lare"]
    assert lare["direction_source"].str.startswith("undetermined on").all()
    assert (lare["split_auroc"] == 0.5).all()
    chosen = lare[lare["chosen"]]
    assert sorted(chosen["direction"].unique()) == ["higher", "lower"]
    for generator, rows in chosen.groupby("generator"):
        higher, lower = (rows.loc[rows["direction"] == d, "auroc"].iloc[0] for d in ("higher", "lower"))
        assert higher + lower == pytest.approx(1.0)
    section = choice_report["chosen_md"].split("### lare")[1].split("###")[0]
    assert "undetermined" in section and "higher = fake (undetermined)" in section
    assert "lower = fake (undetermined)" in section


def test_clip_maps_get_a_linear_probe_row(choice_report: dict):
    """Catches CLIP maps skipped (no row) or a probe fitted on the scored rows: the AUROC equals an independent
    sklearn logistic regression on standardised channel means fitted on the direction split; without the split
    the probe is cross-fitted and says so."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rows = np.arange(CHOICE_ROWS)
    means = {split: _row_maps(rows, split)["clip_layer3"].astype(np.float16).astype(np.float64).mean((2, 3))
             for split in ("train", "val")}
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(means["train"], rows % 2)
    expected = _average_auroc(model.predict_proba(means["val"])[:, 1])
    table = choice_report["chosen"]
    probe = table[(table["map"] == "clip_layer3") & (table["generator"] == "average")].iloc[0]
    assert probe["method"] == "probe" and probe["summary"] == "linear probe (channel means)"
    assert probe["auroc"] == pytest.approx(expected, abs=1e-6) and probe["auroc_low"] <= probe["auroc"] <= probe["auroc_high"]
    assert probe["direction_source"] == f"fitted on {choice_report['paths']['train']}"
    assert "### clip_layer3 · linear probe (channel means), fitted on" in choice_report["chosen_md"]
    crossed = choice_report["scored_rows"]
    assert set(crossed.loc[crossed["map"] == "clip_layer3", "direction_source"]) == {
        "cross-fitted on the scored rows (2 folds)"}
