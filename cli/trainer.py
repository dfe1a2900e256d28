"""The Trainer with the project's own Trainer-run subcommands (LightningCLI maps methods to subcommands)."""

from __future__ import annotations

import lightning.pytorch as pl


class ForensicsTrainer(pl.Trainer):
    """Lightning's Trainer plus `precompute` (phase 1) and `laplace_fit` (the DEU posterior)."""

    def precompute(self, model: pl.LightningModule, datamodule: pl.LightningDataModule | None = None) -> None:
        """Phase 1: compute per-image LaRE/DEU maps from image shards into a Zarr feature store."""
        raise SystemExit("python -m cli precompute: not implemented yet (feature-cache issue)")

    def laplace_fit(self, model: pl.LightningModule, datamodule: pl.LightningDataModule | None = None) -> None:
        """Fit the diagonal last-layer Laplace posterior of the UNet's conv_out over calibration shards."""
        raise SystemExit("python -m cli laplace-fit: not implemented yet (phase-1 features issue)")
