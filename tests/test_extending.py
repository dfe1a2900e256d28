"""A user adds a dataset layout, a guidance map and a detector the way the README says: one layout module, one map
module, one detector module, one YAML, all outside the repository (on PYTHONPATH only), then converts a dataset
tree with the layout, grows existing stores by the map and fits, tests and predicts with the detector; every step
that imports a user's module is a real CLI subprocess (their PYTHONPATH, their registrations) on tiny real models;
the base stores, built with the built-in maps only, are computed in-process (`tests/cli_runner.py`). The map module
is importable only where a map is computed (precompute, predict): fit and test take its channels from the stores."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import zarr

from datamodules.demo_data import GENERATORS, build_demo_images
from feature_cache.manifest import read_manifest_rows
from feature_cache.store import FeatureStore

from cli_runner import CliResult, run_cli

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BASE_OUTPUTS = ("lare", "aleatoric", "clip_layer3")


def _readme_modules(title: str) -> list[str]:
    """The Python files of the README section `title`, verbatim: the README is what users copy, so a stale
    signature or import there fails this test."""
    section = (REPO / "README.md").read_text().split(f"## {title}\n", 1)[1].split("\n## ")[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


MAP_MODULE, DETECTOR_MODULE = _readme_modules("Adding a guidance map or a detector")
(LAYOUT_MODULE,) = _readme_modules("Adding a dataset layout")


def _config(root: Path) -> str:
    """The user's one YAML: the detector by class path, its guidance, the stores (CLIP sizes come from them)."""
    return textwrap.dedent(f"""\
        seed_everything: 0
        trainer:
          accelerator: cpu
          max_epochs: 2
          log_every_n_steps: 1
          logger:
            class_path: lightning.pytorch.loggers.TensorBoardLogger
            init_args: {{save_dir: {root / 'runs'}, name: mean, version: spread, default_hp_metric: false}}
          callbacks:
            - class_path: lightning.pytorch.callbacks.ModelCheckpoint
              init_args: {{monitor: val_loss, mode: min, save_last: true, enable_version_counter: false}}
        model:
          class_path: my_detector.MeanDetector
          init_args:
            guidance: [spread]
            dropout: 0.2
            lr: 1.0e-2
        data:
          class_path: datamodules.cached_features.FeatureCacheDataModule
          init_args:
            features: [spread, clip_layer3]
            train: [{root / 'train.zarr'}]
            val_fraction: 0.25
            test: [{root / 'val.zarr'}]
            batch_size: 8
            num_workers: 0
        """)


def _as_by_label(images: Path, out: Path) -> dict[str, tuple[int, str]]:
    """The demo's GenImage tree copied into the README layout's tree, ROOT/<split>/<generator>/{0_real,1_fake};
    returns sha256 -> (label, generator) of every image, read off the GenImage folders (not through any layout)."""
    expected = {}
    for source in sorted(p for p in images.rglob("*") if p.is_file()):
        generator, split, kind = source.relative_to(images).parts[:3]
        label = {"ai": 1, "nature": 0}[kind]
        target = out / split / generator / ("1_fake" if label else "0_real") / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        expected.setdefault(split, {})[hashlib.sha256(source.read_bytes()).hexdigest()] = (label, generator)
    return expected


def _env(root: Path, maps: bool) -> dict[str, str]:
    """The user's detector folder on PYTHONPATH beside the repository, and their map folder only with `maps`."""
    folders = [REPO, root / "user", *([root / "user_maps"] if maps else [])]
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(str(folder) for folder in folders)}


def _cli(root: Path, *args: str, maps: bool = True, ok: bool = True, subprocess_: bool = True) -> CliResult:
    """`python -m cli ...` run from the user's folder (see `_env`), in a fresh process unless `subprocess_` is false
    (only for runs that import no user module); with `ok`, it must succeed."""
    result = run_cli(list(args), cwd=root, env=_env(root, maps), subprocess_=subprocess_, timeout=900)
    assert not ok or result.returncode == 0, \
        f"python -m cli {' '.join(args)}:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def _precompute(root: Path, models: dict[str, Path], split: str, outputs: tuple[str, ...],
                map_modules: tuple[str, ...] = ("lightning_modules.maps.builtin",)) -> None:
    user_maps = set(map_modules) != {"lightning_modules.maps.builtin"}
    _cli(root, "precompute", "--config", str(REPO / "configs" / "precompute.yaml"),
         "--model.init_args.sd", str(models["sd"]), "--model.init_args.clip", str(models["clip"]),
         "--model.init_args.posterior", "null", "--model.init_args.num_noises", "2",
         "--model.init_args.autocast_dtype", "float32", "--model.init_args.outputs", f"[{','.join(outputs)}]",
         "--model.init_args.map_modules", f"[{','.join(map_modules)}]",
         "--data.init_args.shards", str(root / "shards" / split), "--data.init_args.resolution", "64",
         "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0",
         "--trainer.accelerator", "cpu", "--trainer.callbacks", "[]", "--store", str(root / f"{split}.zarr"),
         subprocess_=user_maps)


def _files(store: Path, group: str) -> dict[str, bytes]:
    return {p.relative_to(store).as_posix(): p.read_bytes() for p in sorted((store / group).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def grown(tiny_model_paths, tmp_path_factory) -> dict[str, object]:
    """Stores built with the built-in maps, then grown by the user's map; the group-0 files before growing."""
    root = tmp_path_factory.mktemp("extending")
    for folder, name, text in (("user_maps", "my_maps.py", MAP_MODULE), ("user", "my_detector.py", DETECTOR_MODULE),
                               ("user", "my_layouts.py", LAYOUT_MODULE)):
        (root / folder).mkdir(exist_ok=True)
        (root / folder / name).write_text(text)
    (root / "mean.yaml").write_text(_config(root))
    images = build_demo_images(root / "images", {"train": 8, "val": 4}, tile_size=64)
    expected = _as_by_label(images, root / "by_label")
    for split, generators in (("train", ["--generators", GENERATORS[0]]), ("val", [])):
        _cli(root, "shards", "--layout_modules", "my_layouts", "--layout", "by_label", "--root", str(root / "by_label"),
             "--split", split, "--out", str(root / "shards" / split), "--shard_size", "8", "--workers", "1",
             *generators)
    converted = {split: read_manifest_rows(root / "shards" / split) for split in ("train", "val")}
    before = {}
    for split in ("train", "val"):
        _precompute(root, tiny_model_paths, split, BASE_OUTPUTS)
        before[split] = _files(root / f"{split}.zarr", "g0")
        _precompute(root, tiny_model_paths, split, (*BASE_OUTPUTS, "spread"),
                    ("lightning_modules.maps.builtin", "my_maps"))
    return {"root": root, "before": before, "images": images, "expected": expected, "converted": converted}


def test_a_user_layout_converts_its_tree_through_the_cli(grown):
    """The README's layout module, named with --layout_modules, gives every image of its tree once with the label
    and generator its folders say (--generators keeping only the one named). Catches a `--layout` that accepts only
    the built-in names, a user module that is not imported before the name is checked, or a layout walk that
    loses, repeats or mislabels files."""
    for split, keep in (("train", {GENERATORS[0]}), ("val", set(GENERATORS))):
        rows = grown["converted"][split]
        wanted = {sha: row for sha, row in grown["expected"][split].items() if row[1] in keep}
        assert {r["sha256"]: (r["label"], r["generator"]) for r in rows} == wanted and len(rows) == len(wanted)


def test_growing_by_a_user_map_adds_one_group_and_leaves_the_others_byte_identical(grown):
    """Catches a grow that recomputes or rewrites the maps already stored, a user map that cannot be registered
    from outside the repository, or a new map with the wrong shape (channels from the registry, grid from the
    latent)."""
    for split in ("train", "val"):
        path = grown["root"] / f"{split}.zarr"
        store = FeatureStore.open(path)
        assert _files(path, "g0") == grown["before"][split]
        assert store.group_of("spread") == "g1" and list(store.groups["g1"].features) == ["spread"]
        aleatoric, spread = store.read("aleatoric"), store.read("spread")
        assert spread.shape == (store.num_rows, 1, *aleatoric.shape[2:]) and spread.dtype == np.float32
        np.testing.assert_array_equal(spread, aleatoric.max(axis=1, keepdims=True))  # same noises as group g0


def test_the_store_describes_itself_to_a_plain_zarr_reader(grown):
    """Catches a store a reader cannot interpret without this framework: arrays without dimension names, kinds
    guessed instead of recorded (the user's map must read as guidance, CLIP's map as clip), label/generator codes
    and flag columns without meanings, and image paths not stored per row. Read with plain zarr and csv only,
    checked against the converter's manifest.csv and shards.json."""
    root = grown["root"]
    store = zarr.open_group(root / "train.zarr", mode="r")
    shards = root / "shards" / "train"
    manifest = next(p for p in (shards / "manifest.csv", shards / "manifest.csv.moved") if p.is_file())
    with manifest.open(newline="") as f:
        records = sorted(csv.DictReader(f), key=lambda r: int(r["row"]))
    assert store["rows/path"][:].tolist() == [r["path"] for r in records]
    codes = store["rows/generator"].attrs["codes"]
    assert sorted(codes.values()) == json.loads((shards / "shards.json").read_text())["generators"]
    assert [codes[str(code)] for code in store["rows/generator"][:]] == [r["generator"] for r in records]
    labels = store["rows/label"].attrs["codes"]
    assert [labels[str(code)] for code in store["rows/label"][:]] == \
        [{"0": "real", "1": "fake", "-1": "unlabelled"}[r["label"]] for r in records]
    for name in ("key", "sha256", "label", "generator", "format", "jpeg_quality", "width", "height", "path"):
        assert store[f"rows/{name}"].metadata.dimension_names == ("row",) and store[f"rows/{name}"].attrs["description"]
    kinds = {"g0/lare": "guidance", "g0/aleatoric": "guidance", "g0/clip_layer3": "clip", "g1/spread": "guidance"}
    for name, kind in kinds.items():
        array = store[name]
        assert array.metadata.dimension_names == ("row", "channel", "y", "x") and array.attrs["kind"] == kind, name
    assert store["g1/spread"].attrs["description"] == "max over channels of the aleatoric variance"
    assert store["g0/lare"].attrs["units"].startswith("eps^2") and store["g0/lare"].attrs["stored_dtype"] == "float32"
    for group in ("g0", "g1"):
        flags = store[f"{group}/flags"]
        assert flags.metadata.dimension_names == ("row", "flag") and flags.attrs["columns"] == ["non_finite", "underflow"]
        assert store[f"{group}/error"].metadata.dimension_names == ("row",)


def test_fit_test_predict_with_the_user_detector_guided_by_the_user_map(grown):
    """Catches phase 2 or `predict` that cannot find a map or detector defined outside the repository (a
    hand-kept list, a registry that only phase 1 filled), fit/test that import the user's map module (they must
    run where it is not importable: its channels are the stores'), `predict` that does not import it, CLIP
    dimensions or guidance that must be stated twice, a pipeline that still needs manifest.csv after the
    stores were written, and base arguments that a detector passing them through **kwargs loses (absent from
    --model.help or from the checkpoint's hparams)."""
    root = grown["root"]
    for split in ("train", "val"):  # phase 2 and predict take what they need from the stores' provenance
        manifest = root / "shards" / split / "manifest.csv"
        manifest.rename(manifest.with_suffix(".csv.moved"))
    unimportable = subprocess.run([sys.executable, "-c", "import my_maps"], cwd=root, env=_env(root, maps=False),
                                  capture_output=True, text=True)
    assert unimportable.returncode != 0 and "No module named 'my_maps'" in unimportable.stderr
    described = _cli(root, "fit", "--model.help", "my_detector.MeanDetector", maps=False).stdout
    assert "--model.dropout" in described and "--model.guidance_norm" in described
    _cli(root, "fit", "--config", "mean.yaml", maps=False)
    run = next((root / "runs" / "mean").glob("spread*"))
    hparams = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]
    layer3 = FeatureStore.open(root / "train.zarr").feature_info("clip_layer3").shape
    assert (hparams["visual_channels"], hparams["grid_size"]) == (layer3[0], layer3[-1]) and "pooled_dim" not in hparams
    assert hparams["guidance_channels"] == {"spread": 1}  # the stored map's channels; the registry never saw it
    # the detector's own argument and the base's, which it only passed through **kwargs, are all in the checkpoint
    assert (hparams["dropout"], hparams["guidance"], hparams["lr"], hparams["norm_rows"]) == (0.2, ["spread"], 1e-2, 2048)
    _cli(root, "test", "--config", "mean.yaml", maps=False)
    table = pd.read_csv(run / "test_predictions.csv")
    assert len(table) == FeatureStore.open(root / "val.zarr").num_rows and table["p_fake"].between(0, 1).all()
    folder = grown["images"] / GENERATORS[1] / "val"
    refused = _cli(root, "predict", "--ckpt", str(run / "checkpoints" / "last.ckpt"), "--data", str(folder),
                   "--out", "refused.csv", "--num_workers", "0", "--accelerator", "cpu", maps=False, ok=False)
    assert refused.returncode != 0 and "my_maps" in refused.stderr  # predict computes the map: it needs the module
    _cli(root, "predict", "--ckpt", str(run / "checkpoints" / "last.ckpt"), "--data", str(folder),
         "--out", "predictions.csv", "--num_workers", "0", "--accelerator", "cpu")
    predictions = pd.read_csv(root / "predictions.csv")
    assert len(predictions) == len([p for p in folder.rglob("*") if p.is_file()])
    assert predictions["error"].isna().all() and predictions["p_fake"].between(0, 1).all()
