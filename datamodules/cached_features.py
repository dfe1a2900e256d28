"""Phase 2 data: rows of one or more feature stores (and, for fine-tuning, their images) as batches.

Batch (docs/contracts.md): one float32 tensor per requested feature, `label` int64, `generator` int64
(codes into `generator_names`, the union over all stores), `row` int64 (row in its store), `store` int64
(index of that store in the split's list), and `image` (B, 3, R, R) in [-1, 1] when `images=True`.
"""

from __future__ import annotations

import bisect
import math
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from datamodules.image_shards import preprocessor_from_provenance
from feature_cache.paired_augment import apply_flip_crop, sample_flip_crop
from feature_cache.store import FeatureStore, config_differences

_RAM_SHARE = 0.5
PER_DATASET = ("shards", "layout", "split")  # provenance keys that differ between the stores of one run  # in_memory loads only if the selected rows take at most this share of available RAM


@dataclass
class _Rows:
    """The selected rows of one store, sorted, with their labels, remapped generator codes and keys."""

    store: int
    rows: np.ndarray
    labels: np.ndarray
    generators: np.ndarray
    keys: np.ndarray

    def subset(self, mask: np.ndarray) -> _Rows:
        return _Rows(self.store, self.rows[mask], self.labels[mask], self.generators[mask], self.keys[mask])


def contiguous_runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """Sorted rows as [start, stop) runs: one zarr call per run instead of one per row."""
    if len(rows) == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    return [(int(run[0]), int(run[-1]) + 1) for run in np.split(rows, breaks)]


class ShardImages:
    """Random access to the images inside a store's WebDataset tars (member offsets indexed once per tar).

    Pixels go through the phase-1 pipeline rebuilt from the store's provenance (resize, JPEG and size
    protocols), so the image matches the maps computed from it.
    """

    def __init__(self, store: FeatureStore) -> None:
        self.shard_dir, self.table = Path(store.provenance["shards"]), store.shard_table
        try:
            self.preprocess = preprocessor_from_provenance(store.provenance)
        except KeyError as missing:
            raise ValueError(f"feature store {store.path}: provenance has no {missing}, so images=True cannot rebuild "
                             "phase 1's pixel pipeline (stores written by `python -m cli precompute` have it)") from None
        self._firsts = [int(s["first_row"]) for s in self.table]
        self._index: dict[int, dict[str, tuple[int, int]]] = {}

    def _members(self, shard: int) -> dict[str, tuple[int, int]]:
        if shard not in self._index:
            path = self.shard_dir / self.table[shard]["name"]
            with tarfile.open(path) as tar:
                self._index[shard] = {m.name.split(".", 1)[0]: (m.offset_data, m.size) for m in tar.getmembers()
                                      if m.isfile() and not m.name.endswith((".json", ".cls", ".txt"))}
        return self._index[shard]

    def read(self, row: int, key: str, label: int, generator: str) -> torch.Tensor:
        """(3, R, R) float32 in [-1, 1]: the row's image as phase 1 saw it."""
        shard = bisect.bisect_right(self._firsts, row) - 1
        members = self._members(shard)
        if key not in members:
            raise KeyError(f"shard {self.shard_dir / self.table[shard]['name']}: no image for key {key!r} (row {row})")
        offset, size = members[key]
        with (self.shard_dir / self.table[shard]["name"]).open("rb") as f:
            f.seek(offset)
            return self.preprocess(f.read(size), key, label, generator)


class FeatureRows(Dataset):
    """Rows of several stores; `__getitems__` reads a whole batch, sorted, so lazy reads are run-wise."""

    def __init__(self, paths: list[str], parts: list[_Rows], shapes: dict[str, tuple[int, ...]],
                 generator_names: list[str], in_memory: bool, images: bool, augment: bool,
                 crop_scale: tuple[float, float]) -> None:
        self.paths, self.parts, self.shapes, self.features = paths, parts, shapes, list(shapes)
        self.generator_names = generator_names
        self.images, self.augment, self.crop_scale = images, augment, crop_scale
        self.part_of = np.concatenate([np.full(len(p.rows), k) for k, p in enumerate(parts)] or [np.zeros(0, int)])
        self.position = np.concatenate([np.arange(len(p.rows)) for p in parts] or [np.zeros(0, int)])
        self._opened: tuple[int, list[FeatureStore], list[ShardImages | None]] | None = None
        self.memory = [self._load(p) for p in parts] if in_memory else None

    def __len__(self) -> int:
        return len(self.part_of)

    def __getstate__(self) -> dict[str, Any]:
        """Spawned workers reopen the stores themselves instead of receiving open handles."""
        return {**self.__dict__, "_opened": None}

    def _stores(self) -> tuple[list[FeatureStore], list[ShardImages | None]]:
        """Stores opened in this process (the zarr sync API's event loop must not cross a fork)."""
        if self._opened is None or self._opened[0] != os.getpid():
            stores = [FeatureStore.open(path) for path in self.paths]
            images = [ShardImages(s) if self.images else None for s in stores]
            self._opened = (os.getpid(), stores, images)
        return self._opened[1], self._opened[2]

    def _load(self, part: _Rows) -> dict[str, np.ndarray]:
        """The part's rows of every feature in storage dtype, read one tar (whole Zarr shard) at a time."""
        store = self._stores()[0][part.store]
        out = {}
        for name in self.features:
            array = store.array(name)
            values = np.empty((len(part.rows), *array.shape[1:]), dtype=array.dtype)
            for start, stop in (store.shard_rows(k) for k in range(len(store.shard_table))):
                lo, hi = np.searchsorted(part.rows, [start, stop])
                if hi - lo == stop - start:
                    values[lo:hi] = array[start:stop]
                elif hi > lo:
                    values[lo:hi] = array[start:stop][part.rows[lo:hi] - start]
            out[name] = values
        return out

    def _read(self, k: int, positions: np.ndarray) -> dict[str, np.ndarray]:
        """Part k's features at `positions`, in that order: from RAM, or from disk by sorted contiguous runs."""
        if self.memory is not None:
            return {name: self.memory[k][name][positions] for name in self.features}
        order = np.argsort(positions, kind="stable")
        store, runs = self._stores()[0][self.parts[k].store], contiguous_runs(self.parts[k].rows[positions[order]])
        restore = np.argsort(order)
        return {name: np.concatenate([store.array(name)[a:b] for a, b in runs])[restore] for name in self.features}

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """The whole batch at once, written straight into float32 tensors (float16 is widened in the copy)."""
        indices = np.asarray(indices)
        parts, positions = self.part_of[indices], self.position[indices]
        batch = {name: torch.empty((len(indices), *self.shapes[name])) for name in self.features}
        for name in ("label", "generator", "row", "store"):
            batch[name] = torch.empty(len(indices), dtype=torch.int64)
        for k in np.unique(parts):
            slots = np.flatnonzero(parts == k)
            part, where = self.parts[k], positions[slots]
            columns = {**self._read(int(k), where), "label": part.labels[where],
                       "generator": part.generators[where], "row": part.rows[where],
                       "store": np.full(len(where), part.store)}
            contiguous = slots[-1] - slots[0] + 1 == len(slots)
            for name, values in columns.items():
                source = torch.from_numpy(values)
                if contiguous:
                    batch[name][slots[0]:slots[-1] + 1].copy_(source)
                else:
                    batch[name][torch.from_numpy(slots)] = source.to(batch[name].dtype)
        if self.images:
            self._add_images(batch, parts, positions)
        return batch

    def _add_images(self, batch: dict[str, torch.Tensor], parts: np.ndarray, positions: np.ndarray) -> None:
        """Decode each row's image; in training, crop/flip it and every spatial map with one shared box."""
        readers = self._stores()[1]
        images = []
        for i, (k, position) in enumerate(zip(parts.tolist(), positions.tolist())):
            part = self.parts[k]
            reader = readers[part.store]
            assert reader is not None
            image = reader.read(int(part.rows[position]), str(part.keys[position]), int(part.labels[position]),
                                self.generator_names[part.generators[position]])
            if self.augment:
                box = sample_flip_crop(self.crop_scale)
                image = apply_flip_crop(image, box)
                for name in self.features:
                    if batch[name].ndim == 4:
                        batch[name][i] = apply_flip_crop(batch[name][i], box)
            images.append(image)
        batch["image"] = torch.stack(images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([index]).items()}


def _passthrough(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`__getitems__` already returns a collated batch."""
    return batch


class FeatureCacheDataModule(pl.LightningDataModule):
    """Train/val/test rows from feature stores; RAM-resident when they fit, else sorted lazy reads.

    Rows whose phase-1 `error` is set are dropped (and counted). `generators` keeps only rows of those
    generator names (in every split). With `val_fraction` and no `val` stores, a seeded permutation of
    the train rows gives the validation split. `images=True` pairs each row with its image from the
    store's shard directory (`provenance["shards"]`) and, for training, applies one random flip +
    resized crop (`crop_scale` = area fraction range) identically to the image and every spatial map.

    Args:
        features: store arrays each batch carries (guidance maps, clip_layer3, clip_pooled).
        train: feature stores of the training split.
        val: feature stores of the validation split (or use val_fraction).
        test: feature stores scored by `test`, e.g. one per test generator.
        generators: keep only rows of these generator names, in every split.
        batch_size: rows per batch.
        num_workers: DataLoader worker processes.
        in_memory: load the selected rows into RAM when they take at most half of the free memory.
        images: pair each row with its image from the store's shards (needed when CLIP is fine-tuned).
        val_fraction: share of the training rows held out for validation (seeded by `seed`).
        seed: seed of the validation split.
        crop_scale: area-fraction range of the random resized crop applied with `images`.
    """

    def __init__(self, features: list[str], train: list[str] = [], val: list[str] = [],  # noqa: B006
                 test: list[str] = [], generators: list[str] | None = None, batch_size: int = 48,  # noqa: B006
                 num_workers: int = 2, in_memory: bool = True, images: bool = False, val_fraction: float = 0.0,
                 seed: int = 0, crop_scale: tuple[float, float] = (0.5, 1.0)) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not features:
            raise ValueError("FeatureCacheDataModule: features must name at least one array (e.g. ['deu'])")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"FeatureCacheDataModule: val_fraction must be in [0, 1), got {val_fraction}")
        self.features = list(features)
        self.stores = {"train": list(train), "val": list(val), "test": list(test)}
        self.generator_names: list[str] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.parts: dict[str, list[_Rows]] = {}  # selected rows per split (cheap: metadata only)
        self.datasets: dict[str, FeatureRows] = {}  # loaded splits (RAM-resident when in_memory)

    def setup(self, stage: str | None = None) -> None:
        """Select rows for every split, but load only the splits this stage reads (test needs no train RAM)."""
        if not self.parts:
            if self.stores["val"] and self.hparams.val_fraction > 0:
                raise ValueError("FeatureCacheDataModule: give either val stores or val_fraction, not both")
            paths = [p for split in ("train", "val", "test") for p in self.stores[split]]
            opened = {path: FeatureStore.open(path) for path in dict.fromkeys(paths)}
            self.generator_names = sorted({name for store in opened.values() for name in store.generator_names})
            self._check(opened)
            self.parts = {split: [self._rows(opened[p], index) for index, p in enumerate(self.stores[split])]
                          for split in ("train", "val", "test")}
            if self.hparams.val_fraction > 0:
                self.parts["train"], self.parts["val"] = self._split(self.parts["train"])
                self.stores["val"] = self.stores["train"]
            for split, parts in self.parts.items():
                if self.stores[split] and not sum(len(p.rows) for p in parts):
                    raise ValueError(f"FeatureCacheDataModule: the {split} split has no rows after filtering "
                                     f"(generators={self.hparams.generators}, phase-1 errors, unlabelled rows; "
                                     f"stores {self.stores[split]})")
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage, ("train", "val", "test"))
        for split in wanted:
            if self.stores[split] and split not in self.datasets:
                self.datasets[split] = self._dataset(split, self.parts[split])

    def feature_provenance(self) -> dict[str, Any] | None:
        """Provenance of the first train store: what a checkpoint needs to recompute features from raw images."""
        return FeatureStore.open(self.stores["train"][0]).provenance if self.stores["train"] else None

    def _check(self, opened: dict[str, FeatureStore]) -> None:
        """Every store has every requested feature with one shape, every tar done, known filter names, and the
        same extractor and pixel settings (only the data they were computed from may differ)."""
        first_path, first = next(iter(opened.items()))
        for path, store in opened.items():
            differences = config_differences({k: v for k, v in first.provenance.items() if k not in PER_DATASET},
                                             {k: v for k, v in store.provenance.items() if k not in PER_DATASET})
            if differences:
                raise ValueError(f"feature stores {first_path} and {path} were computed with different settings "
                                 f"({', '.join(differences)}); phase 2 never mixes them")
        for path, store in opened.items():
            missing = [f for f in self.features if f not in store.feature_shapes]
            if missing:
                raise ValueError(f"feature store {path}: no feature {missing} (it has {store.feature_names})")
            for name in self.features:
                if self.shapes.setdefault(name, store.feature_shapes[name]) != store.feature_shapes[name]:
                    raise ValueError(f"feature store {path}: {name} has shape {store.feature_shapes[name]}, other "
                                     f"stores {self.shapes[name]}")
            if self.hparams.images:
                ShardImages(store)  # fail at setup, not in a worker, if the images cannot be paired
            todo = len(store.shard_table) - len(store.done_shards())
            if todo:
                raise ValueError(f"feature store {path}: {todo} of {len(store.shard_table)} tars not computed yet "
                                 "(finish it with `python -m cli precompute`)")
        unknown = sorted(set(self.hparams.generators or []) - set(self.generator_names))
        if unknown:
            raise ValueError(f"FeatureCacheDataModule: generators {unknown} are in no store "
                             f"(known: {self.generator_names})")

    def _rows(self, store: FeatureStore, index: int) -> _Rows:
        """The store's usable rows: no phase-1 error, labelled, generator in the filter; codes remapped to the union."""
        remap = np.array([self.generator_names.index(n) for n in store.generator_names], dtype=np.int64)
        codes = remap[store.generators()]
        keep = np.array([not e for e in store.errors()], dtype=bool)
        failed = int((~keep).sum())
        if failed:
            rank_zero_info(f"feature store {store.path}: skipping {failed} rows whose images failed in phase 1")
        labelled = store.labels() >= 0
        if (~labelled & keep).any():
            rank_zero_info(f"feature store {store.path}: skipping {int((~labelled & keep).sum())} unlabelled rows "
                           "(score them with `python -m cli predict`)")
        keep &= labelled
        if self.hparams.generators is not None:
            wanted = [self.generator_names.index(n) for n in self.hparams.generators]
            keep &= np.isin(codes, wanted)
        rows = np.flatnonzero(keep)
        return _Rows(index, rows, store.labels()[rows].astype(np.int64), codes[rows], store.array("key")[:][rows])

    def _split(self, parts: list[_Rows]) -> tuple[list[_Rows], list[_Rows]]:
        """Seeded split of the train rows into (train, val) parts."""
        total = sum(len(p.rows) for p in parts)
        is_val = np.zeros(total, dtype=bool)
        is_val[np.random.default_rng(self.hparams.seed).permutation(total)[:round(total * self.hparams.val_fraction)]] = True
        bounds = np.cumsum([0] + [len(p.rows) for p in parts])
        masks = [is_val[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        return [p.subset(~m) for p, m in zip(parts, masks)], [p.subset(m) for p, m in zip(parts, masks)]

    def _dataset(self, split: str, parts: list[_Rows]) -> FeatureRows:
        in_memory = self.hparams.in_memory
        if in_memory:
            needed = sum(len(p.rows) * self._row_bytes(self.stores[split][p.store]) for p in parts)
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            if needed > _RAM_SHARE * available:
                rank_zero_info(f"FeatureCacheDataModule: {split} needs {needed / 2**30:.1f} GiB, more than "
                               f"{_RAM_SHARE:.0%} of the {available / 2**30:.1f} GiB free; reading from disk instead")
                in_memory = False
        return FeatureRows(self.stores[split], parts, self.shapes, self.generator_names, in_memory, self.hparams.images,
                           augment=split == "train", crop_scale=self.hparams.crop_scale)

    def _row_bytes(self, path: str) -> int:
        store = FeatureStore.open(path)
        itemsize = np.dtype(store.feature_dtype).itemsize
        return sum(math.prod(store.feature_shapes[name]) * itemsize for name in self.features)

    def _loader(self, split: str, shuffle: bool) -> DataLoader | list:
        if split not in self.datasets:
            return []
        workers = self.hparams.num_workers
        return DataLoader(self.datasets[split], batch_size=self.hparams.batch_size, shuffle=shuffle,
                          num_workers=workers, persistent_workers=workers > 0, collate_fn=_passthrough)

    def train_dataloader(self) -> DataLoader | list:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader | list:
        return self._loader("test", shuffle=False)
