"""The Trainer with the project's own Trainer-run subcommands (LightningCLI maps methods to subcommands)."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import RichProgressBar

from core.progress import plain_output

ClipDtype = Literal["float16", "int8_rowscale", "float8_e4m3"]
Codec = Literal["none", "lz4", "zstd"]


class ForensicsTrainer(pl.Trainer):
    """Lightning's Trainer plus `precompute` (phase 1), `laplace_fit` (the DEU posterior), `generate`
    and `ensemble_fit` (DECU's members)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if plain_output():
            # Into a file Rich draws only its final frame, already stale (`tars 0/1` after the tar was written,
            # `0.00it/s`); the plain-log lines (PlainLogProgress, the writer's per-tar lines) say it correctly.
            self.callbacks[:] = [RichProgressBar(console_kwargs={"quiet": True}) if isinstance(c, RichProgressBar)
                                 else c for c in self.callbacks]
        cores = len(os.sched_getaffinity(0))
        if isinstance(self.accelerator, CPUAccelerator) and self.num_devices > cores and self.is_global_zero:
            print(f"warning: --trainer.devices {self.num_devices} on CPU starts {self.num_devices} processes on "
                  f"{cores} cores: each runs about {self.num_devices / cores:.1f}x slower and the run is no faster "
                  f"(--trainer.devices {cores} or fewer)", file=sys.stderr, flush=True)

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
        test_stores = getattr(datamodule, "stores", {}).get("test", [])
        if ckpt_path is not None and Path(ckpt_path).is_file() and test_stores:
            from workflows.provenance_checks import check_checkpoint_against_stores

            check_checkpoint_against_stores(ckpt_path, {path: datamodule.feature_provenance(path) for path in test_stores})
        return super().test(model, dataloaders, ckpt_path, verbose, datamodule, weights_only)

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
        from torch.utils.data import DataLoader

        from feature_cache.manifest import read_manifest_rows
        from lightning_modules.generation import UncertaintyGenerator
        from lightning_modules.generation_writer import GenerationItems, GenerationWriter, read_prompts

        if not isinstance(model, UncertaintyGenerator):
            raise SystemExit(f"python -m cli generate: --model must be UncertaintyGenerator, got {type(model).__name__}")
        qualities: tuple[int, ...] = ()
        if jpeg_quality is not None:
            qualities = (jpeg_quality,)
        elif jpeg_quality_from is not None:
            qualities = tuple(r["jpeg_quality"] for r in read_manifest_rows(jpeg_quality_from)
                              if r["label"] == 0 and r["jpeg_quality"])
            if not qualities:
                raise ValueError(f"--jpeg_quality_from {jpeg_quality_from}: no real JPEG image in its manifest")
        items = GenerationItems(read_prompts(prompts), num_images)
        writer = GenerationWriter(out, items, image_format, qualities, keep_quantile, rank_by)
        self.callbacks.append(writer)
        # Guided sampling differentiates the uncertainty w.r.t. x_t: no inference tensors then.
        inference_mode, self.predict_loop.inference_mode = self.predict_loop.inference_mode, not model.hparams.guided
        try:
            self.predict(model, dataloaders=DataLoader(items, batch_size=batch_size), return_predictions=False)
            table = writer.finish(self)
        finally:
            self.callbacks.remove(writer)
            self.predict_loop.inference_mode = inference_mode
        if table is not None:
            kept = int((table["status"] == "kept").sum())
            print(f"generate: {kept}/{len(table)} images kept in {out}/fake, scores in {out}/generation.csv")

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
