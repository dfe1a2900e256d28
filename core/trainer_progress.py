"""The progress of Trainer runs: Lightning callbacks built on `core.progress` (kept apart: they import Lightning).

- `PlainLogProgress`: plain lines for fit/validate/test/predict batches when stdout is not a terminal; a streaming
  loader without a length gets its total from the datamodule's `predict_batches()`.
- `rich_progress_bar()`: the one bar policy (Lightning's Rich bar on a terminal, a quiet one when piped), used by
  `ForensicsTrainer`; `progress_callbacks()`, both callbacks, for the Trainers the workflows build themselves
  (predict, robustness).
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.utilities import rank_zero_only

from core.progress import EVERY_S, ProgressLine, plain_output, print_line


def rich_progress_bar(configured: RichProgressBar | None = None) -> RichProgressBar:
    """The batch bar of every Trainer the project runs: Lightning's Rich bar (the config's own, when it lists one);
    a quiet one when stdout is a file or pipe, where Rich would draw only its final frame, already stale (`tars
    0/1` after the tar was written, `0.00it/s`), and `PlainLogProgress`'s lines say it correctly."""
    if plain_output():
        return RichProgressBar(console_kwargs={"quiet": True})
    return configured or RichProgressBar()


def progress_callbacks() -> list[pl.Callback]:
    """What a Trainer built outside LightningCLI (which adds them to `python -m cli`'s runs) shows: plain lines when
    piped, `rich_progress_bar()` (else Lightning would add its tqdm bar)."""
    return [PlainLogProgress(), rich_progress_bar()]


class PlainLogProgress(pl.Callback):
    """Plain progress lines for fit/validate/test/predict batches when stdout is not a terminal.

    Args:
        every_s: seconds between lines (the first and last batch of a stage always print).
        always: print even on a terminal (beside the Rich bar).
    """

    def __init__(self, every_s: float = EVERY_S, always: bool = False) -> None:
        self.every_s = every_s
        self.always = always
        self._lines: dict[str, ProgressLine] = {}

    def _start(self, stage: str, total: float | int | list | None) -> None:
        if isinstance(total, list):
            total = sum(total)
        self._lines[stage] = ProgressLine(stage, total if total is not None and math.isfinite(total) else None,
                                          "batches", self.every_s)

    @rank_zero_only
    def _step(self, trainer: pl.Trainer, stage: str) -> None:
        if not (self.always or plain_output()) or stage not in self._lines:
            return
        note = f"epoch {trainer.current_epoch}" if stage == "train" else ""
        print_line(self._lines[stage].advance(1, note))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start("train", trainer.num_training_batches)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        self._step(trainer, "train")

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._start("validate", trainer.num_val_batches)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        if not trainer.sanity_checking:
            self._step(trainer, "validate")

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start("test", trainer.num_test_batches)

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        self._step(trainer, "test")

    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        total = sum(trainer.num_predict_batches)
        if not math.isfinite(total) and hasattr(trainer.datamodule, "predict_batches"):
            total = trainer.datamodule.predict_batches()  # a streaming loader has no length; its shard table knows
        self._start("predict", total)

    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        self._step(trainer, "predict")
