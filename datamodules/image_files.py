"""Any file or folder of raw images as batches (for `python -m cli predict`): no shards needed.

Every file under the path is one row: a file that does not decode becomes a row with its `error`, and
what the folder walk skips (hidden names, FIFOs, looping links) becomes a row with the reason, so the
output accounts for every input. A folder with `real/` and `fake/` is labelled as the converter's
folder layout labels it; otherwise labels are unknown (-1).
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from datamodules.image_io import describe_error, estimate_jpeg_quality, read_regular_file
from datamodules.image_protocols import ImagePreprocessor
from datamodules.image_shards import blank_image, collate_samples
from datamodules.layouts import walk_files

FOLDER_LABELS = {"real": 0, "fake": 1}
METADATA = ("path", "sha256", "format", "jpeg_quality", "width", "height")  # per-row lists in the batch


def header_metadata(data: bytes) -> dict[str, Any]:
    """Format, JPEG quality and size from the file's header (no pixel is decoded here)."""
    with Image.open(io.BytesIO(data)) as image:
        return {"format": image.format or "", "jpeg_quality": estimate_jpeg_quality(image), "width": image.width,
                "height": image.height}


class ImageFiles(Dataset):
    """Rows (path, label, generator code, reason it was skipped or "") → preprocessed image plus metadata."""

    def __init__(self, root: Path, rows: list[tuple[Path, int, int, str]], preprocess: ImagePreprocessor) -> None:
        self.root, self.rows, self.preprocess = root, rows, preprocess

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label, generator, error = self.rows[index]
        key = path.name if path == self.root else path.relative_to(self.root).as_posix()
        row: dict[str, Any] = {"image": blank_image(self.preprocess.resolution), **self.preprocess.blank_clip_pixels(),
                               "key": key, "row": index, "label": label,
                               "generator": generator, "shard_index": 0, "error": error, "path": str(path),
                               "sha256": "", "format": "", "jpeg_quality": None, "width": None, "height": None}
        if error:
            return row
        try:
            data = read_regular_file(path)  # read once: the hash is of the bytes that were scored
            row["sha256"] = hashlib.sha256(data).hexdigest()
            prepared = self.preprocess.prepared(data, label, "")
            row["image"] = self.preprocess.resized(prepared)  # uint8, as image shards give it
            row.update(self.preprocess.clip_pixels(prepared))
            row.update(header_metadata(data))
        except Exception as failure:  # noqa: BLE001  reported per file; one bad file never stops the run
            row["error"] = describe_error(failure)
        return row


def collate_files(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The image-batch contract plus the per-file metadata as lists."""
    return {**collate_samples(samples), **{name: [s[name] for s in samples] for name in METADATA}}


class ImageFilesDataModule(pl.LightningDataModule):
    """Predict batches (docs/contracts.md format, `key` = path relative to `data`) over a file or a folder tree."""

    def __init__(self, data: str, preprocess: ImagePreprocessor, batch_size: int = 8, num_workers: int = 2) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"--batch_size {batch_size}: must be at least 1")
        root = Path(data)
        if not root.exists():
            raise FileNotFoundError(f"--data {data}: no such file or directory")
        self.root = root
        self.generator_names = [""]
        if not root.is_dir():
            reason = "" if root.is_file() else "not a regular file"
            self.rows = [(root, -1, 0, reason)]
        else:
            files, skipped = walk_files(root)
            labelled = any((root / name).is_dir() for name in FOLDER_LABELS)
            if labelled:
                self.generator_names = ["", *FOLDER_LABELS]
            rows = [(path, *self._label(path, labelled), "") for path in files]
            rows += [(path, *self._label(path, labelled), f"skipped: {reason}") for path, reason in skipped]
            self.rows = sorted(rows)
        if not self.rows:
            raise ValueError(f"--data {data}: the folder holds no files")
        self.preprocess, self.batch_size, self.num_workers = preprocess, batch_size, num_workers

    def _label(self, path: Path, labelled: bool) -> tuple[int, int]:
        """(label, generator code): from the top folder (real/, fake/) in a labelled tree, else unknown."""
        top = path.relative_to(self.root).parts[0]
        if not labelled or top not in FOLDER_LABELS:
            return -1, 0
        return FOLDER_LABELS[top], self.generator_names.index(top)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(ImageFiles(self.root, self.rows, self.preprocess), batch_size=self.batch_size,
                          num_workers=self.num_workers, collate_fn=collate_files)
