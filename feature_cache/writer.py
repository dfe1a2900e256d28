"""Lightning prediction writer: phase-1 outputs → one feature group of a `FeatureStore`, a tar at a time.

The device loop only copies each batch's outputs to the host and hands them to a background thread
through a bounded queue; the thread checks them (NaN/inf, underflow), encodes them to their stored
dtypes, buffers each tar, and writes a complete tar's files and then its done marker. So a kill at any
moment leaves done markers only for tars whose files are on disk, and a rerun resumes bit-identically.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, RichProgressBar

from core.progress import ProgressLine, plain_output, print_line
from feature_cache.codecs import CLIP_CODEC, GUIDANCE_CODEC, GUIDANCE_DTYPE, ClipDtype, Codec, encode
from feature_cache.integrity import remove_leftovers
from feature_cache.manifest import read_rejected, store_rows
from feature_cache.provenance import (DatasetProvenance, ExtractorProvenance, FeatureSpec, PixelProvenance,
                                      StoreProvenance, config_differences)
from feature_cache.store import FLAG_COLUMNS, FeatureStore, ProvenanceMismatchError, store_lock


def extractor_provenance(model: pl.LightningModule, trainer: pl.Trainer,
                         datamodule: pl.LightningDataModule) -> ExtractorProvenance:
    """The model's provenance plus what changes values but only the Trainer and data know: precision,
    batch size (batched kernels reduce in another order) and, on CPU, the thread count (oneDNN splits
    reductions by threads); on an accelerator the CPU thread count changes no value and is None."""
    provenance = ExtractorProvenance.from_attrs(model.provenance())
    batch_size = getattr(datamodule, "batch_size", None) or datamodule.hparams.get("batch_size")
    on_cpu = trainer.strategy.root_device.type == "cpu"
    return ExtractorProvenance({**provenance.common, "trainer_precision": str(trainer.precision),
                                "batch_size": batch_size, "cpu_threads": torch.get_num_threads() if on_cpu else None},
                               provenance.maps, provenance.modules)


@dataclass
class _TarBuffer:
    """Rows of one tar collected so far, in their stored dtypes."""

    arrays: dict[str, np.ndarray]
    errors: list[str]
    flags: np.ndarray = field(init=False)
    filled: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.flags = np.zeros((len(self.errors), len(FLAG_COLUMNS)), dtype=np.int32)
        self.filled = np.zeros(len(self.errors), dtype=bool)


@dataclass(frozen=True)
class _Batch:
    """One batch's outputs on the host, as the device loop hands them to the writer thread."""

    rows: np.ndarray
    shard_indices: np.ndarray
    errors: list[str]
    features: dict[str, np.ndarray]  # float32


@dataclass(frozen=True)
class RunSummary:
    """What rank 0 reads from the done markers after every rank finished (after a barrier)."""

    group: str | None
    done: int
    total: int
    unfinished: list[str]
    not_added: list[str]  # requested outputs still not in the store (an incomplete group was resumed first)
    text: str


class ZarrFeatureWriter(BasePredictionWriter):
    """Creates or grows the store on rank 0 under its lock, then writes one feature group tar by tar.

    Each tar is computed by one (rank, worker), so the process that completes a tar is the only writer of
    its files; no collectives run in the batch hooks. `setup`: rank 0 takes the lock, creates the store
    (or checks it is bound to the same shards and pixels, repairs damage, checks the settings of the
    requested outputs already present), adds a group for the missing outputs, releases the lock at the
    end of the run; a barrier; every rank then skips the group's done tars. `on_predict_end`: the thread
    is joined, a barrier, and rank 0 reads the done markers (`summary`).

    Datamodule needs: `provenance()` (resolution, shards, layout, split + pixel settings), `shard_table()`,
    `generator_names`, `exclude_shards(names)`, a batch size, optionally `row_metadata()`. Model needs:
    `provenance()` ({common, maps}), `set_outputs(names)`, `feature_specs(resolution, storage)` (each output's
    `FeatureSpec`, its kind from the map registry, stored as `storage[kind]` gives), and a `predict_step`
    returning `row`, `shard_index`, `error` and one (B, ...) tensor per output.
    """

    def __init__(self, store: str, clip_dtype: ClipDtype = "float16", clip_codec: Codec = CLIP_CODEC,
                 guidance_codec: Codec = GUIDANCE_CODEC, background: bool = True, queue_tars: int = 2,
                 verify_checksums: bool = True, drop_incomplete_group: bool = False) -> None:
        """Args:
            store: directory of the Zarr feature store to create, resume or grow.
            clip_dtype: stored dtype of CLIP maps (guidance maps are always float32).
            clip_codec: codec of CLIP maps (lz4 decodes ~10x faster than zstd at a slightly lower ratio).
            guidance_codec: codec of the guidance maps (default `none`: chosen by measurement, see
                feature_cache/codecs.py; a store records each array's codec, so stores written with zstd still read).
                Codecs are lossless and not compared: a resumed store's existing arrays keep the codec they have.
            background: write in a background thread (False: inline, in the device loop).
            queue_tars: tars of outputs the queue holds before the device loop waits (bounds host memory).
            verify_checksums: at start, check every recorded file's crc32c (format 2: sha256), not only its size, and
                recompute damage.
            drop_incomplete_group: before anything else, delete the store's incomplete group (what a failed grow
                left; `FeatureStore.drop_group`), so this run grows the store afresh instead of resuming it.
        """
        super().__init__(write_interval="batch")
        if queue_tars < 1:
            raise ValueError(f"ZarrFeatureWriter: queue_tars must be at least 1, got {queue_tars}")
        self.path = Path(store)
        self.clip_dtype, self.clip_codec, self.guidance_codec = clip_dtype, clip_codec, guidance_codec
        self.background, self.queue_tars, self.verify_checksums = background, queue_tars, verify_checksums
        self.drop_incomplete_group = drop_incomplete_group
        self.config_text: str | None = None  # the run's resolved config, saved into the store by rank 0
        self.store: FeatureStore | None = None
        self.group: str | None = None
        self.summary: RunSummary | None = None
        self.wait_seconds = 0.0  # time the device loop spent handing batches over (inline: writing them)
        self._lock: Any = None
        self._requested_outputs: list[str] = []
        self._reset()

    def _reset(self) -> None:
        self._pending: dict[int, _TarBuffer] = {}
        self._written = 0
        self._tar_line: ProgressLine | None = None
        self._tars_to_write = 0
        self._error: BaseException | None = None
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None

    @property
    def storage(self) -> dict[str, tuple[str, str]]:
        """(stored dtype, codec) per feature kind: reduced precision pays off for CLIP features, not guidance maps."""
        return {"guidance": (GUIDANCE_DTYPE, self.guidance_codec), "clip": (self.clip_dtype, self.clip_codec)}

    # ---- setup: create / check / grow ------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        datamodule = trainer.datamodule
        if datamodule is None:
            raise ValueError("ZarrFeatureWriter: the run has no datamodule; pass one with provenance(), "
                             "shard_table(), generator_names and exclude_shards()")
        data = datamodule.provenance()
        requested = extractor_provenance(pl_module, trainer, datamodule)
        self._requested_outputs = list(requested.maps)
        self._reset()
        self.summary = None
        if trainer.is_global_zero:
            self._lock = store_lock(self.path)
            self._lock.__enter__()  # held until predict ends: no second run computes the same tars
            try:
                self._prepare(datamodule, data, requested, pl_module.feature_specs(data["resolution"], self.storage))
            except BaseException:
                self._release_lock()
                raise
        trainer.strategy.barrier("zarr_feature_writer_setup")
        self.store = FeatureStore.open(self.path, writable=True)
        self.group = self._group_to_compute(self.store, list(requested.maps))
        tars = [t["name"] for t in self.store.shard_table]
        done = set(tars) if self.group is None else self.store.done_tars(self.group)
        if self.group is not None:
            pl_module.set_outputs(list(self.store.groups[self.group].features))  # compute this group only
        datamodule.exclude_shards(done)
        self._done_before = len(done)
        if trainer.is_global_zero and done:
            print(f"resume: skipped {len(done)} of {len(tars)} tars already in the store {self.path}", flush=True)
        self._tar_line = self._tar_progress(trainer, datamodule, done) if plain_output() else None
        if self.background:
            bound = self.queue_tars * -(-self.store.shard_size // max(1, int(requested.common["batch_size"] or 1)))
            self._queue = queue.Queue(maxsize=bound)
            self._thread = threading.Thread(target=self._drain, name="feature-store-writer", daemon=True)
            self._thread.start()

    def _tar_progress(self, trainer: pl.Trainer, datamodule: pl.LightningDataModule, done: set[str]) -> ProgressLine:
        """A plain log line per tar this process writes: rows done/total, rate, ETA (the Rich bar's description
        shows the tars on a terminal). Its share is the datamodule's `rank_shards`, else every tar still to do."""
        assert self.store is not None
        share = (datamodule.rank_shards(trainer.global_rank, trainer.world_size) if hasattr(datamodule, "rank_shards")
                 else [t for t in self.store.shard_table if t["name"] not in done])
        self._tars_to_write = len(share)
        rank = f" (rank {trainer.global_rank})" if trainer.world_size > 1 else ""
        return ProgressLine(f"writing {self.path.name}{rank}", sum(int(t["num_samples"]) for t in share), "rows")

    def _prepare(self, datamodule: pl.LightningDataModule, data: dict[str, Any], requested: ExtractorProvenance,
                 specs: dict[str, FeatureSpec]) -> None:
        """Rank 0, under the lock: create the store or check it, repair damage, add the group to compute."""
        shard_dir = Path(data["shards"])
        dataset = DatasetProvenance.from_shard_dir(shard_dir, data.get("layout", ""), data.get("split", ""),
                                                   datamodule.shard_table())
        pixels = PixelProvenance.from_datamodule(data)
        names = list(datamodule.generator_names)

        def rows() -> dict[str, list]:
            metadata = datamodule.row_metadata() if hasattr(datamodule, "row_metadata") else None
            return store_rows(shard_dir, names, metadata)

        leftovers = remove_leftovers(self.path)  # of writes killed in an earlier run (we hold the lock)
        if leftovers:
            print(f"precompute: removed {len(leftovers)} temporary files left by an interrupted run in {self.path}",
                  file=sys.stderr)
        if not FeatureStore.exists(self.path):
            store = FeatureStore.create(self.path, provenance=StoreProvenance(dataset, pixels), rows=rows(),
                                        generator_names=names, rejected=read_rejected(shard_dir))
        else:
            store = FeatureStore.open(self.path, writable=True)
            self._check_binding(store, dataset, pixels)
            for group in reversed(store.incomplete_groups() if self.drop_incomplete_group else []):
                store.drop_group(group)
                print(f"precompute: dropped the incomplete group {group} of {self.path}", file=sys.stderr)
            damage = store.verify(checksums=self.verify_checksums)
            if damage:
                lines = "\n".join(f"  {d}" for d in damage)
                actions = store.repair(damage, rows() if any(d.group == "rows" for d in damage) else None)
                print(f"precompute: {self.path} was damaged:\n{lines}\nrepair: " + "; ".join(actions), file=sys.stderr)
        outputs = list(requested.maps)
        for group, info in store.groups.items():
            present = [n for n in info.features if n in outputs]
            differences = info.extractor.differences(requested, present) if present else []
            differences += [f"{n}.storage {info.features[n].to_attrs()} != {specs[n].to_attrs()}"
                            for n in present if info.features[n] != specs[n]]
            if differences:
                raise ProvenanceMismatchError(f"feature store {self.path} group {group} ({', '.join(present)}) was "
                                              "made with a different config: " + ", ".join(differences))
            kept = [f"{n} {info.features[n].codec} (asked: {specs[n].codec})" for n in present
                     if info.features[n].codec != specs[n].codec]
            if kept:  # lossless, so not a mismatch (FeatureSpec does not compare it), but never silently ignored
                print(f"precompute: {self.path} group {group} keeps the codec it was created with: {', '.join(kept)}; "
                      "a codec is fixed when a group is created (write a new store for another)", file=sys.stderr)
        if self._group_to_compute(store, outputs) is None:
            missing = [n for n in outputs if n not in store.feature_names]
            if missing:
                store.add_group({n: specs[n] for n in missing}, requested.restricted(missing))
        if self.config_text is not None:
            group = self._group_to_compute(store, outputs) or "none"
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
            (self.path / "configs").mkdir(exist_ok=True)
            (self.path / "configs" / f"precompute-{group}-{stamp}.yaml").write_text(self.config_text)

    def _check_binding(self, store: FeatureStore, dataset: DatasetProvenance, pixels: PixelProvenance) -> None:
        """Refuse a store made from other shard files or other pixels, naming what changed."""
        problem = dataset.binding_problem(store.dataset) if store.dataset.shards == dataset.shards \
            else f"shards {store.dataset.shards} != {dataset.shards}"
        if problem:
            raise ProvenanceMismatchError(f"feature store {self.path} was made from other data than "
                                          f"{dataset.shards}: {problem}; write a new store")
        differences = config_differences(store.pixels.to_attrs(), pixels.to_attrs())
        if differences:
            raise ProvenanceMismatchError(f"feature store {self.path} was made with different pixel settings: "
                                          + ", ".join(differences))

    def _group_to_compute(self, store: FeatureStore, outputs: list[str]) -> str | None:
        """The incomplete group holding requested outputs (resume), else None; refuses a group that also
        holds outputs not requested (a tar is written for all its group's features at once)."""
        for group in store.incomplete_groups():
            features = list(store.groups[group].features)
            if set(features) & set(outputs):
                extra = [n for n in features if n not in outputs]
                if extra:
                    raise ValueError(f"feature store {self.path}: group {group} ({', '.join(features)}) is "
                                     f"incomplete; resume it with outputs including {', '.join(extra)}")
                return group
        return None

    # ---- the device loop: hand batches over ------------------------------------------------------------------

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        assert self.store is not None and self.group is not None, "setup() opens the store before any batch"
        names = list(self.store.groups[self.group].features)
        missing = [k for k in ("row", "shard_index", "error", *names) if k not in prediction]
        if missing:
            raise KeyError(f"ZarrFeatureWriter: predict_step output lacks {missing} "
                           f"(group {self.group} of store {self.path} holds {names})")
        started = time.perf_counter()
        item = _Batch(rows=torch.as_tensor(prediction["row"]).cpu().numpy(),
                      shard_indices=torch.as_tensor(prediction["shard_index"]).cpu().numpy(),
                      errors=list(prediction["error"]),
                      features={n: prediction[n].detach().to("cpu", torch.float32).numpy() for n in names})
        if self._queue is None:
            self._consume(item)
        else:
            self._hand_over(item)
        self.wait_seconds += time.perf_counter() - started
        self._show_progress(trainer)

    def _hand_over(self, item: _Batch | None) -> None:
        """Put on the bounded queue, waiting while it is full; a failed writer thread is raised here."""
        assert self._queue is not None
        while True:
            if self._error is not None:
                raise self._error
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _drain(self) -> None:
        """Writer thread: consume batches until the end sentinel; after an error keep draining (never block)."""
        assert self._queue is not None
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._consume(item)
                except BaseException as error:  # noqa: BLE001  (handed to the device loop, re-raised there)
                    self._error = error

    def _consume(self, item: _Batch) -> None:
        """Check and encode one batch, place its rows in their tars' buffers, write every completed tar."""
        store, group = self.store, self.group
        assert store is not None and group is not None
        specs = store.groups[group].features
        encoded = {name: encode(spec.dtype, item.features[name]) for name, spec in specs.items()}
        for position, (row, shard_index) in enumerate(zip(item.rows.tolist(), item.shard_indices.tolist())):
            buffer = self._buffer(shard_index)
            start, stop = store.tar_rows(shard_index)
            if not start <= row < stop:
                raise ValueError(f"ZarrFeatureWriter: row {row} is not in tar {shard_index} (rows {start}..{stop - 1})")
            local = row - start
            if buffer.filled[local]:
                raise ValueError(f"ZarrFeatureWriter: row {row} (tar {shard_index}) arrived twice; "
                                 "the datamodule must deliver each row exactly once")
            buffer.filled[local] = True
            buffer.errors[local] = item.errors[position]
            if not item.errors[position]:  # error rows keep the fill value 0 instead of whatever was computed
                for name, values in encoded.items():
                    buffer.arrays[name][local] = values.values[position]
                    if values.scale is not None:
                        buffer.arrays[f"{name}__scale"][local] = values.scale[position]
                    buffer.flags[local] += (values.non_finite[position], values.underflow[position])
            if buffer.filled.all():
                store.write_tar(group, shard_index, buffer.arrays, buffer.errors, buffer.flags)
                del self._pending[shard_index]
                self._written += 1
                if self._tar_line is not None:
                    print_line(self._tar_line.advance(len(buffer.errors), f"tar {self._written}/{self._tars_to_write} "
                                                      f"({store.shard_table[shard_index]['name']})", force=True))

    def _buffer(self, shard_index: int) -> _TarBuffer:
        if shard_index not in self._pending:
            store, group = self.store, self.group
            assert store is not None and group is not None
            start, stop = store.tar_rows(shard_index)
            arrays = {name: np.zeros((stop - start, *shape), dtype=dtype)
                      for name, shape, dtype in store.tar_array_shapes(group)}
            self._pending[shard_index] = _TarBuffer(arrays=arrays, errors=[""] * (stop - start))
        return self._pending[shard_index]

    def _show_progress(self, trainer: pl.Trainer) -> None:
        """Tars done so far (before this run + written by this process) in the Rich bar's description."""
        bar = trainer.progress_bar_callback
        if isinstance(bar, RichProgressBar) and bar.progress is not None and bar.predict_progress_bar_id is not None:
            total = len(self.store.shard_table)
            bar.progress.update(bar.predict_progress_bar_id,
                                description=f"Predicting · tars {self._done_before + self._written}/{total}"
                                + (f" (rank {trainer.global_rank}'s share)" if trainer.world_size > 1 else ""))

    # ---- the end: join, barrier, summary ---------------------------------------------------------------------

    def _join(self) -> None:
        """Let the thread finish every queued batch, then raise its error if it had one."""
        if self._thread is not None:
            assert self._queue is not None
            self._queue.put(None)  # the thread drains even after an error, so this never blocks for long
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Join the writer; a tar still missing rows means rows were lost upstream: say so (the summary fails)."""
        self._join()
        if self._pending and self.store is not None:
            incomplete = ", ".join(f"{self.store.shard_table[i]['name']} ({int(b.filled.sum())}/{len(b.errors)} rows)"
                                   for i, b in sorted(self._pending.items()))
            print(f"ZarrFeatureWriter (rank {trainer.global_rank}): predict ended with incomplete tars {incomplete}; "
                  "each tar's rows must all reach one process", file=sys.stderr)
        super().on_predict_epoch_end(trainer, pl_module)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After every rank wrote its tars (barrier), rank 0 reads the done markers: the true state."""
        trainer.strategy.barrier("zarr_feature_writer_end")
        if trainer.is_global_zero and self.store is not None:
            self.summary = self.read_summary()
        self._release_lock()

    def read_summary(self) -> RunSummary:
        store = FeatureStore.open(self.path)
        tars = [t["name"] for t in store.shard_table]
        done = store.done_tars(self.group) if self.group is not None else set(tars)
        unfinished = [t for t in tars if t not in done]
        not_added = [name for name in self._requested_outputs if name not in store.feature_names]
        return RunSummary(self.group, len(done), len(tars), unfinished, not_added, store.summary())

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Keep what is complete: the thread writes every tar already whole before the error propagates."""
        try:
            self._join()
        except BaseException:  # noqa: BLE001  (the original exception is the one to report)
            pass
        self._release_lock()

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.__exit__(None, None, None)
            self._lock = None
