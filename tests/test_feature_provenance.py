"""FeatureProvenance: what a checkpoint records about its features, its one upgrader, and the one rebuild from it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from datamodules.image_shards import pixel_settings
from feature_cache.provenance import (DatasetProvenance, ExtractorProvenance, FeatureProvenance, FeatureSpec,
                                      GroupInfo, PixelProvenance, StoreProvenance, upgrade_attrs)
from lightning_modules.feature_extractor import FeatureExtractor

STATS = {"real_jpeg_qualities": {"75": 2, "90": 1}, "width": [32, 64], "height": [32, 48], "fake_side_ranges": []}
DATASET = DatasetProvenance("/data/train", "genimage", "train", "m0", [{"name": "shard-000000.tar", "first_row": 0,
                                                                      "num_samples": 2, "bytes": 10, "mtime_ns": 1}],
                            STATS)
PIXELS = PixelProvenance(64, "jpeg_aligned", None, 0, "sha256", extra={"resize": "PIL bilinear"})
COMMON = {"unet_hash": "aaaa", "timestep": 200, "seed": 0, "batch_size": 4}
GROUPS = {"g0": GroupInfo({"lare": FeatureSpec((4, 8, 8), "float32", "zstd", "guidance")},
                          ExtractorProvenance(COMMON, {"lare": {}}, {"lare": "lightning_modules.maps.builtin"})),
          "g1": GroupInfo({"deu": FeatureSpec((4, 8, 8), "float32", "zstd", "guidance"),
                           "mi": FeatureSpec((4, 8, 8), "float32", "zstd", "guidance")},
                          ExtractorProvenance(COMMON, {"deu": {"posterior_sha256": "bbbb"}, "mi": {}},
                                              {"deu": "user_maps", "mi": "lightning_modules.maps.builtin"}))}


def test_round_trip_through_a_checkpoint_keeps_every_field(tmp_path: Path) -> None:
    """Catches a field lost or retyped between the store and the checkpoint (tuples, None, nested maps), or attrs a
    weights-only checkpoint cannot hold."""
    provenance = FeatureProvenance.of_store(StoreProvenance(DATASET, PIXELS), GROUPS, ["lare", "deu"])
    assert sorted(provenance.features) == ["deu", "lare"]  # only the features the detector reads
    torch.save({"feature_provenance": provenance.to_attrs()}, tmp_path / "c.ckpt")
    loaded = torch.load(tmp_path / "c.ckpt", weights_only=True)["feature_provenance"]
    assert FeatureProvenance.from_attrs(loaded) == provenance
    assert provenance.extractor() == ExtractorProvenance(COMMON, {"lare": {}, "deu": {"posterior_sha256": "bbbb"}},
                                                         {"lare": "lightning_modules.maps.builtin",
                                                          "deu": "user_maps"})
    assert provenance.map_modules() == ["lightning_modules.maps.builtin", "user_maps"]


def test_a_checkpoint_of_the_previous_format_is_upgraded() -> None:
    """Catches old checkpoints (the loose dict of datamodules/cached_features.py) no longer loading, their
    `protocol_seed` landing in `extra`, or a quality the old code drew per manifest key being reproduced as if it
    were keyed by sha256 (the pixels would silently differ from training's)."""
    old = {"dataset": DATASET.to_attrs(),
           "pixels": {"resolution": 64, "protocol": "raw", "resize": "PIL bilinear", "jpeg_quality": None,
                      "jpeg_quality_source": None, "protocol_seed": None, "size_filter": False,
                      "perturbation": ["none", 0.0], "clip_input": "resize"},
           "features": {"deu": {"common": COMMON, "map": {"posterior_sha256": "bbbb"}, "module": "user_maps"},
                        "clip_layer3": {"common": COMMON, "map": {"clip_hash": "cccc"}}}}
    provenance = FeatureProvenance.from_attrs(old)
    pixels = provenance.store.pixels
    assert (pixels.seed, pixels.quality_key, pixels.extra) == (None, None, {"resize": "PIL bilinear",
                                                                            "jpeg_quality_source": None})
    assert provenance.features["deu"].spec is None and provenance.map_modules() == ["user_maps"]
    assert provenance.extractor().maps == {"deu": {"posterior_sha256": "bbbb"}, "clip_layer3": {"clip_hash": "cccc"}}
    assert FeatureProvenance.from_attrs(provenance.to_attrs()) == provenance  # upgraded once, then stable
    drawn = FeatureProvenance.from_attrs({**old, "pixels": {**old["pixels"], "protocol": "jpeg_aligned",
                                                            "protocol_seed": 0}})
    assert (drawn.store.pixels.seed, drawn.store.pixels.quality_key) == (0, "manifest key")
    with pytest.raises(ValueError, match=r"drawn per manifest key by an older version .* recompute the store"):
        pixel_settings(drawn.store.pixels)


def test_older_store_attrs_read_like_todays() -> None:
    """Catches a store written before the rename comparing unequal to a new one of the same settings (phase 2
    refusing to mix them, a resume refused) because `protocol_seed` survived as an unknown extra field."""
    old_pixels = {**PixelProvenance(64).to_attrs(), "protocol_seed": None}
    del old_pixels["seed"], old_pixels["quality_key"]
    attrs = upgrade_attrs({"feature_store": {"format": 2, "complete": True},
                           "provenance": {"dataset": DATASET.to_attrs(), "pixels": old_pixels}, "groups": {}})
    assert StoreProvenance.from_attrs(attrs["provenance"]).pixels == PixelProvenance(64)


def test_flat_provenance_from_before_format_2_is_one_clear_error() -> None:
    """Catches a format-1 checkpoint (flat settings, noise keyed by row) being half-read into wrong settings."""
    with pytest.raises(ValueError, match=r"written before feature store format 2 .* retrain"):
        FeatureProvenance.from_attrs({"unet_hash": "aaaa", "timestep": 200, "resolution": 64})


def test_differences_name_the_field_and_ignore_which_images() -> None:
    """Catches `test` accepting a store made with another posterior, stored dtype or pixel setting, or refusing a
    test store only because it holds other images or stores a map with another (lossless) codec: zstd guidance
    maps, the writer's default before issue 31, against today's `none`, which also must not stop a resume."""
    trained = FeatureProvenance.of_store(StoreProvenance(DATASET, PIXELS), GROUPS, ["deu"])
    other_images = DatasetProvenance("/data/test", "genimage", "val", "m1", [], STATS)
    same_settings = FeatureProvenance.of_store(StoreProvenance(other_images, PIXELS), GROUPS, ["deu"])
    assert trained.differences(same_settings) == []
    no_codec = {"g1": GroupInfo({"deu": FeatureSpec((4, 8, 8), "float32", "none", "guidance")}, GROUPS["g1"].extractor)}
    assert trained.differences(FeatureProvenance.of_store(StoreProvenance(DATASET, PIXELS), no_codec, ["deu"])) == []
    assert no_codec["g1"].features["deu"] == GROUPS["g1"].features["deu"]  # what the writer's resume compares
    groups = {"g1": GroupInfo({"deu": FeatureSpec((4, 8, 8), "float16", "zstd", "guidance")},
                              ExtractorProvenance(COMMON, {"deu": {"posterior_sha256": "dddd"}}, {}))}
    other = FeatureProvenance.of_store(StoreProvenance(DATASET, PixelProvenance(64, "raw", extra=PIXELS.extra)), groups, ["deu"])
    assert trained.differences(other) == [
        "deu.map.posterior_sha256 bbbb != dddd", "deu.spec.dtype float32 != float16",
        "pixels.protocol jpeg_aligned != raw", "pixels.quality_key sha256 != None", "pixels.seed 0 != None"]


def test_from_provenance_rebuilds_the_extractor_and_refuses_other_weights(tiny_model_paths) -> None:
    """Catches the on-the-fly extractor rebuilt with other settings than the features' (a lost argument falls back
    to its default) and weights that differ from the recorded hashes being accepted."""
    extractor = FeatureExtractor(str(tiny_model_paths["sd"]), outputs=["lare"], num_noises=2, timestep=300, seed=5)
    recorded = ExtractorProvenance.from_attrs(extractor.provenance())
    spec = {"lare": FeatureSpec((4, 8, 8), "float32", "zstd", "guidance")}
    provenance = FeatureProvenance.of_store(StoreProvenance(DATASET, PIXELS), {"g": GroupInfo(spec, recorded)},
                                            ["lare"])
    rebuilt = FeatureExtractor.from_provenance(provenance)
    assert (rebuilt.hparams.num_noises, rebuilt.hparams.timestep, rebuilt.hparams.seed) == (2, 300, 5)
    assert rebuilt.provenance() == extractor.provenance()
    tampered = ExtractorProvenance({**recorded.common, "unet_hash": "aaaa"}, recorded.maps, recorded.modules)
    other = FeatureProvenance.of_store(StoreProvenance(DATASET, PIXELS), {"g": GroupInfo(spec, tampered)}, ["lare"])
    with pytest.raises(ValueError, match=r"differs from the one the detector's features came from .*"
                                         r"common.unet_hash aaaa != "):
        FeatureExtractor.from_provenance(other)
