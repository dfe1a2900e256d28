"""Figures a forensics reader expects: ROC/PR curves, real-vs-fake map histograms, map overlays.

Each function returns a matplotlib Figure, so the same figure goes to a PNG file and to
TensorBoard (`SummaryWriter.add_figure`). Figures are meant for a paper: every axis labelled, a log axis where
positive values span decades (uncertainty maps do), at most a few ticks in scientific notation (DEU's ~1e-4
values printed in full ran into each other), and each panel's AUROC with its 95 % bootstrap interval in its title
(the intervals of `reports.separability.score_table`).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless clusters: never ask for a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import LogLocator, MaxNLocator, ScalarFormatter  # noqa: E402
import torch  # noqa: E402
from torchmetrics.functional.classification import binary_precision_recall_curve, binary_roc  # noqa: E402

from reports.evaluation import Predictions, generator_groups  # noqa: E402

DECADES_FOR_LOG = 2.0  # positive values whose 1st-99th percentiles span this many decades get a log axis
PLOT_REPLICATES = 200  # bootstrap replicates behind a title's interval (the tables use more)


def auroc_title(score: np.ndarray, label: np.ndarray, generator: np.ndarray, group: str) -> str:
    """`AUROC 0.93 [0.88, 0.97]` of one generator group (or `average`), as the separability table scores it."""
    from reports.separability import score_table

    rows = {row["generator"]: row for row in score_table(score, label, generator, PLOT_REPLICATES, 0)}
    row = rows.get(group)
    if row is None or not np.isfinite(row["auroc"]):
        return "AUROC n/a"
    return f"AUROC {row['auroc']:.2f} [{row['auroc_low']:.2f}, {row['auroc_high']:.2f}]"


def log_axis(values: np.ndarray) -> bool:
    """Whether these values want a log axis: all positive and spanning decades."""
    finite = values[np.isfinite(values)]
    if finite.size < 2 or finite.min() <= 0:
        return False
    low, high = np.percentile(finite, [1, 99])
    return bool(np.log10(high / low) >= DECADES_FOR_LOG)


def class_histogram(ax: plt.Axes, values: np.ndarray, label: np.ndarray, xlabel: str, bins: int = 30,
                    density: bool = False) -> None:
    """Real vs fake histograms of `values` on one axis: shared bins (log-spaced on a log axis), labelled axes,
    few non-overlapping ticks."""
    finite = values[np.isfinite(values)]
    logarithmic = log_axis(finite)
    if logarithmic:
        edges = np.geomspace(finite.min(), finite.max(), bins + 1)
    else:
        edges = np.histogram_bin_edges(finite, bins=bins) if finite.size else bins
    for lab, colour, text in ((0, "tab:blue", "real"), (1, "tab:red", "fake")):
        ax.hist(values[(label == lab) & np.isfinite(values)], bins=edges, alpha=0.55, color=colour, label=text,
                density=density)
    ax.set_xlabel(xlabel + (" (log scale)" if logarithmic else ""), fontsize=8)
    ax.set_ylabel("density" if density else "images", fontsize=8)
    tidy_ticks(ax, logarithmic, integer_y=not density)


def tidy_ticks(ax: plt.Axes, log_x: bool = False, integer_y: bool = False) -> None:
    """At most 4 x ticks; a linear axis in scientific notation with the exponent once at the axis end; counts on
    whole numbers."""
    if log_x:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(numticks=4))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(3))
        formatter = ScalarFormatter(useMathText=True)
        formatter.set_powerlimits((-2, 3))
        ax.xaxis.set_major_formatter(formatter)
    ax.yaxis.set_major_locator(MaxNLocator(4, integer=integer_y))
    ax.tick_params(labelsize=7)


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
    average = auroc_title(preds.p_fake, preds.label, preds.generator, "average")
    roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC · mean over generators {average}")
    roc_ax.title.set_fontsize(9)
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
            class_histogram(ax, values[in_gen], label[in_gen], f"per-image mean of {map_name}")
            ax.set_title(f"{gen}\n{auroc_title(values, label, generator, gen)} (higher = fake)", fontsize=8)
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
