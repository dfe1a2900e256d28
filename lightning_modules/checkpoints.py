"""Detector checkpoints loaded back into their class (read through `core.checkpoint_io.safe_torch_load`).

The detector's class is recorded by its import path
(`DetectorBase.on_save_checkpoint`), so any `DetectorBase` subclass loads without a hand-kept list; the
path names code already installed on the user's Python path, never code carried by the file.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path

from core.checkpoint_io import safe_torch_load
from feature_cache.provenance import FeatureProvenance
from lightning_modules.detectors import DetectorBase
from lightning_modules.maps import import_map_modules


def detector_class(class_path: str, source: str) -> type[DetectorBase]:
    """The DetectorBase subclass a checkpoint names (`module.Class`; a bare name is one of ours)."""
    module_name, _, name = class_path.rpartition(".")
    try:
        owner = importlib.import_module(module_name or "lightning_modules.detectors")
        cls = getattr(owner, name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"{source}: its detector class {class_path} cannot be imported ({error}); install or put "
                         "on PYTHONPATH the module that defines it") from None
    if not (isinstance(cls, type) and issubclass(cls, DetectorBase)):
        raise ValueError(f"{source}: {class_path} is not a DetectorBase subclass")
    return cls


def recorded_provenance(checkpoint: Mapping, source: str) -> FeatureProvenance:
    """The feature provenance a checkpoint records (older layouts upgraded), or one error line naming `source`."""
    recorded = checkpoint.get("feature_provenance")
    if not recorded:
        raise ValueError(f"{source} records no feature provenance: it was not written by `python -m cli fit` of a "
                         "detector on a feature store")
    try:
        return FeatureProvenance.from_attrs(recorded)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{source}: its feature provenance cannot be read ({error})") from None


def load_detector(checkpoint_path: str | Path) -> tuple[DetectorBase, FeatureProvenance]:
    """The detector in a checkpoint (evaluation mode, CPU) and the feature provenance it was trained with."""
    source = f"checkpoint {checkpoint_path}"
    checkpoint = safe_torch_load(checkpoint_path, "checkpoint")
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{source}: a PyTorch file but not a Lightning checkpoint (no state_dict)")
    class_path = checkpoint.get("detector_class")
    if not class_path:
        raise ValueError(f"{source} has no detector_class: it was not written by `python -m cli fit` of a detector "
                         "on a feature store")
    provenance = recorded_provenance(checkpoint, source)
    cls = detector_class(class_path, source)
    import_map_modules(provenance.map_modules())  # the registry must know the guidance maps' channels
    detector = cls.load_from_checkpoint(checkpoint_path, map_location="cpu", weights_only=True)
    return detector.eval(), provenance
