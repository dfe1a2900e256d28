"""Phase 2 data: rows of one or more feature stores (and, for fine-tuning, their images) as batches.

Batch (docs/contracts.md): one tensor per requested feature in its STORED dtype (widen with
`feature_cache.codecs.widen`; the detectors do it in their first op), `label` int64, `generator` int64
(codes into `generator_names`, the union over all stores), `row` int64 (row in its store), `store` int64
(index of that store in the split's list), and `image` (B, 3, R, R) float32 in [-1, 1] when `images=True`.
How rows are read, shuffled and buffered: `datamodules/row_batches.py`.
"""

from __future__ import annotations

import bisect
import difflib
import math
import os
import tarfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from datamodules.image_shards import preprocessor_from_provenance
from datamodules.row_batches import Batches, BlockRows, EpochSettings, ResidentRows, Rows, SplitRows
from core.geometry import apply_flip_crop, centre_crop_origin, native_crop_box, sample_flip_crop
from feature_cache.integrity import CHECKSUMMED_FORMAT
from feature_cache.provenance import FeatureProvenance
from feature_cache.store import FLAG_COLUMNS, FeatureStore

RAM_SHARE = 0.5  # in_memory loads into RAM only if the selected rows take at most this share of available RAM
DEVICE_SHARE = 0.6  # in_memory: device loads only if the rows take at most this share of free accelerator memory


def centre_clip_boxes(store: FeatureStore, rows: np.ndarray) -> np.ndarray | None:
    """(n, 4) boxes of the centred native crop CLIP saw for `rows` (as fractions of each image, see
    core.geometry), from the sizes the store records; None for a store made with `resize`."""
    if store.pixels.clip_input != "native_crop":
        return None
    size = int(store.pixels.clip_size)
    width = np.maximum(store.rows("width")[rows], 1)  # rows that failed to decode carry no size; they are dropped
    height = np.maximum(store.rows("height")[rows], 1)
    return native_crop_box(width, height, size, *centre_crop_origin(width, height, size))


class ShardImages:
    """Random access to the images inside a store's WebDataset tars (member offsets indexed once per tar).

    Pixels go through the phase-1 pipeline rebuilt from the store's provenance (resize, JPEG and size
    protocols), so the image matches the maps computed from it.
    """

    def __init__(self, store: FeatureStore) -> None:
        self.shard_dir, self.table = Path(store.dataset.shards), store.shard_table
        missing = [t["name"] for t in self.table if not (self.shard_dir / t["name"]).is_file()]
        if missing:
            raise FileNotFoundError(f"feature store {store.path}: images=True reads the images from {self.shard_dir}, "
                                    f"which lacks {len(missing)} of its tars (e.g. {missing[0]})")
        self.preprocess = preprocessor_from_provenance(store.pixels, store.dataset.stats)
        self._firsts = [int(s["first_row"]) for s in self.table]
        self._index: dict[int, dict[str, tuple[int, int]]] = {}

    def _members(self, shard: int) -> dict[str, tuple[int, int]]:
        if shard not in self._index:
            path = self.shard_dir / self.table[shard]["name"]
            with tarfile.open(path) as tar:
                self._index[shard] = {m.name.split(".", 1)[0]: (m.offset_data, m.size) for m in tar.getmembers()
                                      if m.isfile() and not m.name.endswith((".json", ".cls", ".txt"))}
        return self._index[shard]

    def _bytes(self, row: int, key: str) -> bytes:
        shard = bisect.bisect_right(self._firsts, row) - 1
        members = self._members(shard)
        if key not in members:
            raise KeyError(f"shard {self.shard_dir / self.table[shard]['name']}: no image for key {key!r} (row {row})")
        offset, size = members[key]
        with (self.shard_dir / self.table[shard]["name"]).open("rb") as f:
            f.seek(offset)
            return f.read(size)

    def read(self, row: int, key: str, label: int, generator: str) -> torch.Tensor:
        """(3, R, R) float32 in [-1, 1]: the row's image as phase 1 saw it."""
        return self.preprocess(self._bytes(row, key), label, generator)

    def read_native_crop(self, row: int, key: str, label: int, generator: str,
                         position: tuple[float, float] | None) -> tuple[torch.Tensor, np.ndarray]:
        """((3, S, S) float32 in [-1, 1], its box (4,)): the row's native-resolution crop for CLIP, centred as
        phase 1 took it (`position` None), or at a drawn position (training; see ImagePreprocessor.native_crop)."""
        prepared = self.preprocess.prepared(self._bytes(row, key), label, generator)
        crop, box = self.preprocess.native_crop(prepared, position)
        return crop.float() / 127.5 - 1, box


class CentreClipBoxes:
    """Adds `clip_box` (B, 4) to a batch of a native_crop store: the centred window CLIP's cached maps were computed
    on, which the detector crops the guidance maps to (frozen CLIP cannot be cropped again, so no random crop)."""

    def __init__(self, split: SplitRows) -> None:
        self.boxes = torch.from_numpy(np.concatenate([centre_clip_boxes(split.store(k), part.rows)
                                                      for k, part in enumerate(split.parts)]))

    def __call__(self, batch: dict[str, torch.Tensor], positions: np.ndarray) -> None:
        batch["clip_box"] = self.boxes[torch.from_numpy(positions)].to(batch["label"].device)


class PairedImages:
    """Adds `image` to a batch: decoded (threads), and in training flipped/cropped with every spatial map.

    Under `clip_input: native_crop` the image is LaRE²'s native-resolution crop instead, at a random position
    in training and centred otherwise, with its window as `clip_box` (the detector crops the guidance maps
    to it); the maps themselves stay whole."""

    def __init__(self, split: SplitRows, readers: list[ShardImages], generator_names: list[str], augment: bool,
                 crop_scale: tuple[float, float], threads: int) -> None:
        self.split, self.generator_names, self.augment, self.crop_scale = split, generator_names, augment, crop_scale
        self.readers = readers
        self.native = self.readers[0].preprocess.clip_input == "native_crop"  # equal in every store (checked)
        self.keys = np.concatenate([p.keys for p in split.parts])
        self.pool = ThreadPoolExecutor(max_workers=threads) if threads > 0 else None

    def _image(self, position: int,
               window: tuple[float, float] | None) -> torch.Tensor | tuple[torch.Tensor, np.ndarray]:
        meta = {name: int(values[position]) for name, values in self.split.metadata.items()}
        reader, args = self.readers[meta["store"]], (meta["row"], str(self.keys[position]), meta["label"],
                                                     self.generator_names[meta["generator"]])
        return reader.read_native_crop(*args, window) if self.native else reader.read(*args)

    def __call__(self, batch: dict[str, torch.Tensor], positions: np.ndarray) -> None:
        # Crop positions are drawn here, in order, from the run's seeded generator (not in the decoding threads).
        windows = ([tuple(draw) for draw in torch.rand(len(positions), 2).tolist()]
                   if self.native and self.augment else [None] * len(positions))
        rows = positions.tolist()
        images = list(self.pool.map(self._image, rows, windows) if self.pool else map(self._image, rows, windows))
        if self.native:
            batch["image"] = torch.stack([crop for crop, _ in images])
            batch["clip_box"] = torch.from_numpy(np.stack([box for _, box in images])).to(batch["label"].device)
            return
        if self.augment:
            for i, box in enumerate(sample_flip_crop(self.crop_scale) for _ in images):
                images[i] = apply_flip_crop(images[i], box)
                for name in self.split.features:
                    if batch[name].ndim == 4:
                        batch[name][i] = apply_flip_crop(batch[name][i], box)
        batch["image"] = torch.stack(images)


class FeatureCacheDataModule(pl.LightningDataModule):
    """Train/val/test rows from feature stores: resident in RAM or on the device when they fit, else block reads.

    Rows whose phase-1 `error` is set are dropped (and counted). `generators` keeps only rows of those
    generator names (in every split). With `val_fraction` and no `val` stores, a seeded permutation of
    the train rows gives the validation split. `images=True` pairs each row with its image from the
    store's shard directory (`store.dataset.shards`) and, for training, applies one random flip +
    resized crop (`crop_scale` = area fraction range) identically to the image and every spatial map.
    Stores made with `clip_input: native_crop` give CLIP's window instead: batches carry `clip_box` (centred;
    with `images=True` in training a random native-resolution window, which is then the `image`), and the
    detector crops the guidance maps to it (docs/detectors.md).

    Reading (`datamodules/row_batches.py`): `in_memory` true loads the split once into RAM (if it takes at
    most RAM_SHARE of the available RAM, else reads from disk), `device` into accelerator memory (if it fits
    DEVICE_SHARE of the free memory, else as `true`), false reads from disk. Training order: a seeded
    per-epoch permutation of blocks of `block_rows` consecutive rows (resident data: single rows), dealt into
    windows of `shuffle_blocks` blocks so that each window holds the split's label mix, then a permutation
    within each window; a store sorted by label gives batches whose fake fraction varies as a full shuffle's
    does (README: the shuffle's measured quality). No worker processes: `num_workers` is
    the number of threads decoding images (`images=True` only).

    Args:
        features: store arrays each batch carries (guidance maps, clip_layer3, clip_pooled).
        train: feature stores of the training split.
        val: feature stores of the validation split (or use val_fraction).
        test: feature stores scored by `test`, e.g. one per test generator.
        generators: keep only rows of these generator names, in every split.
        batch_size: rows per batch.
        num_workers: threads decoding images (`images=True` only; feature rows need no workers).
        in_memory: true: load the selected rows into RAM when they fit; `device`: into accelerator memory;
            false: read blocks from disk.
        images: pair each row with its image from the store's shards (needed when CLIP is fine-tuned).
        val_fraction: share of the training rows held out for validation (seeded by `seed`).
        seed: seed of the validation split.
        crop_scale: area-fraction range of the random resized crop applied with `images`.
        block_rows: consecutive rows read per block when reading from disk (the unit of the shuffle); default
            (None): the stores' inner chunk rows (`SplitRows.block_rows`: 25 for 500-row tars, 32 for 512 or
            1024; 32 for stores written with one-row chunks), so a block reads whole chunks once (each chunk's
            crc32c covers all of it).
        shuffle_blocks: blocks per shuffle window (each batch mixes rows of about this many blocks; the blocks
            are dealt into windows by label, so every window holds the split's label mix).
        allow_shared_images: accept train/val/test splits that share an image (same content hash).
        verify_checksums: check every store file's digest at setup (presence and size are always checked). None:
                only for format-2 stores, whose chunks carry no checksum (every read of a format-3 store checks its
                chunks' crc32c); false skips it for them too.
    """

    def __init__(self, features: list[str], train: list[str] = [], val: list[str] = [],  # noqa: B006
                 test: list[str] = [], generators: list[str] | None = None, batch_size: int = 48,  # noqa: B006
                 num_workers: int = 2, in_memory: bool | Literal["device"] = True, images: bool = False,
                 val_fraction: float = 0.0, seed: int = 0, crop_scale: tuple[float, float] = (0.5, 1.0),
                 block_rows: int | None = None, shuffle_blocks: int = 32, allow_shared_images: bool = False,
                 verify_checksums: bool | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not features:
            raise ValueError("FeatureCacheDataModule: features must name at least one array (e.g. ['deu'])")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"FeatureCacheDataModule: val_fraction must be in [0, 1), got {val_fraction}")
        if min(batch_size, block_rows or 1, shuffle_blocks) < 1:
            raise ValueError(f"FeatureCacheDataModule: batch_size, block_rows and shuffle_blocks must be >= 1, got "
                             f"{batch_size}, {block_rows}, {shuffle_blocks}")
        if images and in_memory == "device":
            raise ValueError("FeatureCacheDataModule: images=True decodes on the host; use in_memory true or false")
        self.features = list(features)
        self.stores = {"train": list(train), "val": list(val), "test": list(test)}
        self.generator_names: list[str] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._opened: dict[str, FeatureStore] = {}  # every store of the run, opened once (`opened_stores`)
        self._images: dict[str, ShardImages] = {}
        self.parts: dict[str, list[Rows]] = {}  # selected rows per split (cheap: metadata only)
        self.sources: dict[str, ResidentRows | BlockRows] = {}  # loaded splits

    def setup(self, stage: str | None = None) -> None:
        """Select rows for every split, but load only the splits this stage reads (test needs no train RAM)."""
        if not self.parts:
            if self.stores["val"] and self.hparams.val_fraction > 0:
                raise ValueError("FeatureCacheDataModule: give either val stores or val_fraction, not both")
            opened = self.opened_stores()
            self.generator_names = sorted({name for store in opened.values() for name in store.generator_names})
            self._check(opened)
            self.parts = {split: [self._rows(opened[p], index) for index, p in enumerate(self.stores[split])]
                          for split in ("train", "val", "test")}
            if self.hparams.val_fraction > 0:
                self.parts["train"], self.parts["val"] = self._split(self.parts["train"])
                self.stores["val"] = self.stores["train"]
            if not self.hparams.allow_shared_images:
                self._refuse_shared_images()
            for split, parts in self.parts.items():
                if self.stores[split] and not sum(len(p.rows) for p in parts):
                    raise ValueError(f"FeatureCacheDataModule: the {split} split has no rows after filtering "
                                     f"(generators={self.hparams.generators}, phase-1 errors, unlabelled rows; "
                                     f"stores {self.stores[split]})")
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage, ("train", "val", "test"))
        for split in wanted:
            if self.stores[split] and split not in self.sources:
                self.sources[split] = self._source(split)

    def opened_stores(self) -> dict[str, FeatureStore]:
        """Every store of the run by path, opened once per run (setup, the CLI's links, the checkpoint check and
        the protocol report all use these), each checked to hold every requested feature. No map module is
        imported: shapes and kinds come from the stores."""
        if not self._opened:
            paths = [p for split in ("train", "val", "test") for p in self.stores[split]]
            opened = {path: FeatureStore.open(path) for path in dict.fromkeys(paths)}
            for path, store in opened.items():  # before anything reads a shape: a typo is named as a typo
                unknown = [name for name in self.features if name not in store.feature_names]
                if unknown:
                    close = {name: difflib.get_close_matches(name, store.feature_names, 1, 0.8) for name in unknown}
                    hints = [f"{name!r} (did you mean {close[name][0]!r}?)" if close[name] else repr(name)
                             for name in unknown]
                    raise ValueError(f"data.init_args.features: {', '.join(hints)} not in feature store {path}; "
                                     f"choose from {store.feature_names}")
            self._opened = opened
        return self._opened

    @property
    def stored_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-row stored shape of each requested feature (first store; setup checks that all stores agree): what
        the CLI derives the detector's CLIP dimensions from (`cli/lightning_cli.py`, link_arguments)."""
        first = next(iter(self.opened_stores().values()), None)
        return {} if first is None else {name: first.feature_info(name).shape for name in self.features
                                         if name in first.feature_names}

    @property
    def guidance_channels(self) -> dict[str, int]:
        """Channels of each requested feature the stores record as a guidance map (kind `guidance`): what the CLI
        hands the detector (`model.init_args.guidance_channels`), so phase 2 needs no map module to know them."""
        first = next(iter(self.opened_stores().values()), None)
        return {} if first is None else {name: first.feature_info(name).shape[0] for name in self.features
                                         if name in first.feature_names and first.feature_info(name).kind == "guidance"}

    @property
    def clip_pooled_shape(self) -> tuple[int, ...]:
        """Stored shape of clip_pooled; no such attribute when it is not requested, so the CLI's link to a
        detector's `pooled_dim` is skipped (a detector without pooled vectors never gets the argument)."""
        if "clip_pooled" not in self.features:
            raise AttributeError("clip_pooled_shape: clip_pooled is not among the requested features")
        return self.stored_shapes["clip_pooled"]

    def feature_provenance(self, path: str | None = None) -> FeatureProvenance | None:
        """What a checkpoint needs to recompute its features from raw images: a store's data and pixel provenance,
        and each requested feature's stored form and extractor settings. Default: the first train store (what
        `fit` records in the checkpoint); `test` compares it with each test store's."""
        path = path or (self.stores["train"][0] if self.stores["train"] else None)
        if path is None:
            return None
        return self.opened_stores()[path].feature_provenance(self.features)

    def _check(self, opened: dict[str, FeatureStore]) -> None:
        """Every store (each holds every requested feature: `opened_stores`) has them computed in full, undamaged (presence and size of its files,
        checksums with `verify_checksums`), with the same settings and stored form; filter names are known."""
        first_path, first = next(iter(opened.items()))
        for path, store in opened.items():
            differences = first.feature_provenance(self.features).differences(store.feature_provenance(self.features))
            if differences:
                raise ValueError(f"feature stores {first_path} and {path} were computed with different settings "
                                 f"({', '.join(differences)}); phase 2 never mixes them")
        for path, store in opened.items():
            for group in sorted({store.group_of(name) for name in self.features}):
                todo = len(store.shard_table) - len(store.done_tars(group))
                if todo:
                    raise ValueError(f"feature store {path}: {todo} of {len(store.shard_table)} tars of group {group} "
                                     "not computed yet (finish it with `python -m cli precompute`)")
            # A format-2 store's chunks carry no checksum: by default its files' sha256 are checked here instead.
            checksums = self.hparams.verify_checksums
            damage = store.verify(checksums=store.format < CHECKSUMMED_FORMAT if checksums is None else checksums)
            if damage:
                shown = "; ".join(str(d) for d in damage[:3]) + (f" and {len(damage) - 3} more" if len(damage) > 3 else "")
                raise ValueError(f"feature store {path}: {len(damage)} damaged files ({shown}); "
                                 f"`python -m cli verify {path}` lists them, a precompute rerun recomputes them")
            if self.hparams.images:
                self._images[path] = ShardImages(store)  # fail at setup, not mid-epoch, if images cannot be paired
        self.shapes = {name: first.feature_info(name).shape for name in self.features}
        unknown = sorted(set(self.hparams.generators or []) - set(self.generator_names))
        if unknown:
            raise ValueError(f"FeatureCacheDataModule: generators {unknown} are in no store "
                             f"(known: {self.generator_names})")

    def _rows(self, store: FeatureStore, index: int) -> Rows:
        """The store's usable rows: no phase-1 error, labelled, generator in the filter; codes remapped to the union.

        Rows with non-finite values in a requested feature are refused (training on them gives NaN losses)."""
        groups = sorted({store.group_of(name) for name in self.features})
        non_finite = np.logical_or.reduce([store.flags(g)[:, FLAG_COLUMNS.index("non_finite")] > 0 for g in groups])
        if non_finite.any():
            keys = store.rows("key")[np.flatnonzero(non_finite)[:3]].tolist()
            raise ValueError(f"feature store {store.path}: {int(non_finite.sum())} rows have NaN/inf values in groups "
                             f"{groups} (e.g. keys {keys}); recompute them or select other stores")
        remap = np.array([self.generator_names.index(n) for n in store.generator_names], dtype=np.int64)
        codes, labels = remap[store.rows("generator")], store.rows("label")
        keep = np.logical_and.reduce([store.errors(g) == "" for g in groups])
        failed = int((~keep).sum())
        if failed:
            rank_zero_info(f"feature store {store.path}: skipping {failed} rows whose images failed in phase 1")
        labelled = labels >= 0
        if (~labelled & keep).any():
            rank_zero_info(f"feature store {store.path}: skipping {int((~labelled & keep).sum())} unlabelled rows "
                           "(score them with `python -m cli predict`)")
        keep &= labelled
        if self.hparams.generators is not None:
            wanted = [self.generator_names.index(n) for n in self.hparams.generators]
            keep &= np.isin(codes, wanted)
        rows = np.flatnonzero(keep)
        return Rows(index, rows, labels[rows].astype(np.int64), codes[rows], store.rows("key")[rows],
                    store.rows("sha256")[rows])

    def _refuse_shared_images(self) -> None:
        """Train, val and test must not share an image (same sha256), unless `allow_shared_images`."""
        hashes = {split: np.unique(np.concatenate([p.sha256 for p in parts] or [np.zeros(0, str)]))
                  for split, parts in self.parts.items()}
        keys = {split: dict(zip((h for p in parts for h in p.sha256), (k for p in parts for k in p.keys)))
                for split, parts in self.parts.items()}
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            shared = np.intersect1d(hashes[a], hashes[b])
            if len(shared):
                shown = ", ".join(f"{keys[a][h]} ({a}) = {keys[b][h]} ({b})" for h in shared[:3])
                raise ValueError(f"FeatureCacheDataModule: the {a} and {b} splits share {len(shared)} images (same "
                                 f"sha256), e.g. {shown}; remove the duplicates or set allow_shared_images: true")

    def _split(self, parts: list[Rows]) -> tuple[list[Rows], list[Rows]]:
        """Seeded split of the train rows into (train, val) parts."""
        total = sum(len(p.rows) for p in parts)
        is_val = np.zeros(total, dtype=bool)
        is_val[np.random.default_rng(self.hparams.seed).permutation(total)[:round(total * self.hparams.val_fraction)]] = True
        bounds = np.cumsum([0] + [len(p.rows) for p in parts])
        masks = [is_val[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        return [p.subset(~m) for p, m in zip(parts, masks)], [p.subset(m) for p, m in zip(parts, masks)]

    def _device(self) -> torch.device:
        return self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")

    def _source(self, split: str) -> ResidentRows | BlockRows:
        """Resident in the memory `in_memory` asks for when the split fits there, else read block-wise from disk."""
        rows = SplitRows(self.stores[split], self.parts[split], self.features, self.opened_stores())
        needed = sum(len(p.rows) * self._row_bytes(self.stores[split][p.store]) for p in self.parts[split])
        device = self._device()
        if self.hparams.in_memory == "device" and device.type != "cpu":
            free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
            if needed <= DEVICE_SHARE * free:
                return ResidentRows(rows, device)
            rank_zero_info(f"FeatureCacheDataModule: {split} needs {needed / 2**30:.1f} GiB, more than "
                           f"{DEVICE_SHARE:.0%} of the {free / 2**30:.1f} GiB free on {device}; loading into RAM")
        if self.hparams.in_memory:
            available = available_ram()
            if needed <= RAM_SHARE * available:
                return ResidentRows(rows, torch.device("cpu"))
            rank_zero_info(f"FeatureCacheDataModule: {split} needs {needed / 2**30:.1f} GiB, more than "
                           f"{RAM_SHARE:.0%} of the {available / 2**30:.1f} GiB available; reading from disk instead")
        return BlockRows(rows, pin=device.type == "cuda")

    def _row_bytes(self, path: str) -> int:
        layout = SplitRows.layout(self.opened_stores()[path], self.features)
        return sum(math.prod(shape) * dtype.itemsize for shape, dtype in layout.values())

    def batches(self, split: str, epoch: Callable[[], int] | None = None) -> Batches | list:
        """The split's batches (training order for "train"); `epoch` overrides the Trainer's current epoch, for a
        caller that drives several Trainers from one read (workflows/grid_together.py)."""
        if split not in self.sources:
            return []
        source, trainer, shuffle = self.sources[split], self.trainer, split == "train"
        resident = isinstance(source, ResidentRows)
        block_rows = 1 if resident else self.hparams.block_rows or source.split.block_rows()
        step = math.lcm(block_rows, self.hparams.batch_size)  # windows hold whole blocks and whole batches
        settings = EpochSettings(
            shuffle=shuffle, block_rows=block_rows, seed=self.hparams.seed,
            window_rows=math.ceil(block_rows * self.hparams.shuffle_blocks / step) * step,
            epoch=epoch or (lambda: trainer.current_epoch if trainer is not None else 0),
            rank=lambda: (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1))
        decorate: PairedImages | CentreClipBoxes | None = None
        if self.hparams.images:
            decorate = PairedImages(source.split, [self._images[path] for path in source.split.paths],
                                    self.generator_names, augment=split == "train", crop_scale=self.hparams.crop_scale,
                                    threads=self.hparams.num_workers)
        elif source.split.store(0).pixels.clip_input == "native_crop":
            decorate = CentreClipBoxes(source.split)
        return Batches(source, self.hparams.batch_size, settings, self._device(), decorate=decorate)

    def train_dataloader(self) -> Batches | list:
        return self.batches("train")

    def val_dataloader(self) -> Batches | list:
        return self.batches("val")

    def test_dataloader(self) -> Batches | list:
        return self.batches("test")


def available_ram(meminfo: Path = Path("/proc/meminfo")) -> int:
    """Bytes of RAM a load can take: the kernel's MemAvailable (free pages plus the reclaimable page cache). Free
    pages alone are near zero on a machine whose page cache holds the stores phase 1 just wrote, which made
    `in_memory` fall back to disk reads with plenty of RAM. Elsewhere (no /proc): the free pages."""
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
