"""The prediction log keeps each (store, row) once: DDP's padding sampler repeats rows to even out ranks."""

from __future__ import annotations

import torch

from reports.predictions import PredictionLog


def test_repeated_rows_are_kept_once_in_first_seen_order():
    log = PredictionLog()
    log.update(torch.tensor([0.1, 0.9]), torch.tensor([0, 1]), torch.tensor([0, 0]), torch.tensor([5, 6]),
               torch.tensor([0, 0]))
    log.update(torch.tensor([0.2, 0.1, 0.7]), torch.tensor([0, 0, 1]), torch.tensor([1, 0, 1]),
               torch.tensor([5, 5, 2]), torch.tensor([1, 0, 1]))  # (store 0, row 5) again: padding
    table = log.compute()
    assert list(zip(table["store"].tolist(), table["row"].tolist())) == [(0, 5), (0, 6), (1, 5), (1, 2)]
    assert torch.allclose(table["p_fake"], torch.tensor([0.1, 0.9, 0.2, 0.7]))


def test_a_split_of_one_row_is_a_column_of_one():
    """Bug caught: torchmetrics squeezes a one-element result to 0-d, so a validation split of one row (5 % of a
    16-row store) crashed `fit` in the per-generator table ('int' object is not iterable)."""
    from reports.predictions import generator_names_of

    log = PredictionLog()
    log.update(torch.tensor([0.3]), torch.tensor([1]), torch.tensor([0]), torch.tensor([5]))
    table = log.columns()
    assert {name: tuple(column.shape) for name, column in table.items()} == {name: (1,) for name in table}
    assert generator_names_of(table["generator"], ["sdv4"]).tolist() == ["sdv4"]
