"""Batches of cached feature rows at memory speed: block-shuffled orders, whole-block reads, reused buffers.

Three sources, one order and one gather:

- `ResidentRows` (`in_memory: true` / `device`): every selected row loaded once, whole tars per Zarr
  call, in the stored dtype, into RAM or accelerator memory; a batch is one `index_select`.
- `BlockRows` (`in_memory: false`, or a split larger than the RAM share): the epoch's order is read
  window by window; a window's rows are read as sorted contiguous runs (one Zarr call per run and
  feature, never one per row) while a background thread reads the next window.

The order (`epoch_order`) is a seeded per-epoch permutation of blocks of `block_rows` consecutive rows,
dealt to DDP ranks, then permuted within windows of `window_rows` rows. Resident sources use blocks of
one row (a full shuffle: random access to resident rows is as fast as sequential). Batches leave in the
stored dtype (float16 CLIP maps stay float16) and are widened on the device by the model's first op
(`feature_cache.codecs.widen`); on the host they are written into a ring of reused (pinned, when the
target is a GPU) buffers, because a fresh 20–40 MB batch per step costs more in page faults than the
gather itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from feature_cache.codecs import scale_channels
from feature_cache.store import FeatureStore

RING_SLOTS = 4  # batches alive at once: Lightning's one-batch prefetch, the step's batch, the one being filled, a spare
METADATA = ("label", "generator", "row", "store")
# Rows per zarr call (rounded to whole inner chunks, see read_calls). Measured on zarr 3.1.6, 2 busy cores, RN50-shaped
# rows from the page cache: 32-row calls read ~5x faster than one call for a whole 600-row run (1,100 vs 200 rows/s),
# which decodes every chunk before returning.
READ_ROWS = 32
Window = tuple[np.ndarray, np.ndarray, dict[str, torch.Tensor]]  # (the window's order, its sorted positions, their arrays)


@dataclass
class Rows:
    """The selected rows of one store, sorted, with their labels, remapped generator codes, keys and sha256."""

    store: int
    rows: np.ndarray
    labels: np.ndarray
    generators: np.ndarray
    keys: np.ndarray
    sha256: np.ndarray

    def subset(self, mask: np.ndarray) -> Rows:
        return Rows(self.store, self.rows[mask], self.labels[mask], self.generators[mask], self.keys[mask],
                    self.sha256[mask])


def read_calls(runs: list[tuple[int, int]], chunk_rows: int) -> list[tuple[int, int]]:
    """[start, stop) zarr calls covering `runs`, cut at multiples of a whole number of inner chunks (about
    READ_ROWS rows): a call never decodes a chunk that a neighbouring call decodes again."""
    step = chunk_rows * max(1, READ_ROWS // chunk_rows)
    return [(start, min((start // step + 1) * step, stop)) for run_start, stop in runs
            for start in [run_start, *range((run_start // step + 1) * step, stop, step)]]


def contiguous_runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """Sorted rows as [start, stop) runs: one zarr call per run instead of one per row."""
    if len(rows) == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    return [(int(run[0]), int(run[-1]) + 1) for run in np.split(rows, breaks)]


def epoch_order(num_rows: int, *, shuffle: bool, block_rows: int, window_rows: int, seed: int, epoch: int,
                rank: int = 0, world_size: int = 1) -> np.ndarray:
    """This rank's positions (0..num_rows-1) for one epoch.

    Shuffled: a permutation of blocks of `block_rows` consecutive positions seeded by (seed, epoch), dealt
    round-robin to the ranks, each rank's sequence cut or wrapped to num_rows // world_size positions
    (equal step counts, so DDP never waits on a collective), then permuted within consecutive windows of
    `window_rows` (a multiple of `block_rows`, so each block is read by one call). Not shuffled: positions in order, padded by wrapping to a multiple of the world size
    like DistributedSampler, one contiguous slice per rank (every row scored; duplicates are dropped by
    the prediction log's (store, row) identity).
    """
    if not shuffle:
        per_rank = -(-num_rows // world_size)
        return np.resize(np.arange(num_rows), per_rank * world_size)[rank * per_rank:(rank + 1) * per_rank]
    rng = np.random.default_rng([seed, epoch])
    full = num_rows // block_rows  # a short last block goes last, so windows stay unions of whole blocks
    starts = np.append(np.arange(full)[rng.permutation(full)] * block_rows,
                       [full * block_rows] if num_rows % block_rows else [])[rank::world_size].astype(np.int64)
    order = (np.concatenate([np.arange(s, min(s + block_rows, num_rows)) for s in starts]) if len(starts)
             else np.arange(0))
    order = np.resize(order, num_rows // world_size if len(order) else 0)
    for start in range(0, len(order), window_rows):
        order[start:start + window_rows] = rng.permutation(order[start:start + window_rows])
    return order


class SplitRows:
    """A split's rows across its stores as one position axis 0..n-1, with per-position metadata.

    `arrays` are what a batch carries per feature: the feature in its stored dtype, plus `NAME__scale`
    (B, C) float32 for int8_rowscale features.
    """

    def __init__(self, paths: list[str], parts: list[Rows], features: list[str],
                 opened: Mapping[str, FeatureStore] | None = None) -> None:
        self.paths, self.parts = paths, parts
        self._stores: dict[str, FeatureStore] = dict(opened or {})  # the datamodule's, opened once per run
        self.layout_of = self.layout(self.store(0), features)
        self.features = list(self.layout_of)
        # float8 is stored as uint8 bits (numpy has no float8): batches view them as torch.float8_e4m3fn
        self.views = {name: torch.float8_e4m3fn for name in features
                      if self.store(0).feature_info(name).dtype == "float8_e4m3"}
        self.bounds = np.cumsum([0] + [len(p.rows) for p in parts])
        self.metadata = {"label": np.concatenate([p.labels for p in parts]).astype(np.int64),
                         "generator": np.concatenate([p.generators for p in parts]).astype(np.int64),
                         "row": np.concatenate([p.rows for p in parts]).astype(np.int64),
                         "store": np.concatenate([np.full(len(p.rows), p.store) for p in parts]).astype(np.int64)}

    def __len__(self) -> int:
        return int(self.bounds[-1])

    @staticmethod
    def layout(store: FeatureStore, features: list[str]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Per-row shape and storage dtype of each array a batch carries for `features` (scales included)."""
        layout = {}
        for name in features:
            info = store.feature_info(name)
            layout[name] = (info.shape, info.storage_dtype)
            if info.has_scale:
                layout[f"{name}__scale"] = ((scale_channels(info.shape),), np.dtype("float32"))
        return layout

    def store(self, part: int) -> FeatureStore:
        path = self.paths[self.parts[part].store]
        if path not in self._stores:
            self._stores[path] = FeatureStore.open(path)
        return self._stores[path]

    def read(self, positions: np.ndarray, out: dict[str, np.ndarray] | None = None,
             names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Arrays `names` (default all) of sorted `positions`, stored dtype, read per store as contiguous runs cut
        into chunk-aligned calls of about READ_ROWS rows (`read_calls`) straight into `out` (at least
        len(positions) rows, reused by the caller) or into new arrays."""
        names = names or self.features
        out = out if out is not None else {name: np.empty((len(positions), *self.layout_of[name][0]),
                                                          self.layout_of[name][1]) for name in names}
        filled = 0
        for part, (lo, hi) in enumerate(zip(self.bounds[:-1], self.bounds[1:])):
            first, last = np.searchsorted(positions, [lo, hi])
            store, rows = self.store(part), self.parts[part].rows[positions[first:last] - lo]
            calls = read_calls(contiguous_runs(rows), max(store.chunk_rows(name) for name in names))
            for start, stop in calls:
                for name in names:
                    store.read(name, start, stop, out=out[name][filled:filled + stop - start])
                filled += stop - start
        return {name: out[name][:len(positions)] for name in names}


class BatchRing:
    """`RING_SLOTS` preallocated host batches reused in turn (pinned for fast, asynchronous copies to a GPU).

    A slot is refilled RING_SLOTS batches later; with a GPU target the copy's event is waited on first.
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, torch.dtype], batch_size: int,
                 pin: bool) -> None:
        self.slots = [{name: torch.empty((batch_size, *shape), dtype=dtypes[name], pin_memory=pin)
                       for name, shape in shapes.items()} for _ in range(RING_SLOTS)]
        self.events: list[torch.cuda.Event | None] = [None] * RING_SLOTS
        self.next = 0

    def take(self) -> tuple[int, dict[str, torch.Tensor]]:
        slot = self.next
        self.next = (slot + 1) % RING_SLOTS
        if self.events[slot] is not None:
            self.events[slot].synchronize()
        return slot, self.slots[slot]


class ResidentRows:
    """The whole split in memory (RAM or device), stored dtype; batches are gathers by position."""

    def __init__(self, split: SplitRows, device: torch.device) -> None:
        self.split, self.device = split, device
        positions = np.arange(len(split))
        self.tensors: dict[str, torch.Tensor] = {}
        for name in split.features:  # one feature at a time: peak host memory is one feature's host copy
            self.tensors[name] = torch.from_numpy(split.read(positions, names=[name])[name]).to(device)
        self.tensors.update({name: torch.from_numpy(values).to(device) for name, values in split.metadata.items()})

    def windows(self, order: np.ndarray, window_rows: int) -> Iterator[Window]:
        everything = np.arange(len(self.split))
        for start in range(0, len(order), window_rows):
            yield order[start:start + window_rows], everything, self.tensors


class BlockRows:
    """Windows of the epoch's order read from the stores, the next one read by a background thread."""

    def __init__(self, split: SplitRows) -> None:
        self.split = split
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feature-window")
        self._buffers: list[dict[str, np.ndarray] | None] = [None, None]  # alternating: one served, one filled
        self._turn = 0

    def _buffer(self, rows: int) -> dict[str, np.ndarray]:
        """The next of two reused window buffers (grown when a window is larger): fresh memory is page-faulted
        on every touch, which on a busy VM costs more than the read itself (measured ~0.15 GB/s)."""
        self._turn = 1 - self._turn
        current = self._buffers[self._turn]
        if current is None or len(next(iter(current.values()))) < rows:
            current = {name: np.empty((rows, *shape), dtype) for name, (shape, dtype) in self.split.layout_of.items()}
            self._buffers[self._turn] = current
        return current

    def _load(self, window: np.ndarray) -> Window:
        positions = np.unique(window)
        arrays = {name: torch.from_numpy(values)
                  for name, values in self.split.read(positions, self._buffer(len(positions))).items()}
        arrays.update({name: torch.from_numpy(values[positions]) for name, values in self.split.metadata.items()})
        return window, positions, arrays

    def windows(self, order: np.ndarray, window_rows: int) -> Iterator[Window]:
        pending: Future | None = None
        for start in range(0, len(order), window_rows):
            current = pending.result() if pending is not None else self._load(order[start:start + window_rows])
            following = order[start + window_rows:start + 2 * window_rows]
            pending = self._reader.submit(self._load, following) if len(following) else None
            yield current


@dataclass
class EpochSettings:
    """How an epoch's order is drawn (see `epoch_order`); `epoch` and `rank` are read when iteration starts."""

    shuffle: bool
    block_rows: int
    window_rows: int
    seed: int
    epoch: Callable[[], int]
    rank: Callable[[], tuple[int, int]]


class Batches:
    """One split's batches for Lightning (sized iterable; no DataLoader, so no worker processes).

    Feature tensors of host batches live in `BatchRing` slots: valid until RING_SLOTS batches later (copy
    to keep them). Metadata tensors (label, generator, row, store) are fresh per batch because metric
    states keep references to them. `decorate(batch, positions)` adds per-batch extras (images).
    """

    def __init__(self, source: ResidentRows | BlockRows, batch_size: int, settings: EpochSettings,
                 device: torch.device, decorate: Callable[[dict, np.ndarray], None] | None = None) -> None:
        self.source, self.batch_size, self.settings, self.device = source, batch_size, settings, device
        self.decorate = decorate
        split = source.split
        on_host = not isinstance(source, ResidentRows) or source.device.type == "cpu"
        self.ring = None
        if on_host:
            shapes = {name: shape for name, (shape, _) in split.layout_of.items()}
            dtypes = {name: torch.from_numpy(np.empty(0, dtype)).dtype for name, (_, dtype) in split.layout_of.items()}
            self.ring = BatchRing(shapes, dtypes, batch_size, pin=device.type == "cuda")

    def order(self) -> np.ndarray:
        s = self.settings
        rank, world = s.rank()
        return epoch_order(len(self.source.split), shuffle=s.shuffle, block_rows=s.block_rows,
                           window_rows=s.window_rows, seed=s.seed, epoch=s.epoch(), rank=rank, world_size=world)

    def __len__(self) -> int:
        return math.ceil(len(self.order()) / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for window, positions, arrays in self.source.windows(self.order(), self.settings.window_rows):
            index = torch.from_numpy(np.searchsorted(positions, window)).to(arrays["row"].device)
            for start in range(0, len(window), self.batch_size):
                yield self._gather(arrays, index[start:start + self.batch_size], window[start:start + self.batch_size])

    def _gather(self, arrays: dict[str, torch.Tensor], index: torch.Tensor, positions: np.ndarray) -> dict:
        batch: dict[str, torch.Tensor] = {name: arrays[name].index_select(0, index) for name in METADATA}
        if self.ring is None:  # device-resident: gathered on the device, the caching allocator reuses memory
            batch.update({name: arrays[name].index_select(0, index) for name in self.source.split.features})
        else:
            slot, buffers = self.ring.take()
            sources = index.tolist()
            for name in self.source.split.features:
                out, values = buffers[name][:len(sources)], arrays[name].numpy()
                target = out.numpy()
                # One single-threaded numpy memcpy per row. Measured on 2 busy cores: CPU index_select on large
                # float16 rows runs at ~1% of memcpy speed, and torch's copy_ of a row splits it across OpenMP
                # threads whose barriers stall when a core is taken (~4% of a plain numpy gather).
                for slot_row, source in enumerate(sources):
                    target[slot_row] = values[source]
                batch[name] = out
            if self.device.type == "cuda":
                batch = {name: value.to(self.device, non_blocking=True) for name, value in batch.items()}
                self.ring.events[slot] = torch.cuda.Event()
                self.ring.events[slot].record()
        batch.update({name: batch[name].view(view) for name, view in self.source.split.views.items()})
        if self.decorate is not None:
            self.decorate(batch, positions)
        return batch
