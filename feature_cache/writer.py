"""Lightning prediction writer: phase-1 outputs → a `FeatureStore`, one tar at a time, resumable."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, RichProgressBar

from feature_cache.manifest import read_manifest, read_rejected
from feature_cache.store import FeatureStore


@dataclass
class _TarBuffer:
    """Rows of one tar collected so far, already cast to the storage dtype."""

    arrays: dict[str, np.ndarray]
    errors: list[str]
    filled: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.filled = np.zeros(len(self.errors), dtype=bool)


def merged_provenance(model: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """Model and datamodule provenance in one dict; a key both set differently is a config bug."""
    clash = {k for k in model.keys() & data.keys() if model[k] != data[k]}
    if clash:
        raise ValueError("ZarrFeatureWriter: model and datamodule provenance disagree on "
                         + ", ".join(f"{k} ({model[k]!r} vs {data[k]!r})" for k in sorted(clash)))
    return {**model, **data}


class ZarrFeatureWriter(BasePredictionWriter):
    """Writes each tar's rows in one go once all of them arrived, then marks the tar done.

    Each tar is computed by one (rank, worker), so the process that completes a tar is the only
    writer of its Zarr shard files; no collectives run in the batch hooks. In `setup`, rank 0
    creates the store (or reopens it with the same provenance: resume), all ranks wait at a
    barrier, then every rank drops the done tars from the datamodule's to-do list.

    Datamodule needs: `provenance()` with `resolution` and `shards` (the shard dir holding
    `manifest.csv`), `shard_table()`, `generator_names`, `exclude_shards(names)`. Model needs:
    `provenance()`, `feature_shapes(resolution)`, and a `predict_step` returning `row`,
    `shard_index`, `error` and one (B, ...) tensor per feature name.
    """

    def __init__(self, store: str, feature_dtype: Literal["float16", "float32"] = "float16") -> None:
        """Args:
            store: directory of the Zarr feature store to create or resume.
            feature_dtype: storage dtype of the feature arrays (float16 halves disk and RAM in phase 2).
        """
        super().__init__(write_interval="batch")
        self.path = Path(store)
        self.feature_dtype = feature_dtype
        self.store: FeatureStore | None = None
        self._pending: dict[int, _TarBuffer] = {}
        self._done_before = self._written = 0  # tars done before this run / written by this process

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        datamodule = trainer.datamodule
        if datamodule is None:
            raise ValueError("ZarrFeatureWriter: the run has no datamodule; pass one with provenance(), "
                             "shard_table(), generator_names and exclude_shards()")
        data_provenance = datamodule.provenance()
        provenance = merged_provenance(pl_module.provenance(), data_provenance)
        if trainer.is_global_zero:
            self._create_or_open(provenance, datamodule, pl_module.feature_shapes(data_provenance["resolution"]))
        trainer.strategy.barrier("zarr_feature_writer_setup")
        self.store = FeatureStore.open(self.path, expected_provenance=provenance, writable=True)
        done = self.store.done_shards()
        datamodule.exclude_shards(done)
        self._pending = {}
        self._done_before, self._written = len(done), 0

    def _create_or_open(self, provenance: dict[str, Any], datamodule: pl.LightningDataModule,
                        feature_shapes: dict[str, tuple[int, ...]]) -> None:
        """Rank 0 only: preallocate the store from the shard table and the manifest (or reopen it)."""
        shard_dir = Path(provenance["shards"])
        manifest = read_manifest(shard_dir)
        names = list(datamodule.generator_names)
        code = {name: index for index, name in enumerate(names)}
        unknown = sorted(set(manifest.generators) - code.keys())
        if unknown:
            raise ValueError(f"manifest {shard_dir / 'manifest.csv'}: generators {unknown} are not in the "
                             f"datamodule's generator_names {names}")
        FeatureStore.create(self.path, shards=datamodule.shard_table(), keys=manifest.keys, labels=manifest.labels,
                            generators=[code[g] for g in manifest.generators], generator_names=names,
                            feature_shapes=feature_shapes, feature_dtype=self.feature_dtype,
                            provenance=provenance, rejected=read_rejected(shard_dir),
                            row_metadata=datamodule.row_metadata() if hasattr(datamodule, "row_metadata") else None)

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        store = self.store
        assert store is not None, "setup() opens the store before any batch"
        missing = [k for k in ("row", "shard_index", "error", *store.feature_names) if k not in prediction]
        if missing:
            raise KeyError(f"ZarrFeatureWriter: predict_step output lacks {missing} "
                           f"(store {self.path} expects features {store.feature_names})")
        rows = prediction["row"].cpu().numpy()
        shard_indices = prediction["shard_index"].cpu().numpy()
        errors = list(prediction["error"])
        storage = getattr(torch, self.feature_dtype)
        features = {name: prediction[name].detach().to("cpu", storage).numpy() for name in store.feature_names}
        for position, (row, shard_index) in enumerate(zip(rows.tolist(), shard_indices.tolist())):
            buffer = self._buffer(shard_index)
            start, stop = store.shard_rows(shard_index)
            if not start <= row < stop:
                raise ValueError(f"ZarrFeatureWriter: row {row} is not in shard {shard_index} (rows {start}..{stop - 1})")
            local = row - start
            if buffer.filled[local]:
                raise ValueError(f"ZarrFeatureWriter: row {row} (shard {shard_index}) arrived twice; "
                                 "the datamodule must deliver each row exactly once")
            buffer.filled[local] = True
            buffer.errors[local] = errors[position]
            if not errors[position]:  # error rows keep the fill value 0 instead of whatever was computed
                for name, values in features.items():
                    buffer.arrays[name][local] = values[position]
            if buffer.filled.all():
                store.write_shard(shard_index, buffer.arrays, buffer.errors)
                del self._pending[shard_index]
                self._written += 1
                self._show_progress(trainer)

    def _show_progress(self, trainer: pl.Trainer) -> None:
        """Tars done so far (before this run + written by this process) in the Rich bar's description."""
        bar = trainer.progress_bar_callback
        if isinstance(bar, RichProgressBar) and bar.progress is not None and bar.predict_progress_bar_id is not None:
            total = len(self.store.shard_table)
            bar.progress.update(bar.predict_progress_bar_id,
                                description=f"Predicting · tars {self._done_before + self._written}/{total}"
                                + (f" (rank {trainer.global_rank}'s share)" if trainer.world_size > 1 else ""))

    def _buffer(self, shard_index: int) -> _TarBuffer:
        if shard_index not in self._pending:
            store = self.store
            assert store is not None
            start, stop = store.shard_rows(shard_index)
            arrays = {name: np.zeros((stop - start, *shape), dtype=self.feature_dtype)
                      for name, shape in store.feature_shapes.items()}
            self._pending[shard_index] = _TarBuffer(arrays=arrays, errors=[""] * (stop - start))
        return self._pending[shard_index]

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """An incomplete tar here means rows were lost or split across processes upstream: fail loudly."""
        if self._pending:
            assert self.store is not None
            incomplete = ", ".join(f"{self.store.shard_table[i]['name']} ({int(b.filled.sum())}/{len(b.errors)} rows)"
                                   for i, b in sorted(self._pending.items()))
            raise RuntimeError(f"ZarrFeatureWriter (rank {trainer.global_rank}): predict ended with incomplete "
                               f"tars {incomplete}; each tar's rows must all reach one process (datamodule bug)")
        super().on_predict_epoch_end(trainer, pl_module)
