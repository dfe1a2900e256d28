"""The Trainer with the project's own Trainer-run subcommands (LightningCLI maps methods to subcommands)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning.pytorch as pl

ClipDtype = Literal["float16", "int8_rowscale", "float8_e4m3"]
Codec = Literal["none", "lz4", "zstd"]


class ForensicsTrainer(pl.Trainer):
    """Lightning's Trainer plus `precompute` (phase 1) and `laplace_fit` (the DEU posterior)."""

    def precompute(self, model: pl.LightningModule, datamodule: pl.LightningDataModule | None = None,
                   store: str | None = None, clip_dtype: ClipDtype = "float16", clip_codec: Codec = "lz4",
                   background_writer: bool = True, queue_tars: int = 2, verify_checksums: bool = True) -> None:
        """Phase 1: compute per-image maps from image shards into a Zarr feature store (create, resume or grow).

        Args:
            store: Zarr store directory to create, resume (done tars are skipped) or grow (outputs not yet in
                it become a new feature group; outputs already in it are checked, not recomputed).
            clip_dtype: stored dtype of CLIP maps (guidance maps are float32); see feature_cache/codecs.py.
            clip_codec: codec of CLIP maps (none, lz4, zstd).
            background_writer: encode and write tars in a background thread, off the device loop.
            queue_tars: tars of outputs queued for the writer before the device loop waits.
            verify_checksums: check every stored file's sha256 at start (not only its size) and recompute
                damaged tars; false skips the read-back of the whole store.
        """
        from feature_cache.writer import ZarrFeatureWriter

        if store is None:
            raise SystemExit("python -m cli precompute: --store PATH is required (the Zarr feature store to write)")
        if Path(store).exists() and not Path(store).is_dir():
            raise SystemExit(f"python -m cli precompute: --store {store}: is a file, not a store directory")
        if datamodule is None:
            raise SystemExit("python -m cli precompute: --data is required (an ImageShardDataModule over shards)")
        if any(isinstance(c, ZarrFeatureWriter) for c in self.callbacks):
            raise SystemExit("python -m cli precompute: remove ZarrFeatureWriter from trainer.callbacks; "
                             "--store adds it")
        writer = ZarrFeatureWriter(store, clip_dtype=clip_dtype, clip_codec=clip_codec, background=background_writer,
                                   queue_tars=queue_tars, verify_checksums=verify_checksums)
        self.callbacks.append(writer)
        try:
            self.predict(model, datamodule=datamodule, return_predictions=False)
        finally:
            self.callbacks.remove(writer)
        summary = writer.summary  # rank 0 only, read from the done markers after every rank finished
        if summary is not None:
            print(f"precompute: {summary.text}")
            if summary.unfinished:
                raise SystemExit(f"python -m cli precompute: {store}: group {summary.group}: {summary.done}/"
                                 f"{summary.total} tars done; unfinished: {', '.join(summary.unfinished[:10])}"
                                 f"{' ...' if len(summary.unfinished) > 10 else ''} (rerun to finish them)")
            if summary.not_added:
                raise SystemExit(f"python -m cli precompute: {store}: outputs {', '.join(summary.not_added)} are not "
                                 "in the store yet (an incomplete group was resumed first); rerun to add them")

    def laplace_fit(self, model: pl.LightningModule, datamodule: pl.LightningDataModule | None = None) -> None:
        """Fit the diagonal last-layer Laplace posterior of the UNet's conv_out over calibration shards."""
        from lightning_modules.laplace_fit import LaplaceFit

        if not isinstance(model, LaplaceFit):
            raise SystemExit(f"python -m cli laplace-fit: --model must be LaplaceFit, got {type(model).__name__}")
        self.predict(model, datamodule=datamodule, return_predictions=False)
        if self.is_global_zero:
            print(f"laplace-fit: posterior written to {model.hparams.output}")
