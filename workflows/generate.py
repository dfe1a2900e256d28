"""`python -m cli generate`'s work: prompts × images through the uncertainty-scored sampler into OUT.

`ForensicsTrainer.generate` (cli/trainer.py) parses the options and calls `generate`.
"""

from __future__ import annotations

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from core.outputs import output_dir
from feature_cache.manifest import read_manifest_rows
from lightning_modules.generation import UncertaintyGenerator
from lightning_modules.generation_writer import GenerationItems, GenerationWriter, read_prompts


def generate(trainer: pl.Trainer, model: pl.LightningModule, prompts: str, num_images: int, out: str,
             image_format: str, jpeg_quality: int | None, jpeg_quality_from: str | None, keep_quantile: float,
             rank_by: str, batch_size: int) -> None:
    """Generate, score and keep/filter images into OUT (see `ForensicsTrainer.generate` for the options)."""
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
    output_dir(out, "--out")  # before the model runs: a folder under a file or a read-only disk is one line
    writer = GenerationWriter(out, items, image_format, qualities, keep_quantile, rank_by)
    trainer.callbacks.append(writer)
    # Guided sampling differentiates the uncertainty w.r.t. x_t: no inference tensors then.
    inference_mode, trainer.predict_loop.inference_mode = trainer.predict_loop.inference_mode, not model.hparams.guided
    try:
        trainer.predict(model, dataloaders=DataLoader(items, batch_size=batch_size), return_predictions=False)
        table = writer.finish(trainer)
    finally:
        trainer.callbacks.remove(writer)
        trainer.predict_loop.inference_mode = inference_mode
    if table is not None:
        kept = int((table["status"] == "kept").sum())
        print(f"generate: {kept}/{len(table)} images kept in {out}/fake, scores in {out}/generation.csv")
