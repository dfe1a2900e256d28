"""A trained detector applied to raw images: the phase-1 extractor computes its inputs on the fly.

No cache is needed: the checkpoint records the feature provenance of the store it was trained on
(extractor settings, weight hashes, pixel pipeline), the same extractor is rebuilt from it, and
weights or settings that differ are refused, so predictions use exactly the features it learned from.
The model paths may be overridden (`--sd`, `--clip`, `--posterior`) for a checkpoint moved to another
machine: the files are then identified by their hashes, not their paths.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from feature_cache.provenance import FeatureProvenance
from lightning_modules.checkpoints import load_detector
from lightning_modules.detectors import DetectorBase
from lightning_modules.feature_extractor import FeatureExtractor


class OnTheFlyDetector(pl.LightningModule):
    """predict_step: images → extractor maps → detector → probability of fake, per image, with the batch's
    other fields (key, label, file metadata...) passed through for the writer."""

    def __init__(self, detector: DetectorBase, extractor: FeatureExtractor) -> None:
        super().__init__()
        self.detector, self.extractor = detector, extractor
        self.threshold = float(getattr(detector, "val_threshold", 0.5))

    @classmethod
    def from_checkpoint(cls, checkpoint_path: str, **paths: str | None) -> tuple[OnTheFlyDetector, FeatureProvenance]:
        """The checkpoint's detector with its extractor (model paths overridable, see
        `FeatureExtractor.from_provenance`)."""
        detector, provenance = load_detector(checkpoint_path)  # imports the map modules its guidance needs
        return cls(detector, FeatureExtractor.from_provenance(provenance, **paths)), provenance

    @torch.no_grad()
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Under `clip_input: native_crop` (recorded in the checkpoint's pixel provenance, which rebuilt the
        datamodule) a fine-tuned CLIP sees the centred native crop and the guidance maps are cropped to its box."""
        features = self.extractor.predict_step(batch, batch_idx)
        window = {"clip_box": batch["clip_box"]} if "clip_box" in batch else {}
        inputs = {**features, **window, "image": self.extractor.clip_input(batch)}
        p_fake = self.detector(inputs).logits.softmax(dim=-1)[:, 1]
        return {**{name: value for name, value in batch.items() if name not in ("image", "clip_image", "clip_box")},
                "p_fake": p_fake}
