"""Any file or folder of raw images as batches (for `python -m cli predict`): no shards, no labels.

Every regular file under the path is one row, image or not: a file that does not decode becomes a
row with its `error`, so the output accounts for every input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.image_io import describe_error
from datamodules.image_protocols import ImagePreprocessor
from datamodules.image_shards import collate_samples
from datamodules.shards import walk_files


class ImageFiles(Dataset):
    def __init__(self, paths: list[Path], preprocess: ImagePreprocessor) -> None:
        self.paths, self.preprocess = paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, error = self.paths[index], ""
        try:
            image = self.preprocess(path.read_bytes(), str(path), -1, "")
        except Exception as failure:  # noqa: BLE001  reported per file; one bad file never stops the run
            image, error = torch.zeros(3, self.preprocess.resolution, self.preprocess.resolution), describe_error(failure)
        return {"image": image, "key": str(path), "row": index, "label": -1, "generator": 0, "shard_index": 0,
                "error": error}


class ImageFilesDataModule(pl.LightningDataModule):
    """Predict batches (docs/contracts.md format, `key` = file path) over a file or a folder tree."""

    def __init__(self, data: str, preprocess: ImagePreprocessor, batch_size: int = 8, num_workers: int = 2) -> None:
        super().__init__()
        root = Path(data)
        if not root.exists():
            raise FileNotFoundError(f"--data {data}: no such file or directory")
        self.paths = [root] if root.is_file() else sorted(walk_files(root))
        if not self.paths:
            raise ValueError(f"--data {data}: the folder holds no files")
        self.preprocess, self.batch_size, self.num_workers = preprocess, batch_size, num_workers

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(ImageFiles(self.paths, self.preprocess), batch_size=self.batch_size,
                          num_workers=self.num_workers, collate_fn=collate_samples)
