"""Checks that a checkpoint is applied to features computed the way its training features were.

`test` (scoring stores) and `predict`/`robustness` (recomputing features on the fly) both refuse a
mismatch naming every differing field: a detector trained on one UNet's or posterior's features and
scored on another's gives numbers that mean nothing, with rc=0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from feature_cache.provenance import config_differences
from core.checkpoint_io import safe_torch_load

# Provenance sections and keys that describe which images a store holds, not how its features were
# computed: they differ between the train and test stores of one run (format 1 keys, format 2 section).
PER_DATASET = ("shards", "layout", "split", "dataset")


def feature_settings(provenance: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a store's provenance that fixes its feature values (everything but which images it holds)."""
    return {key: value for key, value in provenance.items() if key not in PER_DATASET}


def check_feature_provenance(trained: Mapping[str, Any], stores: Mapping[str, Mapping[str, Any]],
                             checkpoint: str, ignore: Iterable[str] = ()) -> None:
    """Refuse stores whose features were computed otherwise than the ones the checkpoint was trained on.

    `stores` maps a store's path to its provenance; `ignore` names settings that may legitimately differ
    (robustness compares a perturbed store, so `perturbation`). The error names every differing field
    as `name trained != store`, e.g. `unet_hash 3fa0... != 91c2...` or `posterior_sha256 ...`.
    """
    skipped = tuple(ignore)
    wanted = {k: v for k, v in feature_settings(trained).items() if k not in skipped}
    for path, provenance in stores.items():
        found = {k: v for k, v in feature_settings(provenance).items() if k not in skipped}
        differences = config_differences(wanted, found)
        if differences:
            raise ValueError(f"feature store {path} was computed otherwise than the features checkpoint {checkpoint} "
                             f"was trained on ({'; '.join(differences)}); recompute it with the checkpoint's "
                             "settings or use a matching checkpoint")


def check_checkpoint_against_stores(checkpoint_path: str | Path, stores: Mapping[str, Mapping[str, Any]]) -> None:
    """`test`'s guard: every store it scores holds features made as the checkpoint's training features were.

    `stores` maps each test store's path to its feature provenance, as the datamodule reports it for the
    checkpoint (`DetectorBase` records `datamodule.feature_provenance()`): the same function must produce
    both sides, so only real differences show. Called through `check_scored_stores` before scoring.
    """
    checkpoint = safe_torch_load(checkpoint_path, "checkpoint")
    trained = checkpoint.get("feature_provenance") if isinstance(checkpoint, dict) else None
    if not trained:
        raise ValueError(f"checkpoint {checkpoint_path} records no feature provenance, so the stores it is tested "
                         "on cannot be checked against its training features")
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
