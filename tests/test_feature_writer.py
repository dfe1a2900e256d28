"""ZarrFeatureWriter through a real Trainer.predict: values, flags, resume, growing, binding, repair, DDP."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from feature_cache.store import FeatureStore, ProvenanceMismatchError
from feature_cache_fakes import (FAKE_OUTPUTS, GENERATORS, TINY_POOLED, expected_features, make_shard_dir,
                                run_predict)

NUM_ROWS, SHARD_SIZE = 23, 4  # 6 tars, the last one short
REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).parent / "ddp_scripts" / "feature_writer_run.py"


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    return make_shard_dir(tmp_path / "shards", NUM_ROWS, SHARD_SIZE)


@pytest.fixture
def reference(tmp_path: Path, shard_dir: Path) -> FeatureStore:
    """An uninterrupted 1-process run."""
    run_predict(tmp_path / "reference", shard_dir)
    return FeatureStore.open(tmp_path / "reference")


def store_bytes(path: Path) -> dict[str, bytes]:
    """Every data file of a store (not attrs or done markers, whose JSON records sizes and hashes anyway)."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and "/c/" in p.relative_to(path).as_posix()}


def assert_same_store(path: Path, reference: Path) -> None:
    """Bit-identical data files and equal done markers."""
    mine, theirs = store_bytes(path), store_bytes(reference)
    assert sorted(mine) == sorted(theirs)
    assert [k for k in mine if mine[k] != theirs[k]] == []
    for marker in (reference / "g0" / "done").iterdir():
        assert (path / "g0" / "done" / marker.name).read_text() == marker.read_text()


def test_writes_every_row_with_manifest_metadata(reference: FeatureStore) -> None:
    """Catches lost or misplaced rows, error rows keeping computed values, wrong dtypes or wrong row metadata."""
    assert reference.done_tars("g0") == {f"shard-00000{k}.tar" for k in range(6)} and reference.num_rows == NUM_ROWS
    expected = {k: v.copy() for k, v in expected_features(np.arange(NUM_ROWS)).items()}
    for values in expected.values():
        values[5] = 0  # row 5 failed to decode: fill values, not whatever the model returned
    np.testing.assert_array_equal(reference.read("lare"), expected["lare"])  # float32 guidance maps: exact
    assert reference.read("deu").dtype == np.float32 and reference.read("clip_pooled").dtype == np.float16
    np.testing.assert_array_equal(reference.read("clip_pooled"), expected["clip_pooled"].astype(np.float16))
    assert reference.feature_info("clip_pooled").codec == "lz4" and reference.feature_info("deu").codec == "none"
    assert reference.rows("key").tolist() == [f"img{row:05d}" for row in range(NUM_ROWS)]
    with (Path(reference.dataset.shards) / "manifest.csv").open() as f:
        assert reference.rows("sha256").tolist() == [r["sha256"] for r in csv.DictReader(f)]
    np.testing.assert_array_equal(reference.rows("label"), np.arange(NUM_ROWS) % 2)
    names = reference.generator_names
    assert [names[c] for c in reference.rows("generator")] == [GENERATORS[row % 3] for row in range(NUM_ROWS)]
    assert reference.rejected() == [{"path": "bad/broken.png", "reason": "cannot identify image file"},
                                    {"key": "img00005", "row": 5, "reason": "decode failed: truncated file"}]
    common = reference.groups["g0"].extractor.common
    assert common == {"extractor": "fake", "timestep": 200, "unet_hash": "ab12", "trainer_precision": "32-true",
                      "batch_size": 3, "cpu_threads": common["cpu_threads"]} and common["cpu_threads"] >= 1
    assert reference.pixels.resolution == 32 and reference.dataset.layout == "fake"
    assert reference.verify(checksums=True) == []


@pytest.mark.parametrize("clip_dtype", ["int8_rowscale", "float8_e4m3"])
def test_eight_bit_clip_dtypes_round_trip(tmp_path: Path, shard_dir: Path, clip_dtype: str) -> None:
    """Catches the writer storing 8-bit CLIP rows without their scale or in another encoding than `codecs`."""
    from feature_cache.codecs import encode, widen

    run_predict(tmp_path / "s", shard_dir, writer_kwargs={"clip_dtype": clip_dtype, "clip_codec": "none"})
    store = FeatureStore.open(tmp_path / "s")
    expected = expected_features(np.arange(NUM_ROWS))["clip_pooled"]
    expected[5] = 0
    encoded = encode(clip_dtype, expected)
    np.testing.assert_array_equal(store.read("clip_pooled"), encoded.values)
    scale = store.read("clip_pooled__scale") if clip_dtype == "int8_rowscale" else None
    widened = widen(clip_dtype, store.read("clip_pooled"), scale).numpy()
    assert np.abs(widened - expected).max() <= 0.07 * np.abs(expected).max()


def test_inline_and_background_writers_give_identical_stores(tmp_path: Path, shard_dir: Path, reference) -> None:
    """Catches the writer thread reordering, dropping or duplicating rows relative to writing inline."""
    run_predict(tmp_path / "inline", shard_dir, writer_kwargs={"background": False})
    assert_same_store(tmp_path / "inline", reference.path)


def test_nan_and_overflow_rows_are_flagged_and_summarised(tmp_path: Path, shard_dir: Path) -> None:
    """Catches NaN maps or float16 overflow (inf) stored silently: phase 2 must be able to refuse those rows."""
    writer = run_predict(tmp_path / "s", shard_dir, nan_rows=(3,), huge_rows=(7, 8))
    flags = FeatureStore.open(tmp_path / "s").flags("g0")
    assert np.flatnonzero(flags[:, 0]).tolist() == [3, 7, 8] and flags[:, 1].sum() == 0
    assert "3 rows with non-finite values" in writer.summary.text


def test_underflowing_rows_reach_the_stored_flags(tmp_path: Path, shard_dir: Path) -> None:
    """A real row whose float16 clip_pooled values fall below float16's normal range (1e-5..8e-5 against its
    smallest normal 2^-14) must carry, in the stored flags' underflow column, the count of values that are
    subnormal yet not negligible next to the row's largest (≥ max·2^-10), computed here independently; other rows
    0, and the summary says so. Catches the writer dropping the underflow column on its way to the store."""
    writer = run_predict(tmp_path / "s", shard_dir, tiny_rows=(6,))
    store = FeatureStore.open(tmp_path / "s")
    flags = store.flags("g0")
    magnitude = np.abs(TINY_POOLED)
    expected = int(((magnitude < 2 ** -14) & (magnitude >= magnitude.max() * 2 ** -10)).sum())
    assert expected == 6
    assert flags[:, 1].tolist() == [expected if row == 6 else 0 for row in range(NUM_ROWS)]
    assert flags[:, 0].sum() == 0
    stored = store.read("clip_pooled")[6].astype(np.float32)
    assert (np.abs(stored[:6] - TINY_POOLED[:6]) > 1e-3 * TINY_POOLED[:6]).any()  # the precision really was lost
    assert "1 rows with values that underflow their stored dtype" in writer.summary.text


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path: Path, shard_dir: Path, reference) -> None:
    """Catches a background writer losing completed tars on an error, or a resume recomputing done tars."""
    with pytest.raises(RuntimeError, match="fake failure at row 14"):
        run_predict(tmp_path / "s", shard_dir, fail_at_row=14)
    partial = FeatureStore.open(tmp_path / "s").done_tars("g0")
    assert partial == {"shard-000000.tar", "shard-000001.tar", "shard-000002.tar"}
    log = tmp_path / "rows"
    log.mkdir()
    run_predict(tmp_path / "s", shard_dir, rows_log=str(log))
    assert sorted(int(r) for r in (log / "rank0.txt").read_text().split()) == list(range(12, NUM_ROWS))
    assert_same_store(tmp_path / "s", reference.path)


def test_resume_with_another_setting_is_refused_naming_it(tmp_path: Path, shard_dir: Path, reference) -> None:
    """Catches a resume mixing rows of two configs: a common field, a map's own setting, the storage dtype."""
    with pytest.raises(ProvenanceMismatchError, match=r"different config: common.timestep 200 != 300$"):
        run_predict(reference.path, shard_dir, timestep=300)
    with pytest.raises(ProvenanceMismatchError, match=r"different config: maps.deu.deu_mode closed_form != mc$"):
        run_predict(reference.path, shard_dir, deu_mode="mc")
    with pytest.raises(ProvenanceMismatchError, match=r"clip_pooled.storage .*'float16'.* != .*'int8_rowscale'"):
        run_predict(reference.path, shard_dir, writer_kwargs={"clip_dtype": "int8_rowscale"})
    assert FeatureStore.open(reference.path).verify(checksums=True) == []  # nothing computed was lost


def test_a_map_added_later_is_bit_identical_and_nothing_else_is_recomputed(tmp_path: Path, shard_dir: Path,
                                                                           reference) -> None:
    """Catches growing that recomputes present maps, stores the new one elsewhere, or grows under other settings."""
    run_predict(tmp_path / "s", shard_dir, outputs=("lare", "deu"))
    with pytest.raises(ProvenanceMismatchError, match=r"group g0 \(lare\) .* common.timestep 200 != 201$"):
        run_predict(tmp_path / "s", shard_dir, outputs=("lare", "clip_pooled"), timestep=201)
    before = store_bytes(tmp_path / "s")
    log = tmp_path / "rows"
    log.mkdir()
    writer = run_predict(tmp_path / "s", shard_dir, outputs=FAKE_OUTPUTS, rows_log=str(log))
    store = FeatureStore.open(tmp_path / "s")
    assert writer.group == "g1" and list(store.groups["g1"].features) == ["clip_pooled"]
    assert {k: v for k, v in store_bytes(tmp_path / "s").items() if k.startswith("g0")} == \
        {k: v for k, v in before.items() if k.startswith("g0")}
    np.testing.assert_array_equal(store.read("clip_pooled"), reference.read("clip_pooled"))
    assert store.groups["g1"].extractor.common == store.groups["g0"].extractor.common
    rerun = run_predict(tmp_path / "s", shard_dir, outputs=FAKE_OUTPUTS)  # nothing left to compute
    assert rerun.group is None and rerun.summary.unfinished == [] and rerun.summary.not_added == []


def test_an_incomplete_group_is_dropped_in_one_step_and_the_store_grows_afresh(tmp_path: Path, shard_dir: Path,
                                                                              reference) -> None:
    """Catches `--drop_incomplete_group` that leaves the group's entry (the next grow is refused or the attribute
    digest fails at open), leaves its files behind, touches the complete groups' bytes, or drops a complete group."""
    run_predict(tmp_path / "s", shard_dir, outputs=("lare", "deu"))
    with pytest.raises(RuntimeError, match="fake failure"):  # a grow that dies on its first batches
        run_predict(tmp_path / "s", shard_dir, outputs=FAKE_OUTPUTS, fail_at_row=6)
    assert FeatureStore.open(tmp_path / "s").incomplete_groups() == ["g1"]
    before = {k: v for k, v in store_bytes(tmp_path / "s").items() if k.startswith("g0")}
    dropped = run_predict(tmp_path / "s", shard_dir, outputs=("lare", "deu"),
                          writer_kwargs={"drop_incomplete_group": True})
    store = FeatureStore.open(tmp_path / "s")  # the attribute digests were resealed without g1
    assert dropped.group is None and list(store.groups) == ["g0"] and not (tmp_path / "s" / "g1").exists()
    assert {k: v for k, v in store_bytes(tmp_path / "s").items() if k.startswith("g0")} == before
    assert store.verify(checksums=True) == []
    with pytest.raises(ValueError, match="group g0 is complete; only an incomplete group is dropped"):
        store.drop_group("g0")
    run_predict(tmp_path / "s", shard_dir, outputs=FAKE_OUTPUTS)  # grows g1 afresh
    store = FeatureStore.open(tmp_path / "s")
    assert store.incomplete_groups() == [] and list(store.groups["g1"].features) == ["clip_pooled"]
    np.testing.assert_array_equal(store.read("clip_pooled"), reference.read("clip_pooled"))


def test_reconverted_shards_are_refused_naming_the_tars(tmp_path: Path, shard_dir: Path, reference) -> None:
    """Catches a resume against re-converted shards (same count, other pixels) mixing old and new features."""
    make_shard_dir(shard_dir, NUM_ROWS, SHARD_SIZE, pixel_offset=1)
    with pytest.raises(ProvenanceMismatchError, match=r"made from other data .*manifest.csv changed; tars changed "
                                                      r"\(size or mtime\): shard-000000.tar, shard-000001.tar"):
        run_predict(reference.path, shard_dir)
    (shard_dir / "shard-000003.tar").unlink()
    with pytest.raises(FileNotFoundError, match=r"tars shard-000003.tar are missing"):
        run_predict(tmp_path / "new", shard_dir)


def _verify_cli(store: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", "verify", str(store), "--checksums", "true"],
                          capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def _damage(store: Path, damage: str) -> None:
    shard_file = store / "g0" / "deu" / "c" / "2" / "0" / "0" / "0"
    if damage == "deleted":
        shard_file.unlink()
    elif damage == "truncated":
        shard_file.write_bytes(shard_file.read_bytes()[:-3])
    elif damage == "flipped":
        data = bytearray(shard_file.read_bytes())
        data[-20] ^= 1
        shard_file.write_bytes(bytes(data))
    else:
        (store / "rows" / "label" / "c" / "2").unlink()


@pytest.mark.parametrize("damage", ["deleted", "truncated", "flipped", "label_chunk"])
def test_damage_is_found_and_a_rerun_repairs_it_bit_identically(tmp_path: Path, shard_dir: Path, reference,
                                                                damage: str) -> None:
    """Catches damage read as zeros/other values, and a rerun that says "done" without repairing it."""
    run_predict(tmp_path / "s", shard_dir)
    _damage(tmp_path / "s", damage)
    assert {d.tar for d in FeatureStore.open(tmp_path / "s").verify(checksums=True)} == {"shard-000002.tar"}
    run_predict(tmp_path / "s", shard_dir)
    assert FeatureStore.open(tmp_path / "s").verify(checksums=True) == []
    assert_same_store(tmp_path / "s", reference.path)


@pytest.mark.slow
def test_verify_cli_names_the_damaged_tar_and_exits_1(tmp_path: Path, shard_dir: Path) -> None:
    """Catches `python -m cli verify` exiting 0 on a flipped byte, or printing a traceback instead of one line."""
    run_predict(tmp_path / "s", shard_dir)
    assert _verify_cli(tmp_path / "s").returncode == 0
    _damage(tmp_path / "s", "flipped")
    result = _verify_cli(tmp_path / "s")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "damaged: g0 shard-000002.tar: g0/deu/c/2/0/0/0 crc32c mismatch" in result.stdout
    assert result.stderr.strip().splitlines() == [
        f"python -m cli verify: {tmp_path / 's'}: 1 damaged files in shard-000002.tar; rerun the same precompute "
        "command to recompute them"]


def test_a_tar_missing_rows_is_unfinished_in_the_summary(tmp_path: Path, shard_dir: Path, capfd) -> None:
    """Catches a run that loses rows upstream reporting success (the summary comes from the done markers)."""
    writer = run_predict(tmp_path / "s", shard_dir, drop_rows=(9,))
    assert writer.summary.unfinished == ["shard-000002.tar"] and writer.summary.done == 5
    assert "incomplete tars shard-000002.tar (3/4 rows)" in capfd.readouterr().err


def run_script(store: Path, shard_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """One thread per process in every run: Lightning gives DDP ranks cores/ranks threads, and the thread count
    is part of the provenance (a 1-process run resumed by 2 ranks would otherwise be refused)."""
    return subprocess.run([sys.executable, str(SCRIPT), str(store), str(shard_dir), *args],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_ddp_two_processes_write_every_row_once(tmp_path: Path, shard_dir: Path, reference) -> None:
    """Catches rows computed twice or never across 2 gloo ranks, or a summary read before the other rank finished."""
    log = tmp_path / "rows"
    log.mkdir()
    result = run_script(tmp_path / "ddp", shard_dir, "--devices", "2", "--rows-log", str(log))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "6/6 tars done" in result.stdout
    per_rank = [[int(r) for r in (log / f"rank{k}.txt").read_text().split()] for k in (0, 1)]
    assert all(per_rank) and sorted(per_rank[0] + per_rank[1]) == list(range(NUM_ROWS))
    assert_same_store(tmp_path / "ddp", reference.path)


@pytest.mark.slow
def test_ddp_exit_code_is_non_zero_when_a_tar_is_unfinished(tmp_path: Path, shard_dir: Path) -> None:
    """Catches a 2-rank run exiting 0 (or miscounting) while one rank's tar never completed."""
    result = run_script(tmp_path / "ddp", shard_dir, "--devices", "2", "--drop-row", "21")
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]
    assert "5/6 tars done; unfinished: shard-000005.tar" in result.stderr


@pytest.mark.slow
def test_resume_after_sigkill_with_ddp_equals_an_uninterrupted_run(tmp_path: Path, shard_dir: Path,
                                                                   reference) -> None:
    """Catches a done marker written before its files (background thread) or a kill leaving a tar half-trusted."""
    killed = run_script(tmp_path / "s", shard_dir, "--kill-at-row", "20")
    assert killed.returncode == -9, killed.stderr[-3000:]
    partial = FeatureStore.open(tmp_path / "s").done_tars("g0")
    assert len(partial) <= 4 and partial <= {f"shard-00000{k}.tar" for k in range(4)}
    resumed = run_script(tmp_path / "s", shard_dir, "--devices", "2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_store(tmp_path / "s", reference.path)
