"""`python -m cli robustness`: a trained detector's accuracy under each level of a perturbation sweep.

Perturbed features depend only on (images, perturbation, extractor settings), not on the detector, so
each level's features are computed once into a feature store by the same exactly-once, resumable
writer as `precompute` (the perturbation is in the store's provenance) and reused by every later
checkpoint with the same extractor. Detectors that fine-tune CLIP need the pixels themselves and are
scored on the fly instead.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from workflows.predict import run_predict
from core.progress import ProgressLine, print_line
from core.trainer_progress import progress_callbacks
from datamodules.cached_features import centre_clip_boxes
from datamodules.image_shards import ImageShardDataModule, pixel_settings
from datamodules.perturbations import ROBUSTNESS_SWEEP, parse_sweep, perturbation_label
from feature_cache.codecs import widen
from feature_cache.store import FeatureStore
from feature_cache.writer import ZarrFeatureWriter
from lightning_modules.on_the_fly import OnTheFlyDetector
from reports.evaluation import Predictions, protocol_table, save_rows

METRICS = ("n_real", "n_fake", "acc", "real_acc", "fake_acc", "ap", "auroc")


def cache_path(cache: Path, label: str, identity: dict[str, Any]) -> Path:
    """One store per (data, pixels incl. perturbation, extractor settings but its list of outputs, batch size,
    threads): everything the writer would refuse to mix. A checkpoint needing more outputs grows the store."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return cache / f"{label.replace(' ', '-')}-{digest}"


def done_everywhere(path: Path, names: list[str]) -> int:
    """How many tars hold every feature in `names` already (0 when the store does not exist yet)."""
    if not FeatureStore.exists(path):
        return 0
    store = FeatureStore.open(path)
    if not set(names) <= set(store.feature_names):
        return 0
    done = [store.done_tars(store.group_of(name)) for name in names]
    return len(set.intersection(*done))


def cached_features(model: OnTheFlyDetector, datamodule: ImageShardDataModule, cache: Path, label: str,
                    accelerator: str) -> tuple[FeatureStore, int]:
    """The level's feature store and how many of its tars were reused: only what is missing is computed."""
    extractor = model.extractor
    settings = extractor.provenance()
    identity = {"data": datamodule.provenance(), "batch_size": datamodule.hparams.batch_size,
                "cpu_threads": torch.get_num_threads(),  # the settings every output shares; a map's own are
                "extractor": settings.get("common", settings)}  # checked by the writer when it grows the store
    path = cache_path(cache, label, identity)
    names = list(extractor.outputs)
    reused, total = done_everywhere(path, names), len(datamodule.shard_table())
    print(f"robustness {label}: features: {reused}/{total} tars already in the cache {path}"
          + (f", computing {total - reused}" if reused < total else ""), flush=True)
    if reused < total:
        writer = ZarrFeatureWriter(str(path))  # the exactly-once, resumable writer of `precompute`
        trainer = pl.Trainer(accelerator=accelerator, devices=1, logger=False,
                             callbacks=[writer, *progress_callbacks()], enable_model_summary=False)
        trainer.predict(extractor, datamodule=datamodule, return_predictions=False)
        extractor.set_outputs(names)  # the writer selected the outputs the store lacked; scoring needs all
    return FeatureStore.open(path), reused


@torch.no_grad()
def score_store(detector: torch.nn.Module, store: FeatureStore, names: list[str]) -> Predictions:
    """The detector's p_fake on every labelled row without a phase-1 error, read and widened one tar at a time."""
    labels, codes = store.rows("label").astype(np.int64), store.rows("generator").astype(np.int64)
    failed = np.zeros(store.num_rows, dtype=bool)
    for group in {store.group_of(name) for name in names}:
        failed |= store.errors(group) != ""
    scores = np.full(store.num_rows, np.nan)
    for index in range(len(store.shard_table)):
        start, stop = store.tar_rows(index)
        batch = {}
        boxes = centre_clip_boxes(store, np.arange(start, stop))  # CLIP's window, where it saw a native crop
        if boxes is not None:
            batch["clip_box"] = torch.from_numpy(boxes)
        for name in names:
            info = store.feature_info(name)
            scale = store.read(f"{name}__scale", start, stop) if info.has_scale else None
            batch[name] = widen(info.dtype, store.read(name, start, stop), scale)
        scores[start:stop] = detector(batch).logits.softmax(dim=-1)[:, 1].numpy()
    keep = ~failed & (labels >= 0)
    return Predictions(scores[keep], labels[keep], np.array(store.generator_names, dtype=object)[codes[keep]])


def on_the_fly_scores(model: OnTheFlyDetector, datamodule: ImageShardDataModule, accelerator: str) -> Predictions:
    rows = [r for r in run_predict(model, datamodule, accelerator) if not r["error"] and r["label"] >= 0]
    names = datamodule.generator_names
    return Predictions(np.array([r["p_fake"] for r in rows]), np.array([r["label"] for r in rows]),
                       np.array([names[r["generator"]] for r in rows], dtype=object))


def robustness_sweep(ckpt: str, shards: str, out: str, batch_size: int, num_workers: int, accelerator: str,
                     levels: str | None = None, cache: str | None = None, **paths: str | None) -> list[dict[str, Any]]:
    """Per-generator and average metrics of a trained detector at each sweep level; two tables in `out`."""
    sweep = parse_sweep(levels) if levels else ROBUSTNESS_SWEEP
    model, provenance = OnTheFlyDetector.from_checkpoint(ckpt, **paths)
    cache_dir = Path(cache) if cache else Path(shards) / "robustness_cache"
    cached = model.detector.clip is None  # a fine-tuned CLIP reads pixels, which no store holds
    rows: list[dict[str, Any]] = []
    levels = ProgressLine("robustness", len(sweep), "levels")  # done/total, rate, ETA after every level
    for number, (name, parameter) in enumerate(sweep, 1):
        label, started = perturbation_label(name, parameter), time.monotonic()
        print(f"robustness [{number}/{len(sweep)}] {label}: "
              + ("features from the cache where present" if cached else "features on the fly (fine-tuned CLIP)"),
              flush=True)
        settings = {**pixel_settings(provenance.store.pixels), "perturbation": (name, parameter)}
        datamodule = ImageShardDataModule(shards, batch_size=batch_size, num_workers=num_workers, **settings)
        reused = ""
        if cached:
            store, done_before = cached_features(model, datamodule, cache_dir, label, accelerator)
            predictions = score_store(model.detector, store, list(model.extractor.outputs))
            reused = f", {done_before}/{len(store.shard_table)} tars reused from {store.path}"
        else:
            predictions = on_the_fly_scores(model, datamodule, accelerator)
        for row in protocol_table(predictions, model.threshold):
            rows.append({"perturbation": label, "generator": row["generator"], **{k: row[k] for k in METRICS}})
        print(f"robustness [{number}/{len(sweep)}] {label}: done in {time.monotonic() - started:.1f} s{reused}",
              flush=True)
        print_line(levels.advance(force=True))

    def cell(value: object) -> str:
        return str(value) if isinstance(value, (str, int)) else f"{100 * value:.1f}"

    save_rows(rows, out, "robustness_per_generator", cell)
    overall = [r for r in rows if r["generator"] == "average"]
    print(save_rows([{k: v for k, v in r.items() if k != "generator"} for r in overall], out, "robustness", cell))
    print(f"robustness: tables written to {Path(out) / 'robustness.md'} (and .csv) and "
          f"{Path(out) / 'robustness_per_generator.md'} (and .csv)", flush=True)
    return overall
