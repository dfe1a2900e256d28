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
        from lightning_modules.laplace_fit import LaplaceFit

        if not isinstance(model, LaplaceFit):
            raise SystemExit(f"python -m cli laplace-fit: --model must be LaplaceFit, got {type(model).__name__}")
        self.predict(model, datamodule=datamodule, return_predictions=False)
        if self.is_global_zero:
            print(f"laplace-fit: posterior written to {model.hparams.output}")
