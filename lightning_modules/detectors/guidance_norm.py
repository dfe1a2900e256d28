"""Scale-free standardisation of guidance maps, fitted once on training rows and saved with the checkpoint.

DEU sits near 1e-3 with a spatial variance of 1e-7..1e-9, MI near 1e-4, LaRE near 1e-1; DEU's level
also moves with σ² and the calibration-set size. BatchNorm's absolute eps (1e-5) exceeds DEU's
variance, so it flattened the very signal the detectors rest on. Here every constant is relative to
the map's own scale, so multiplying a map by any c > 0 leaves the standardised map unchanged:

- `log` (default): z = (log(u + f) − μ) / σ per channel, with the floor f = 1e-6 · mean(u) of that
  channel and μ, σ the mean and std of log(u + f) over the fitting rows. Multiplying u by c adds
  log c to both log(u + f) and μ. Right for non-negative maps whose values span decades (variances,
  squared errors); a negative value in the fitting rows is an error naming the map.
- `standard`: z = (u − μ) / (σ + 1e-6 · (|μ| + σ)) per channel, for signed maps.
- `none`: the raw values, as the official LaRE² code feeds its LaRE map.

The statistics are buffers: a checkpoint carries them, so `test` and `predict` use the training scale.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn

GuidanceNorm = Literal["log", "standard", "none"]
RELATIVE_EPS = 1e-6  # floor and std guard, as a fraction of the channel's own scale
MIN_LOG_STD = 1e-4   # log space is scale-free already: an absolute guard there is a relative one on u


class GuidanceNormalizer(nn.Module):
    """Per-channel standardisation of (B, C, h, w) guidance maps whose channels come from named maps."""

    def __init__(self, names: list[str], channels: list[int], mode: GuidanceNorm = "log") -> None:
        super().__init__()
        if mode not in ("log", "standard", "none"):
            raise ValueError(f"guidance_norm must be 'log', 'standard' or 'none', got {mode!r}")
        self.names = list(names)
        self.channels = list(channels)
        self.mode = mode
        total = sum(channels)
        self.register_buffer("floor", torch.zeros(total))
        self.register_buffer("mean", torch.zeros(total))
        self.register_buffer("std", torch.ones(total))
        self.register_buffer("fitted", torch.tensor(mode == "none"))

    def _channel_names(self) -> list[str]:
        return [name for name, count in zip(self.names, self.channels) for _ in range(count)]

    def fit(self, batches: Iterable[torch.Tensor], max_rows: int) -> int:
        """Set the statistics from up to `max_rows` rows of (B, C, h, w) maps; returns the rows used."""
        if self.mode == "none":
            return 0
        rows = []
        seen = 0
        for maps in batches:
            rows.append(maps[: max_rows - seen].detach().to("cpu", torch.float64))
            seen += rows[-1].shape[0]
            if seen >= max_rows:
                break
        if not seen:
            raise ValueError("no training rows to fit the guidance normalisation on")
        values = torch.cat(rows).transpose(0, 1).flatten(1)  # (C, rows·h·w)
        if self.mode == "log":
            minimum = values.min(dim=1).values
            negative = [name for name, low in zip(self._channel_names(), minimum.tolist()) if low < 0]
            if negative:
                raise ValueError(f"guidance map {negative[0]!r} has negative values (min {minimum.min():.3g}): "
                                 "log normalisation needs non-negative maps; set model.init_args.guidance_norm "
                                 "standard")
            scale = values.mean(dim=1)
            floor = torch.where(scale > 0, RELATIVE_EPS * scale, torch.ones_like(scale))
            logs = torch.log(values + floor[:, None])
            self.floor.copy_(floor)
            self.mean.copy_(logs.mean(dim=1))
            self.std.copy_(logs.std(dim=1).clamp_min(MIN_LOG_STD))
        else:
            mean, std = values.mean(dim=1), values.std(dim=1)
            guard = RELATIVE_EPS * (mean.abs() + std)
            self.mean.copy_(mean)
            self.std.copy_(torch.where(guard > 0, std + guard, torch.ones_like(std)))
        self.fitted.fill_(True)
        return seen

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        if not bool(self.fitted):
            raise RuntimeError("the guidance normalisation has no statistics: train the detector with `fit` "
                               "(they are computed from the training rows) or load a trained checkpoint")
        if self.mode == "none":
            return maps
        shape = (1, -1, 1, 1)
        if self.mode == "log":  # clamp: a slightly negative value at test time must not give NaN
            maps = torch.log(maps.clamp_min(0) + self.floor.view(shape))
        return (maps - self.mean.view(shape)) / self.std.view(shape)
