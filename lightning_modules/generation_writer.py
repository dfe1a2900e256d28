"""Where `python -m cli generate` puts its images: exactly once over ranks, resumable, then filtered.

```
OUT/fake/KEY.png|jpg          the kept images (the folder `python -m cli shards --layout folder` reads)
OUT/generation.csv            one row per image: prompt, seed, settings, scores, file hash, kept/filtered
OUT/.generation/settings.json the run's settings; a resume with other settings is refused
OUT/.generation/done/KEY.json one record per finished image, written last (atomic): the done marker
OUT/.generation/images/       every generated image (kept or not), so a new --keep_quantile needs no resampling
OUT/.generation/maps/KEY.npy  De Vita's aleatoric map (float16, 4×h×w latent pixels)
```
The work folder is hidden, so the shard converter does not see it; `generation.csv` sits outside
`real/` and `fake/`, and the converter lists it in rejected.csv as such (harmless).
A key is `p{prompt:05d}-i{image:05d}`: its noise is seeded from it, so a restart or another rank count
gives the same images.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import pandas as pd
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image
from torch.utils.data import Dataset

from core.seeding import image_random

RankBy = Literal["generative", "aleatoric"]
WORK = ".generation"


def read_prompts(path: str | Path) -> list[str]:
    """Non-empty lines of a prompts file, in order (a prompt's index is its position among them)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"prompts file {file} not found (one prompt per line)")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"prompts file {file} is not UTF-8 text (byte {error.start}); give a text file, one prompt "
                         "per line") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {file} has no non-empty line")
    return prompts


def image_key(prompt_index: int, image_index: int) -> str:
    return f"p{prompt_index:05d}-i{image_index:05d}"


class GenerationItems(Dataset):
    """All (prompt, image index) work items, minus those already done; map-style, so predict splits it
    over ranks without padding."""

    def __init__(self, prompts: list[str], num_images: int) -> None:
        if num_images < 1:
            raise ValueError(f"--num_images must be >= 1, got {num_images}")
        self.all = [{"key": image_key(p, i), "prompt": prompt, "prompt_index": p, "image_index": i}
                    for p, prompt in enumerate(prompts) for i in range(num_images)]
        self.todo = list(self.all)

    def exclude(self, done: set[str]) -> None:
        self.todo = [item for item in self.all if item["key"] not in done]

    def __len__(self) -> int:
        return len(self.todo)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.todo[index]


def _atomic_write(path: Path, data: bytes) -> None:
    """tmp file, fsync, rename: a kill -9 leaves the old file or the new one, never half of one."""
    temp = path.with_name(f".{path.name}.tmp")
    with open(temp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)


def encode_image(pixels: np.ndarray, image_format: Literal["png", "jpeg"], quality: int | None) -> bytes:
    """(H, W, 3) uint8 → PNG bytes, or JPEG at `quality` (PIL, 4:2:0 as the real-image JPEG protocol)."""
    buffer = io.BytesIO()
    image = Image.fromarray(pixels)
    if image_format == "png":
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


class GenerationWriter(BasePredictionWriter):
    """Writes each image, its map and then its done record as soon as its batch ends; finalises on rank 0."""

    def __init__(self, out: str | Path, items: GenerationItems, image_format: Literal["png", "jpeg"] = "png",
                 jpeg_qualities: tuple[int, ...] = (), keep_quantile: float = 1.0,
                 rank_by: RankBy = "generative") -> None:
        """Args:
            jpeg_qualities: JPEG: one quality is drawn per image from these (seeded by the image's key).
            keep_quantile: fraction q of images to keep in fake/, least uncertain first by `rank_by`.
        """
        super().__init__(write_interval="batch")
        if image_format not in ("png", "jpeg"):
            raise ValueError(f"--image_format must be png or jpeg, got {image_format!r}")
        if image_format == "jpeg" and not jpeg_qualities:
            raise ValueError("--image_format jpeg needs --jpeg_quality Q or --jpeg_quality_from SHARD_DIR")
        if not 0 < keep_quantile <= 1:
            raise ValueError(f"--keep_quantile must be in (0, 1], got {keep_quantile}")
        self.out, self.items = Path(out).expanduser(), items
        self.image_format, self.jpeg_qualities = image_format, tuple(jpeg_qualities)
        self.keep_quantile, self.rank_by = keep_quantile, rank_by
        self.work = self.out / WORK
        self.settings: dict[str, Any] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.settings = {**pl_module.settings(), "image_format": self.image_format,
                         "jpeg_qualities": list(self.jpeg_qualities)}
        if self.keep_quantile < 1 and self.rank_by == "generative" and pl_module.hparams.posterior is None:
            raise ValueError("--keep_quantile < 1 with --rank_by generative needs the model's posterior and clip")
        if self.keep_quantile < 1 and self.rank_by == "aleatoric" and not pl_module.hparams.aleatoric_steps:
            raise ValueError("--keep_quantile < 1 with --rank_by aleatoric needs the model's aleatoric_steps")
        if trainer.is_global_zero:
            self._create_or_check()
        trainer.strategy.barrier("generation_writer_setup")
        self._check_settings()  # every rank, so a mismatch stops all of them with the same message
        done = {p.stem for p in (self.work / "done").glob("*.json")}
        trainer.strategy.barrier("generation_writer_listed")  # all ranks listed before any writes
        self.items.exclude(done)

    def _create_or_check(self) -> None:
        for sub in ("done", "images", "maps"):
            (self.work / sub).mkdir(parents=True, exist_ok=True)
        settings_file = self.work / "settings.json"
        if not settings_file.exists():
            _atomic_write(settings_file, json.dumps(self.settings, indent=1, sort_keys=True, default=str).encode())

    def _check_settings(self) -> None:
        stored = json.loads((self.work / "settings.json").read_text())
        mine = json.loads(json.dumps(self.settings, sort_keys=True, default=str))
        diff = {k: (stored.get(k), mine.get(k)) for k in stored.keys() | mine.keys() if stored.get(k) != mine.get(k)}
        if diff:
            raise ValueError(f"{self.out} was generated with other settings (stored, requested): {diff}; "
                             "use another --out or the same settings to resume")

    def _quality(self, key: str) -> int | None:
        if self.image_format == "png":
            return None
        return image_random(self.settings["seed"], "jpeg", key).choice(self.jpeg_qualities)

    def write_on_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int) -> None:
        images = prediction["image"].permute(0, 2, 3, 1).numpy()
        for row, key in enumerate(prediction["key"]):
            quality = self._quality(key)
            data = encode_image(images[row], self.image_format, quality)
            name = f"{key}.{'png' if self.image_format == 'png' else 'jpg'}"
            _atomic_write(self.work / "images" / name, data)
            record = {"key": key, "prompt_index": prediction["prompt_index"][row],
                      "image_index": prediction["image_index"][row], "prompt": prediction["prompt"][row],
                      "file": name, "sha256": hashlib.sha256(data).hexdigest(), "jpeg_quality": quality,
                      "generative_uncertainty": None, "aleatoric_uncertainty": None, "guided_pixels": None}
            if prediction["generative"] is not None:
                record["generative_uncertainty"] = float(prediction["generative"][row])
            if prediction["aleatoric_map"] is not None:
                values = prediction["aleatoric_map"][row].numpy()
                buffer = io.BytesIO()
                np.save(buffer, values.astype(np.float16))
                _atomic_write(self.work / "maps" / f"{key}.npy", buffer.getvalue())
                record["aleatoric_uncertainty"] = float(values.astype(np.float64).mean())
            if prediction["guided_pixels"] is not None:
                record["guided_pixels"] = float(prediction["guided_pixels"][row])
            _atomic_write(self.work / "done" / f"{key}.json", json.dumps(record).encode())

    def finish(self, trainer: pl.Trainer) -> pd.DataFrame | None:
        """After predict on every rank (a rank with no work skips predict's end hooks, so this is not one):
        wait for all ranks, then rank 0 writes generation.csv and fake/."""
        trainer.strategy.barrier("generation_writer_end")
        if not trainer.is_global_zero:
            return None
        return finalize(self.out, [item["key"] for item in self.items.all], self.keep_quantile, self.rank_by)


def finalize(out: Path, keys: list[str], keep_quantile: float, rank_by: RankBy) -> pd.DataFrame:
    """Write generation.csv and make fake/ hold exactly the kept images (the q least uncertain)."""
    work = out / WORK
    missing = [k for k in keys if not (work / "done" / f"{k}.json").is_file()]
    if missing:
        raise RuntimeError(f"generate: {len(missing)} images have no done record (first {missing[0]}); rerun to finish")
    settings = json.loads((work / "settings.json").read_text())
    table = pd.DataFrame([json.loads((work / "done" / f"{k}.json").read_text()) for k in keys])
    score = f"{rank_by}_uncertainty"
    keep = math.ceil(keep_quantile * len(table))
    # Least uncertain first; ties broken by key so the kept set never depends on record order.
    order = table.sort_values([score, "key"], kind="stable").index if keep < len(table) else table.index
    table["status"] = "filtered"
    table.loc[order[:keep], "status"] = "kept"
    for name in ("seed", "scheduler", "num_inference_steps", "guidance_scale", "resolution", "num_posterior_samples",
                 "posterior_steps", "aleatoric_steps", "num_perturbations", "guided", "guidance_percentile",
                 "guidance_strength", "sd_source", "unet_hash", "posterior_sha256"):
        table[name] = json.dumps(settings[name]) if isinstance(settings[name], list) else settings[name]
    fake = out / "fake"
    fake.mkdir(parents=True, exist_ok=True)
    kept = set(table.loc[table["status"] == "kept", "file"])
    for stale in fake.iterdir():
        if stale.name not in kept:
            stale.unlink()
    for name in kept:
        if not (fake / name).exists():
            shutil.copyfile(work / "images" / name, fake / name)
    table.to_csv(out / "generation.csv", index=False)
    return table
