"""Batches of cached feature rows at memory speed: block-shuffled orders, whole-block reads, reused buffers.

Two sources, one order:

- `ResidentRows` (`in_memory: true` / `device`): every selected row loaded once, in the stored dtype, into
  RAM or accelerator memory; a batch is a gather (`index_select` on the device; on the host `np.take` into
  a ring of reused, pinned when the target is a GPU, batch buffers: a fresh 20–40 MB batch per step costs
  more in page faults than the gather itself).
- `BlockRows` (`in_memory: false`, or a split larger than the RAM share): the epoch's order is read window
  by window into reused buffers laid out in batch order, so a batch is a slice of its window. A window's
  rows are read as sorted contiguous runs cut at whole inner chunks (never one call per row), each chunk's
  bytes scattered by one `preadv` straight to its rows' places (`feature_cache.raw_chunks`: one kernel copy
  from the page cache, no Zarr per-call cost), while a background thread reads the next window.

The order (`epoch_order`) is a seeded per-epoch permutation of blocks of `block_rows` consecutive rows,
dealt into windows by label (`stratified`: each window holds the split's label mix) and to DDP ranks, then
permuted within windows of `window_rows` rows. Resident sources use blocks of
one row (a full shuffle: random access to resident rows is as fast as sequential). Batches leave in the
stored dtype (float16 CLIP maps stay float16) and are widened on the device by the model's first op
(`feature_cache.codecs.widen`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from core.threads import LANES, in_two_lanes
from feature_cache.codecs import scale_channels
from feature_cache.raw_chunks import RawChunks
from feature_cache.store import FeatureStore

RING_SLOTS = 4  # batches alive at once: Lightning's one-batch prefetch, the step's batch, the one being filled, a spare
METADATA = ("label", "generator", "row", "store")
# Rows per zarr call (rounded to whole inner chunks, see read_calls). Measured on zarr 3.1.6, 2 busy cores, RN50-shaped
# rows from the page cache: 32-row calls read ~5x faster than one call for a whole 600-row run (1,100 vs 200 rows/s),
# which decodes every chunk before returning.
READ_ROWS = 32


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


@dataclass
class Window:
    """Consecutive positions of the epoch's order (whole batches) and the arrays holding their rows.

    `index` None: row i of every array is position `order[i]` (a block read laid the window out in batch order,
    so a batch is a slice); else `index[i]` is the row of `order[i]` in `arrays` (resident: a gather). `slot` is
    the reused buffer that holds a block read window (refilled only after its batches' GPU copies are done)."""

    order: np.ndarray
    arrays: dict[str, torch.Tensor]
    index: torch.Tensor | None = None
    slot: int | None = None


def read_calls(runs: list[tuple[int, int]], chunk_rows: int) -> list[tuple[int, int]]:
    """[start, stop) zarr calls covering `runs`, cut at multiples of a whole number of inner chunks (about
    READ_ROWS rows): a call never decodes a chunk that a neighbouring call decodes again."""
    step = whole_chunks(chunk_rows)
    return [(start, min((start // step + 1) * step, stop)) for run_start, stop in runs
            for start in [run_start, *range((run_start // step + 1) * step, stop, step)]]


def whole_chunks(chunk_rows: int) -> int:
    """The whole number of inner chunks closest to READ_ROWS rows from below (at least one chunk): the unit of a
    read call, and the default block (25 for 25-row chunks, 32 for 32-row ones, 32 for the one-row CLIP chunks of
    stores written before CHUNK_ROWS, which would otherwise read one random row per block)."""
    return chunk_rows * max(1, READ_ROWS // chunk_rows)


def contiguous_runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """Sorted rows as [start, stop) runs: one zarr call per run instead of one per row."""
    if len(rows) == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    return [(int(run[0]), int(run[-1]) + 1) for run in np.split(rows, breaks)]


def epoch_order(num_rows: int, *, shuffle: bool, block_rows: int, window_rows: int, seed: int, epoch: int,
                rank: int = 0, world_size: int = 1, labels: np.ndarray | None = None) -> np.ndarray:
    """This rank's positions (0..num_rows-1) for one epoch.

    Shuffled: a permutation of blocks of `block_rows` consecutive positions seeded by (seed, epoch), dealt
    round-robin to the ranks, each rank's sequence cut or wrapped to num_rows // world_size positions
    (equal step counts, so DDP never waits on a collective), then permuted within consecutive windows of
    `window_rows` (a multiple of `block_rows`, so each block is read by one call). With `labels` (per position)
    the blocks are first dealt into windows by their label sum (`stratified`), so every window, on every rank,
    holds the split's label mix even when the store is sorted by label. Not shuffled: positions in order, padded
    by wrapping to a multiple of the world size like DistributedSampler, one contiguous slice per rank (every
    row scored; duplicates are dropped by the prediction log's (store, row) identity).
    """
    if not shuffle:
        per_rank = -(-num_rows // world_size)
        return np.resize(np.arange(num_rows), per_rank * world_size)[rank * per_rank:(rank + 1) * per_rank]
    rng = np.random.default_rng([seed, epoch])
    full = num_rows // block_rows  # a short last block goes last, so windows stay unions of whole blocks
    blocks = np.arange(full)[rng.permutation(full)]
    if labels is not None and full:
        sums = np.asarray(labels[:full * block_rows]).reshape(full, block_rows).sum(axis=1)
        blocks = stratified(blocks, sums[blocks], window_rows // block_rows * world_size, rng)
    starts = np.append(blocks * block_rows,
                       [full * block_rows] if num_rows % block_rows else [])[rank::world_size].astype(np.int64)
    order = (np.concatenate([np.arange(s, min(s + block_rows, num_rows)) for s in starts]) if len(starts)
             else np.arange(0))
    order = np.resize(order, num_rows // world_size if len(order) else 0)
    for start in range(0, len(order), window_rows):
        order[start:start + window_rows] = rng.permutation(order[start:start + window_rows])
    return order


def stratified(blocks: np.ndarray, keys: np.ndarray, window: int, rng: np.random.Generator) -> np.ndarray:
    """`blocks` reordered so that every run of `window` consecutive blocks (the last may be shorter) samples the
    blocks' `keys` evenly: sorted by key (ties keep their shuffled order), the i-th block goes to the slot with the
    i-th smallest quantile, slot k of a window of n blocks standing for quantile (k + 1/2) / n (ties between
    windows broken at random). A label-sorted store's windows then hold its label mix to within a block, while
    which block of a key lands in which window stays the seeded permutation's choice."""
    ranked = blocks[np.argsort(keys, kind="stable")]
    slots = np.arange(len(blocks))
    sizes = np.minimum(window, len(blocks) - slots // window * window)
    quantiles = (slots % window + 0.5) / sizes
    placed = np.empty_like(blocks)
    placed[np.lexsort((rng.permutation(len(blocks)), quantiles))] = ranked
    return placed


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
        self._lanes = [ReadLane() for _ in range(LANES)]
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

    def torch_layout(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """`layout_of` with torch dtypes (float8 as its uint8 storage): what reused batch buffers are made of."""
        return {name: (shape, torch.from_numpy(np.empty(0, dtype)).dtype)
                for name, (shape, dtype) in self.layout_of.items()}

    def block_rows(self) -> int:
        """The default block: whole inner chunks (`whole_chunks`) of the arrays a batch carries (the largest chunk,
        over stores and arrays), so a block read never reads part of a chunk (whose crc32c covers all of it)."""
        return whole_chunks(max(self.store(part).chunk_rows(name) for part in range(len(self.parts))
                                for name in self.features))

    def store(self, part: int) -> FeatureStore:
        path = self.paths[self.parts[part].store]
        if path not in self._stores:
            self._stores[path] = FeatureStore.open(path)
        return self._stores[path]

    def raw(self, lane: ReadLane, part: int, name: str) -> RawChunks | None:
        """A lane's byte-range reader of a feature (or `NAME__scale`) in a part's store; None: read through Zarr."""
        if (part, name) not in lane.raw:
            lane.raw[part, name] = self.store(part).raw_reader(name)
        return lane.raw[part, name]

    def read(self, positions: np.ndarray, out: dict[str, np.ndarray] | None = None,
             names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Arrays `names` (default all) of `positions` (any order, repeats allowed) in the stored dtype: row i of each
        array is position i, written into `out` (at least len(positions) rows, reused by the caller) or new arrays.

        Rows are read in sorted contiguous runs cut into chunk-aligned calls (`read_calls`); each call's rows go
        straight to their places in `out` (`RawChunks`: one kernel copy from the page cache), or, for a layout
        RawChunks does not read, through Zarr into a scratch block first."""
        names = names or self.features
        out = out if out is not None else {name: np.empty((len(positions), *self.layout_of[name][0]),
                                                          self.layout_of[name][1]) for name in names}
        sorter = np.argsort(positions, kind="stable")
        ordered = positions[sorter]
        calls: list[tuple[int, int, int, np.ndarray]] = []  # (part, start row, stop row, the rows' places in out)
        for part, (lo, hi) in enumerate(zip(self.bounds[:-1], self.bounds[1:])):
            first, last = np.searchsorted(ordered, [lo, hi])
            rows = self.parts[part].rows[ordered[first:last] - lo]
            for start, stop in read_calls(contiguous_runs(rows), max(self.store(part).chunk_rows(n) for n in names)):
                calls.append((part, start, stop, sorter[first:first + stop - start]))
                first += stop - start
        in_two_lanes(len(calls), lambda lane, lo, hi: self._read_calls(self._lanes[lane], calls[lo:hi], out, names))
        return {name: out[name][:len(positions)] for name in names}

    def _read_calls(self, lane: ReadLane, calls: list[tuple[int, int, int, np.ndarray]], out: dict[str, np.ndarray],
                    names: list[str]) -> None:
        for part, start, stop, slots in calls:
            for name in names:
                raw = self.raw(lane, part, name)
                if raw is not None:
                    raw.read(start, stop, [out[name][slot] for slot in slots.tolist()])
                else:
                    scratch = lane.scratch(name, stop - start, self.layout_of[name])
                    self.store(part).read(name, start, stop, out=scratch)
                    out[name][slots] = scratch


class ReadLane:
    """What one reading thread of `SplitRows.read` owns: its raw readers (not thread-safe: an open shard file,
    reused buffers) and its scratch blocks for Zarr reads."""

    def __init__(self) -> None:
        self.raw: dict[tuple[int, str], RawChunks | None] = {}  # per (part, feature); None: read through Zarr
        self._scratches: dict[str, np.ndarray] = {}

    def scratch(self, name: str, rows: int, layout: tuple[tuple[int, ...], np.dtype]) -> np.ndarray:
        """A reused block for Zarr reads (fresh memory per call would be page-faulted on every touch)."""
        shape, dtype = layout
        if name not in self._scratches or len(self._scratches[name]) < rows:
            self._scratches[name] = np.empty((rows, *shape), dtype)
        return self._scratches[name][:rows]


class BatchRing:
    """`RING_SLOTS` preallocated host batches reused in turn (pinned for fast, asynchronous copies to a GPU).

    A slot is refilled RING_SLOTS batches later; with a GPU target the copy's event is waited on first.
    """

    def __init__(self, layout: dict[str, tuple[tuple[int, ...], torch.dtype]], batch_size: int, pin: bool) -> None:
        self.slots = [{name: torch.empty((batch_size, *shape), dtype=dtype, pin_memory=pin)
                       for name, (shape, dtype) in layout.items()} for _ in range(RING_SLOTS)]
        self.events: list[torch.cuda.Event | None] = [None] * RING_SLOTS
        self.next = 0

    def take(self) -> tuple[int, dict[str, torch.Tensor]]:
        slot = self.next
        self.next = (slot + 1) % RING_SLOTS
        if self.events[slot] is not None:
            self.events[slot].synchronize()
        return slot, self.slots[slot]


def gather_rows(source: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
    """`out[:] = source[rows]`, half of the rows copied by a helper thread (numpy's take releases the GIL): one core's
    copies stop well short of the machine's memory bandwidth (a 48-row batch of 214 KB rows: 35k rows/s on one
    thread, 74k on two, quiet 2-core VM). numpy's take is one memcpy per row (mode "clip": with the default "raise"
    numpy buffers `out`, a second copy into fresh memory); CPU index_select on large float16 rows ran at ~1 % of
    memcpy speed, and torch's copy_ of a row splits it across OpenMP threads whose barriers stall when a core is
    taken."""
    in_two_lanes(len(rows), lambda lane, lo, hi: np.take(source, rows[lo:hi], axis=0, out=out[lo:hi], mode="clip"))


class ResidentRows:
    """The whole split in memory (RAM or device), stored dtype; batches are gathers by position."""

    def __init__(self, split: SplitRows, device: torch.device) -> None:
        self.split, self.device = split, device
        positions = np.arange(len(split))
        self.tensors: dict[str, torch.Tensor] = {}
        for name in split.features:  # one feature at a time: peak host memory is one feature's host copy
            self.tensors[name] = torch.from_numpy(split.read(positions, names=[name])[name]).to(device)
        self.tensors.update({name: torch.from_numpy(values).to(device) for name, values in split.metadata.items()})

    def windows(self, order: np.ndarray, window_rows: int, batch_size: int) -> Iterator[Window]:
        for start in range(0, len(order), window_rows):
            window = order[start:start + window_rows]
            yield Window(window, self.tensors, torch.from_numpy(window).to(self.device))


class BlockRows:
    """Windows of the epoch's order read from the stores into reused buffers laid out in batch order (a batch is
    a slice: no gather, no second copy), the next window read by a background thread.

    Buffers rotate so that a batch stays valid RING_SLOTS batches after it is handed out, as ring batches do:
    one window served, one being read, and enough earlier ones to cover RING_SLOTS batches. Pinned when the
    batches go to a GPU; a buffer is refilled only after the copies of its batches have finished."""

    def __init__(self, split: SplitRows, pin: bool = False) -> None:
        self.split, self.pin = split, pin
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feature-window")
        self._buffers: list[dict[str, torch.Tensor]] = []
        self._fences: dict[int, torch.cuda.Event] = {}
        self._turn = 0  # windows read so far, across epochs: consecutive windows never share a buffer
        self._pending: Future | None = None

    def fence(self, slot: int, event: torch.cuda.Event) -> None:
        """The copies out of buffer `slot` are done when `event` is (recorded after each batch's copy)."""
        self._fences[slot] = event

    def _prepare(self, window_rows: int, batch_size: int) -> None:
        slots = 2 + math.ceil(RING_SLOTS / math.ceil(window_rows / batch_size))
        if len(self._buffers) != slots or len(next(iter(self._buffers[0].values()))) < window_rows:
            self._buffers = [{name: torch.empty((window_rows, *shape), dtype=dtype, pin_memory=self.pin)
                              for name, (shape, dtype) in self.split.torch_layout().items()} for _ in range(slots)]
            self._fences = {}

    def _load(self, window: np.ndarray, slot: int) -> Window:
        if slot in self._fences:
            self._fences.pop(slot).synchronize()
        buffers = self._buffers[slot]
        self.split.read(window, {name: values.numpy() for name, values in buffers.items()})
        arrays = {name: values[:len(window)] for name, values in buffers.items()}
        arrays.update({name: torch.from_numpy(values[window]) for name, values in self.split.metadata.items()})
        return Window(window, arrays, slot=slot)

    def windows(self, order: np.ndarray, window_rows: int, batch_size: int) -> Iterator[Window]:
        if self._pending is not None:  # an epoch broken off (limit_train_batches) may still be reading a buffer
            self._pending.result()
            self._pending = None
        self._prepare(window_rows, batch_size)
        for start in range(0, len(order), window_rows):
            slot = self._turn % len(self._buffers)
            self._turn += 1
            if self._pending is not None:
                current, self._pending = self._pending.result(), None
            else:
                current = self._load(order[start:start + window_rows], slot)
            following = order[start + window_rows:start + 2 * window_rows]
            if len(following):
                self._pending = self._reader.submit(self._load, following, self._turn % len(self._buffers))
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
        self.ring = None
        if isinstance(source, ResidentRows) and source.device.type == "cpu":
            self.ring = BatchRing(split.torch_layout(), batch_size, pin=device.type == "cuda")

    def order(self) -> np.ndarray:
        s = self.settings
        rank, world = s.rank()
        labels = self.source.split.metadata["label"] if s.block_rows > 1 else None  # one-row blocks: a full shuffle
        return epoch_order(len(self.source.split), shuffle=s.shuffle, block_rows=s.block_rows,
                           window_rows=s.window_rows, seed=s.seed, epoch=s.epoch(), rank=rank, world_size=world,
                           labels=labels)

    def __len__(self) -> int:
        return math.ceil(len(self.order()) / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for window in self.source.windows(self.order(), self.settings.window_rows, self.batch_size):
            for start in range(0, len(window.order), self.batch_size):
                rows = slice(start, start + self.batch_size)
                if window.index is None:
                    batch = self._slice(window, rows)
                else:
                    batch = self._gather(window.arrays, window.index[rows])
                batch.update({name: batch[name].view(view) for name, view in self.source.split.views.items()})
                if self.decorate is not None:
                    self.decorate(batch, window.order[rows])
                yield batch

    def _slice(self, window: Window, rows: slice) -> dict[str, torch.Tensor]:
        """A block read window's batch: views of its buffer (copied to the GPU, asynchronously, when there is one)."""
        batch = {name: values[rows] for name, values in window.arrays.items()}
        if self.device.type == "cuda":
            batch = {name: value.to(self.device, non_blocking=True) for name, value in batch.items()}
            event = torch.cuda.Event()
            event.record()
            self.source.fence(window.slot, event)
        return batch

    def _gather(self, arrays: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
        """A resident batch: rows `index` of the split's tensors (on the device, or copied into a ring slot)."""
        batch: dict[str, torch.Tensor] = {name: arrays[name].index_select(0, index) for name in METADATA}
        if self.ring is None:  # device-resident: gathered on the device, the caching allocator reuses memory
            batch.update({name: arrays[name].index_select(0, index) for name in self.source.split.features})
            return batch
        slot, buffers = self.ring.take()
        sources = index.numpy()
        for name in self.source.split.features:
            out = buffers[name][:len(sources)]
            gather_rows(arrays[name].numpy(), sources, out.numpy())
            batch[name] = out
        if self.device.type == "cuda":
            batch = {name: value.to(self.device, non_blocking=True) for name, value in batch.items()}
            self.ring.events[slot] = torch.cuda.Event()
            self.ring.events[slot].record()
        return batch
