"""A trained detector applied to raw images: the phase-1 extractor computes its inputs on the fly.

No cache is needed: the checkpoint records the feature provenance of the store it was trained on
(extractor settings, weight hashes, pixel pipeline), the same extractor is rebuilt from it, and
weights that hash differently are refused, so predictions use exactly the features it learned from.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_modules.detectors import DEUADetector, DetectorBase, LaRE2Detector
from lightning_modules.feature_extractor import FeatureExtractor

DETECTORS = {cls.__name__: cls for cls in (DEUADetector, LaRE2Detector)}


def load_detector(checkpoint_path: str) -> tuple[DetectorBase, dict[str, Any]]:
    """The detector in a checkpoint and the feature provenance it was trained with."""
    if not Path(checkpoint_path).is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint_path}: no such file (a last.ckpt from `python -m cli fit`)")
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    name, provenance = checkpoint.get("detector_class"), checkpoint.get("feature_provenance")
    if name not in DETECTORS or not provenance:
        raise ValueError(f"checkpoint {checkpoint_path} has no detector_class/feature_provenance: it was not "
                         "written by a DEUA/LaRE² fit on a feature store")
    detector = DETECTORS[name].load_from_checkpoint(checkpoint_path, map_location="cpu")
    return detector.eval(), provenance


def extractor_from_provenance(provenance: dict[str, Any]) -> FeatureExtractor:
    """Rebuild the FeatureExtractor a store was computed with and check its weights are the same."""
    settings = {k: provenance[k] for k in inspect.signature(FeatureExtractor).parameters if k in provenance}
    extractor = FeatureExtractor(**settings)
    recorded = {k: v for k, v in provenance.items() if k.endswith("_hash") or k == "posterior_sha256"}
    current = extractor.provenance()
    different = sorted(k for k, v in recorded.items() if current.get(k) != v)
    if different:
        raise ValueError(f"the weights at {settings.get('sd')} / {settings.get('clip')} / {settings.get('posterior')} "
                         f"differ from those the detector was trained on ({', '.join(different)})")
    return extractor


class OnTheFlyDetector(pl.LightningModule):
    """predict_step: images → extractor maps → detector → probability of fake, per image."""

    def __init__(self, detector: DetectorBase, extractor: FeatureExtractor) -> None:
        super().__init__()
        self.detector, self.extractor = detector, extractor
        self.threshold = float(getattr(detector, "val_threshold", 0.5))

    @classmethod
    def from_checkpoint(cls, checkpoint_path: str) -> tuple[OnTheFlyDetector, dict[str, Any]]:
        detector, provenance = load_detector(checkpoint_path)
        return cls(detector, extractor_from_provenance(provenance)), provenance

    @torch.no_grad()
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        features = self.extractor.predict_step(batch, batch_idx)
        p_fake = self.detector({**features, "image": batch["image"]}).logits.softmax(dim=-1)[:, 1]
        return {"key": batch["key"], "p_fake": p_fake, "label": batch["label"], "generator": batch["generator"],
                "error": batch["error"]}
