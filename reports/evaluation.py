"""The papers' evaluation table from saved predictions: per generator real/fake/mean ACC, AP, AUROC.

Everything is computed from a predictions table (p_fake, label, generator), so a test can recompute
any number independently, and the threshold for accuracy comes from validation predictions, never
from the test split (thresholds tuned on the test set are a known flaw of the papers' code).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_curve
from torchmetrics.functional.classification import binary_auroc, binary_average_precision

from reports.tables import markdown_table

COLUMNS = ("generator", "n_real", "n_fake", "real_acc", "fake_acc", "acc", "ap", "auroc")

# TensorBoard hparams-tab metrics: registered by `fit`, filled by validation, `test` and the protocol report.
HP_METRICS = ("hp/val_acc", "hp/val_ap", "hp/val_auroc", "hp/test_acc", "hp/test_ap", "hp/test_auroc",
              "hp/test_real_acc", "hp/test_fake_acc", "hp/test_mean_generator_acc", "hp/test_mean_generator_auroc",
              "hp/test_format_only_auroc")


@dataclass(frozen=True)
class PublishedRow:
    """A number a paper reports, with what a run must match to be shown beside it.

    The paper's setting is the detector's own `paper_setting` (one definition, beside the code it configures);
    a row adds only what its ablation changes (`changes`, e.g. DEUA's CLIP baseline: no guidance, no asymmetric
    loss), and the protocol: `layout` and `train_generators` (GenImage trained on SD v1.4, or DRCT-2M).
    """

    detector: str
    layout: str
    train_generators: tuple[str, ...] | None
    changes: Mapping[str, object]
    acc: float
    ap: float | None = None
    source: str = ""

    def settings(self, paper_setting: Mapping[str, object]) -> dict[str, object]:
        """The detector hparams this row was obtained with."""
        return {**paper_setting, **self.changes}


GENIMAGE_SDV4 = ("imagenet_ai_0419_sdv4",)
# SPEC §7. A config names its row with `paper_row: NAME`; nothing else ever gets a published number.
PUBLISHED: dict[str, PublishedRow] = {
    "deua": PublishedRow("DEUADetector", "genimage", GENIMAGE_SDV4, {}, 85.6, source="DEUA, GenImage mean ACC"),
    "deua_drct": PublishedRow("DEUADetector", "drct", None, {}, 90.5, source="DEUA, DRCT-2M mean ACC"),
    "lare2": PublishedRow("LaRE2Detector", "genimage", GENIMAGE_SDV4, {}, 79.1, source="LaRE², GenImage mean ACC"),
    "lare2_drct": PublishedRow("LaRE2Detector", "drct", None, {}, 88.0, source="LaRE², DRCT-2M mean ACC"),
    "deua_baseline": PublishedRow("DEUADetector", "genimage", GENIMAGE_SDV4, {"guidance": [], "asym_weight": 0.0},
                                  76.1, 90.7, source="DEUA ablation, CLIP baseline"),
    "deua_deu": PublishedRow("DEUADetector", "genimage", GENIMAGE_SDV4, {"asym_weight": 0.0}, 90.3, 98.7,
                             source="DEUA ablation, + DEU"),
    "deua_asym": PublishedRow("DEUADetector", "genimage", GENIMAGE_SDV4, {"guidance": []}, 81.7, 93.8,
                              source="DEUA ablation, + asymmetric loss"),
    "deua_both": PublishedRow("DEUADetector", "genimage", GENIMAGE_SDV4, {}, 91.5, 99.7,
                              source="DEUA ablation, DEU + asymmetric loss"),
    "lare2_baseline": PublishedRow("LaRE2Detector", "genimage", GENIMAGE_SDV4,
                                   {"guidance": [], "spatial": False, "channel": False}, 73.1, 92.3,
                                   source="LaRE² ablation, baseline"),
    "lare2_spatial": PublishedRow("LaRE2Detector", "genimage", GENIMAGE_SDV4, {"channel": False}, 81.7, 97.6,
                                  source="LaRE² ablation, + spatial refinement"),
    "lare2_channel": PublishedRow("LaRE2Detector", "genimage", GENIMAGE_SDV4, {"spatial": False}, 78.8, 94.7,
                                  source="LaRE² ablation, + channel refinement"),
    "lare2_both": PublishedRow("LaRE2Detector", "genimage", GENIMAGE_SDV4, {}, 84.5, 99.5,
                               source="LaRE² ablation, spatial + channel"),
}


def setting_departures(hparams: Mapping[str, object], setting: Mapping[str, object]) -> list[str]:
    """`name=ours (paper: theirs)` for every setting a run's hparams do not share with a paper's."""
    return [f"{key}={hparams.get(key)!r} (paper: {value!r})" for key, value in setting.items()
            if hparams.get(key) != value]


def paper_departures(hparams: Mapping[str, object], paper_setting: Mapping[str, object],
                     clip_input: str | None) -> list[str]:
    """`name=ours (paper: theirs)` for every setting of a detector (its hparams) that differs from its class's
    `paper_setting`, and `clip_input` (the stores' pixel provenance; None before a fit) unless CLIP saw LaRE²'s
    native 224 crops (both papers); the published accuracy is printed only beside runs with none (`published_for`,
    same comparison)."""
    departures = setting_departures(hparams, paper_setting)
    if paper_setting and clip_input != "native_crop":
        departures.append(f"clip_input={clip_input!r} (paper: 'native_crop')")
    return departures


def published_for(paper_row: str | None, detector: str, hparams: Mapping[str, object],
                  paper_setting: Mapping[str, object], layout: str | None, protocol: str | None,
                  train_generators: list[str], *, clip_input: str) -> tuple[PublishedRow | None, str]:
    """The published row this run reproduces, or None and the reason (shown under the table) why not.

    `paper_setting` is the run's detector class's (`DetectorBase.paper_setting`); the row adds its ablation changes.
    `clip_input` is how CLIP saw the images (the stores' pixel provenance): both papers' numbers come from
    LaRE²'s native-resolution 224 crops (DEUA builds on its training), not from resized images.
    """
    if paper_row is None:
        return None, ""
    if paper_row not in PUBLISHED:
        raise ValueError(f"paper_row {paper_row!r} is not a published row (known: {sorted(PUBLISHED)})")
    row = PUBLISHED[paper_row]
    problems = [f"detector {detector} (paper: {row.detector})"] if detector != row.detector else []
    problems += setting_departures(hparams, row.settings(paper_setting))
    if (protocol or "raw") != "raw":
        problems.append(f"protocol {protocol} (paper: raw files)")
    if clip_input != "native_crop":
        problems.append(f"CLIP input {clip_input} (paper: native_crop, native-resolution 224 crops)")
    if layout != row.layout:
        problems.append(f"layout {layout} (paper: {row.layout})")
    if row.train_generators is not None and tuple(sorted(train_generators)) != row.train_generators:
        problems.append(f"trained on {sorted(train_generators)} (paper: {list(row.train_generators)})")
    if problems:
        return None, f"\nPublished {paper_row} ({row.source}) not shown: this run differs: {'; '.join(problems)}.\n"
    return row, ""


def hparams_settings(detector: str, model: Mapping[str, object], data: Mapping[str, object],
                     seed: int) -> dict[str, object]:
    """The settings one run shows in TensorBoard's hparams tab: scalars and strings, lists spelled out.

    TensorBoard drops empty lists (DEUA's `guidance: []` baseline would show a blank on the main ablation
    axis), so a list becomes its items joined by `+`, or `none`; jsonargparse's bookkeeping keys go.
    """
    def plain(value: object) -> object:
        if isinstance(value, (list, tuple)):
            return "+".join(map(str, value)) if value else "none"
        return value if isinstance(value, (bool, int, float, str)) else str(value)

    settings: dict[str, object] = {"detector": detector, "seed": seed}
    settings.update({key: plain(value) for key, value in model.items() if not key.startswith("_")})
    settings.update({f"data.{key}": plain(value) for key, value in data.items() if not key.startswith("_")})
    return settings


@dataclass
class Predictions:
    """One row per image: probability of fake, true label (0 real, 1 fake), generator name."""

    p_fake: np.ndarray
    label: np.ndarray
    generator: np.ndarray

    @classmethod
    def from_csv(cls, path: str | Path) -> Predictions:
        frame = pd.read_csv(path, dtype={"generator": str})
        if frame.empty:
            raise ValueError(f"predictions file {path} has no rows")
        missing = {"p_fake", "label", "generator"} - set(frame.columns)
        if missing:
            raise ValueError(f"predictions file {path} lacks the columns {sorted(missing)}")
        return cls(frame["p_fake"].to_numpy(float), frame["label"].to_numpy(int),
                   frame["generator"].to_numpy(object))

    def select(self, mask: np.ndarray) -> Predictions:
        return Predictions(self.p_fake[mask], self.label[mask], self.generator[mask])


def choose_threshold(validation: Predictions) -> float:
    """Threshold on p_fake that maximises balanced accuracy on validation predictions (ties: closest to 0.5).

    sklearn's ROC gives every distinct threshold t (fake iff p ≥ t) with its rates; balanced accuracy is
    (TPR + 1 − FPR) / 2. Threshold t_i stands for every t in (t_{i+1}, t_i], so 0.5 wins a tie when it lies
    in a best interval.
    """
    if len(set(validation.label.tolist())) < 2:
        return 0.5
    fpr, tpr, thresholds = roc_curve(validation.label, validation.p_fake, drop_intermediate=False)
    score = tpr - fpr
    best = np.flatnonzero(np.isclose(score, score.max()))
    lower = np.append(thresholds[1:], -np.inf)  # t_i covers (lower_i, t_i]
    if any(lower[i] < 0.5 <= thresholds[i] for i in best):
        return 0.5
    finite = [i for i in best if np.isfinite(thresholds[i])]
    return float(min((thresholds[i] for i in finite), key=lambda t: abs(t - 0.5)))


def _metrics(preds: Predictions, threshold: float) -> dict[str, float]:
    real, fake = preds.label == 0, preds.label == 1
    predicted_fake = preds.p_fake >= threshold
    row = {"n_real": int(real.sum()), "n_fake": int(fake.sum()),
           "real_acc": float((~predicted_fake[real]).mean()) if real.any() else float("nan"),
           "fake_acc": float(predicted_fake[fake].mean()) if fake.any() else float("nan"),
           "acc": float((predicted_fake == (preds.label == 1)).mean())}
    if real.any() and fake.any():
        scores, target = torch.from_numpy(preds.p_fake).float(), torch.from_numpy(preds.label).long()
        row["ap"] = float(binary_average_precision(scores, target))
        row["auroc"] = float(binary_auroc(scores, target))
    else:
        row["ap"] = row["auroc"] = float("nan")
    return row


def generator_groups(generator: np.ndarray, label: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """The rows each generator is scored on: THE definition of "per generator" (tables, TensorBoard, plots).

    A generator with both classes (GenImage: each generator's own real and fake val images) is scored on
    its rows. Where the reals form their own group (DRCT-2M's MSCOCO, a `folder` layout's `real`), that
    group is a real class, not a generator: real-only groups are pooled and every fake-only generator is
    scored against the pool. With a single group, it is scored as it is.
    """
    names = sorted(set(generator.tolist()))
    classes = {name: set(label[generator == name].tolist()) for name in names}
    real_pool = np.isin(generator, [n for n in names if classes[n] == {0}])
    groups = []
    for name in names:
        if classes[name] == {0} and len(names) > 1:
            continue  # part of the real pool, scored with every fake-only generator
        mine = generator == name
        groups.append((name, mine | real_pool if classes[name] == {1} else mine))
    return groups


def protocol_table(test: Predictions, threshold: float = 0.5) -> list[dict]:
    """One row per generator (`generator_groups`) and the average row, as GenImage and DRCT-2M report them.

    The average row is the mean over generators of each column (the papers' "mean ACC"), not a pooled
    accuracy, so a large generator does not dominate it.
    """
    rows = [{"generator": name, **_metrics(test.select(mask), threshold)}
            for name, mask in generator_groups(test.generator, test.label)]
    average = {"generator": "average", "n_real": sum(r["n_real"] for r in rows),
               "n_fake": sum(r["n_fake"] for r in rows)}
    for column in ("real_acc", "fake_acc", "acc", "ap", "auroc"):
        average[column] = float(np.nanmean([r[column] for r in rows])) if rows else float("nan")
    return [*rows, average]


def save_rows(rows: list[dict], out_dir: str | Path, name: str, cell: Callable[[object], str]) -> str:
    """NAME.csv (values as they are) and NAME.md (cells formatted by `cell`) in out_dir; returns the Markdown."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows)
    frame.to_csv(out / f"{name}.csv", index=False)
    markdown = markdown_table(list(frame.columns), [[cell(value) for value in record] for record in frame.itertuples(index=False)])
    (out / f"{name}.md").write_text(markdown)
    return markdown


def to_markdown(rows: list[dict], title: str = "", published: PublishedRow | None = None) -> str:
    """The table as Markdown (percent, one decimal); the published ACC (and AP) beside our average row."""
    header = ["generator", "n real", "n fake", "real ACC", "fake ACC", "ACC", "AP", "AUROC"]
    if published is not None:
        header += ["published ACC", "published AP"]
    cells = []
    for row in rows:
        cells.append([row["generator"], str(row["n_real"]), str(row["n_fake"])]
                     + [f"{100 * row[c]:.1f}" for c in ("real_acc", "fake_acc", "acc", "ap", "auroc")])
        if published is not None:
            mine = row["generator"] == "average"
            cells[-1] += [f"{published.acc:.1f}" if mine else "",
                          f"{published.ap:.1f}" if mine and published.ap is not None else ""]
    text = (f"### {title}\n\n" if title else "") + markdown_table(header, cells)
    if published is not None:
        text += f"\nPublished: {published.source} (SPEC §7), same detector settings and protocol.\n"
    return text


def write_table(rows: list[dict], out_dir: str | Path, name: str, title: str = "",
                published: PublishedRow | None = None, note: str = "") -> tuple[Path, Path]:
    """Write NAME.csv (fractions, full precision) and NAME.md (percent, then `note`) into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / f"{name}.csv", out / f"{name}.md"
    pd.DataFrame(rows, columns=list(COLUMNS)).to_csv(csv_path, index=False)
    md_path.write_text(to_markdown(rows, title, published) + note)
    return csv_path, md_path
