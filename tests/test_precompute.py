"""`python -m cli precompute` on the tiny models and a mini image set: exactly once, resumable, honest.

Every run is a real subprocess of the real CLI (DDP re-executes it per rank), writing a real Zarr
store; stores are compared array by array.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import zarr

from datamodules.demo_data import build_demo_images
from datamodules.image_shards import ImageShardDataModule
from datamodules.shards import convert
from feature_cache.store import FeatureStore
from lightning_modules.laplace_fit import LaplaceFit

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
FEATURES = ("lare", "deu", "aleatoric", "mi", "clip_layer3", "clip_pooled")


@pytest.fixture(scope="module")
def setup(tiny_model_paths, tmp_path_factory) -> dict[str, Path]:
    """Demo images plus one corrupt file → 2-image tars; a posterior fitted on them."""
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
    return {"root": root, "shards": root / "shards", "posterior": posterior, **tiny_model_paths}


def _command(setup: dict[str, Path], store: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cli", "precompute", "--config", str(REPO / "configs" / "precompute.yaml"),
            "--model.init_args.sd", str(setup["sd"]), "--model.init_args.clip", str(setup["clip"]),
            "--model.init_args.posterior", str(setup["posterior"]), "--model.init_args.num_noises", "2",
            "--model.init_args.autocast_dtype", "float32", "--data.init_args.shards", str(setup["shards"]),
            "--data.init_args.resolution", "64", "--data.init_args.batch_size", "3",
            "--data.init_args.num_workers", "1", "--trainer.accelerator", "cpu", "--trainer.callbacks", "[]",
            "--store", str(store), "--feature_dtype", "float32", *extra]


def _env() -> dict[str, str]:
    """One CPU thread per process in every run: oneDNN splits reductions by thread count, so bit-identity
    across 1 and 2 ranks holds for equal thread counts (Lightning gives each DDP rank cores/ranks)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _run(setup: dict[str, Path], store: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(_command(setup, store, *extra), capture_output=True, text=True, timeout=600, env=_env(),
                          cwd=setup["root"])


def _arrays(store_path: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(store_path, mode="r")
    return {name: group[name][:] for name in (*FEATURES, "label", "generator", "key", "error", "done")}


def _assert_bit_identical(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    for name in FEATURES:
        assert a[name].tobytes() == b[name].tobytes(), f"{name} differs"
    for name in ("label", "generator", "key", "error", "done"):
        assert (a[name] == b[name]).all(), name


@pytest.fixture(scope="module")
def single_process_store(setup) -> Path:
    store = setup["root"] / "one.zarr"
    result = _run(setup, store)
    assert result.returncode == 0, result.stderr[-3000:]
    return store


def test_single_process_store_is_complete_and_records_the_corrupt_image(setup, single_process_store):
    store = FeatureStore.open(single_process_store)
    assert len(store.done_shards()) == len(store.shard_table) == 12  # 24 decodable images, 2 per tar
    arrays = _arrays(single_process_store)
    assert all(np.isfinite(arrays[name]).all() for name in FEATURES)
    assert (arrays["deu"] > 0).all() and (arrays["lare"] > 0).all()  # variances and squared errors
    rejected = store.rejected()
    assert [Path(r["path"]).name for r in rejected] == ["fake_9999.png"] and rejected[0]["reason"]
    provenance = store.provenance
    assert provenance["timestep"] == 200 and provenance["num_noises"] == 2 and provenance["resolution"] == 64
    assert provenance["unet_hash"] and provenance["posterior_sha256"]


def test_two_ddp_ranks_write_the_same_arrays_as_one(setup, single_process_store):
    store = setup["root"] / "two.zarr"
    result = _run(setup, store, "--trainer.devices", "2", "--trainer.strategy", "ddp")
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_bit_identical(_arrays(single_process_store), _arrays(store))


def test_sigkill_then_rerun_equals_an_uninterrupted_run(setup, single_process_store):
    store = setup["root"] / "killed.zarr"
    process = subprocess.Popen(_command(setup, store), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(),
                               cwd=setup["root"], start_new_session=True)
    done = 0
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if (store / "done" / "zarr.json").exists():
            done = int(zarr.open_array(store / "done", mode="r")[:].sum())
            if done >= 2:
                break
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the whole group: the run and its dataloader worker
    process.wait()
    partial = int(zarr.open_array(store / "done", mode="r")[:].sum())
    assert 2 <= partial < 12, f"the kill should land mid-run, {partial}/12 tars were done"

    result = _run(setup, store)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_bit_identical(_arrays(single_process_store), _arrays(store))


def test_rerun_with_another_config_names_the_differing_fields(setup, single_process_store):
    result = _run(setup, single_process_store, "--model.init_args.seed", "7", "--model.init_args.deu_mode", "mc")
    assert result.returncode != 0
    assert "different config" in result.stderr and "seed" in result.stderr and "deu_mode" in result.stderr
    # Nothing already computed is lost.
    assert len(FeatureStore.open(single_process_store).done_shards()) == 12
