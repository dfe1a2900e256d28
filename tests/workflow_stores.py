"""Small real feature stores for the workflow tests: DEU maps and CLIP layer3 maps whose class signal is known.

Fakes get a higher mean DEU than reals (how much per generator is set by `strength`), so a detector trained a
couple of epochs separates some generators and not others; PNG fakes vs JPEG reals give the format-only
reference something to find. Built with `FeatureStore.create`/`write_shard`, the same calls phase 1 makes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from feature_cache.store import FeatureStore

from feature_cache_fakes import RAW_PROTOCOL, make_shard_dir

CHANNELS, GRID, SHARD = 16, 14, 8


def build_store(path: Path, generators: list[str], strength: dict[str, float], rows_per_generator: int,
                layout: str = "genimage", seed: int = 0) -> str:
    """A complete store: each generator folder holds half reals (JPEG q90) and half fakes (PNG), GenImage style;
    in the drct layout a generator holds only fakes, and one with strength None only reals (DRCT's MSCOCO)."""
    n = rows_per_generator * len(generators)
    codes = np.repeat(np.arange(len(generators)), rows_per_generator)
    real_only = np.array([strength[g] is None for g in generators])[codes]
    labels = np.where(real_only, 0, 1 if layout == "drct" else np.arange(n) % 2)  # DRCT: fake-only generators
    shard_dir = make_shard_dir(path.parent / f"{path.stem}_shards", n, SHARD, images=True, generators=generators)
    table = [{"name": f"shard-{k:06d}.tar", "first_row": k * SHARD, "num_samples": min(SHARD, n - k * SHARD)}
             for k in range(-(-n // SHARD))]
    metadata = {"format": np.where(labels == 1, "png", "jpeg"), "jpeg_quality": np.where(labels == 1, -1, 90),
                "width": np.full(n, 64), "height": np.full(n, 64)}
    store = FeatureStore.create(path, shards=table, keys=[f"img{r:05d}" for r in range(n)], labels=labels.tolist(),
                                generators=codes.tolist(), generator_names=generators,
                                feature_shapes={"deu": (4, 8, 8), "clip_layer3": (CHANNELS, GRID, GRID)},
                                feature_dtype="float32", row_metadata=metadata,
                                provenance={"resolution": 64, "shards": str(shard_dir), "layout": layout,
                                            "timestep": 200, **RAW_PROTOCOL})
    rng = np.random.default_rng(seed)
    shift = np.array([strength[g] or 0.0 for g in generators])[codes] * labels
    deu = rng.normal(0, 1, (n, 4, 8, 8)) + shift[:, None, None, None]
    clip = rng.normal(0, 1, (n, CHANNELS, GRID, GRID)) + 0.3 * shift[:, None, None, None]
    for k, entry in enumerate(table):
        a, b = entry["first_row"], entry["first_row"] + entry["num_samples"]
        store.write_shard(k, {"deu": deu[a:b].astype(np.float32), "clip_layer3": clip[a:b].astype(np.float32)},
                          [""] * (b - a))
    return str(path)


def local_config(path: Path, train: list[str], test: list[str], runs: Path, epochs: int = 2) -> Path:
    """What a user's local.yaml holds: store paths, small dimensions for these stores, a short CPU schedule."""
    path.write_text(yaml.safe_dump({
        "trainer": {"accelerator": "cpu", "max_epochs": epochs, "enable_progress_bar": False,
                    "logger": {"init_args": {"save_dir": str(runs)}}},
        "model": {"init_args": {"visual_channels": CHANNELS, "num_heads": 2, "guidance_dim": 8}},
        "data": {"init_args": {"train": train, "test": test, "val_fraction": 0.25, "batch_size": 16,
                               "num_workers": 0}}}))
    return path
