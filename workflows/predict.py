"""`python -m cli predict` (raw images → CSV) and `python -m cli robustness` (a perturbation sweep table).

Both run a trained detector with its phase-1 extractor rebuilt from the checkpoint's feature provenance
(lightning_modules/on_the_fly.py). `predict` computes features on the fly; `robustness` caches each
perturbation's features as a feature store (workflows/robustness.py), so a second checkpoint with the
same extractor reuses them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pandas as pd
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from core.devices import warn_if_oversubscribed
from core.trainer_progress import progress_callbacks
from datamodules.image_files import METADATA, ImageFilesDataModule
from datamodules.image_shards import preprocessor_from_provenance
from lightning_modules.on_the_fly import OnTheFlyDetector

PREDICT_COLUMNS = ("path", "key", "sha256", "generator", "label", "format", "jpeg_quality", "width", "height",
                   "p_fake", "threshold", "prediction", "error")


class RowCollector(BasePredictionWriter):
    """Keeps each image's outputs and metadata on the CPU as batches finish (nothing kept per epoch)."""

    def __init__(self) -> None:
        super().__init__(write_interval="batch")
        self.rows: list[dict[str, Any]] = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx) -> None:
        for i, key in enumerate(prediction["key"]):
            row = {"key": key, "p_fake": float(prediction["p_fake"][i]), "label": int(prediction["label"][i]),
                   "generator": int(prediction["generator"][i]), "error": prediction["error"][i]}
            row.update({name: prediction[name][i] for name in METADATA if name in prediction})
            self.rows.append(row)


def run_predict(model: pl.LightningModule, datamodule: pl.LightningDataModule, accelerator: str,
                devices: int = 1) -> list[dict] | None:
    """Every image's row, on rank 0 (None on the other ranks). With `devices` > 1 each DDP rank scores its share
    (predict's distributed sampler over the files is unpadded: each image on exactly one rank) and rank 0
    gathers the rows."""
    collector = RowCollector()
    trainer = pl.Trainer(accelerator=accelerator, devices=devices, strategy="ddp" if devices > 1 else "auto",
                         logger=False, callbacks=[collector, *progress_callbacks()],
                         enable_model_summary=False)
    warn_if_oversubscribed(trainer, "--devices")
    trainer.predict(model, datamodule=datamodule, return_predictions=False)
    if trainer.world_size == 1:
        return collector.rows
    gathered = [None] * trainer.world_size if trainer.is_global_zero else None
    torch.distributed.gather_object(collector.rows, gathered, dst=0)
    return [row for rows in gathered for row in rows] if trainer.is_global_zero else None


def check_output_file(out: str | Path, overwrite: bool) -> Path:
    """The CSV path, checked before any work: not a directory, not an existing file unless `overwrite`."""
    path = Path(out)
    if path.is_dir():
        raise ValueError(f"--out {out}: is a directory; give a CSV file path such as {path / 'predictions.csv'}")
    if path.exists() and not overwrite:
        raise ValueError(f"--out {out}: exists; pass --overwrite true to replace it")
    if path.parent.exists() and not path.parent.is_dir():
        raise ValueError(f"--out {out}: {path.parent} is not a directory")
    return path


def predictions_table(rows: list[dict], generator_names: list[str], threshold: float) -> pd.DataFrame:
    """One row per input file, sorted by path, in PREDICT_COLUMNS order; unknown values are empty."""
    table = pd.DataFrame(rows)
    failed = table["error"] != ""
    table["generator"] = [generator_names[code] for code in table["generator"]]
    table["label"] = table["label"].map({0: "real", 1: "fake"}).fillna("")
    table["p_fake"] = table["p_fake"].round(6).astype(object).where(~failed, "")
    table["threshold"] = round(threshold, 6)
    table["prediction"] = (table["p_fake"].where(~failed, 0) >= threshold).map({True: "fake", False: "real"})
    table.loc[failed, "prediction"] = ""
    for column in ("jpeg_quality", "width", "height"):
        table[column] = table[column].astype("Int64")
    return table.sort_values("path")[list(PREDICT_COLUMNS)]


def predict_folder(ckpt: str, data: str, out: str, batch_size: int, num_workers: int, accelerator: str,
                   overwrite: bool = False, devices: int = 1, **paths: str | None) -> Path | None:
    """Score every file under `data`; one CSV row per file (PREDICT_COLUMNS), written by rank 0."""
    out_path = check_output_file(out, overwrite)
    model, provenance = OnTheFlyDetector.from_checkpoint(ckpt, **paths)
    preprocess = preprocessor_from_provenance(provenance.store.pixels, provenance.store.dataset.stats)
    datamodule = ImageFilesDataModule(data, preprocess, batch_size, num_workers)
    rows = run_predict(model, datamodule, accelerator, devices)
    if rows is None:  # a DDP rank other than 0: its rows went to rank 0
        return None
    out_path.parent.mkdir(parents=True, exist_ok=True)
    table = predictions_table(rows, datamodule.generator_names, model.threshold)
    table.to_csv(out_path, index=False)
    failed = int((table["error"] != "").sum())
    print(f"predict: {len(table)} files ({failed} not scored: unreadable or skipped, reason in `error`) → {out_path}")
    return out_path
