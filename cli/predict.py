"""`python -m cli predict` (raw images → CSV) and `python -m cli robustness` (a perturbation sweep table).

Both run a trained detector with its phase-1 extractor on the fly (lightning_modules/on_the_fly.py)
through Trainer.predict, with a BasePredictionWriter collecting rows as batches finish.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter

from datamodules.image_files import ImageFilesDataModule
from datamodules.image_shards import ImageShardDataModule, pixel_settings, preprocessor_from_provenance
from datamodules.perturbations import ROBUSTNESS_SWEEP
from reports.evaluation import Predictions, protocol_table, save_rows
from lightning_modules.on_the_fly import OnTheFlyDetector


class RowCollector(BasePredictionWriter):
    """Keeps each image's (key, p_fake, label, generator, error) on the CPU as batches finish."""

    def __init__(self) -> None:
        super().__init__(write_interval="batch")
        self.rows: list[dict[str, Any]] = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx) -> None:
        for i, key in enumerate(prediction["key"]):
            self.rows.append({"key": key, "p_fake": float(prediction["p_fake"][i]),
                              "label": int(prediction["label"][i]), "generator": int(prediction["generator"][i]),
                              "error": prediction["error"][i]})


def _predict(model: OnTheFlyDetector, datamodule: pl.LightningDataModule, accelerator: str) -> list[dict[str, Any]]:
    collector = RowCollector()
    trainer = pl.Trainer(accelerator=accelerator, devices=1, logger=False, callbacks=[collector])
    trainer.predict(model, datamodule=datamodule, return_predictions=False)
    return collector.rows


def predict_folder(ckpt: str, data: str, out: str, batch_size: int, num_workers: int, accelerator: str) -> Path:
    """One CSV row per file: path, p_fake, prediction (real/fake at the validation threshold), error."""
    model, provenance = OnTheFlyDetector.from_checkpoint(ckpt)
    datamodule = ImageFilesDataModule(data, preprocessor_from_provenance(provenance), batch_size, num_workers)
    rows = _predict(model, datamodule, accelerator)
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "p_fake", "prediction", "error"])
        for row in sorted(rows, key=lambda r: r["key"]):
            failed = bool(row["error"])
            writer.writerow([row["key"], "" if failed else f"{row['p_fake']:.6f}",
                             "" if failed else ("fake" if row["p_fake"] >= model.threshold else "real"), row["error"]])
    print(f"predict: {len(rows)} files ({sum(bool(r['error']) for r in rows)} unreadable) → {out_path}")
    return out_path


def robustness_sweep(ckpt: str, shards: str, out: str, batch_size: int, num_workers: int,
                     accelerator: str) -> list[dict[str, Any]]:
    """Accuracy and AP of a trained detector under each perturbation of ROBUSTNESS_SWEEP, as one table."""
    model, provenance = OnTheFlyDetector.from_checkpoint(ckpt)
    results = []
    for name, parameter in ROBUSTNESS_SWEEP:
        settings = {**pixel_settings(provenance), "perturbation": (name, parameter)}
        datamodule = ImageShardDataModule(shards, batch_size=batch_size, num_workers=num_workers, **settings)
        rows = [r for r in _predict(model, datamodule, accelerator) if not r["error"] and r["label"] >= 0]
        preds = Predictions(np.array([r["p_fake"] for r in rows]), np.array([r["label"] for r in rows]),
                            np.array(["all"] * len(rows)))
        metrics = protocol_table(preds, model.threshold)[-1]
        results.append({"perturbation": name if name == "none" else f"{name} {parameter:g}", "images": len(rows),
                        **{k: metrics[k] for k in ("acc", "real_acc", "fake_acc", "ap", "auroc")}})
    print(save_rows(results, out, "robustness", lambda v: str(v) if isinstance(v, (str, int)) else f"{100 * v:.1f}"))
    return results
