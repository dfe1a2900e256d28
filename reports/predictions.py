"""Per-row predictions of one stage, kept as a torchmetrics state so DDP gathers them correctly.

One log serves two needs: per-generator metrics (grouping needs every row's score, label and
generator; the metric definitions live in `reports.evaluation`) and the saved prediction tables that
the evaluation step recomputes its numbers from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torchmetrics import Metric
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

    def columns(self) -> dict[str, torch.Tensor]:
        """`compute`'s table as 1-D columns: torchmetrics squeezes a one-element result to a scalar, so a split of
        one row would otherwise reach the tables as 0-d tensors."""
        return {name: values.reshape(-1) for name, values in self.compute().items()}


def generator_name(code: int, names: list[str] | None) -> str:
    """The datamodule's name for a generator code, or `gen<code>` when it gives none."""
    return names[code] if names is not None and 0 <= code < len(names) else f"gen{code}"


def generator_names_of(codes: torch.Tensor, names: list[str] | None) -> np.ndarray:
    """Generator names of a column of codes (object array, the shape `reports.evaluation.Predictions` takes)."""
    return np.array([generator_name(code, names) for code in codes.tolist()], dtype=object)


def write_predictions_csv(table: dict[str, torch.Tensor], names: list[str] | None, threshold: float,
                          path: Path) -> Path:
    """CSV with store, row, generator (name), generator_code, label, p_fake, threshold, prediction (1 = fake).

    `reports.protocol_report` joins the stores' per-image columns (key, path, format, ...) onto the test one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame({"store": table["store"].cpu().numpy(), "row": table["row"].cpu().numpy(),
                          "generator": generator_names_of(table["generator"].cpu(), names),
                          "generator_code": table["generator"].cpu().numpy(), "label": table["label"].cpu().numpy(),
                          "p_fake": table["p_fake"].cpu().numpy()})
    frame["threshold"] = threshold
    frame["prediction"] = (frame["p_fake"] >= threshold).astype(int)
    frame.to_csv(path, index=False, float_format="%.6g")
    return path
