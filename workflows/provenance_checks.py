"""Checks that a checkpoint is applied to features computed the way its training features were.

`test` (scoring stores) and `predict`/`robustness` (recomputing features on the fly) both refuse a
mismatch naming every differing field: a detector trained on one UNet's or posterior's features and
scored on another's gives numbers that mean nothing, with rc=0. Both sides are `FeatureProvenance`
(`feature_cache/provenance.py`), compared by `FeatureProvenance.differences`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from core.checkpoint_io import safe_torch_load
from feature_cache.provenance import FeatureProvenance
from lightning_modules.checkpoints import recorded_provenance


def check_feature_provenance(trained: FeatureProvenance, stores: Mapping[str, FeatureProvenance],
                             checkpoint: str) -> None:
    """Refuse stores whose features were computed otherwise than the ones the checkpoint was trained on.

    `stores` maps a store's path to its provenance of the checkpoint's features. The error names every
    differing field as `name trained != store`, e.g. `lare.common.unet_hash 3fa0... != 91c2...`.
    """
    for path, provenance in stores.items():
        differences = trained.differences(provenance)
        if differences:
            raise ValueError(f"feature store {path} was computed otherwise than the features checkpoint {checkpoint} "
                             f"was trained on ({'; '.join(differences)}); recompute it with the checkpoint's "
                             "settings or use a matching checkpoint")


def check_checkpoint_against_stores(checkpoint_path: str | Path, stores: Mapping[str, FeatureProvenance]) -> None:
    """`test`'s guard: every store it scores holds features made as the checkpoint's training features were.

    `stores` maps each test store's path to its provenance of the run's features, as the datamodule reports it
    for the checkpoint (`FeatureCacheDataModule.feature_provenance(path)`). Called through
    `check_scored_stores` before scoring.
    """
    checkpoint = safe_torch_load(checkpoint_path, "checkpoint")
    if not isinstance(checkpoint, dict):
        raise ValueError(f"checkpoint {checkpoint_path}: a PyTorch file but not a Lightning checkpoint")
    trained = recorded_provenance(checkpoint, f"checkpoint {checkpoint_path}")
    check_feature_provenance(trained, stores, str(checkpoint_path))


def check_scored_stores(checkpoint_path: str | Path | None, datamodule: Any, stage: str) -> None:
    """`test`'s and `validate`'s guard: the stores this stage scores (`test`: the test stores; `validate`: the val
    stores, or the train stores a `val_fraction` splits) hold features made as the checkpoint's were.

    Nothing to compare without a checkpoint file (Lightning reports a missing one) or without stores."""
    if checkpoint_path is None or not Path(checkpoint_path).is_file():
        return
    stores = getattr(datamodule, "stores", {})
    scored = stores.get("test", []) if stage == "test" else stores.get("val", []) or (
        stores.get("train", []) if getattr(datamodule, "hparams", {}).get("val_fraction") else [])
    if scored:
        check_checkpoint_against_stores(checkpoint_path, {path: datamodule.feature_provenance(path)
                                                          for path in dict.fromkeys(scored)})
