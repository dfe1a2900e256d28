"""Per-row predictions of one stage, kept as a torchmetrics state so DDP gathers them correctly.

One log serves two needs: per-generator metrics (grouping needs every row's score, label and
generator) and the saved prediction tables that the evaluation step recomputes its numbers from.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from torchmetrics import Metric
from torchmetrics.functional.classification import (binary_accuracy, binary_auroc, binary_average_precision,
                                                     binary_recall, binary_specificity)
from torchmetrics.utilities import dim_zero_cat

FIELDS = ("p_fake", "label", "generator", "row", "store")


class PredictionLog(Metric):
    """Collects (p_fake, label, generator, row, store) for every row; `compute` returns them in batch order.

    (store, row) identifies an image: `row` is a row within its store and a split may span several stores.
    Under DDP the distributed sampler repeats up to world_size − 1 rows to even out the ranks; `compute`
    keeps each image once.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in FIELDS:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, p_fake: torch.Tensor, label: torch.Tensor, generator: torch.Tensor, row: torch.Tensor,
               store: torch.Tensor | None = None) -> None:
        self.p_fake.append(p_fake.detach().float())
        self.label.append(label.detach().long())
        self.generator.append(generator.detach().long())
        self.row.append(row.detach().long())
        self.store.append(torch.zeros_like(self.row[-1]) if store is None else store.detach().long())

    def compute(self) -> dict[str, torch.Tensor]:
        """Every (store, row) once, in first-seen order: DDP's padding sampler repeats up to world − 1 rows."""
        if isinstance(self.row, list) and not self.row:  # after a DDP sync the states are tensors
            return {name: torch.empty(0, device=self.device) for name in FIELDS}
        table = {name: dim_zero_cat(getattr(self, name)) for name in FIELDS}
        identity = table["store"] * 2**40 + table["row"]
        _, inverse = torch.unique(identity, return_inverse=True)
        first = torch.full((int(inverse.max()) + 1,), len(identity), device=identity.device)
        first = first.scatter_reduce(0, inverse, torch.arange(len(identity), device=identity.device), "amin")
        keep = first.sort().values
        return {name: values[keep] for name, values in table.items()}


def binary_metrics(p_fake: torch.Tensor, label: torch.Tensor, threshold: float = 0.5) -> dict[str, torch.Tensor]:
    """ACC, real ACC (specificity), fake ACC (recall) at `threshold`, and AP/AUROC, each only where defined."""
    real, fake = (label == 0).any(), (label == 1).any()
    out = {"acc": binary_accuracy(p_fake, label, threshold)}
    if real:
        out["real_acc"] = binary_specificity(p_fake, label, threshold)
    if fake:
        out["fake_acc"] = binary_recall(p_fake, label, threshold)
    if real and fake:
        out["ap"] = binary_average_precision(p_fake, label)
        out["auroc"] = binary_auroc(p_fake, label)
    return out


def per_generator_metrics(table: dict[str, torch.Tensor], names: list[str] | None,
                          threshold: float = 0.5) -> dict[str, dict[str, torch.Tensor]]:
    """`binary_metrics` for each generator code present in the table, keyed by generator name."""
    out = {}
    for code in torch.unique(table["generator"]).tolist():
        rows = table["generator"] == code
        out[generator_name(code, names)] = binary_metrics(table["p_fake"][rows], table["label"][rows], threshold)
    return out


def generator_name(code: int, names: list[str] | None) -> str:
    """The datamodule's name for a generator code, or `gen<code>` when it gives none."""
    return names[code] if names is not None and 0 <= code < len(names) else f"gen{code}"


def write_predictions_csv(table: dict[str, torch.Tensor], names: list[str] | None, path: Path) -> Path:
    """CSV with columns store, row, generator (name), generator_code, label, p_fake: the evaluation step's input."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {name: values.cpu().tolist() for name, values in table.items()}
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["store", "row", "generator", "generator_code", "label", "p_fake"])
        for store, row, code, label, p in zip(columns["store"], columns["row"], columns["generator"], columns["label"],
                                              columns["p_fake"]):
            writer.writerow([store, row, generator_name(code, names), code, label, f"{p:.6g}"])
    return path
