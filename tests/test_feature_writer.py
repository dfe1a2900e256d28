"""ZarrFeatureWriter through a real Trainer.predict: values, errors, resume, DDP exactly-once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from feature_cache.store import FeatureStore, ProvenanceMismatchError
from feature_cache_fakes import GENERATORS, RAW_PROTOCOL, expected_features, make_shard_dir, run_predict

NUM_ROWS, SHARD_SIZE = 23, 4  # 6 tars, the last one short
SCRIPT = Path(__file__).parent / "ddp_scripts" / "feature_writer_run.py"
ARRAYS = ("lare", "deu", "clip_pooled", "label", "generator", "key", "error", "done")


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    return make_shard_dir(tmp_path / "shards", NUM_ROWS, SHARD_SIZE)


@pytest.fixture
def reference(tmp_path: Path, shard_dir: Path) -> FeatureStore:
    """An uninterrupted 1-process run."""
    run_predict(tmp_path / "reference", shard_dir)
    return FeatureStore.open(tmp_path / "reference")


def assert_same_store(store: FeatureStore, reference: FeatureStore) -> None:
    assert store.done_shards() == reference.done_shards()
    for name in ARRAYS:
        np.testing.assert_array_equal(store.array(name)[:], reference.array(name)[:], err_msg=name)


def test_writes_every_row_with_manifest_metadata(reference: FeatureStore) -> None:
    assert len(reference.done_shards()) == 6 and reference.num_rows == NUM_ROWS
    expected = expected_features(np.arange(NUM_ROWS))
    expected = {k: v.copy() for k, v in expected.items()}
    for values in expected.values():
        values[5] = 0  # row 5 failed to decode: fill values, not whatever the model returned
    for name, values in expected.items():
        assert reference.array(name).dtype == np.float16
        np.testing.assert_array_equal(reference.array(name)[:], values.astype(np.float16))
    assert reference.keys() == [f"img{row:05d}" for row in range(NUM_ROWS)]
    np.testing.assert_array_equal(reference.labels(), np.arange(NUM_ROWS) % 2)
    names = reference.generator_names
    assert [names[c] for c in reference.generators()] == [GENERATORS[row % 3] for row in range(NUM_ROWS)]
    assert reference.rejected() == [{"path": "bad/broken.png", "reason": "cannot identify image file"},
                                    {"key": "img00005", "row": 5, "reason": "decode failed: truncated file"}]
    assert reference.provenance == {"extractor": "fake", "timestep": 200, "unet_hash": "ab12", "resolution": 32,
                                    "shards": str(reference.provenance["shards"]), **RAW_PROTOCOL}


def test_float32_storage(tmp_path: Path, shard_dir: Path) -> None:
    run_predict(tmp_path / "s", shard_dir, feature_dtype="float32")
    stored = FeatureStore.open(tmp_path / "s").array("clip_pooled")
    assert stored.dtype == np.float32
    np.testing.assert_array_equal(stored[:7], expected_features(np.arange(7))["clip_pooled"][:7] * (np.arange(7) != 5)[:, None])


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path: Path, shard_dir: Path,
                                                          reference: FeatureStore) -> None:
    with pytest.raises(RuntimeError, match="fake failure at row 14"):
        run_predict(tmp_path / "s", shard_dir, fail_at_row=14)
    partial = FeatureStore.open(tmp_path / "s").done_shards()
    assert partial == {"shard-000000.tar", "shard-000001.tar", "shard-000002.tar"}
    log = tmp_path / "rows"
    log.mkdir()
    run_predict(tmp_path / "s", shard_dir, rows_log=str(log))
    assert sorted(int(r) for r in (log / "rank0.txt").read_text().split()) == list(range(12, NUM_ROWS))  # done tars skipped
    assert_same_store(FeatureStore.open(tmp_path / "s"), reference)


def test_resume_with_another_config_is_refused(tmp_path: Path, shard_dir: Path, reference: FeatureStore) -> None:
    with pytest.raises(ProvenanceMismatchError, match=r"was made with a different config: timestep 200 != 300$"):
        run_predict(reference.path, shard_dir, timestep=300)


def test_a_tar_missing_rows_at_epoch_end_is_an_error(tmp_path: Path, shard_dir: Path) -> None:
    with pytest.raises(RuntimeError, match=r"incomplete tars shard-000002.tar \(3/4 rows\)"):
        run_predict(tmp_path / "s", shard_dir, drop_rows=(9,))
    assert "shard-000002.tar" not in FeatureStore.open(tmp_path / "s").done_shards()


def run_script(store: Path, shard_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(store), str(shard_dir), *args],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_ddp_two_processes_write_every_row_once(tmp_path: Path, shard_dir: Path, reference: FeatureStore) -> None:
    log = tmp_path / "rows"
    log.mkdir()
    result = run_script(tmp_path / "ddp", shard_dir, "--devices", "2", "--rows-log", str(log))
    assert result.returncode == 0, result.stderr[-3000:]
    per_rank = [[int(r) for r in (log / f"rank{k}.txt").read_text().split()] for k in (0, 1)]
    assert all(per_rank) and sorted(per_rank[0] + per_rank[1]) == list(range(NUM_ROWS))
    assert_same_store(FeatureStore.open(tmp_path / "ddp"), reference)


@pytest.mark.slow
def test_resume_after_sigkill_with_ddp_equals_an_uninterrupted_run(tmp_path: Path, shard_dir: Path,
                                                                   reference: FeatureStore) -> None:
    killed = run_script(tmp_path / "s", shard_dir, "--kill-at-row", "20")
    assert killed.returncode == -9, killed.stderr[-3000:]
    partial = FeatureStore.open(tmp_path / "s").done_shards()
    assert partial == {f"shard-00000{k}.tar" for k in range(4)}  # tar 4 had rows 16..17 buffered when killed
    resumed = run_script(tmp_path / "s", shard_dir, "--devices", "2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_store(FeatureStore.open(tmp_path / "s"), reference)
