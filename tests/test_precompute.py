"""`python -m cli precompute` on the tiny models and a mini image set: exactly once, resumable, honest.

Every run goes through the real CLI entry point, writing a real Zarr store; stores are compared file by file.
Runs are in-process (`tests/cli_runner.py`) except where the process boundary is under test: 2 DDP ranks
(Lightning re-executes the command line), kill -9, piped stdout, two concurrent runs.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest

from datamodules.demo_data import build_demo_images
from datamodules.image_shards import ImageShardDataModule
from datamodules.shards import convert
from feature_cache.store import FeatureStore
from lightning_modules.laplace_fit import LaplaceFit

from cli_runner import CliResult, cli_env, run_cli

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
FEATURES = ("lare", "deu", "aleatoric", "mi", "clip_layer3", "clip_pooled")
USER_CONFIG = "# the user's own config, not the run's\nseed_everything: 123\n"


@pytest.fixture(scope="module")
def setup(tiny_model_paths, tmp_path_factory) -> dict[str, Path]:
    """Demo images plus one corrupt file → 2-image tars; a posterior fitted on them; a user's config.yaml in cwd."""
    root = tmp_path_factory.mktemp("precompute")
    images = build_demo_images(root / "images", {"val": 6}, tile_size=64)
    corrupt = images / "demo_smooth" / "val" / "ai" / "fake_9999.png"
    corrupt.write_bytes((images / "demo_smooth" / "val" / "ai" / "fake_0000.png").read_bytes()[:200])
    convert("genimage", images, "val", root / "shards", shard_size=2, workers=1)
    posterior = root / "posterior.pt"
    fit = LaplaceFit(str(tiny_model_paths["sd"]), output=str(posterior), num_noises=2)
    data = ImageShardDataModule(str(root / "shards"), resolution=64, batch_size=4, num_workers=0)
    pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).predict(fit, datamodule=data,
                                                                                  return_predictions=False)
    (root / "config.yaml").write_text(USER_CONFIG)
    return {"root": root, "shards": root / "shards", "posterior": posterior, **tiny_model_paths}


def _command(setup: dict[str, Path], store: Path, *extra: str, outputs: tuple[str, ...] = FEATURES) -> list[str]:
    return [sys.executable, "-m", "cli", *_args(setup, store, *extra, outputs=outputs)]


def _args(setup: dict[str, Path], store: Path, *extra: str, outputs: tuple[str, ...] = FEATURES) -> list[str]:
    return ["precompute", "--config", str(REPO / "configs" / "precompute.yaml"),
            "--model.init_args.sd", str(setup["sd"]), "--model.init_args.clip", str(setup["clip"]),
            "--model.init_args.posterior", str(setup["posterior"]), "--model.init_args.num_noises", "2",
            "--model.init_args.outputs", f"[{','.join(outputs)}]",
            "--model.init_args.autocast_dtype", "float32", "--data.init_args.shards", str(setup["shards"]),
            "--data.init_args.resolution", "64", "--data.init_args.batch_size", "3",
            "--data.init_args.num_workers", "1", "--trainer.accelerator", "cpu", "--trainer.callbacks", "[]",
            "--store", str(store), *extra]


def _env(threads: int = 1) -> dict[str, str]:
    """One CPU thread per process in every run: oneDNN splits reductions by thread count, so bit-identity
    across 1 and 2 ranks holds for equal thread counts (and the count is part of the provenance)."""
    return cli_env(OMP_NUM_THREADS=str(threads))


def _run(setup: dict[str, Path], store: Path, *extra: str, outputs: tuple[str, ...] = FEATURES,
         threads: int = 1, subprocess_: bool = False) -> CliResult:
    """`python -m cli precompute` in the user's folder: in-process unless `subprocess_` (a process boundary)."""
    return run_cli(_args(setup, store, *extra, outputs=outputs), cwd=setup["root"], env=_env(threads),
                   subprocess_=subprocess_, timeout=600)


def _data_files(store: Path, group: str | None = None) -> dict[str, bytes]:
    """Every chunk/shard file of a store (or of one group), by relative path."""
    return {p.relative_to(store).as_posix(): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file() and "/c/" in p.relative_to(store).as_posix()
            and (group is None or p.relative_to(store).parts[0] == group)}


def _feature(store: Path, name: str) -> np.ndarray:
    return FeatureStore.open(store).read(name)


def _assert_bit_identical(a: Path, b: Path) -> None:
    for name in FEATURES:
        assert _feature(a, name).tobytes() == _feature(b, name).tobytes(), f"{name} differs"
    mine, theirs = _data_files(a), _data_files(b)
    assert sorted(mine) == sorted(theirs) and [k for k in mine if mine[k] != theirs[k]] == []


def _error_line(stderr: str) -> str:
    """The one error line a refused run ends with (before it: only log lines, never a traceback)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    return stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def single_process_store(setup) -> Path:
    store = setup["root"] / "one.zarr"
    result = _run(setup, store)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "precompute: feature store" in result.stdout and "12/12 tars done" in result.stdout
    flagged = bool((FeatureStore.open(store).flags("g0")[:, 1] > 0).any())  # underflow rows: said iff there are any
    assert ("rows with values that underflow their stored dtype" in result.stdout) == flagged
    return store


def test_single_process_store_is_complete_and_records_the_corrupt_image(setup, single_process_store):
    """Catches missing tars, non-finite or non-positive variances, an unrecorded reject or a thin provenance."""
    store = FeatureStore.open(single_process_store)
    assert len(store.done_tars("g0")) == len(store.shard_table) == 12  # 24 decodable images, 2 per tar
    assert all(np.isfinite(store.read(name).astype(np.float32)).all() for name in FEATURES)
    assert (store.read("deu") > 0).all() and (store.read("lare") > 0).all()  # variances and squared errors
    assert store.read("deu").dtype == np.float32 and store.read("clip_layer3").dtype == np.float16
    rejected = store.rejected()
    assert [Path(r["path"]).name for r in rejected] == ["fake_9999.png"] and rejected[0]["reason"]
    extractor = store.groups["g0"].extractor
    assert extractor.common["timestep"] == 200 and extractor.common["num_noises"] == 2
    assert extractor.common["trainer_precision"] == "32-true" and extractor.common["batch_size"] == 3
    assert extractor.common["cpu_threads"] == 1 and extractor.common["unet_hash"]
    assert extractor.maps["deu"]["posterior_sha256"] and store.pixels.resolution == 64
    assert store.verify(checksums=True) == [] and store.flags("g0")[:, 0].sum() == 0
    # A row is flagged as underflow exactly where a float16 subnormal is not negligible next to the row's largest
    # value (≥ max·2^-10, float16's own precision). The guidance maps are float32 and cannot underflow here.
    layer3 = np.abs(store.read("clip_layer3").astype(np.float32))
    row_max = layer3.max(axis=(1, 2, 3), keepdims=True)
    lost = (layer3 > 0) & (layer3 < 2 ** -14) & (layer3 >= row_max * 2 ** -10)
    assert (store.flags("g0")[:, 1] > 0).tolist() == lost.any(axis=(1, 2, 3)).tolist()


def test_config_is_saved_in_the_store_not_over_the_users_file(setup, single_process_store):
    """Catches the run's resolved config replacing a config.yaml the user keeps in the working directory."""
    assert (setup["root"] / "config.yaml").read_text() == USER_CONFIG
    saved = list((single_process_store / "configs").glob("precompute-g0-*.yaml"))
    assert len(saved) == 1 and f"store: {single_process_store}" in saved[0].read_text()


def test_two_ddp_ranks_write_the_same_arrays_as_one(setup, single_process_store):
    """Catches rows lost, duplicated or computed differently when 2 gloo ranks share the tars."""
    store = setup["root"] / "two.zarr"
    result = _run(setup, store, "--trainer.devices", "2", "--trainer.strategy", "ddp", subprocess_=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "12/12 tars done" in result.stdout
    _assert_bit_identical(single_process_store, store)


def test_sigkill_then_rerun_equals_an_uninterrupted_run(setup, single_process_store):
    """Catches a done marker written before its files by the background writer, or a half-written tar trusted."""
    store = setup["root"] / "killed.zarr"
    process = subprocess.Popen(_command(setup, store), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=_env(), cwd=setup["root"], start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if len(list((store / "g0" / "done").glob("*.json"))) >= 2:
            break
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the whole group: the run and its dataloader worker
    process.wait()
    partial = len(list((store / "g0" / "done").glob("*.json")))
    assert 2 <= partial < 12, f"the kill should land mid-run, {partial}/12 tars were done"
    result = _run(setup, store)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_bit_identical(single_process_store, store)


def test_plain_log_shows_totals_eta_per_tar_and_the_resume_skip(setup, single_process_store):
    """stdout piped (not a terminal), as under SLURM or `> log`: a resume after 3 of 12 tars lost their done
    markers. Catches a streaming loader's batch line without a total (no ETA), tars written without a line,
    a resume that does not say how many tars it skipped or counts the ones it recomputes, and Rich's stale final
    frame in the log."""
    store = setup["root"] / "plain_log.zarr"
    shutil.copytree(single_process_store, store)
    for marker in sorted((store / "g0" / "done").glob("*.json"))[-3:]:
        marker.unlink()
    # the config's Rich bar kept on: piped, its only frame came at the end, stale (`tars 0/1`, `0.00it/s`)
    result = _run(setup, store, "--trainer.callbacks+", "lightning.pytorch.callbacks.RichProgressBar",
                  subprocess_=True)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert not any("Predicting" in line or "it/s" in line for line in lines), lines
    assert f"resume: skipped 9 of 12 tars already in the store {store}" in lines
    batches = [line for line in lines if line.startswith("predict: ")]  # 3 tars of 2 rows, batch size 3: 3 batches
    assert batches[0].startswith("predict: 1/3 batches (33%)") and "ETA" in batches[0], lines
    assert batches[-1].startswith("predict: 3/3 batches (100%)"), lines
    tars = [line for line in lines if line.startswith("writing plain_log.zarr: ")]
    assert [line.split(",")[0] for line in tars] == [f"writing plain_log.zarr: {2 * k}/6 rows ({100 * k / 3:.0f}%)"
                                                     for k in (1, 2, 3)], lines
    assert all("ETA" in line and f"tar {k}/3 (shard-" in line for k, line in enumerate(tars, 1)), lines
    _assert_bit_identical(single_process_store, store)


def test_rerun_with_another_config_names_the_differing_fields(setup, single_process_store):
    """Catches a resume under other extractor settings mixing rows, or losing what was computed."""
    result = _run(setup, single_process_store, "--model.init_args.seed", "7", "--model.init_args.deu_mode", "mc")
    assert result.returncode != 0
    assert "different config" in result.stderr and "common.seed 0 != 7" in result.stderr
    assert "maps.deu.deu_mode closed_form != mc" in result.stderr
    assert len(FeatureStore.open(single_process_store).done_tars("g0")) == 12


def test_resume_with_another_codec_says_the_store_keeps_its_own(setup, single_process_store):
    """A codec is lossless, so a resume under `--clip_codec zstd` is not refused; catches the asked codec being
    ignored without a word (the user believes the store is zstd) and a resume that rewrites finished tars."""
    before = _data_files(single_process_store)
    result = _run(setup, single_process_store, "--clip_codec", "zstd")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if "keeps the codec" in line]
    assert lines == [f"precompute: {single_process_store} group g0 keeps the codec it was created with: clip_layer3 "
                     "lz4 (asked: zstd), clip_pooled lz4 (asked: zstd); a codec is fixed when a group is created "
                     "(write a new store for another)"], result.stderr[-2000:]
    assert _data_files(single_process_store) == before


@pytest.mark.parametrize(("extra", "threads", "field"), [
    (("--trainer.precision", "bf16-mixed"), 1, "common.trainer_precision 32-true != bf16-mixed"),
    (("--data.init_args.batch_size", "4"), 1, "common.batch_size 3 != 4"),
    ((), 2, "common.cpu_threads 1 != 2"),
])
def test_resume_with_other_precision_batch_size_or_threads_is_refused(setup, single_process_store, extra, threads,
                                                                      field):
    """Catches a resume that changes values without a provenance change (mixed rows, provenance says otherwise)."""
    result = _run(setup, single_process_store, *extra, threads=threads)
    assert result.returncode != 0 and field in result.stderr, result.stderr[-2000:]
    assert _error_line(result.stderr).startswith("python -m cli precompute: feature store ")


def test_a_map_added_later_is_bit_identical_to_the_first_pass(setup, single_process_store):
    """Catches growing with other noises (mi added later differs), or recomputing the maps already present."""
    store = setup["root"] / "grown.zarr"
    first = _run(setup, store, outputs=tuple(f for f in FEATURES if f != "mi"))
    assert first.returncode == 0, first.stderr[-3000:]
    before = _data_files(store, "g0")
    grown = _run(setup, store)
    assert grown.returncode == 0, grown.stderr[-3000:]
    opened = FeatureStore.open(store)
    assert list(opened.groups["g1"].features) == ["mi"] and _data_files(store, "g0") == before
    assert opened.read("mi").tobytes() == _feature(single_process_store, "mi").tobytes()
    assert len(list((store / "configs").glob("precompute-g1-*.yaml"))) == 1


def test_two_concurrent_creations_one_wins_one_gets_one_line(setup, single_process_store):
    """Catches two runs on a new store mixing their configs (the loser must be refused while the winner runs)."""
    store = setup["root"] / "race.zarr"
    runs = [subprocess.Popen(_command(setup, store, *seed), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=_env(), cwd=setup["root"])
            for seed in ((), ("--model.init_args.seed", "7"))]
    results = [(run.wait(timeout=600), run.stderr.read()) for run in runs]
    losers = [stderr for code, stderr in results if code != 0]
    assert len(losers) == 1, results
    # Usually the loser starts while the winner holds the lock; on a loaded machine it may start after the
    # winner finished, and is then refused for its other seed. Either way nothing of it reaches the store.
    line = _error_line(losers[0])
    assert ("is being created/grown by another run (lock held by pid" in line
            or line.endswith("was made with a different config: common.seed 0 != 7  (CLI_TRACEBACK=1 for the traceback)")
            or line.endswith("was made with a different config: common.seed 7 != 0  (CLI_TRACEBACK=1 for the traceback)")), line
    opened = FeatureStore.open(store)
    assert opened.verify(checksums=True) == [] and len(opened.done_tars("g0")) == 12
    winner_seed = opened.groups["g0"].extractor.common["seed"]
    if winner_seed == 0:
        _assert_bit_identical(single_process_store, store)


def test_store_that_is_a_file_is_one_line(setup):
    """Catches --store naming a file ending in a traceback (or in a half-made store)."""
    target = setup["root"] / "not_a_store.zarr"
    target.write_text("x")
    result = _run(setup, target)
    assert result.returncode != 0
    assert _error_line(result.stderr) == f"python -m cli precompute: --store {target}: is a file, not a store directory"
