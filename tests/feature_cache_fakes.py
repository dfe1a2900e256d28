"""Synthetic shard directories plus a fake extractor and shard datamodule shaped like the contracts.

They stand in for ImageShardDataModule and FeatureExtractor so the writer can be tested through a
real `Trainer.predict` (1 process or DDP) with real Zarr on disk. Features are exact functions of the
row, so any lost, duplicated or misplaced row shows up as a value mismatch.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

GENERATORS = ["imagenet_ai_0419_sdv4", "imagenet_glide", "nature"]
# The pixel-pipeline part of ImageShardDataModule.provenance() for a plain resize.
RAW_PROTOCOL = {"protocol": "raw", "jpeg_quality": None, "protocol_seed": None, "size_filter": False}


def marker_image(row: int, size: int) -> np.ndarray:
    """RGB uint8 image, black with a white square whose place depends on the row (for alignment tests)."""
    image = np.zeros((size, size, 3), dtype=np.uint8)
    y, x = (row * 3) % (size // 2), (row * 5) % (size // 2)
    image[y:y + size // 4, x:x + size // 4] = 255
    return image


def make_shard_dir(root: Path, num_rows: int, shard_size: int, images: bool = False, image_size: int = 32,
                   rejected: tuple[tuple[str, str], ...] = (("bad/broken.png", "cannot identify image file"),),
                   generators: list[str] = GENERATORS) -> Path:
    """A shard directory as `python -m cli shards` writes it (tars only with `images`)."""
    root.mkdir(parents=True, exist_ok=True)
    num_shards = -(-num_rows // shard_size)
    shard_names = [f"shard-{k:06d}.tar" for k in range(num_shards)]
    rows = [{"key": f"img{row:05d}", "row": row, "label": row % 2, "generator": generators[row % len(generators)],
             "path": f"src/img{row:05d}.png", "shard": shard_names[row // shard_size], "format": "png",
             "jpeg_quality": "", "width": image_size, "height": image_size, "class_name": ""}
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
    if images:
        for entry in table:
            with tarfile.open(root / entry["name"], "w") as tar:
                for row in range(entry["first_row"], entry["first_row"] + entry["num_samples"]):
                    png = io.BytesIO()
                    Image.fromarray(marker_image(row, image_size)).save(png, format="PNG")
                    meta = json.dumps({k: rows[row][k] for k in ("row", "label", "generator", "path")}).encode()
                    for suffix, payload in (("png", png.getvalue()), ("json", meta)):
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
        return {"resolution": self.resolution, "shards": str(self.shard_dir), **RAW_PROTOCOL}

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


class FakeExtractor(pl.LightningModule):
    """FeatureExtractor's interface; optionally raises, or SIGKILLs its own process, at a given row.

    With `rows_log`, each rank appends the rows it computed to `rows_log/rank<k>.txt` (exactly-once checks).
    """

    def __init__(self, timestep: int = 200, fail_at_row: int | None = None, kill_at_row: int | None = None,
                 rows_log: str | None = None) -> None:
        super().__init__()
        self.timestep, self.fail_at_row, self.kill_at_row = timestep, fail_at_row, kill_at_row
        self.rows_log = rows_log
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # strategies expect a module with parameters

    def provenance(self) -> dict[str, Any]:
        return {"extractor": "fake", "timestep": self.timestep, "unet_hash": "ab12"}

    def feature_shapes(self, resolution: int) -> dict[str, tuple[int, ...]]:
        h = resolution // 8
        return {"lare": (4, h, h), "deu": (4, h, h), "clip_pooled": (8,)}

    def predict_step(self, batch: dict[str, Any]) -> dict[str, Any]:
        rows = batch["row"]
        if self.kill_at_row is not None and self.kill_at_row in rows.tolist():
            os.kill(os.getpid(), signal.SIGKILL)
        if self.fail_at_row is not None and self.fail_at_row in rows.tolist():
            raise RuntimeError(f"fake failure at row {self.fail_at_row}")
        if self.rows_log is not None:
            with (Path(self.rows_log) / f"rank{self.global_rank}.txt").open("a") as f:
                f.write("".join(f"{row}\n" for row in rows.tolist()))
        features = {k: torch.from_numpy(v) for k, v in expected_features(rows.numpy()).items()}
        return {**{k: batch[k] for k in ("key", "row", "shard_index", "label", "generator", "error")}, **features}


def run_predict(store: Path, shard_dir: Path, devices: int = 1, feature_dtype: str = "float16",
                drop_rows: tuple[int, ...] = (), **module_kwargs: Any) -> None:
    """One `Trainer.predict` over the fake shards into `store` (the same code for 1 process and DDP)."""
    from feature_cache.writer import ZarrFeatureWriter

    strategy = "ddp" if devices > 1 else "auto"
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[ZarrFeatureWriter(str(store), feature_dtype=feature_dtype)])
    datamodule = FakeShardDataModule(str(shard_dir), num_workers=1 if devices > 1 else 0, bad_rows=(5,),
                                     drop_rows=drop_rows)
    trainer.predict(FakeExtractor(**module_kwargs), datamodule=datamodule, return_predictions=False)
