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
