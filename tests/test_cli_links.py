"""What LightningCLI derives from the stores (CLIP sizes) and checks against the data (guidance), on the real
configs and a real (fake-valued) store; the classes are built, nothing is run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cli.lightning_cli import ForensicsCLI, build_cli
from feature_cache.provenance import FeatureSpec

from feature_cache_fakes import write_store

REPO = Path(__file__).resolve().parents[1]
LAYER3, POOLED = (16, 7, 7), (8,)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("links") / "train.zarr"
    shapes = {"deu": (4, 8, 8), "lare": (4, 8, 8), "clip_layer3": LAYER3, "clip_pooled": POOLED}
    write_store(path, lambda rows: {n: np.ones((len(rows), *s), np.float32) for n, s in shapes.items()},
                {n: FeatureSpec(s, "float32", "zstd", "guidance") if n in ("deu", "lare")
                 else FeatureSpec(s, "float16", "lz4", "clip") for n, s in shapes.items()}, ["g"])
    return path


def _built(config: str, store: Path, *extra: str) -> ForensicsCLI:
    return build_cli(["--config", str(REPO / "configs" / config), "--data.init_args.train", f"[{store}]",
                      "--data.init_args.test", "[]", "--trainer.logger", "false", "--trainer.callbacks", "[]", *extra],
                     run=False)


@pytest.mark.parametrize("config,features", [("deua.yaml", "[deu, clip_layer3]"),
                                             ("lare2.yaml", "[lare, clip_layer3, clip_pooled]")])
def test_clip_sizes_come_from_the_store_not_the_config(store, config, features):
    """Catches CLIP sizes taken from the config (RN50's 1024/14) instead of the store the model reads, a value stated
    in a config winning over the store, and `pooled_dim` handed to a detector that has no such argument."""
    cli = _built(config, store, "--data.init_args.features", features, "--model.init_args.visual_channels", "1024")
    assert (cli.model.visual_channels, cli.model.grid_size) == (LAYER3[0], LAYER3[-1])
    if config == "lare2.yaml":
        assert cli.model.pooled_dim == POOLED[0] and cli.model.head.in_features == 2 * LAYER3[0] + POOLED[0]
    else:
        assert "pooled_dim" not in cli.model.hparams


def test_guidance_the_data_does_not_request_is_one_error_before_any_run(store):
    """Catches a detector guided by a map the datamodule does not load failing only at the first batch."""
    with pytest.raises(ValueError, match=r"DEUADetector reads \['deu'\], which data.init_args.features "
                                         r"\['clip_layer3'\] does not request"):
        _built("deua.yaml", store, "--data.init_args.features", "[clip_layer3]")


def test_guidance_channels_come_from_the_store_for_a_map_no_module_registers(tmp_path):
    """Catches phase 2 learning a guidance map's channels from the map registry (which would need the user's map
    module importable in fit/test) instead of the store, and a CLIP feature (kind `clip`) handed over as guidance."""
    path = tmp_path / "train.zarr"
    shapes = {"toy_unregistered": (2, 8, 8), "clip_layer3": LAYER3}
    write_store(path, lambda rows: {n: np.ones((len(rows), *s), np.float32) for n, s in shapes.items()},
                {"toy_unregistered": FeatureSpec(shapes["toy_unregistered"], "float32", "zstd", "guidance"),
                 "clip_layer3": FeatureSpec(LAYER3, "float16", "lz4", "clip")}, ["g"])
    cli = _built("deua.yaml", path, "--data.init_args.features", "[toy_unregistered, clip_layer3]",
                 "--model.init_args.guidance", "[toy_unregistered]")
    assert cli.model.map_channels == {"toy_unregistered": 2} and cli.model.guidance_channels == 2
    assert cli.model.hparams["guidance_channels"] == {"toy_unregistered": 2}
