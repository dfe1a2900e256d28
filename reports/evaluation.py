"""The papers' evaluation table from saved predictions: per generator real/fake/mean ACC, AP, AUROC.

Everything is computed from a predictions table (p_fake, label, generator), so a test can recompute
any number independently, and the threshold for accuracy comes from validation predictions, never
from the test split (thresholds tuned on the test set are a known flaw of the papers' code).
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchmetrics.functional.classification import binary_auroc, binary_average_precision

# SPEC §7: GenImage, trained on SD v1.4, mean ACC % over the eight generators.
PUBLISHED_GENIMAGE_MEAN_ACC = {"DEUADetector": 85.6, "LaRE2Detector": 79.1, "UnivFD": 69.7, "DIRE": 67.2}
PUBLISHED_DRCT_MEAN_ACC = {"DEUADetector": 90.5, "LaRE2Detector": 88.0}

COLUMNS = ("generator", "n_real", "n_fake", "real_acc", "fake_acc", "acc", "ap", "auroc")


@dataclass
class Predictions:
    """One row per image: probability of fake, true label (0 real, 1 fake), generator name."""

    p_fake: np.ndarray
    label: np.ndarray
    generator: np.ndarray

    @classmethod
    def from_csv(cls, path: str | Path) -> Predictions:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        if not rows:
            raise ValueError(f"predictions file {path} has no rows")
        missing = {"p_fake", "label", "generator"} - set(rows[0])
        if missing:
            raise ValueError(f"predictions file {path} lacks the columns {sorted(missing)}")
        return cls(np.array([float(r["p_fake"]) for r in rows]), np.array([int(r["label"]) for r in rows]),
                   np.array([r["generator"] for r in rows]))

    def select(self, mask: np.ndarray) -> Predictions:
        return Predictions(self.p_fake[mask], self.label[mask], self.generator[mask])


def choose_threshold(validation: Predictions) -> float:
    """Threshold on p_fake that maximises balanced accuracy on validation predictions (ties: closest to 0.5).

    Sorted scores and cumulative counts give every candidate's accuracy at once: O(n log n).
    """
    real, fake = validation.p_fake[validation.label == 0], validation.p_fake[validation.label == 1]
    if not len(real) or not len(fake):
        return 0.5
    candidates = np.unique(np.concatenate([validation.p_fake, [0.5]]))
    real_below = np.searchsorted(np.sort(real), candidates, side="left") / len(real)  # real ACC at t
    fake_at_or_above = 1 - np.searchsorted(np.sort(fake), candidates, side="left") / len(fake)  # fake ACC at t
    score = real_below + fake_at_or_above
    best = np.flatnonzero(np.isclose(score, score.max()))
    return float(candidates[best[np.argmin(np.abs(candidates[best] - 0.5))]])


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


def scoring_groups(generator: np.ndarray, label: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """(generator, row mask) of every group a per-generator table scores, in name order.

    A generator with both classes (GenImage: each generator's own real and fake val images) is scored on
    its rows. Where the reals form their own "generator" (DRCT-2M's MSCOCO, a `folder` layout's `real`),
    those real-only groups are pooled and every fake-only generator is scored against the pool.
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
    """One row per generator (groups of `scoring_groups`) and the average row, as GenImage and DRCT-2M report
    them. The average row is the mean over generators of each column (the papers' "mean ACC"), not a pooled
    accuracy, so a large generator does not dominate it.
    """
    rows = [{"generator": name, **_metrics(test.select(mask), threshold)}
            for name, mask in scoring_groups(test.generator, test.label)]
    average = {"generator": "average", "n_real": sum(r["n_real"] for r in rows),
               "n_fake": sum(r["n_fake"] for r in rows)}
    for column in ("real_acc", "fake_acc", "acc", "ap", "auroc"):
        average[column] = float(np.nanmean([r[column] for r in rows])) if rows else float("nan")
    return [*rows, average]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table of already formatted cells (every report of the project uses it)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows]) + "\n"


def save_rows(rows: list[dict], out_dir: str | Path, name: str, cell: Callable[[object], str]) -> str:
    """NAME.csv (values as they are) and NAME.md (cells formatted by `cell`) in out_dir; returns the Markdown."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0])
    with open(out / f"{name}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    markdown = markdown_table(columns, [[cell(row[c]) for c in columns] for row in rows])
    (out / f"{name}.md").write_text(markdown)
    return markdown


def to_markdown(rows: list[dict], title: str = "", published_mean_acc: float | None = None) -> str:
    """The table as Markdown (percent, one decimal); the published mean ACC beside ours when comparable."""
    header = ["generator", "real ACC", "fake ACC", "ACC", "AP", "AUROC"]
    if published_mean_acc is not None:
        header.append("published ACC")
    cells = []
    for row in rows:
        cells.append([row["generator"]] + [f"{100 * row[c]:.1f}" for c in ("real_acc", "fake_acc", "acc", "ap", "auroc")])
        if published_mean_acc is not None:
            cells[-1].append(f"{published_mean_acc:.1f}" if row["generator"] == "average" else "")
    return (f"### {title}\n\n" if title else "") + markdown_table(header, cells)


def write_table(rows: list[dict], out_dir: str | Path, name: str, title: str = "",
                published_mean_acc: float | None = None, note: str = "") -> tuple[Path, Path]:
    """Write NAME.csv (fractions, full precision) and NAME.md (percent, then `note`) into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / f"{name}.csv", out / f"{name}.md"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({c: row[c] for c in COLUMNS} for row in rows)
    md_path.write_text(to_markdown(rows, title, published_mean_acc) + note)
    return csv_path, md_path
