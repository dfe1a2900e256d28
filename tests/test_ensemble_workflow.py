"""DECU end to end through the CLI, as a user types it: ensemble-fit (both member kinds) → precompute stores with
`ensemble_mi`/`ensemble_var` → fit and test DEUA from configs/deua_ensemble.yaml → the separability report; each
command in-process through `python -m cli`'s entry point (tests/cli_runner.py).

Tiny random models and a handful of demo images: nothing here measures detection quality, only that every step
runs on real stores, checkpoints and tables and that the ensemble maps reach each of them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from workflows.demo import TRAIN_GENERATOR
from datamodules.demo_data import GENERATORS, build_demo_images
from datamodules.shards import convert
from feature_cache.store import FeatureStore
from lightning_modules.ensemble_fit import load_members
from core.hashing import file_sha256

from cli_runner import CliResult, cli_env, run_cli

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
ENSEMBLE_MAPS = ("ensemble_mi", "ensemble_var")


def cli(*args: str, cwd: Path) -> CliResult:
    """`python -m cli ARGS` in-process, one torch thread (tiny models: threads cost more than they give)."""
    return run_cli(list(args), cwd=cwd, env=cli_env(OMP_NUM_THREADS="1"))


def ok(result: CliResult) -> CliResult:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def ensemble_fit(root: Path, sd: Path, kind: str) -> Path:
    output = root / f"members_{kind}.pt"
    result = ok(cli("ensemble-fit", "--config", str(REPO / "configs/ensemble_fit.yaml"), "--model.init_args.sd", str(sd),
           "--model.init_args.output", str(output), "--model.init_args.kind", kind,
           "--model.init_args.num_members", "3", "--model.init_args.steps", "3", "--model.init_args.batch_size", "2",
           "--data.init_args.shards", str(root / "shards/train"), "--data.init_args.resolution", "64",
           "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0", "--trainer.accelerator", "cpu",
           "--trainer.default_root_dir", str(root / f"ensemble_fit_{kind}"), cwd=root))
    (root / f"ensemble_fit_{kind}.log").write_text(result.stdout)  # stdout was no terminal, as under SLURM
    return output


def precompute(root: Path, models: dict[str, Path], members: Path, split: str, store: Path,
               outputs: str, *extra: str) -> CliResult:
    """The precompute line of configs/ensemble_fit.yaml's comment, on the tiny models (no posterior needed)."""
    return cli("precompute", "--config", str(REPO / "configs/precompute.yaml"), "--model.init_args.sd",
               str(models["sd"]), "--model.init_args.clip", str(models["clip"]), "--model.init_args.posterior", "null",
               "--model.init_args.outputs", outputs, "--model.init_args.num_noises", "2",
               "--model.init_args.autocast_dtype", "float32",
               "--model.init_args.map_modules", "[lightning_modules.maps.builtin, lightning_modules.maps.ensemble]",
               "--model.init_args.map_settings",
               f"{{ensemble_members: {members}, ensemble_distance: bhattacharyya}}",
               "--data.init_args.shards", str(root / "shards" / split), "--data.init_args.resolution", "64",
               "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0",
               "--trainer.accelerator", "cpu", "--trainer.callbacks", "[]", "--store", str(store), *extra, cwd=root)


@pytest.fixture(scope="module")
def workspace(tiny_model_paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Shards, members of both kinds, and stores: train/val with embedding-member maps (+ CLIP layer3 for DEUA), a
    val store with conv_out-member maps."""
    root = tmp_path_factory.mktemp("ensemble_workflow")
    images = build_demo_images(root / "images", {"train": 6, "val": 3}, tile_size=64)
    convert("genimage", images, "train", root / "shards/train", 4, [TRAIN_GENERATOR], workers=1)
    convert("genimage", images, "val", root / "shards/val", 4, None, workers=1)
    members = {kind: ensemble_fit(root, tiny_model_paths["sd"], kind) for kind in ("embedding", "conv_out")}
    stores = {"train": root / "train.zarr", "val": root / "val.zarr", "val_conv_out": root / "val_conv_out.zarr"}
    for split in ("train", "val"):
        ok(precompute(root, tiny_model_paths, members["embedding"], split, stores[split],
                      "[ensemble_mi, ensemble_var, clip_layer3]"))
    ok(precompute(root, tiny_model_paths, members["conv_out"], "val", stores["val_conv_out"],
                  "[ensemble_mi, ensemble_var]"))
    return {"root": root, **{f"members_{k}": v for k, v in members.items()}, **stores}


def test_piped_ensemble_fit_log_shows_member_training_progress(workspace: dict[str, Path]) -> None:
    """Bug caught: ensemble-fit printing nothing while its members trained (7.5 min of silence in a SLURM log):
    Rich's bar draws nothing into a pipe, so each member's steps must come as done/total, rate, ETA lines."""
    for kind in ("embedding", "conv_out"):
        log = (workspace["root"] / f"ensemble_fit_{kind}.log").read_text().splitlines()
        for member in (1, 2, 3):
            lines = [line for line in log if line.startswith(f"ensemble-fit member {member}/3 (rank 0): ")]
            assert lines and lines[0].split(",")[0].endswith(": 1/3 steps (33%)"), log
            assert lines[-1].split(",")[0].endswith(": 3/3 steps (100%)") and "steps/s" in lines[-1] \
                and "ETA" in lines[-1], lines


def test_stores_hold_the_ensemble_maps_with_their_members(workspace: dict[str, Path]) -> None:
    """Both kinds reach a store: (4, 8, 8) float32 maps, finite, MI in [0, ln K], positive somewhere, and the
    provenance names the members file it came from. Catches embedding members refused or silently evaluated as the
    prompt (MI all 0), a members file not recorded in the store, and maps not written for every row."""
    for store_name, kind in (("val", "embedding"), ("val_conv_out", "conv_out")):
        store = FeatureStore.open(workspace[store_name])
        mi, var = store.read("ensemble_mi"), store.read("ensemble_var")
        assert mi.shape == var.shape == (len(store.rows("key")), 4, 8, 8) and mi.dtype == np.float32
        assert np.isfinite(mi).all() and (mi >= 0).all() and (mi <= np.log(3) + 1e-6).all() and (mi > 0).any()
        assert (var >= 0).all() and (var > 0).any()
        recorded = store.feature_provenance(["ensemble_mi"]).features["ensemble_mi"].extractor.maps["ensemble_mi"]
        assert recorded["ensemble_members"] == str(workspace[f"members_{kind}"])
        assert recorded["ensemble_members_sha256"] == file_sha256(workspace[f"members_{kind}"])
        assert load_members(workspace[f"members_{kind}"])["kind"] == kind


def test_refused_members_are_one_line(workspace: dict[str, Path], tiny_model_paths: dict[str, Path]) -> None:
    """A precompute at another timestep than the members' stops with one line naming the field, and writes no
    store. Catches members silently used at a timestep they were not fitted at, or a traceback instead."""
    store = workspace["root"] / "refused.zarr"
    result = precompute(workspace["root"], tiny_model_paths, workspace["members_embedding"], "val", store,
                        "[ensemble_mi]", "--model.init_args.timestep", "300")
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert "trained with other settings" in line and "'timestep': (200, 300)" in line, line


def test_deua_guided_by_ensemble_mi_fits_tests_and_writes_its_table(workspace: dict[str, Path]) -> None:
    """configs/deua.yaml + configs/deua_ensemble.yaml as documented, with a local.yaml of store paths and tiny
    dimensions: fit writes a checkpoint whose detector is guided by ensemble_mi, test writes the protocol table
    with a row per test generator, and `predict` on the raw images gives the test run's probabilities. Catches the
    registry not knowing ensemble_mi in phase 2, the override not replacing DEUA's guidance and features, a test
    step that rejects the ensemble store's provenance, and a predict that loses the members file (map_settings)."""
    root = workspace["root"]
    (root / "local.yaml").write_text(yaml.safe_dump({
        "trainer": {"accelerator": "cpu", "max_epochs": 2,
                    "logger": {"init_args": {"save_dir": str(root / "runs")}}},
        "model": {"init_args": {"visual_channels": 128, "num_heads": 2, "guidance_dim": 8}},
        "data": {"init_args": {"train": [str(workspace["train"])], "test": [str(workspace["val"])],
                               "val_fraction": 0.25, "batch_size": 4, "num_workers": 0}}}))
    configs = ["--config", str(REPO / "configs/deua.yaml"), "--config", str(REPO / "configs/deua_ensemble.yaml"),
               "--config", str(root / "local.yaml")]
    ok(cli("fit", *configs, cwd=root))
    ok(cli("test", *configs, cwd=root))
    (run,) = [p for p in (root / "runs/deua_ensemble").iterdir() if p.name.startswith("ensemble_mi")]
    checkpoint = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["hyper_parameters"]["guidance"] == ["ensemble_mi"]
    table = pd.read_csv(run / "protocol_table.csv")
    assert set(GENERATORS) <= set(table["generator"]), table
    assert table.loc[table["generator"].isin(GENERATORS), "acc"].between(0, 1).all()
    # On raw files: `predict` rebuilds the extractor (members file included) from the checkpoint's provenance and
    # gives the test run's probabilities for the same images (matched by content hash).
    out = root / "predictions.csv"
    ok(cli("predict", "--ckpt", str(run / "checkpoints/last.ckpt"), "--data", str(root / "images"), "--out", str(out),
           "--num_workers", "0", cwd=root))
    scored = pd.read_csv(run / "test_predictions.csv")
    scored["sha256"] = FeatureStore.open(workspace["val"]).rows("sha256")[scored["row"]]
    on_the_fly = pd.read_csv(out).set_index("sha256").loc[scored["sha256"], "p_fake"].to_numpy()
    np.testing.assert_allclose(on_the_fly, scored["p_fake"], atol=1e-4)


def test_separability_report_covers_the_ensemble_maps(workspace: dict[str, Path]) -> None:
    """`python -m cli separability` on the embedding- and conv_out-member stores scores ensemble_mi and ensemble_var
    (the CLIP map only by the linear probe), with an AUROC per generator. Catches the report keeping its own list
    of map names."""
    out = workspace["root"] / "separability"
    ok(cli("separability", "--stores", f"[{workspace['val']}, {workspace['val_conv_out']}]", "--out", str(out),
           "--bootstrap", "20", cwd=workspace["root"]))
    table = pd.read_csv(out / "separability.csv")
    assert set(table.loc[table["method"] == "summary", "map"]) == set(ENSEMBLE_MAPS)
    assert table["store"].nunique() == 2
    assert table["auroc"].between(0, 1).all()
    assert {p.name for p in (out / "plots").iterdir()} >= {f"val_{m}.png" for m in ENSEMBLE_MAPS}
