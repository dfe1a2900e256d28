"""Callbacks that turn a detector's per-row predictions into what a reader looks at, the same for every detector.

A detector (`lightning_modules.detectors.DetectorBase`) only returns `{"loss", "p_fake"}` from each step and logs
its overall metrics; the CLI attaches these callbacks to every detector run (`detector_callbacks()`, added by
`cli.lightning_cli.ForensicsCLI.instantiate_trainer`, so `python -m cli fit/validate/test` and `grid --together`
alike). A Trainer built by hand gets the same reports by passing `callbacks=detector_callbacks()`.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_modules.detectors.base import STAGES, DetectorBase
from reports.evaluation import HP_METRICS, Predictions, choose_threshold, hparams_settings, protocol_table
from reports.predictions import PredictionLog, generator_names_of, write_predictions_csv

GENERATOR_METRICS = ("acc", "ap", "auroc", "real_acc", "fake_acc")


class PredictionTables(pl.Callback):
    """Every row's (p_fake, label, generator, row, store) per stage, gathered across ranks at each epoch end, and
    what is read off it:

    - per-generator metrics `<stage>_<metric>/<generator>` (`reports.evaluation.protocol_table`'s rows, the one
      definition of "per generator") and `hp/test_mean_generator_{acc,auroc}`;
    - the decision threshold, chosen on each validation epoch's predictions (`choose_threshold`, never on test)
      and stored in the detector's `val_threshold` buffer, so the checkpoint carries it to `test` and `predict`;
    - `val_predictions.csv` (last validation epoch) and `test_predictions.csv` in the run's log dir;
    - `test_predictions`: the test table, which `reports.protocol_report.ProtocolReport` reads.
    """

    def __init__(self) -> None:
        self.logs = {stage: PredictionLog() for stage in STAGES}
        self.test_predictions: dict[str, torch.Tensor] = {}

    def _update(self, stage: str, outputs: object, batch: dict) -> None:
        if not isinstance(outputs, dict) or "p_fake" not in outputs:
            return  # not a detector's step
        log = self.logs[stage]
        p_fake = outputs["p_fake"]
        if log.device != p_fake.device:
            log.to(p_fake.device)  # the module is on its device only once the run started
        log.update(p_fake, *(DetectorBase.batch_tensor(batch, name) for name in ("label", "generator", "row")),
                   batch.get("store"))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: object, batch: dict,
                           batch_idx: int) -> None:
        self._update("train", outputs, batch)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: object,
                                batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._update("val", outputs, batch)

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: object, batch: dict,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._update("test", outputs, batch)

    def _epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                   stage: str) -> tuple[dict[str, torch.Tensor], list[dict]]:
        """Gather the stage's table (every rank takes part), log its per-generator metrics, reset it."""
        log = self.logs[stage]
        table = log.columns()
        log.reset()
        rows: list[dict] = []
        if table["row"].numel():
            threshold = float(pl_module.val_threshold) if stage == "test" else 0.5
            rows = protocol_table(self._predictions(trainer, table), threshold)
            for row in rows[:-1]:  # the last row is the average, logged as hp/test_mean_generator_*
                pl_module.log_dict({f"{stage}_{metric}/{row['generator']}": row[metric]
                                    for metric in GENERATOR_METRICS if row[metric] == row[metric]})
        return table, rows

    @staticmethod
    def _generator_names(trainer: pl.Trainer) -> list[str] | None:
        """Names of generator codes from the datamodule, if it offers `generator_names` (duck-typed)."""
        names = getattr(trainer.datamodule, "generator_names", None)
        return list(names) if names is not None else None

    def _predictions(self, trainer: pl.Trainer, table: dict[str, torch.Tensor]) -> Predictions:
        names = generator_names_of(table["generator"].cpu(), self._generator_names(trainer))
        return Predictions(table["p_fake"].cpu().numpy(), table["label"].cpu().numpy(), names)

    def _write(self, trainer: pl.Trainer, table: dict[str, torch.Tensor], file_name: str, threshold: float) -> None:
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank must ask, rank 0 writes
        if trainer.is_global_zero and log_dir is not None:
            write_predictions_csv(table, self._generator_names(trainer), threshold, Path(log_dir) / file_name)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_end(trainer, pl_module, "train")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        table, rows = self._epoch_end(trainer, pl_module, "val")
        if trainer.sanity_checking or not rows:
            return
        pl_module.val_threshold.fill_(choose_threshold(self._predictions(trainer, table)))
        self._write(trainer, table, "val_predictions.csv", float(pl_module.val_threshold))
        pl_module.log("val_threshold", pl_module.val_threshold)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        table, rows = self._epoch_end(trainer, pl_module, "test")
        self.test_predictions = {name: values.cpu() for name, values in table.items()}
        if not rows:
            return
        average = rows[-1]
        pl_module.log_dict({"hp/test_mean_generator_acc": average["acc"],
                            "hp/test_mean_generator_auroc": average["auroc"]})
        self._write(trainer, table, "test_predictions.csv", float(pl_module.val_threshold))


class HparamsTab(pl.Callback):
    """TensorBoard's hparams tab: the run's settings (`hparams_settings`) with `HP_METRICS` registered, and the
    `hp/*` copies of the detector's overall validation and test metrics that fill it.

    Only `fit` registers (with NaN placeholders at step 0, overwritten by the real values later), once per run
    directory; a `test` of a fitted run adds its values to the fit's session instead of writing a second set of
    placeholders. The copies are taken from the detector's own metrics (`val_metrics`, `test_metrics`) before
    the detector logs and resets them (callbacks' epoch-end hooks run before the module's), so they are the
    same numbers.
    """

    def __init__(self) -> None:
        self.registered = False

    def _register(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.registered:
            return
        data = getattr(trainer.datamodule, "hparams", {})
        settings = hparams_settings(type(pl_module).__name__, dict(pl_module.hparams), dict(data),
                                    int(os.environ.get("PL_GLOBAL_SEED", -1)))
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.log_hyperparams(settings, {name: float("nan") for name in HP_METRICS})
        self.registered = True

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._register(trainer, pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        log_dir = trainer.log_dir
        if log_dir is None or not any(Path(log_dir).glob("events.out.tfevents.*")):
            self._register(trainer, pl_module)  # a checkpoint scored outside its fit's directory

    @staticmethod
    def _overall(pl_module: pl.LightningModule, stage: str) -> dict[str, torch.Tensor]:
        """The stage's overall metrics as the detector is about to log them (computed once: torchmetrics caches)."""
        collection = getattr(pl_module, f"{stage}_metrics", None)
        return collection.compute() if collection is not None and collection["acc"].update_called else {}

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        overall = self._overall(pl_module, "val")
        if overall and not trainer.sanity_checking:
            pl_module.log_dict({f"hp/val_{m}": overall[f"val_{m}"] for m in ("acc", "ap", "auroc")})

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        overall = self._overall(pl_module, "test")
        if overall:
            pl_module.log_dict({f"hp/test_{m}": overall[f"test_{m}"] for m in GENERATOR_METRICS})


def detector_callbacks() -> list[pl.Callback]:
    """Fresh instances of the callbacks every detector run gets (per-generator tables, threshold, CSVs, hparams)."""
    return [PredictionTables(), HparamsTab()]
