"""FeatureStore: layout, round trip, provenance checks, done markers, rejects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from feature_cache.store import FeatureStore, ProvenanceMismatchError

SHARDS = [{"name": f"shard-{k:06d}.tar", "first_row": 4 * k, "num_samples": 4 if k < 2 else 2} for k in range(3)]
SHAPES = {"deu": (4, 8, 8), "clip_layer3": (64, 14, 14), "clip_pooled": (16,)}
PROVENANCE = {"timestep": 200, "unet_hash": "ab12", "num_noises": 4, "models": {"vae": "sd/vae"}}


def create(path: Path, **overrides: Any) -> FeatureStore:
    kwargs: dict[str, Any] = dict(
        shards=SHARDS, keys=[f"k{i}" for i in range(10)], labels=[i % 2 for i in range(10)],
        generators=[i % 3 for i in range(10)], generator_names=["adm", "glide", "sdv4"], feature_shapes=SHAPES,
        feature_dtype="float16", provenance=PROVENANCE, rejected=[{"path": "x/bad.png", "reason": "truncated"}])
    return FeatureStore.create(path, **{**kwargs, **overrides})


def shard_arrays(index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    count = SHARDS[index]["num_samples"]
    return {name: rng.standard_normal((count, *shape)).astype(np.float32) for name, shape in SHAPES.items()}


def test_round_trip_arrays_metadata_and_layout(tmp_path: Path) -> None:
    store = create(tmp_path / "s")
    rng = np.random.default_rng(0)
    written = {k: shard_arrays(k, rng) for k in range(3)}
    for k in (2, 0, 1):
        store.write_shard(k, written[k], [""] * SHARDS[k]["num_samples"])

    again = FeatureStore.open(tmp_path / "s", expected_provenance=PROVENANCE)
    assert again.num_rows == 10
    assert again.done_shards() == {s["name"] for s in SHARDS}
    for name in SHAPES:
        stored = again.array(name)
        assert stored.dtype == np.float16 and stored.shards == (4, *SHAPES[name])
        expected = np.concatenate([written[k][name] for k in range(3)]).astype(np.float16)
        np.testing.assert_array_equal(stored[:], expected)
    assert again.array("clip_layer3").chunks == (2, 64, 14, 14)  # 25 KB rows: two per ~64 KiB inner chunk
    assert again.array("done").chunks == (1,)
    assert again.keys() == [f"k{i}" for i in range(10)]
    np.testing.assert_array_equal(again.labels(), np.arange(10) % 2)
    assert again.labels().dtype == np.int8 and again.generators().dtype == np.int16
    np.testing.assert_array_equal(again.generators(), np.arange(10) % 3)
    assert again.generator_names == ["adm", "glide", "sdv4"]
    assert again.provenance == PROVENANCE
    assert again.feature_shapes == SHAPES


def test_float32_storage(tmp_path: Path) -> None:
    store = create(tmp_path / "s", feature_dtype="float32")
    values = shard_arrays(0, np.random.default_rng(1))
    store.write_shard(0, values, [""] * 4)
    np.testing.assert_array_equal(store.array("deu")[:4], values["deu"])


def test_provenance_mismatch_names_every_field(tmp_path: Path) -> None:
    create(tmp_path / "s")
    other = {**PROVENANCE, "timestep": 300, "unet_hash": "cd34", "models": {"vae": "other/vae"}, "mode": "mc"}
    with pytest.raises(ProvenanceMismatchError) as error:
        FeatureStore.open(tmp_path / "s", expected_provenance=other)
    assert str(error.value) == (f"feature store {tmp_path / 's'} was made with a different config: mode <missing> != mc, "
                                "models.vae sd/vae != other/vae, timestep 200 != 300, unet_hash ab12 != cd34")


def test_create_over_existing_store_resumes_or_refuses(tmp_path: Path) -> None:
    store = create(tmp_path / "s")
    store.write_shard(1, shard_arrays(1, np.random.default_rng(2)), [""] * 4)
    assert create(tmp_path / "s").done_shards() == {"shard-000001.tar"}  # same config: opened, not wiped
    with pytest.raises(ProvenanceMismatchError, match=r"timestep 200 != 250$"):
        create(tmp_path / "s", provenance={**PROVENANCE, "timestep": 250})
    with pytest.raises(ProvenanceMismatchError, match=r"different config: feature_dtype float16 != float32$"):
        create(tmp_path / "s", feature_dtype="float32")


def test_interrupted_creation_is_redone(tmp_path: Path) -> None:
    store = create(tmp_path / "s")
    store._group.attrs["feature_store"] = {"format": 1, "complete": False}  # as if killed while preallocating
    with pytest.raises(FileNotFoundError, match="no complete feature store"):
        FeatureStore.open(tmp_path / "s")
    assert create(tmp_path / "s").done_shards() == set()


def test_refuses_to_overwrite_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "precious.txt").write_text("keep")
    with pytest.raises(ValueError, match="exists and is not a feature store"):
        create(tmp_path / "s")
    assert (tmp_path / "s" / "precious.txt").read_text() == "keep"


class _FailingArray:
    def __setitem__(self, key: Any, value: Any) -> None:
        raise OSError("disk full")


def test_done_only_after_a_complete_write(tmp_path: Path) -> None:
    store = create(tmp_path / "s")
    bad = shard_arrays(0, np.random.default_rng(3))
    bad["deu"] = bad["deu"][:, :2]
    with pytest.raises(ValueError, match=r"array deu has shape \(4, 2, 8, 8\), expected \(4, 4, 8, 8\)"):
        store.write_shard(0, bad, [""] * 4)
    store.array("clip_pooled")
    store._arrays["clip_pooled"] = _FailingArray()  # the last feature array fails after the others were written
    with pytest.raises(OSError, match="disk full"):
        store.write_shard(0, shard_arrays(0, np.random.default_rng(3)), [""] * 4)
    assert store.done_shards() == set()
    assert not FeatureStore.open(tmp_path / "s").array("done")[0]


def test_rejected_lists_converter_rejects_and_failed_rows(tmp_path: Path) -> None:
    store = create(tmp_path / "s")
    store.write_shard(2, shard_arrays(2, np.random.default_rng(4)), ["", "cannot identify image file"])
    assert store.rejected() == [{"path": "x/bad.png", "reason": "truncated"},
                                {"key": "k9", "row": 9, "reason": "cannot identify image file"}]
    assert store.errors()[9] == "cannot identify image file"


def test_bad_shard_table_is_refused(tmp_path: Path) -> None:
    uneven = [dict(SHARDS[0]), {**SHARDS[1], "num_samples": 3}, {**SHARDS[2], "first_row": 7, "num_samples": 3}]
    with pytest.raises(ValueError, match="shard-000001.tar .* breaks the layout"):
        create(tmp_path / "s", shards=uneven)
