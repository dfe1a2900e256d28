"""Predict over image shards with a 2-rank CPU DDP Trainer; each rank appends the keys it saw to its own file.

DDP re-executes this script per rank, so it runs as its own process, never inside pytest.
Usage: python image_shards_predict.py SHARD_DIR LOG_DIR [--exclude NAME,NAME ...] [--devices 2] [--num-workers 2]
One predict run per --exclude value (the empty string excludes nothing); run i logs to LOG_DIR/run{i}/rank{r}.txt.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter

from datamodules.image_shards import ImageShardDataModule


class KeyModel(pl.LightningModule):
    """Returns the batch's keys and errors: the run checks the data, not a model."""

    def predict_step(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        return {"key": batch["key"], "error": batch["error"]}


class KeyWriter(BasePredictionWriter):
    """Appends `key<TAB>error` lines per batch to LOG_DIR/rank{r}.txt (batch interval: nothing kept in RAM)."""

    def __init__(self) -> None:
        super().__init__(write_interval="batch")
        self.log_dir: Path | None = None

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        with (self.log_dir / f"rank{trainer.global_rank}.txt").open("a") as handle:
            handle.writelines(f"{key}\t{error}\n" for key, error in zip(prediction["key"], prediction["error"]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("shard_dir")
    parser.add_argument("log_dir", type=Path)
    parser.add_argument("--exclude", action="append", default=None)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--num-workers", type=int, default=2)
    args = parser.parse_args()
    writer = KeyWriter()
    trainer = pl.Trainer(accelerator="cpu", strategy="ddp", devices=args.devices, callbacks=[writer], logger=False,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
    for run, excluded in enumerate(args.exclude or [""]):
        writer.log_dir = args.log_dir / f"run{run}"
        writer.log_dir.mkdir(parents=True, exist_ok=True)
        datamodule = ImageShardDataModule(args.shard_dir, resolution=16, batch_size=3, num_workers=args.num_workers)
        datamodule.exclude_shards([name for name in excluded.split(",") if name])
        trainer.predict(KeyModel(), datamodule=datamodule, return_predictions=False)


if __name__ == "__main__":
    main()
