"""`python -m cli precompute`'s work: the feature writer attached to a predict pass, its summary checked.

`ForensicsTrainer.precompute` (cli/trainer.py) parses the options and calls `precompute`.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl

from datamodules.image_shards import lost_tars
from feature_cache.store import FeatureStore
from feature_cache.writer import ZarrFeatureWriter


def precompute(trainer: pl.Trainer, model: pl.LightningModule, datamodule: pl.LightningDataModule | None,
               store: str | None, clip_dtype: str, clip_codec: str, background_writer: bool, queue_tars: int,
               verify_checksums: bool, drop_incomplete_group: bool = False) -> None:
    """Phase 1 into `store` (create, resume or grow); exits naming unfinished tars, outputs not yet added or
    tars lost to damage (after everything else is written)."""
    if store is None:
        raise SystemExit("python -m cli precompute: --store PATH is required (the Zarr feature store to write)")
    if Path(store).exists() and not Path(store).is_dir():
        raise SystemExit(f"python -m cli precompute: --store {store}: is a file, not a store directory")
    if datamodule is None:
        raise SystemExit("python -m cli precompute: --data is required (an ImageShardDataModule over shards)")
    if any(isinstance(c, ZarrFeatureWriter) for c in trainer.callbacks):
        raise SystemExit("python -m cli precompute: remove ZarrFeatureWriter from trainer.callbacks; "
                         "--store adds it")
    writer = ZarrFeatureWriter(store, clip_dtype=clip_dtype, clip_codec=clip_codec, background=background_writer,
                               queue_tars=queue_tars, verify_checksums=verify_checksums,
                               drop_incomplete_group=drop_incomplete_group)
    trainer.callbacks.append(writer)
    try:
        trainer.predict(model, datamodule=datamodule, return_predictions=False)
    finally:
        trainer.callbacks.remove(writer)
    summary = writer.summary  # rank 0 only, read from the done markers after every rank finished
    if summary is not None:
        print(f"precompute: {summary.text}")
        if summary.unfinished:
            raise SystemExit(f"python -m cli precompute: {store}: group {summary.group}: {summary.done}/"
                             f"{summary.total} tars done; unfinished: {', '.join(summary.unfinished[:10])}"
                             f"{' ...' if len(summary.unfinished) > 10 else ''} (rerun to finish them)")
        if summary.not_added:
            raise SystemExit(f"python -m cli precompute: {store}: outputs {', '.join(summary.not_added)} are not "
                             "in the store yet (an incomplete group was resumed first); rerun to add them")
        lost = lost_tars(FeatureStore.open(store))
        if lost:
            raise SystemExit(f"python -m cli precompute: {store}: {summary.total - len(lost)} of {summary.total} "
                             f"tars written; unreadable: {', '.join(lost[:10])}{' ...' if len(lost) > 10 else ''} "
                             "(truncated or damaged: their lost rows are stored as rejected rows; "
                             "rebuild the shards with `python -m cli shards` and precompute a new store)")
