"""Synthetic shard directories plus a fake extractor and shard datamodule shaped like the contracts.

They stand in for ImageShardDataModule and FeatureExtractor so the writer can be tested through a
real `Trainer.predict` (1 process or DDP) with real Zarr on disk. Features are exact functions of the
row, so any lost, duplicated or misplaced row shows up as a value mismatch.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import signal
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from feature_cache.codecs import encode
from feature_cache.provenance import (DatasetProvenance, ExtractorProvenance, FeatureSpec, PixelProvenance,
                                      StoreProvenance)
from feature_cache.store import FeatureStore, store_lock
from lightning_modules.maps import feature_spec

GENERATORS = ["imagenet_ai_0419_sdv4", "imagenet_glide", "nature"]
# The pixel-pipeline part of ImageShardDataModule.provenance() for a plain resize.
RAW_PROTOCOL = {"protocol": "raw", "jpeg_quality": None, "seed": None, "size_filter": False}


def marker_image(row: int, size: int) -> np.ndarray:
    """RGB uint8 image, black with a white square whose place depends on the row (for alignment tests)."""
    image = np.zeros((size, size, 3), dtype=np.uint8)
    y, x = (row * 3) % (size // 2), (row * 5) % (size // 2)
    image[y:y + size // 4, x:x + size // 4] = 255
    return image


def make_shard_dir(root: Path, num_rows: int, shard_size: int, image_size: int = 32,
                   rejected: tuple[tuple[str, str], ...] = (("bad/broken.png", "cannot identify image file"),),
                   generators: list[str] = GENERATORS, pixel_offset: int = 0,
                   images: list[np.ndarray] | None = None) -> Path:
    """A shard directory as `python -m cli shards` writes it (tars of marker PNGs, or of `images` (H, W, 3)
    uint8 of any sizes; `pixel_offset` shifts the markers, i.e. a re-conversion of other images with the same
    count)."""
    root.mkdir(parents=True, exist_ok=True)
    num_shards = -(-num_rows // shard_size)
    shard_names = [f"shard-{k:06d}.tar" for k in range(num_shards)]
    pixels = images or [marker_image(row + pixel_offset, image_size) for row in range(num_rows)]
    pngs = []
    for row in range(num_rows):
        png = io.BytesIO()
        Image.fromarray(pixels[row]).save(png, format="PNG")
        pngs.append(png.getvalue())
    rows = [{"key": f"img{row:05d}", "row": row, "label": row % 2, "generator": generators[row % len(generators)],
             "path": f"src/img{row:05d}.png", "shard": shard_names[row // shard_size], "format": "png",
             "jpeg_quality": "", "width": pixels[row].shape[1], "height": pixels[row].shape[0], "class_name": "",
             "sha256": hashlib.sha256(pngs[row]).hexdigest()}
            for row in range(num_rows)]
    with (root / "manifest.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with (root / "rejected.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "reason"])
        writer.writerows(rejected)
    table = [{"name": name, "first_row": k * shard_size, "num_samples": min(shard_size, num_rows - k * shard_size)}
             for k, name in enumerate(shard_names)]
    (root / "shards.json").write_text(json.dumps({"shard_size": shard_size, "num_samples": num_rows,
                                                  "generators": sorted(set(generators)), "layout": "fake",
                                                  "split": "train", "shards": table}))
    for entry in table:
        with tarfile.open(root / entry["name"], "w") as tar:
            for row in range(entry["first_row"], entry["first_row"] + entry["num_samples"]):
                meta = json.dumps({k: rows[row][k] for k in ("row", "label", "generator", "path", "sha256")}).encode()
                for suffix, payload in (("png", pngs[row]), ("json", meta)):
                    info = tarfile.TarInfo(f"{rows[row]['key']}.{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return root


class _RowsOfTars(IterableDataset):
    """Yields the rows of the given tars, each tar whole to one worker (as the real WebDataset split)."""

    def __init__(self, table: list[dict[str, Any]], shard_indices: list[int], manifest: list[dict[str, str]],
                 bad_rows: set[int], drop_rows: set[int]) -> None:
        self.table, self.shard_indices, self.manifest = table, shard_indices, manifest
        self.bad_rows, self.drop_rows = bad_rows, drop_rows

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        mine = self.shard_indices if info is None else self.shard_indices[info.id::info.num_workers]
        for index in mine:
            first = self.table[index]["first_row"]
            for row in range(first, first + self.table[index]["num_samples"]):
                if row in self.drop_rows:
                    continue
                record = self.manifest[row]
                yield {"key": record["key"], "row": row, "label": int(record["label"]),
                       "generator": GENERATORS.index(record["generator"]), "shard_index": index,
                       "error": "decode failed: truncated file" if row in self.bad_rows else ""}


class FakeShardDataModule(pl.LightningDataModule):
    """ImageShardDataModule's interface (provenance, shard_table, exclude_shards) without images."""

    def __init__(self, shard_dir: str, resolution: int = 32, batch_size: int = 3, num_workers: int = 0,
                 bad_rows: tuple[int, ...] = (), drop_rows: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.shard_dir = Path(shard_dir)
        self.resolution, self.batch_size, self.num_workers = resolution, batch_size, num_workers
        self.bad_rows, self.drop_rows = set(bad_rows), set(drop_rows)
        info = json.loads((self.shard_dir / "shards.json").read_text())
        self._table = info["shards"]
        self.generator_names = info["generators"]
        self._excluded: set[str] = set()

    def provenance(self) -> dict[str, Any]:
        return {"resolution": self.resolution, "shards": str(self.shard_dir), "layout": "fake", "split": "train",
                **RAW_PROTOCOL}

    def shard_table(self) -> list[dict[str, Any]]:
        return self._table

    def exclude_shards(self, names: set[str]) -> None:
        self._excluded = set(names)

    def predict_dataloader(self) -> DataLoader:
        todo = [k for k, entry in enumerate(self._table) if entry["name"] not in self._excluded]
        mine = todo[self.trainer.global_rank::self.trainer.world_size]
        with (self.shard_dir / "manifest.csv").open(newline="") as f:
            manifest = list(csv.DictReader(f))
        dataset = _RowsOfTars(self._table, mine, manifest, self.bad_rows, self.drop_rows)
        return DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers)


def expected_features(rows: np.ndarray, resolution: int = 32) -> dict[str, np.ndarray]:
    """The fake extractor's outputs for these rows (float32)."""
    h = resolution // 8
    r = rows.astype(np.float32)
    grid = np.arange(4 * h * h, dtype=np.float32).reshape(4, h, h)
    return {"lare": r[:, None, None, None] + grid / 8, "deu": -r[:, None, None, None] / 4 + grid,
            "clip_pooled": r[:, None] * 2 + np.arange(8, dtype=np.float32)}


FAKE_OUTPUTS = ("lare", "deu", "clip_pooled")
TINY_POOLED = (1e-5 * np.arange(1, 9)).astype(np.float32)  # float16's smallest normal is 2^-14 ≈ 6.1e-5


class FakeExtractor(pl.LightningModule):
    """FeatureExtractor's interface; optionally raises, or SIGKILLs its own process, at a given row.

    With `rows_log`, each rank appends the rows it computed to `rows_log/rank<k>.txt` (exactly-once checks);
    `nan_rows` get a NaN in `lare`, `huge_rows` a `clip_pooled` value beyond float16's range, `tiny_rows` a
    `clip_pooled` of `TINY_POOLED` (values float16 stores only as subnormals, not negligible in their row).
    """

    def __init__(self, timestep: int = 200, deu_mode: str = "closed_form", outputs: tuple[str, ...] = FAKE_OUTPUTS,
                 fail_at_row: int | None = None, kill_at_row: int | None = None, rows_log: str | None = None,
                 nan_rows: tuple[int, ...] = (), huge_rows: tuple[int, ...] = (),
                 tiny_rows: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.timestep, self.deu_mode, self.outputs = timestep, deu_mode, list(outputs)
        self.fail_at_row, self.kill_at_row, self.rows_log = fail_at_row, kill_at_row, rows_log
        self.nan_rows, self.huge_rows, self.tiny_rows = set(nan_rows), set(huge_rows), set(tiny_rows)
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # strategies expect a module with parameters

    def provenance(self) -> dict[str, Any]:
        settings = {"lare": {}, "deu": {"deu_mode": self.deu_mode}, "clip_pooled": {}}
        return {"common": {"extractor": "fake", "timestep": self.timestep, "unet_hash": "ab12"},
                "maps": {name: settings[name] for name in self.outputs}}

    def set_outputs(self, names: list[str]) -> None:
        self.outputs = list(names)

    def feature_specs(self, resolution: int, storage: dict[str, tuple[str, str]]) -> dict[str, FeatureSpec]:
        h = resolution // 8
        shapes = {"lare": (4, h, h), "deu": (4, h, h), "clip_pooled": (8,)}
        return {name: feature_spec(name, shapes[name], storage) for name in self.outputs}

    def predict_step(self, batch: dict[str, Any]) -> dict[str, Any]:
        rows = batch["row"]
        if self.kill_at_row is not None and self.kill_at_row in rows.tolist():
            os.kill(os.getpid(), signal.SIGKILL)
        if self.fail_at_row is not None and self.fail_at_row in rows.tolist():
            raise RuntimeError(f"fake failure at row {self.fail_at_row}")
        if self.rows_log is not None:
            with (Path(self.rows_log) / f"rank{self.global_rank}.txt").open("a") as f:
                f.write("".join(f"{row}\n" for row in rows.tolist()))
        features = {k: torch.from_numpy(v) for k, v in expected_features(rows.numpy()).items() if k in self.outputs}
        for position, row in enumerate(rows.tolist()):
            if row in self.nan_rows and "lare" in features:
                features["lare"][position, 0, 0, 0] = float("nan")
            if row in self.huge_rows and "clip_pooled" in features:
                features["clip_pooled"][position, 0] = 1e6
            if row in self.tiny_rows and "clip_pooled" in features:
                features["clip_pooled"][position] = torch.from_numpy(TINY_POOLED)
        return {**{k: batch[k] for k in ("key", "row", "shard_index", "label", "generator", "error")}, **features}


def run_predict(store: Path, shard_dir: Path, devices: int = 1, drop_rows: tuple[int, ...] = (),
                writer_kwargs: dict[str, Any] | None = None, **module_kwargs: Any):  # -> ZarrFeatureWriter
    """One `Trainer.predict` over the fake shards into `store` (the same code for 1 process and DDP)."""
    from feature_cache.writer import ZarrFeatureWriter

    strategy = "ddp" if devices > 1 else "auto"
    writer = ZarrFeatureWriter(str(store), **(writer_kwargs or {}))
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[writer])
    datamodule = FakeShardDataModule(str(shard_dir), num_workers=1 if devices > 1 else 0, bad_rows=(5,),
                                     drop_rows=drop_rows)
    trainer.predict(FakeExtractor(**module_kwargs), datamodule=datamodule, return_predictions=False)
    return writer


def write_store(path: Path, values: Callable[[np.ndarray], dict[str, np.ndarray]], specs: dict[str, FeatureSpec],
                generator_names: list[str], num_rows: int = 10, shard_size: int = 4, keys: list[str] | None = None,
                labels: list[int] | None = None, error_rows: tuple[int, ...] = (), done: bool = True,
                timestep: int = 200, shards: str = "no_shards", pixels: dict | None = None,
                identity: str = "", generators: list[int] | None = None,
                row_columns: dict[str, list] | None = None, layout: str = "fake",
                extractor: ExtractorProvenance | None = None, format_version: int | None = None) -> FeatureStore:
    """A store (the current format, or `format_version`) through the store's own API: features `values(rows)` (float32, encoded to each spec's
    dtype), generator code = row % len(names) (or `generators`), label = row % 2 (or `labels`), sha256 from
    (`identity`, row); `row_columns` replaces per-row metadata (format, jpeg_quality, width, height)."""
    tars = [{"name": f"shard-{k:06d}.tar", "first_row": k * shard_size,
             "num_samples": min(shard_size, num_rows - k * shard_size)} for k in range(-(-num_rows // shard_size))]
    provenance = StoreProvenance(DatasetProvenance(str(path.parent / shards), layout, "train", "0" * 64, tars, {}),
                                 PixelProvenance.from_attrs(pixels or {"resolution": 32}))
    keys = keys or [f"k{r}" for r in range(num_rows)]
    rows = {"key": keys, "label": labels or [r % 2 for r in range(num_rows)],
            "generator": generators or [r % len(generator_names) for r in range(num_rows)], "format": ["png"] * num_rows,
            "jpeg_quality": [-1] * num_rows, "width": [32] * num_rows, "height": [32] * num_rows,
            "sha256": [hashlib.sha256(f"{identity}{r}".encode()).hexdigest() for r in range(num_rows)],
            "path": [f"{key}.png" for key in keys], **(row_columns or {})}
    with store_lock(path):
        store = FeatureStore.create(path, provenance=provenance, rows=rows, generator_names=generator_names,
                                    **({} if format_version is None else {"format_version": format_version}))
        group = store.add_group(specs, extractor or ExtractorProvenance({"timestep": timestep},
                                                                        {name: {} for name in specs}))
    for k, tar in enumerate(tars if done else tars[:-1]):
        index = np.arange(tar["first_row"], tar["first_row"] + tar["num_samples"])
        arrays, flags = {}, np.zeros((len(index), 2), dtype=np.int32)
        for name, raw in values(index).items():
            encoded = encode(specs[name].dtype, raw)
            arrays[name] = encoded.values
            if encoded.scale is not None:
                arrays[f"{name}__scale"] = encoded.scale
            flags[:, 0] += encoded.non_finite
        store.write_tar(group, k, arrays, ["bad file" if r in error_rows else "" for r in index], flags)
    return store
