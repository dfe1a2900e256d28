"""The Trainer with the project's own Trainer-run subcommands (LightningCLI maps methods to subcommands).

A method's signature and docstring are the subcommand's options and help; where its work is more than a call,
the work lives in workflows/ (`workflows.precompute`, `workflows.generate`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar

from core.devices import warn_if_oversubscribed
from core.trainer_progress import rich_progress_bar

from feature_cache.codecs import CLIP_CODEC, ClipDtype, Codec


class ForensicsTrainer(pl.Trainer):
    """Lightning's Trainer plus `precompute` (phase 1), `laplace_fit` (the DEU posterior), `generate`
    and `ensemble_fit` (DECU's members)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Lightning's default bar (tqdm, added when no bar is configured) and a configured Rich bar both become
        # `rich_progress_bar()`; a bar of another kind that the config names is kept
        given = kwargs.get("callbacks") or []
        configured = any(isinstance(c, ProgressBar) for c in (given if isinstance(given, list) else [given]))
        self.callbacks[:] = [
            rich_progress_bar(c) if isinstance(c, RichProgressBar) or (isinstance(c, TQDMProgressBar) and not configured)
            else c for c in self.callbacks]
        warn_if_oversubscribed(self)

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
        from workflows.provenance_checks import check_scored_stores

        check_scored_stores(ckpt_path, datamodule, "test")
        return super().test(model, dataloaders, ckpt_path, verbose, datamodule, weights_only)

    def validate(self, model: pl.LightningModule | None = None, dataloaders: Any = None,
                 ckpt_path: str | Path | None = None, verbose: bool = True,
                 datamodule: pl.LightningDataModule | None = None,
                 weights_only: bool | None = None) -> list[Mapping[str, float]]:
        """Score a fitted run's checkpoint on the validation stores (refused when they were computed otherwise).

        Args:
            ckpt_path: checkpoint to score; default (or `best`) the fitted run's best checkpoint, `last` its
                last one. The run is the newest `fit` of the same configs and seed.
            verbose: print Lightning's list of every logged metric.
        """
        from workflows.provenance_checks import check_scored_stores

        check_scored_stores(ckpt_path, datamodule, "validate")
        return super().validate(model, dataloaders, ckpt_path, verbose, datamodule, weights_only)

    def precompute(self, model: pl.LightningModule, datamodule: pl.LightningDataModule | None = None,
                   store: str | None = None, clip_dtype: ClipDtype = "float16", clip_codec: Codec = CLIP_CODEC,
                   background_writer: bool = True, queue_tars: int = 2, verify_checksums: bool = True,
                   drop_incomplete_group: bool = False) -> None:
        """Phase 1: compute per-image maps from image shards into a Zarr feature store (create, resume or grow).

        Args:
            store: Zarr store directory to create, resume (done tars are skipped) or grow (outputs not yet in
                it become a new feature group; outputs already in it are checked, not recomputed).
            clip_dtype: stored dtype of CLIP maps (guidance maps are float32); see feature_cache/codecs.py.
            clip_codec: codec of CLIP maps (none, lz4, zstd).
            background_writer: encode and write tars in a background thread, off the device loop.
            queue_tars: tars of outputs queued for the writer before the device loop waits.
            verify_checksums: check every stored file's crc32c (format 2: sha256) at start, not only its size, and
                recompute damaged tars; false skips the read-back of the whole store.
            drop_incomplete_group: first delete the store's incomplete group (a grow that failed, e.g. on a members
                file fitted at another resolution), then grow it afresh with this run's outputs.
        """
        from workflows.precompute import precompute

        precompute(self, model, datamodule, store, clip_dtype, clip_codec, background_writer, queue_tars,
                   verify_checksums, drop_incomplete_group)

    def laplace_fit(self, model: pl.LightningModule, datamodule: pl.LightningDataModule | None = None,
                    overwrite: bool = False) -> None:
        """Fit the diagonal last-layer Laplace posterior of the UNet's conv_out over calibration shards.

        Args:
            overwrite: replace an existing posterior file at `model.init_args.output` (stores computed with it
                then no longer match its hash); without it an existing file is refused before any work.
        """
        from lightning_modules.laplace_fit import LaplaceFit

        if not isinstance(model, LaplaceFit):
            raise SystemExit(f"python -m cli laplace-fit: --model must be LaplaceFit, got {type(model).__name__}")
        output = Path(model.hparams.output).expanduser()
        if output.exists() and not overwrite:
            raise SystemExit(f"python -m cli laplace-fit: {output} exists (a posterior stores may have been computed "
                             "with): pass --overwrite true to replace it, or --model.init_args.output NEW_PATH")
        self.predict(model, datamodule=datamodule, return_predictions=False)
        if self.is_global_zero:
            print(f"laplace-fit: posterior written to {model.hparams.output}")

    def generate(self, model: pl.LightningModule, prompts: str, num_images: int, out: str,
                 image_format: Literal["png", "jpeg"] = "png", jpeg_quality: int | None = None,
                 jpeg_quality_from: str | None = None, keep_quantile: float = 1.0,
                 rank_by: Literal["generative", "aleatoric"] = "generative", batch_size: int = 1) -> None:
        """Generate fakes with a local SD, scored by generative and pixel-wise aleatoric uncertainty (OUT/fake).

        Args:
            prompts: text file, one prompt per line.
            num_images: images per prompt.
            out: output folder (OUT/fake, OUT/generation.csv); rerunning the same command resumes.
            image_format: png, or jpeg at `jpeg_quality` or at a quality drawn per image from the real images
                of the shard directory `jpeg_quality_from` (its manifest's measured qualities).
            keep_quantile: keep the q least uncertain images (by `rank_by`) in OUT/fake; the rest are listed
                as filtered in generation.csv.
            batch_size: images per step; 1 makes every image bit-identical at any rank count.
        """
        from workflows.generate import generate

        generate(self, model, prompts, num_images, out, image_format, jpeg_quality, jpeg_quality_from, keep_quantile,
                 rank_by, batch_size)

    def ensemble_fit(self, model: pl.LightningModule, datamodule: pl.LightningDataModule | None = None) -> None:
        """Train DECU's ensemble members (conditioning embeddings or conv_out heads) over calibration shards."""
        from lightning_modules.ensemble_fit import EnsembleFit

        if not isinstance(model, EnsembleFit):
            raise SystemExit(f"python -m cli ensemble-fit: --model must be EnsembleFit, got {type(model).__name__}")
        # The members train (with gradients) at the end of the predict pass that encodes the images.
        inference_mode, self.predict_loop.inference_mode = self.predict_loop.inference_mode, False
        try:
            self.predict(model, datamodule=datamodule, return_predictions=False)
        finally:
            self.predict_loop.inference_mode = inference_mode
        if self.is_global_zero:
            print(f"ensemble-fit: {model.hparams.num_members} {model.hparams.kind} members written to "
                  f"{model.hparams.output}")
