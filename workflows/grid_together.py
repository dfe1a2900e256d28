"""`python -m cli grid ROWS --together`: fit several grid rows in one process on the same batches.

Each row is instantiated from its own command line exactly as `python -m cli fit ARGS` would (LightningCLI:
its own seed, detector, optimiser, Trainer, TensorBoard run, checkpoints and saved config) and runs
`trainer.fit` in its own thread. The rows' data configs must be equal: one FeatureCacheDataModule is set
up once (one read of the stores, resident in RAM or on the device), and `SharedBatches` hands every batch
to every row. Rows advance in lockstep (a batch is produced when every row still training has asked
for it), so one read serves all rows and reused batch buffers are never overwritten under a row.
The order of epoch e is the one a row trained alone sees in its epoch e (`epoch_order` depends only on
the data seed and the epoch), so each row's numbers equal its alone run's within float tolerance
(tests/test_grid_together.py). Rows must share their loop settings (epochs, limits, validation
schedule) and run on one device; validation's sanity check is skipped (it changes no number).

The rows are built by the caller's `build` (cli's one `build_cli`, passed in by `python -m cli.together`, the
process `grid --together` starts): this module never imports `cli`. A terminal has one live display, so the
rows' own progress bars become tasks of one display owned here (`RowsDisplay`); piped, the rows' plain-log
lines report progress, as in `python -m cli fit`.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar

from core.progress import plain_output
from datamodules.cached_features import FeatureCacheDataModule
from feature_cache.provenance import FeatureProvenance

LOOP_SETTINGS = ("max_epochs", "max_steps", "limit_train_batches", "limit_val_batches", "check_val_every_n_epoch",
                 "val_check_interval", "num_devices")


class SharedBatches:
    """One split's batches, read once per epoch and handed to `consumers` rows in lockstep."""

    def __init__(self, make: Callable[[int], Any], consumers: int) -> None:
        self.make, self.consumers = make, consumers
        self.cond = threading.Condition()
        self.retired: set[int] = set()
        self.epochs: dict[int, dict[str, Any]] = {}  # epoch -> {iterator, batches, freed, asked, left, end}
        self.length = len(make(0))

    def view(self, consumer: int) -> RowBatches:
        return RowBatches(self, consumer)

    def retire(self, consumer: int) -> None:
        """The row stopped training (finished, stopped early or failed): nobody waits for it any more."""
        with self.cond:
            self.retired.add(consumer)
            self.cond.notify_all()

    def _state(self, epoch: int) -> dict[str, Any]:
        if epoch not in self.epochs:
            self.epochs[epoch] = {"iterator": iter(self.make(epoch)), "batches": {}, "freed": 0, "asked": {},
                                  "left": set(), "end": None}
        return self.epochs[epoch]

    def _everyone_asked(self, state: dict[str, Any], index: int) -> bool:
        waiting = set(range(self.consumers)) - self.retired - state["left"]
        return all(state["asked"].get(c, -1) >= index for c in waiting)

    def get(self, consumer: int, epoch: int, index: int) -> Any:
        """Batch `index` of `epoch` (StopIteration at the end), produced once every active row asked for it."""
        with self.cond:
            state = self._state(epoch)
            state["asked"][consumer] = index
            self.cond.notify_all()
            while index not in state["batches"]:
                if state["end"] is not None and index >= state["end"]:
                    raise StopIteration
                if index == len(state["batches"]) + state["freed"] and self._everyone_asked(state, index):
                    batch = next(state["iterator"], None)
                    if batch is None:
                        state["end"] = index
                    else:
                        state["batches"][index] = batch
                    self.cond.notify_all()
                else:
                    self.cond.wait()
            batch = state["batches"][index]
            for old in [k for k in state["batches"] if self._everyone_asked(state, k + 2)]:
                del state["batches"][old]  # every row has stepped past it (Lightning prefetches one batch)
                state["freed"] += 1
            return batch

    def leave(self, consumer: int, epoch: int) -> None:
        """The row ended its epoch (exhausted or broke off): later batches of it need not wait for this row."""
        with self.cond:
            state = self._state(epoch)
            state["left"].add(consumer)
            if state["left"] | self.retired >= set(range(self.consumers)):
                del self.epochs[epoch]
            self.cond.notify_all()


class RowBatches:
    """One row's view of SharedBatches: a sized iterable whose k-th iteration is epoch k."""

    def __init__(self, shared: SharedBatches, consumer: int) -> None:
        self.shared, self.consumer, self.epoch = shared, consumer, -1

    def __len__(self) -> int:
        return self.shared.length

    def __iter__(self) -> Iterator[Any]:
        return self._batches()

    def _batches(self) -> Iterator[Any]:
        # counted at the first batch, not at iter(): Lightning calls iter() once to check a loader is iterable
        self.epoch += 1
        epoch, index = self.epoch, 0
        try:
            while True:
                try:
                    batch = self.shared.get(self.consumer, epoch, index)
                except StopIteration:
                    return
                yield batch
                index += 1
        finally:
            self.shared.leave(self.consumer, epoch)


class RowDataModule(pl.LightningDataModule):
    """What one row's Trainer and detector see: the shared module's names, provenance and hparams, its own views."""

    def __init__(self, shared: FeatureCacheDataModule, train: RowBatches, val: RowBatches | None) -> None:
        super().__init__()
        self.shared, self.train, self.val = shared, train, val
        self.generator_names = shared.generator_names
        self.save_hyperparameters(shared.hparams_initial)  # the run's logged hparams include the data's, as alone

    def feature_provenance(self) -> FeatureProvenance | None:
        return self.shared.feature_provenance()

    def train_dataloader(self) -> RowBatches:
        return self.train

    def val_dataloader(self) -> RowBatches | list:
        return self.val if self.val is not None else []


class RowsDisplay:
    """One Rich progress display for every row on a terminal (Rich allows one live display per console: rows in
    threads that each start and stop Lightning's RichProgressBar crash with `IndexError: pop from empty list`).
    Disabled when stdout is piped, where the rows' PlainLogProgress lines report."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[metrics]}"), disable=plain_output())

    def bar(self, name: str) -> RowProgressBar:
        return RowProgressBar(self, name)

    def __enter__(self) -> RowsDisplay:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()


class RowProgressBar(ProgressBar):
    """A row's progress bar: its task in the shared `RowsDisplay` (stage, epoch, batches, the bar's metrics)."""

    def __init__(self, display: RowsDisplay, name: str) -> None:
        super().__init__()
        self.display, self.name, self.enabled = display, name, True
        self.task = display.progress.add_task(name, total=None, metrics="")

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def _show(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, done: int, total: float) -> None:
        if self.enabled:
            metrics = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in self.get_metrics(trainer, pl_module).items())
            self.display.progress.update(self.task, description=f"{self.name}: epoch {trainer.current_epoch} {stage}",
                                         completed=done, total=total if total != float("inf") else None,
                                         metrics=metrics)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._show(trainer, pl_module, "train", batch_idx + 1, self.total_train_batches)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if not trainer.sanity_checking:
            self._show(trainer, pl_module, "validate", batch_idx + 1, self.total_val_batches)


def _check_alike(rows: list[Any], names: list[str]) -> None:
    """Rows trained together read the same data with the same loop; each on one device."""
    datas = [json.dumps(row.config["data"], sort_keys=True, default=str) for row in rows]
    loops = [{name: getattr(row.trainer, name) for name in LOOP_SETTINGS} for row in rows]
    for name, data, loop, row in zip(names, datas, loops, rows):
        if not isinstance(row.datamodule, FeatureCacheDataModule):
            raise ValueError(f"row {name}: --together needs a FeatureCacheDataModule, got {type(row.datamodule).__name__}")
        if data != datas[0]:
            raise ValueError(f"rows {names[0]} and {name} read different data; --together trains rows of one data config")
        if loop != loops[0]:
            raise ValueError(f"rows {names[0]} and {name} differ in their training loop ({loops[0]} != {loop})")
    if loops[0]["num_devices"] != 1:
        raise ValueError("--together runs every row on one device (got trainer.devices > 1)")


def fit_together(row_args: list[list[str]], names: list[str], build: Callable[[list[str]], Any]) -> list[str]:
    """Fit the rows given by their `fit` argument lists in one process; returns the names of rows that failed.

    `build(args)` gives a row's LightningCLI (`.model`, `.datamodule`, `.trainer`, `.config`) as `python -m cli fit
    ARGS` builds it, seeded and not run.
    """
    rows = [build(args) for args in row_args]
    _check_alike(rows, names)
    shared = rows[0].datamodule
    shared.trainer = rows[0].trainer  # the device to load onto; epochs are driven below, not by this Trainer
    shared.setup("fit")
    for row in rows:  # what `fit` does in on_fit_start, from the shared rows (the lockstep views serve training only)
        if getattr(row.model, "guidance", None):
            row.model.fit_guidance_norm(shared.batches("train", epoch=lambda: 0))
    train = SharedBatches(lambda epoch: shared.batches("train", epoch=lambda: epoch), len(rows))
    val = SharedBatches(lambda epoch: shared.batches("val"), len(rows)) if shared.sources.get("val") else None
    failed: dict[str, BaseException] = {}

    def fit(k: int) -> None:
        row = rows[k]
        row.trainer.num_sanity_val_steps = 0
        try:
            row.trainer.fit(row.model, datamodule=RowDataModule(shared, train.view(k), val.view(k) if val else None))
        except BaseException as error:  # noqa: BLE001  one failed row must not stop the others; reported below
            failed[names[k]] = error
        finally:
            train.retire(k)
            if val is not None:
                val.retire(k)

    display = RowsDisplay()
    for row, name in zip(rows, names):  # a row's own bar (Lightning's default: Rich) becomes its task in the display
        row.trainer.callbacks = [display.bar(name) if isinstance(c, ProgressBar) else c for c in row.trainer.callbacks]
    threads = [threading.Thread(target=fit, args=(k,), name=f"grid-row-{names[k]}") for k in range(len(rows))]
    with display:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    for name, error in failed.items():
        print(f"grid row {name} failed: {type(error).__name__}: {error}", file=sys.stderr)
    return list(failed)
