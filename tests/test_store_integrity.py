"""Store format 3 refuses damaged bytes instead of reading them: chunk checksums on every read (Zarr and RawChunks),
missing files as errors, digested attributes, atomic creation, and `verify` through the real CLI (issue 28): its
entry point in-process (`tests/cli_runner.py`), a fresh process only for the kill -9."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from datamodules.row_batches import Rows, SplitRows
from feature_cache.integrity import remove_leftovers
from feature_cache.provenance import FeatureSpec
from feature_cache.store import FeatureStore
from cli_runner import CliResult, run_cli
from feature_cache_fakes import make_shard_dir, run_predict, write_store
from workflow_stores import build_store

REPO = Path(__file__).resolve().parents[1]
SPECS = {"deu": FeatureSpec((4, 8, 8), "float32", "zstd", "guidance"), "clip_layer3": FeatureSpec((16, 14, 14), "float16", "none", "clip"),
         "clip_pooled": FeatureSpec((16,), "int8_rowscale", "none", "clip")}
REPAIR = "rerun the same `python -m cli precompute` command to recompute it"


def values(rows: np.ndarray) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(rows)
    return {name: rng.standard_normal((len(rows), *spec.shape)).astype(np.float32) for name, spec in SPECS.items()}


def make(path: Path, format_version: int | None = None) -> FeatureStore:
    """10 rows in tars of 4, 4, 2 rows (one inner chunk per shard file)."""
    return write_store(path, values, SPECS, ["adm", "sdv4"], num_rows=10, shard_size=4, format_version=format_version)


def files(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def flip_bit(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x04
    path.write_bytes(bytes(data))


def raw_read(store: FeatureStore, name: str) -> np.ndarray:
    """Every row of a feature through the phase-2 reader (RawChunks where the layout allows, else Zarr)."""
    rows = np.arange(store.num_rows)
    part = Rows(0, rows, rows % 2, np.zeros_like(rows), rows.astype(str), rows.astype(str))
    return SplitRows([str(store.path)], [part], [name.removesuffix("__scale")]).read(rows)[name]


def cli(*args: str, cwd: Path = REPO) -> CliResult:
    return run_cli(list(args), cwd=cwd)


def error_line(result: CliResult) -> str:
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(("name", "file", "where"), [
    ("deu", "g0/deu/c/1/0/0/0", "shard file g0/deu/c/1/0/0/0 inner chunk 0 (rows 4..7)"),  # compressed map
    ("clip_layer3", "g0/clip_layer3/c/1/0/0/0", "shard file g0/clip_layer3/c/1/0/0/0 inner chunk 0 (rows 4..7)"),
    ("clip_pooled__scale", "g0/clip_pooled__scale/c/0/0", "shard file g0/clip_pooled__scale/c/0/0 inner chunk 0 "
                                                           "(rows 0..3)")])
def test_a_flipped_bit_in_a_feature_chunk_is_refused_by_both_readers(tmp_path: Path, name: str, file: str,
                                                                      where: str) -> None:
    """One bit flipped in a stored chunk, same size. Catches a read that returns the altered values (format 2 did:
    only `verify --checksums true` saw it), a RawChunks path (uncompressed rows scattered straight into the batch,
    whose checksum is checked on another thread) that hands the rows out before the check, and an error that does
    not name the store, array and chunk or say how to repair."""
    store = make(tmp_path / "s")
    flip_bit(store.path / file, 20)
    before = files(store.path)
    expected = f"feature store {store.path}: array g0/{name} {where} fails its crc32c checksum (bytes changed on disk); "
    with pytest.raises(ValueError) as through_zarr:
        FeatureStore.open(store.path).read(name)
    assert str(through_zarr.value) == expected + REPAIR
    with pytest.raises(ValueError) as through_raw:
        raw_read(FeatureStore.open(store.path), name)
    assert str(through_raw.value) == expected + REPAIR
    assert files(store.path) == before  # refused, nothing repaired or rewritten behind the reader's back


def test_a_partial_read_checks_the_whole_chunk(tmp_path: Path) -> None:
    """A flip in a row of a chunk that the read does not ask for (rows 6..7 of the chunk of rows 4..7). Catches a raw
    reader that checks only whole-chunk reads (a shuffled block rarely matches a chunk) or returns rows without the
    check, and a partial read that puts the right rows in the wrong places."""
    store = make(tmp_path / "s")
    raw = store.raw_reader("clip_layer3")
    assert raw is not None and raw.checksummed and not raw.compressed
    out = np.zeros((2, *SPECS["clip_layer3"].shape), np.float16)
    raw.read(6, 8, list(out))
    np.testing.assert_array_equal(out, store.read("clip_layer3", 6, 8))
    flip_bit(store.path / "g0/clip_layer3/c/1/0/0/0", 20)  # row 4
    with pytest.raises(ValueError, match=r"array g0/clip_layer3 shard file g0/clip_layer3/c/1/0/0/0 inner chunk 0 "
                                         r"\(rows 4..7\) fails its crc32c checksum"):
        raw.read(6, 8, list(out))


def test_a_flipped_bit_in_labels_is_refused_naming_the_chunk(tmp_path: Path) -> None:
    """Catches a flipped label bit read silently (issue 28: `test`'s ACC moved from 57.1 to 60.7, exit 0)."""
    store = make(tmp_path / "s")
    flip_bit(store.path / "rows/label/c/1", (store.path / "rows/label/c/1").stat().st_size // 2)
    with pytest.raises(ValueError) as error:
        FeatureStore.open(store.path).rows("label")
    assert str(error.value) == (f"feature store {store.path}: array rows/label chunk file rows/label/c/1 (rows 4..7) "
                                f"fails its crc32c checksum (bytes changed on disk); {REPAIR}")


def test_a_deleted_shard_file_is_an_error_never_zeros(tmp_path: Path) -> None:
    """Catches the raw reader's old rule (a missing shard file = all fill value) and Zarr's (a missing chunk reads
    as fill value) for a file its done marker says was written; a tar recorded as all fill value still reads 0."""
    store = make(tmp_path / "s")
    (store.path / "g0/clip_layer3/c/1/0/0/0").unlink()
    expected = (f"feature store {store.path}: array g0/clip_layer3 chunk file g0/clip_layer3/c/1/0/0/0 (rows 4..7) "
                f"is missing although its tar is done (deleted?); {REPAIR}")
    for read in (lambda s: s.read("clip_layer3"), lambda s: raw_read(s, "clip_layer3")):
        with pytest.raises(ValueError) as error:
            read(FeatureStore.open(store.path))
        assert str(error.value) == expected
    zeros = write_store(tmp_path / "z", lambda rows: {n: np.zeros_like(v) for n, v in values(rows).items()}, SPECS, ["adm"],
                        num_rows=10, shard_size=4)
    assert not (zeros.path / "g0/clip_layer3/c/1/0/0/0").exists()
    assert not raw_read(zeros, "clip_layer3").any() and not zeros.read("clip_layer3").any()


def test_edited_attributes_are_refused_at_open_and_by_verify(tmp_path: Path) -> None:
    """Swapping generator_names in zarr.json. Catches phase 2 silently relabelling generators (the names are codes'
    meaning) and `verify` reporting no damage; an array's own attributes are covered too."""
    store = make(tmp_path / "s")
    metadata = json.loads((store.path / "zarr.json").read_text())
    metadata["attributes"]["generator_names"] = ["sdv4", "adm"]
    (store.path / "zarr.json").write_text(json.dumps(metadata))
    line = (f"feature store {store.path}: attribute generator_names changed since it was written (its sha256 in "
            "attrs_sha256 no longer matches), so its rows' meaning cannot be trusted; restore the store's zarr.json "
            "files or recompute it with precompute into a new path")
    with pytest.raises(ValueError) as error:
        FeatureStore.open(store.path)
    assert str(error.value) == line
    assert error_line(cli("verify", str(store.path))) == f"python -m cli verify: {line}  (CLI_TRACEBACK=1 for the traceback)"
    other = make(tmp_path / "t")
    label = json.loads((other.path / "rows/label/zarr.json").read_text())
    label["attributes"] = {"meaning": {"0": "fake", "1": "real"}}
    (other.path / "rows/label/zarr.json").write_text(json.dumps(label))
    with pytest.raises(ValueError, match="attributes of rows/label changed since it was written"):
        FeatureStore.open(other.path)


def test_deleted_done_marker_fails_verify_with_one_line(tmp_path: Path) -> None:
    """Catches `verify` exiting 0 on a store whose done markers disagree with its data (fit refuses it)."""
    store = make(tmp_path / "s")
    assert cli("verify", str(store.path)).returncode == 0
    (store.path / "g0/done/shard-000001.tar.json").unlink()
    result = cli("verify", str(store.path))
    assert "damaged: g0 shard-000001.tar: g0/done/shard-000001.tar.json missing while the tar's files exist" \
        in result.stdout
    assert error_line(result) == (f"python -m cli verify: {store.path}: 1 damaged files in shard-000001.tar; rerun the "
                                  "same precompute command to recompute them")


def test_verify_checks_checksums_by_default(tmp_path: Path) -> None:
    """Catches `verify` passing a same-size flip unless asked for checksums, and `--checksums false` no longer
    being the cheap presence-and-size check."""
    store = make(tmp_path / "s")
    flip_bit(store.path / "g0/deu/c/0/0/0/0", 20)
    result = cli("verify", str(store.path))
    assert "damaged: g0 shard-000000.tar: g0/deu/c/0/0/0/0 crc32c mismatch (bytes changed)" in result.stdout
    assert error_line(result).endswith("1 damaged files in shard-000000.tar; rerun the same precompute command to "
                                       "recompute them")
    quick = cli("verify", str(store.path), "--checksums", "false")
    assert quick.returncode == 0 and "no damage found (presence and sizes)" in quick.stdout


@pytest.mark.slow
def test_creation_killed_in_its_first_write_is_restarted_and_leftovers_are_cleaned(tmp_path: Path) -> None:
    """A kill -9 while zarr writes the very first zarr.json (the hook kills the process inside zarr's atomic
    write, leaving `zarr.<uuid>.partial`), then a rerun. Catches every rerun refusing "the directory exists and is
    not a feature store" (issue 28), leftovers never removed, and a restarted store that differs from an
    uninterrupted one."""
    shards = make_shard_dir(tmp_path / "shards", num_rows=10, shard_size=4)
    script = ("import os, signal, sys, pathlib\n"
              "sys.path.insert(0, 'tests')\n"
              "real = pathlib.Path.replace\n"
              "def killed(self, target):\n"
              "    if pathlib.Path(target).name == 'zarr.json': os.kill(os.getpid(), signal.SIGKILL)\n"
              "    return real(self, target)\n"
              "pathlib.Path.replace = killed\n"
              "from feature_cache_fakes import run_predict\n"
              f"run_predict(pathlib.Path({str(tmp_path / 's')!r}), pathlib.Path({str(shards)!r}))\n")
    killed = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert sorted(p.name.split(".")[-1] for p in (tmp_path / "s").iterdir()) == ["lock", "partial"]
    run_predict(tmp_path / "s", shards)
    run_predict(tmp_path / "reference", shards)
    mine, reference = files(tmp_path / "s"), files(tmp_path / "reference")
    assert not [name for name in mine if name.endswith((".partial", ".tmp"))]
    assert sorted(mine) == sorted(reference)
    assert [n for n in mine if "/c/" in n and mine[n] != reference[n]] == []


def test_leftovers_of_killed_writes_in_a_complete_store_are_removed_by_the_next_run(tmp_path: Path) -> None:
    """Catches `.partial` / `.tmp` files of killed writes (zarr's chunk writes, our done markers) piling up."""
    shards = make_shard_dir(tmp_path / "shards", num_rows=10, shard_size=4)
    run_predict(tmp_path / "s", shards)
    leftovers = ["g0/deu/c/1/0/0/0.0123456789abcdef0123456789abcdef.partial", "g0/done/.shard-000001.tar.json.77.tmp"]
    for name in leftovers:
        (tmp_path / "s" / name).write_bytes(b"half")
    before = {n: b for n, b in files(tmp_path / "s").items() if n not in leftovers}
    (tmp_path / "s" / "user.tmp").write_text("not ours")  # not a leftover pattern: kept
    run_predict(tmp_path / "s", shards)
    after = files(tmp_path / "s")
    assert not set(leftovers) & set(after) and after["user.tmp"] == b"not ours"
    assert {n: b for n, b in after.items() if "/c/" in n} == {n: b for n, b in before.items() if "/c/" in n}
    assert remove_leftovers(tmp_path / "s") == []


def test_format_2_stores_stay_readable_and_verifiable(tmp_path: Path) -> None:
    """A store written as format 2 (no chunk checksums, sha256 done markers, no attribute digests). Catches format
    3 refusing older stores, RawChunks no longer reading their layout, and `verify` losing their checksum check."""
    store = make(tmp_path / "s", format_version=2)
    opened = FeatureStore.open(store.path)
    assert opened.format == 2 and "attrs_sha256" not in json.loads((store.path / "zarr.json").read_text())["attributes"]
    for name in SPECS:
        np.testing.assert_array_equal(raw_read(opened, name), opened.read(name))
    marker = json.loads((store.path / "g0/done/shard-000000.tar.json").read_text())
    assert set(marker["files"]["g0/deu/c/0/0/0/0"]) == {"bytes", "sha256"}
    flip_bit(store.path / "g0/deu/c/0/0/0/0", 20)
    assert [d.problem for d in opened.verify(checksums=True)] == ["sha256 mismatch (bytes changed)"]


@pytest.mark.parametrize(("target", "where"), [
    ("g0/deu/c/1/0/0/0", "array g0/deu shard file g0/deu/c/1/0/0/0 inner chunk 0 (rows 8..15)"),
    ("g0/clip_layer3/c/2/0/0/0", "array g0/clip_layer3 shard file g0/clip_layer3/c/2/0/0/0 inner chunk 0 (rows 16..23)"),
    ("rows/label/c/0", "array rows/label chunk file rows/label/c/0 (rows 0..7)")])
def test_fit_refuses_a_store_with_a_flipped_bit(tmp_path: Path, target: str, where: str) -> None:
    """`python -m cli fit` (configs/deua.yaml) on a store with one flipped bit in a map, CLIP or label chunk.
    Catches training on the altered values (exit 0) and a traceback instead of the one line; the store is unchanged."""
    train = Path(build_store(tmp_path / "train.zarr", ["sdv4"], {"sdv4": 1.5}, 32))
    test = build_store(tmp_path / "test.zarr", ["sdv4"], {"sdv4": 1.5}, 16, seed=1)
    (tmp_path / "local.yaml").write_text(yaml.safe_dump({
        "trainer": {"accelerator": "cpu", "max_epochs": 1,
                    "logger": {"init_args": {"save_dir": str(tmp_path / "runs")}}},
        "model": {"init_args": {"visual_channels": 16, "num_heads": 2, "guidance_dim": 8}},
        "data": {"init_args": {"train": [str(train)], "test": [test], "val_fraction": 0.25, "batch_size": 8,
                               "num_workers": 0}}}))
    size = (train / target).stat().st_size
    flip_bit(train / target, 20 if "/c/" in target and target.startswith("g0") else size // 2)
    before = files(train)
    result = cli("fit", "--config", str(REPO / "configs/deua.yaml"), "--config", str(tmp_path / "local.yaml"),
                 cwd=tmp_path)
    assert error_line(result) == (f"python -m cli fit: feature store {train}: {where} fails its crc32c checksum (bytes "
                                  f"changed on disk); {REPAIR}  (CLI_TRACEBACK=1 for the traceback)")
    assert files(train) == before
