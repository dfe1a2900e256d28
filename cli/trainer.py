"""The Trainer with the project's own Trainer-run subcommands (LightningCLI maps methods to subcommands)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl


class ForensicsTrainer(pl.Trainer):
    """Lightning's Trainer plus `precompute` (phase 1) and `laplace_fit` (the DEU posterior)."""

    def test(self, model: pl.LightningModule | None = None, dataloaders: Any = None,
             ckpt_path: str | Path | None = None, verbose: bool = False,
             datamodule: pl.LightningDataModule | None = None,
             weights_only: bool | None = None) -> list[Mapping[str, float]]:
        """Score a fitted run's checkpoint on the test stores; print and save the per-generator protocol table.

        Args:
            ckpt_path: checkpoint to score; default (or `best`) the fitted run's best checkpoint, `last` its
                last one. The run is the newest `fit` of the same configs and seed.
            verbose: also print Lightning's list of every logged metric (the protocol table is always printed).
        """
        return super().test(model, dataloaders, ckpt_path, verbose, datamodule, weights_only)

    def precompute(self, model: pl.LightningModule, datamodule: pl.LightningDataModule | None = None,
                   store: str | None = None, feature_dtype: Literal["float16", "float32"] = "float16") -> None:
        """Phase 1: compute per-image LaRE/DEU maps from image shards into a Zarr feature store.

        Args:
            store: Zarr store directory to create, or to resume (done tars are skipped).
            feature_dtype: storage dtype of the feature arrays.
        """
        from feature_cache.writer import ZarrFeatureWriter

        if store is None:
            raise SystemExit("python -m cli precompute: --store PATH is required (the Zarr feature store to write)")
        if datamodule is None:
            raise SystemExit("python -m cli precompute: --data is required (an ImageShardDataModule over shards)")
        if any(isinstance(c, ZarrFeatureWriter) for c in self.callbacks):
            raise SystemExit("python -m cli precompute: remove ZarrFeatureWriter from trainer.callbacks; "
                             "--store adds it")
        writer = ZarrFeatureWriter(store, feature_dtype)
        self.callbacks.append(writer)
        try:
            self.predict(model, datamodule=datamodule, return_predictions=False)
        finally:
            self.callbacks.remove(writer)
        if self.is_global_zero and writer.store is not None:
            done = len(writer.store.done_shards())
            print(f"precompute: {store}: {done}/{len(writer.store.shard_table)} tars done, "
                  f"{len(writer.store.rejected())} rejected images recorded")

    def laplace_fit(self, model: pl.LightningModule, datamodule: pl.LightningDataModule | None = None) -> None:
        """Fit the diagonal last-layer Laplace posterior of the UNet's conv_out over calibration shards."""
        from lightning_modules.laplace_fit import LaplaceFit

        if not isinstance(model, LaplaceFit):
            raise SystemExit(f"python -m cli laplace-fit: --model must be LaplaceFit, got {type(model).__name__}")
        self.predict(model, datamodule=datamodule, return_predictions=False)
        if self.is_global_zero:
            print(f"laplace-fit: posterior written to {model.hparams.output}")
