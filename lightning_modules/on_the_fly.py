"""A trained detector applied to raw images: the phase-1 extractor computes its inputs on the fly.

No cache is needed: the checkpoint records the feature provenance of the store it was trained on
(extractor settings, weight hashes, pixel pipeline), the same extractor is rebuilt from it, and
weights or settings that differ are refused, so predictions use exactly the features it learned from.
The model paths may be overridden (`--sd`, `--clip`, `--posterior`) for a checkpoint moved to another
machine: the files are then identified by their hashes, not their paths.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_modules.checkpoints import load_detector
from lightning_modules.detectors import DetectorBase
from lightning_modules.feature_extractor import FeatureExtractor
from lightning_modules.maps import BUILTIN_MAP_MODULES

MODEL_PATHS = ("sd", "clip", "posterior")  # where the weights are: may differ; their hashes may not
# Recorded for the reader only: where SD was loaded from, and the extractor's class (bare name in format 1).
SOURCES = ("sd_source", "extractor")


def _leaves(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested provenance as dotted leaves, JSON-normalised (tuples read back as lists)."""
    if isinstance(value, dict) and value:
        return {k: v for key, item in value.items() for k, v in _leaves(item, f"{prefix}{key}.").items()}
    return {prefix[:-1]: json.loads(json.dumps(value, default=str))}


def _by_name(provenance: dict[str, Any]) -> dict[str, Any]:
    """Leaves keyed by their own name (`common.seed` → `seed`; a map's `posterior_sha256` is the same file
    for every map that has it)."""
    return {key.rsplit(".", 1)[-1]: value for key, value in _leaves(provenance).items()}


def extractor_part(provenance: dict[str, Any]) -> dict[str, Any]:
    """The extractor's provenance inside a checkpoint's feature provenance: phase 2's per-feature form
    {features: {name: {common, map}}} (the settings every feature shares, and each feature's own), typed
    {common, maps} (possibly under `extractor`), or flat (format-1 stores, every setting at the top level)."""
    if isinstance(provenance.get("features"), dict):
        parts = provenance["features"]
        return {"common": next(iter(parts.values()))["common"], "maps": {n: part["map"] for n, part in parts.items()},
                "modules": {n: part["module"] for n, part in parts.items() if "module" in part}}
    typed = provenance.get("extractor", provenance)
    return typed if isinstance(typed, dict) and "common" in typed else provenance


def extractor_settings(recorded: dict[str, Any]) -> dict[str, Any]:
    """FeatureExtractor arguments from its recorded provenance: every leaf named like an argument, the outputs
    (the typed form's map names), the modules that register them (a user's map file included) and `map_settings`:
    the maps' own settings that are no argument and not derived by the extractor (a file's X_sha256, weight
    hashes, the posterior's σ), e.g. DECU's members file."""
    names = set(inspect.signature(FeatureExtractor).parameters)
    settings = {name: value for name, value in _by_name(_compared(recorded)).items() if name in names}
    if "maps" in recorded:
        settings["outputs"] = list(recorded["maps"])
        settings["map_modules"] = list(dict.fromkeys([*BUILTIN_MAP_MODULES, *recorded.get("modules", {}).values()]))
        own = {name: value for map_settings in recorded["maps"].values() for name, value in map_settings.items()
               if name not in names and name != "sigma" and not name.endswith(("_sha256", "_hash"))}
        if own:
            settings["map_settings"] = own
    return settings


def _compared(recorded: dict[str, Any]) -> dict[str, Any]:
    """The settings that fix the values (where a map's code lives does not)."""
    return {key: value for key, value in recorded.items() if key != "modules"}


def extractor_from_provenance(provenance: dict[str, Any], **paths: str | None) -> FeatureExtractor:
    """Rebuild the FeatureExtractor a store was computed with and check it computes the same features.

    `paths` overrides `sd`, `clip` or `posterior` (None keeps the recorded one). Every setting and hash
    the rebuilt extractor reports must equal the recorded one; the error names each that differs.
    """
    recorded = extractor_part(provenance)
    settings = extractor_settings(recorded)
    settings.update({name: path for name, path in paths.items() if path is not None})
    for name in MODEL_PATHS:
        if settings.get(name) and not Path(settings[name]).expanduser().exists() and settings[name] != "openai":
            raise FileNotFoundError(f"the checkpoint's {name} {settings[name]} does not exist here: pass --{name} PATH "
                                    "(the weights are checked against the hashes the checkpoint recorded)")
    extractor = FeatureExtractor(**settings)
    # Compared by setting name, so flat (format 1) and typed ({common, maps}) provenance compare alike.
    before, now = _by_name(_compared(recorded)), _by_name(_compared(extractor.provenance()))
    different = [f"{name} {before[name]} != {now[name]}" for name in sorted(before.keys() & now.keys())
                 if name not in MODEL_PATHS + SOURCES and before[name] != now[name]]
    if different:
        raise ValueError(f"the extractor rebuilt from {', '.join(f'{n}={settings.get(n)}' for n in MODEL_PATHS)} "
                         f"differs from the one the detector's features came from (checkpoint != here: "
                         f"{'; '.join(different)})")
    return extractor


class OnTheFlyDetector(pl.LightningModule):
    """predict_step: images → extractor maps → detector → probability of fake, per image, with the batch's
    other fields (key, label, file metadata...) passed through for the writer."""

    def __init__(self, detector: DetectorBase, extractor: FeatureExtractor) -> None:
        super().__init__()
        self.detector, self.extractor = detector, extractor
        self.threshold = float(getattr(detector, "val_threshold", 0.5))

    @classmethod
    def from_checkpoint(cls, checkpoint_path: str, **paths: str | None) -> tuple[OnTheFlyDetector, dict[str, Any]]:
        """The checkpoint's detector with its extractor (model paths overridable, see `extractor_from_provenance`)."""
        detector, provenance = load_detector(checkpoint_path)  # imports the map modules its guidance needs
        return cls(detector, extractor_from_provenance(provenance, **paths)), provenance

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
