"""A device count the machine cannot honour is said once, by rank 0, whichever Trainer was asked for it."""

from __future__ import annotations

import os
import sys

import lightning.pytorch as pl
from lightning.pytorch.accelerators import CPUAccelerator


def warn_if_oversubscribed(trainer: pl.Trainer, option: str = "--trainer.devices") -> None:
    """More CPU ranks than cores run each rank that much slower and the whole run no faster: one warning line."""
    cores = len(os.sched_getaffinity(0))
    if isinstance(trainer.accelerator, CPUAccelerator) and trainer.num_devices > cores and trainer.is_global_zero:
        print(f"warning: {option} {trainer.num_devices} on CPU starts {trainer.num_devices} processes on "
              f"{cores} cores: each runs about {trainer.num_devices / cores:.1f}x slower and the run is no faster "
              f"({option} {cores} or fewer)", file=sys.stderr, flush=True)
