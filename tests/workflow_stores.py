"""Small real feature stores for the workflow tests: DEU maps and CLIP layer3 maps whose class signal is known.

Fakes get a higher mean DEU than reals (how much per generator is set by `strength`), so a detector trained a
couple of epochs separates some generators and not others; PNG fakes vs JPEG reals give the format-only
reference something to find. Built with the store's own API (`write_store`), as phase 1's writer builds stores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from feature_cache.provenance import FeatureSpec

from feature_cache_fakes import RAW_PROTOCOL, make_shard_dir, write_store

CHANNELS, GRID, SHARD = 16, 14, 8


def build_store(path: Path, generators: list[str], strength: dict[str, float], rows_per_generator: int,
                layout: str = "genimage", seed: int = 0, timestep: int = 200) -> str:
    """A complete store: each generator folder holds half reals (JPEG q90) and half fakes (PNG), GenImage style;
    in the drct layout a generator holds only fakes, and one with strength None only reals (DRCT's MSCOCO)."""
    n = rows_per_generator * len(generators)
    codes = np.repeat(np.arange(len(generators)), rows_per_generator)
    real_only = np.array([strength[g] is None for g in generators])[codes]
    labels = np.where(real_only, 0, 1 if layout == "drct" else np.arange(n) % 2)  # DRCT: fake-only generators
    make_shard_dir(path.parent / f"{path.stem}_shards", n, SHARD, generators=generators)
    rng = np.random.default_rng(seed)
    shift = np.array([strength[g] or 0.0 for g in generators])[codes] * labels
    deu = np.exp(rng.normal(0, 1, (n, 4, 8, 8)) + shift[:, None, None, None])  # DEU is a variance: positive
    clip = rng.normal(0, 1, (n, CHANNELS, GRID, GRID)) + 0.3 * shift[:, None, None, None]
    write_store(path, lambda rows: {"deu": deu[rows], "clip_layer3": clip[rows]},
                {"deu": FeatureSpec((4, 8, 8), "float32", "zstd", "guidance"),
                 "clip_layer3": FeatureSpec((CHANNELS, GRID, GRID), "float32", "lz4", "clip")},
                generators, num_rows=n, shard_size=SHARD, keys=[f"img{r:05d}" for r in range(n)],
                labels=labels.tolist(), shards=f"{path.stem}_shards", pixels={"resolution": 64, **RAW_PROTOCOL},
                identity=path.stem, generators=codes.tolist(), layout=layout, timestep=timestep,
                row_columns={"format": np.where(labels == 1, "png", "jpeg").tolist(),
                             "jpeg_quality": np.where(labels == 1, -1, 90).tolist(),
                             "width": [64] * n, "height": [64] * n})
    return str(path)


def local_config(path: Path, train: list[str], test: list[str], runs: Path, epochs: int = 2) -> Path:
    """What a user's local.yaml holds: store paths, small dimensions for these stores, a short CPU schedule."""
    path.write_text(yaml.safe_dump({
        "trainer": {"accelerator": "cpu", "max_epochs": epochs,
                    "logger": {"init_args": {"save_dir": str(runs)}}},
        "model": {"init_args": {"visual_channels": CHANNELS, "num_heads": 2, "guidance_dim": 8}},
        "data": {"init_args": {"train": train, "test": test, "val_fraction": 0.25, "batch_size": 16,
                               "num_workers": 0}}}))
    return path
