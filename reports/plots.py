"""Figures a forensics reader expects: ROC/PR curves, real-vs-fake map histograms, map overlays.

Each function returns a matplotlib Figure, so the same figure goes to a PNG file and to
TensorBoard (`SummaryWriter.add_figure`).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless clusters: never ask for a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torchmetrics.functional.classification import binary_precision_recall_curve, binary_roc  # noqa: E402

from reports.evaluation import Predictions, generator_groups  # noqa: E402


def roc_pr_figure(preds: Predictions, title: str = "") -> plt.Figure:
    """ROC and precision-recall curves, one line per generator plus all images pooled."""
    fig, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(10, 4.5))
    groups = [("all", np.ones_like(preds.label, dtype=bool))] + generator_groups(preds.generator, preds.label)
    for name, mask in groups:
        subset = preds.select(mask)
        if len(set(subset.label.tolist())) < 2:
            continue
        scores, target = torch.from_numpy(subset.p_fake).float(), torch.from_numpy(subset.label).long()
        fpr, tpr, _ = binary_roc(scores, target)
        precision, recall, _ = binary_precision_recall_curve(scores, target)
        style = {"linewidth": 2.5, "color": "black"} if name == "all" else {"linewidth": 1}
        roc_ax.plot(fpr.numpy(), tpr.numpy(), label=name, **style)
        pr_ax.plot(recall.numpy(), precision.numpy(), label=name, **style)
    roc_ax.plot([0, 1], [0, 1], ":", color="grey")
    roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    pr_ax.set(xlabel="recall", ylabel="precision (fake = positive)", title="precision-recall")
    roc_ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def map_histograms(per_image_means: dict[str, np.ndarray], label: np.ndarray, generator: np.ndarray) -> plt.Figure:
    """Histograms of each map's per-image mean, real vs fake, one row per map and column per generator
    (the rows `generator_groups` scores it on: pooled reals beside a fake-only generator)."""
    groups = generator_groups(generator, label)
    fig, axes = plt.subplots(len(per_image_means), len(groups), figsize=(3.2 * len(groups), 2.6 * len(per_image_means)),
                             squeeze=False)
    for row, (map_name, values) in enumerate(per_image_means.items()):
        for col, (gen, in_gen) in enumerate(groups):
            ax = axes[row][col]
            bins = np.histogram_bin_edges(values[in_gen], bins=30)
            for lab, colour, text in ((0, "tab:blue", "real"), (1, "tab:red", "fake")):
                ax.hist(values[in_gen & (label == lab)], bins=bins, alpha=0.55, color=colour, label=text)
            ax.set_title(f"{gen}", fontsize=8)
            ax.set_xlabel(f"mean {map_name}", fontsize=8)
            if row == 0 and col == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def overlay_figure(images: np.ndarray, maps: np.ndarray, captions: list[str]) -> plt.Figure:
    """Images (N,3,H,W in [-1,1]) with a map (N,h,w, e.g. DEU summed over channels) overlaid as a heatmap."""
    fig, axes = plt.subplots(1, len(images), figsize=(3 * len(images), 3.3), squeeze=False)
    for ax, image, heat, caption in zip(axes[0], images, maps, captions):
        ax.imshow(np.clip((image.transpose(1, 2, 0) + 1) / 2, 0, 1))
        ax.imshow(heat, cmap="inferno", alpha=0.5, extent=(0, image.shape[2], image.shape[1], 0),
                  interpolation="bilinear")
        ax.set_title(caption, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    return fig


def save_figure(fig: plt.Figure, path: str | Path) -> Path:
    """Write a PNG and release the figure's memory (long evaluation loops make many)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
