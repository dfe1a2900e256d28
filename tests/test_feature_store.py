"""FeatureStore format 2: layout, round trip per dtype/codec, typed provenance, lock, verify and repair."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from feature_cache.codecs import encode, widen
from feature_cache.provenance import (DatasetProvenance, ExtractorProvenance, FeatureSpec, GroupInfo, PixelProvenance,
                                      StoreProvenance)
from feature_cache.store import FeatureStore, StoreLockedError, store_lock

TARS = [{"name": f"shard-{k:06d}.tar", "first_row": 4 * k, "num_samples": 4 if k < 2 else 2, "bytes": 100 + k,
         "mtime_ns": 7} for k in range(3)]
SPECS = {"deu": FeatureSpec((4, 8, 8), "float32", "zstd", "guidance"),
         "clip_layer3": FeatureSpec((64, 14, 14), "float16", "lz4", "clip"),
         "clip_pooled": FeatureSpec((16,), "int8_rowscale", "none", "clip")}
EXTRACTOR = ExtractorProvenance({"seed": 0, "timestep": 200, "batch_size": 4},
                                {"deu": {"deu_mode": "closed_form"}, "clip_layer3": {}, "clip_pooled": {}})
PROVENANCE = StoreProvenance(DatasetProvenance("/data/shards", "genimage", "val", "ab" * 32, TARS,
                                               {"real_jpeg_qualities": {"75": 3}, "width": [32, 64],
                                                "height": [32, 64]}),
                             PixelProvenance(resolution=64, protocol="raw", extra={"resize": "bicubic"}))
ROWS = {"key": [f"k{i}" for i in range(10)], "sha256": [f"{i:064x}" for i in range(10)],
        "label": [i % 2 for i in range(10)], "generator": [i % 3 for i in range(10)], "format": ["PNG"] * 10,
        "jpeg_quality": [-1] * 10, "width": [32] * 10, "height": [64] * 10, "path": [f"g/k{i}.png" for i in range(10)]}


def create(path: Path) -> tuple[FeatureStore, str]:
    with store_lock(path):
        store = FeatureStore.create(path, provenance=PROVENANCE, rows=ROWS, generator_names=["adm", "glide", "sdv4"],
                                    rejected=[{"path": "x/bad.png", "reason": "truncated"}])
        return store, store.add_group(SPECS, EXTRACTOR)


def tar_values(index: int, seed: int = 0) -> dict[str, np.ndarray]:
    count = TARS[index]["num_samples"]
    rng = np.random.default_rng(seed + index)
    return {name: rng.standard_normal((count, *spec.shape)).astype(np.float32) for name, spec in SPECS.items()}


def write(store: FeatureStore, group: str, index: int, values: dict[str, np.ndarray],
          errors: list[str] | None = None) -> None:
    stored: dict[str, np.ndarray] = {}
    for name, spec in SPECS.items():
        encoded = encode(spec.dtype, values[name])
        stored[name] = encoded.values
        if encoded.scale is not None:
            stored[f"{name}__scale"] = encoded.scale
    count = TARS[index]["num_samples"]
    store.write_tar(group, index, stored, errors or [""] * count, np.zeros((count, 2), np.int32))


@pytest.fixture
def full(tmp_path: Path) -> tuple[FeatureStore, str, dict[int, dict[str, np.ndarray]]]:
    store, group = create(tmp_path / "s")
    values = {k: tar_values(k) for k in range(3)}
    for k in (2, 0, 1):
        write(store, group, k, values[k])
    return FeatureStore.open(tmp_path / "s", writable=True), group, values


def test_round_trip_per_dtype_and_codec(full) -> None:
    """Catches a feature stored in the wrong dtype/codec, rows written to the wrong tar, or a lost provenance."""
    store, group, values = full
    assert group == "g0" and store.done_tars("g0") == {t["name"] for t in TARS}
    everything = {name: np.concatenate([values[k][name] for k in range(3)]) for name in SPECS}
    np.testing.assert_array_equal(store.read("deu"), everything["deu"])  # float32: exact
    np.testing.assert_array_equal(store.read("clip_layer3", 4, 8), everything["clip_layer3"][4:8].astype(np.float16))
    pooled = widen("int8_rowscale", store.read("clip_pooled"), store.read("clip_pooled__scale")).numpy()
    scale = np.abs(everything["clip_pooled"]).max(axis=1, keepdims=True) / 127
    assert (np.abs(pooled - everything["clip_pooled"]) <= scale / 2 + 1e-7).all()  # half a quantisation step
    assert store.read("clip_pooled").dtype == np.int8
    info = store.feature_info("clip_layer3")
    assert (info.group, info.shape, info.dtype, info.codec) == ("g0", (64, 14, 14), "float16", "lz4")
    layer3 = zarr.open_array(store.path / "g0" / "clip_layer3", mode="r")
    assert layer3.shards == (4, 64, 14, 14) and layer3.chunks == (4, 64, 14, 14)  # a 4-row tar: one chunk
    assert {store.chunk_rows(name) for name in [*SPECS, "clip_pooled__scale"]} == {4}
    assert store.rows("key").tolist() == ROWS["key"] and store.rows("sha256").tolist() == ROWS["sha256"]
    assert store.rows("label").dtype == np.int8 and store.rows("generator").tolist() == ROWS["generator"]
    assert store.provenance == PROVENANCE and store.groups == {"g0": GroupInfo(SPECS, EXTRACTOR)}
    assert store.pixels.extra == {"resize": "bicubic"} and store.dataset.stats["width"] == [32, 64]


def test_a_store_written_before_kinds_were_recorded_gets_them_from_the_one_upgrader(full) -> None:
    """Catches older stores (group attrs without `kind`) refused, or read with a kind guessed from dtype: the
    int8 `clip_pooled` and float16 `clip_layer3` are CLIP features, `deu` a guidance map, as the registry says;
    and a store without rows/path answering with a repair hint that cannot repair it."""
    store, _, _ = full
    root = zarr.open_group(store.path, mode="r+")
    groups = root.attrs["groups"]
    for spec in groups["g0"]["features"].values():
        for key in ("kind", "units", "description"):
            spec.pop(key)
    root.attrs["groups"] = groups
    root.attrs["feature_store"] = {**root.attrs["feature_store"], "format": 2}  # kinds came with format 3
    del root.attrs["attrs_sha256"]  # format 2 had no attribute digests
    reopened = FeatureStore.open(store.path)
    assert {name: reopened.feature_info(name).kind for name in SPECS} == \
        {"deu": "guidance", "clip_layer3": "clip", "clip_pooled": "clip"}
    assert reopened.groups["g0"].features == SPECS
    shutil.rmtree(store.path / "rows" / "path")  # nor did they store image paths
    with pytest.raises(KeyError, match="written before image paths were stored"):
        FeatureStore.open(store.path).rows("path")


def test_every_array_describes_itself_to_a_plain_zarr_reader(full) -> None:
    """Catches arrays without dimension names or meaning (a reader needing this code or its docs to know that
    label 1 is fake, which generator code 2 is, which flags column counts NaNs, or that clip_pooled is int8 times
    a scale), and a per-row image path that is not stored."""
    store, _, _ = full
    root = zarr.open_group(store.path, mode="r")  # plain zarr from here on
    assert root["rows/label"].attrs["codes"] == {"0": "real", "1": "fake", "-1": "unlabelled"}
    assert root["rows/generator"].attrs["codes"] == {"0": "adm", "1": "glide", "2": "sdv4"}
    assert root["rows/path"][:].tolist() == ROWS["path"] and root["rows/width"].attrs["units"] == "pixels"
    assert all(root[f"rows/{name}"].metadata.dimension_names == ("row",) and root[f"rows/{name}"].attrs["kind"] ==
               "metadata" for name in ROWS)
    assert root["g0/clip_layer3"].metadata.dimension_names == ("row", "channel", "y", "x")
    assert root["g0/clip_pooled"].metadata.dimension_names == ("row", "channel")
    assert root["g0/clip_pooled__scale"].metadata.dimension_names == ("row", "channel")
    assert {name: root[f"g0/{name}"].attrs["kind"] for name in SPECS} == {name: s.kind for name, s in SPECS.items()}
    assert "clip_pooled__scale" in root["g0/clip_pooled"].attrs["encoding"]
    flags = root["g0/flags"]
    assert flags.metadata.dimension_names == ("row", "flag") and flags.attrs["columns"] == ["non_finite", "underflow"]
    assert flags.attrs["codes"]["0"].startswith("non_finite: number of NaN/inf")
    assert root["g0/error"].metadata.dimension_names == ("row",) and root["g0/error"].attrs["kind"] == "metadata"


def test_inner_chunks_are_the_largest_divisor_of_the_tar_within_chunk_rows(tmp_path: Path, monkeypatch) -> None:
    """Catches inner chunks that span two tars (CHUNK_ROWS not dividing the shard size: two writers of one
    chunk) and a store written with other chunks (as before format 2's CHUNK_ROWS) no longer reading or
    verifying: chunking is per-array Zarr metadata."""
    monkeypatch.setattr("feature_cache.store.CHUNK_ROWS", 3)  # 4-row tars: chunks of 2 rows, not 3
    store, group = create(tmp_path / "s")
    values = {k: tar_values(k) for k in range(3)}
    for k in range(3):
        write(store, group, k, values[k])
    monkeypatch.undo()
    store = FeatureStore.open(tmp_path / "s")
    assert {store.chunk_rows(name) for name in SPECS} == {2} and store.verify() == []
    np.testing.assert_array_equal(store.read("deu", 1, 9), np.concatenate([values[k]["deu"] for k in range(3)])[1:9])


def test_read_rows_equals_slicing_across_tars(full) -> None:
    """Catches read_rows mixing up rows of different tars (it reads one contiguous block per tar)."""
    store, _, _ = full
    rows = [0, 3, 5, 6, 9]
    np.testing.assert_array_equal(store.read_rows("clip_layer3", rows), store.read("clip_layer3")[rows])
    assert store.read_rows("deu", []).shape == (0, 4, 8, 8)
    with pytest.raises(ValueError, match="sorted rows"):
        store.read_rows("deu", [3, 1])


def test_codecs_count_non_finite_and_underflow_per_row() -> None:
    """Catches a NaN/inf or a float16 overflow/underflow that slips through unflagged, or flags on the wrong row."""
    values = np.ones((4, 2, 3, 3), dtype=np.float32)
    values[1, 0, 0, 0] = np.nan
    values[2, 1, 2, 2] = 1e6  # finite in float32, inf in float16
    values[3] = 1e-6  # a row of DEU-like values, all subnormal in float16
    values[0, 0, 0, 0] = 1e-6  # negligible next to its row's 1.0: not counted
    encoded = encode("float16", values)
    assert encoded.non_finite.tolist() == [0, 1, 1, 0] and encoded.underflow.tolist() == [0, 0, 0, 18]
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(encoded.values, values.astype(np.float16))
    assert encode("float32", values).non_finite.tolist() == [0, 1, 0, 0]
    eight = encode("float8_e4m3", values)
    np.testing.assert_array_equal(widen("float8_e4m3", eight.values).numpy(),
                                  torch.from_numpy(values).to(torch.float8_e4m3fn).float().numpy())


def test_format_1_store_is_refused_with_what_to_do(tmp_path: Path) -> None:
    """Catches an old row-keyed store being read as if its noises were content-keyed."""
    zarr.open_group(tmp_path / "old", mode="w").attrs["feature_store"] = {"format": 1, "complete": True}
    with pytest.raises(ValueError) as error:
        FeatureStore.open(tmp_path / "old")
    assert str(error.value) == (f"feature store {tmp_path / 'old'} is format 1 (noise keyed by row number); "
                                "recompute it with python -m cli precompute into a new path")


def test_lock_refuses_a_second_holder_naming_the_pid(tmp_path: Path) -> None:
    """Catches two runs creating or growing the same store at once (the second must be refused, not wait or mix)."""
    with store_lock(tmp_path / "s"):
        with pytest.raises(StoreLockedError, match=rf"being created/grown by another run \(lock held by pid {os.getpid()}\)"):
            with store_lock(tmp_path / "s"):
                pass
    with store_lock(tmp_path / "s"):  # released: the next run gets it
        pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a store directory"):
        with store_lock(tmp_path / "file"):
            pass


def test_refuses_to_overwrite_a_foreign_directory(tmp_path: Path) -> None:
    """Catches creation wiping a user's directory that happens to be named as the store."""
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "precious.txt").write_text("keep")
    with pytest.raises(ValueError, match="exists and is not a feature store"):
        create(tmp_path / "s")
    assert (tmp_path / "s" / "precious.txt").read_text() == "keep"


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["deleted", "truncated", "flipped"])
def test_verify_finds_damaged_shard_files_and_repair_drops_their_tars(full, damage: str) -> None:
    """Catches a deleted chunk reading as zeros, a truncated one, or a flipped byte giving silently other values."""
    store, group, _ = full
    target = store.path / "g0" / "deu" / "c" / "1" / "0" / "0" / "0"
    {"deleted": target.unlink, "truncated": lambda: target.write_bytes(target.read_bytes()[:-5]),
     "flipped": lambda: _flip_byte(target)}[damage]()
    found = store.verify(checksums=True)
    assert [(d.group, d.tar, d.file) for d in found] == [("g0", "shard-000001.tar", "g0/deu/c/1/0/0/0")]
    assert store.verify(checksums=False) == ([] if damage == "flipped" else found)  # a flip keeps the size
    assert store.repair(found, rows=None) == ["g0: tars shard-000001.tar to recompute"]
    assert store.done_tars(group) == {"shard-000000.tar", "shard-000002.tar"} and store.verify(checksums=True) == []


def test_verify_finds_a_deleted_label_chunk_and_repair_rewrites_rows(full) -> None:
    """Catches a deleted label chunk silently reading as the fill value (rows dropped as unlabelled)."""
    store, _, _ = full
    (store.path / "rows" / "label" / "c" / "2").unlink()
    found = store.verify()
    assert [(d.group, d.tar, d.file, d.problem) for d in found] == [("rows", "shard-000002.tar", "rows/label/c/2",
                                                                      "missing")]
    assert store.repair(found, rows=ROWS) == ["rows/ rewritten from the manifest"]
    assert store.verify(checksums=True) == [] and store.rows("label").tolist() == ROWS["label"]


def test_verify_finds_a_deleted_array_and_repair_recreates_it(full) -> None:
    """Catches a deleted array surfacing as a raw KeyError, or its other tars being trusted after it was lost."""
    store, group, values = full
    (store.path / "g0" / "clip_pooled" / "zarr.json").unlink()
    found = store.verify()
    assert [(d.tar, d.file) for d in found] == [(None, "g0/clip_pooled/zarr.json")]
    with pytest.raises(KeyError, match="array g0/clip_pooled is missing"):
        FeatureStore.open(store.path).read("clip_pooled")
    store.repair(found, rows=None)
    assert store.done_tars(group) == set() and store.verify() == []
    write(store, group, 0, values[0])
    np.testing.assert_array_equal(FeatureStore.open(store.path).read("deu", 0, 4), values[0]["deu"])


def test_done_marker_only_after_a_complete_write(tmp_path: Path) -> None:
    """Catches a done marker for a tar whose arrays are wrong or were not all written."""
    store, group = create(tmp_path / "s")
    bad = tar_values(0)
    bad["deu"] = bad["deu"][:, :2]
    with pytest.raises(ValueError, match=r"array deu is float32 \(4, 2, 8, 8\), expected float32 \(4, 4, 8, 8\)"):
        write(store, group, 0, bad)
    assert store.done_tars(group) == set()


def test_error_rows_are_rejected_and_marker_records_fill_value_files(tmp_path: Path) -> None:
    """Catches a missing fill-value chunk being reported as damage, or failed rows not listed as rejected."""
    store, group = create(tmp_path / "s")
    write(store, group, 2, {name: np.zeros((2, *spec.shape), np.float32) for name, spec in SPECS.items()},
          errors=["", "cannot identify image file"])
    marker = json.loads((store.path / "g0" / "done" / "shard-000002.tar.json").read_text())
    assert marker["files"]["g0/deu/c/2/0/0/0"] == {"bytes": 0, "crc32c": None} and marker["rows"] == 2
    assert store.verify(checksums=True) == []
    assert store.rejected() == [{"path": "x/bad.png", "reason": "truncated"},
                                {"key": "k9", "row": 9, "reason": "cannot identify image file"}]


def test_dataset_binding_names_changed_tars(tmp_path: Path) -> None:
    """Catches a re-converted shard directory (other pixels, same count) being accepted for resume."""
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.csv").write_text("key,row,label,generator,path,shard,format,jpeg_quality,width,height\n"
                                         "a,0,0,g,p,shard-000000.tar,JPEG,75,10,20\nb,1,1,g,q,shard-000001.tar,PNG,,30,5\n")
    table = [{"name": f"shard-00000{k}.tar", "first_row": k, "num_samples": 1} for k in range(2)]
    for entry in table:
        (shards / entry["name"]).write_bytes(b"x" * 10)
    before = DatasetProvenance.from_shard_dir(shards, "folder", "val", table)
    assert before.stats == {"real_jpeg_qualities": {"75": 1}, "width": [10, 30], "height": [5, 20],
                            "fake_side_ranges": [["", 5, 5], ["g", 5, 5]]}
    (shards / "shard-000001.tar").write_bytes(b"y" * 11)
    after = DatasetProvenance.from_shard_dir(shards, "folder", "val", table)
    assert before.binding_problem(after) == "tars changed (size or mtime): shard-000001.tar"
    assert DatasetProvenance.from_attrs(before.to_attrs()) == before
    (shards / "shard-000000.tar").unlink()
    with pytest.raises(FileNotFoundError, match="tars shard-000000.tar are missing"):
        DatasetProvenance.from_shard_dir(shards, "folder", "val", table)


def test_extractor_differences_name_common_and_own_settings_only() -> None:
    """Catches a growing run refused over another map's settings, or accepted with a changed common field."""
    other = ExtractorProvenance({**EXTRACTOR.common, "batch_size": 8},
                                {"deu": {"deu_mode": "mc"}, "clip_layer3": {}, "clip_pooled": {}, "mi": {"x": 1}})
    assert EXTRACTOR.differences(other, ["clip_layer3"]) == ["common.batch_size 4 != 8"]
    assert EXTRACTOR.differences(other, ["deu"]) == ["common.batch_size 4 != 8", "maps.deu.deu_mode closed_form != mc"]


def test_summary_counts_flagged_rows(tmp_path: Path) -> None:
    """Catches NaN rows not reported at the end of precompute or in the store's summary."""
    store, group = create(tmp_path / "s")
    values = tar_values(0)
    values["deu"][2, 0, 0, 0] = np.inf
    stored = {}
    flags = np.zeros((4, 2), np.int32)
    for name, spec in SPECS.items():
        encoded = encode(spec.dtype, values[name])
        stored[name] = encoded.values
        if encoded.scale is not None:
            stored[f"{name}__scale"] = encoded.scale
        flags += np.stack([encoded.non_finite, encoded.underflow], axis=1)
    store.write_tar(group, 0, stored, [""] * 4, flags)
    assert store.flags("deu")[:4, 0].tolist() == [0, 0, 1, 0]
    assert "1/3 tars done, 1 rows with non-finite values" in store.summary()
    assert json.loads((store.path / "g0" / "done" / "shard-000000.tar.json").read_text())["flagged"] == 1
