"""`python -m cli predict --devices 2`: each raw image scored once across DDP ranks, the CSV of one rank."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from datamodules.demo_data import build_demo_images
from datamodules.shards import convert

from cli_runner import REPO, cli_env, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fitted(tiny_model_paths, tmp_path_factory) -> dict[str, Path]:
    """A LaRE² checkpoint trained one epoch on a tiny-model store of 7 × 2 × 2 demo images; the image folder then
    gets a 29th file that is no image (29 rows: two ranks need a padded row)."""
    root = tmp_path_factory.mktemp("predict_ddp")
    images = build_demo_images(root / "images", {"val": 7}, tile_size=64)
    convert("genimage", images, "val", root / "shards", shard_size=8, workers=1)
    env = cli_env(OMP_NUM_THREADS="1")
    done = run_cli(["precompute", "--config", str(REPO / "configs/precompute.yaml"),
                    "--model.init_args.sd", str(tiny_model_paths["sd"]), "--model.init_args.clip",
                    str(tiny_model_paths["clip"]), "--model.init_args.posterior", "null",
                    "--model.init_args.num_noises", "2", "--model.init_args.outputs", "[lare,clip_layer3,clip_pooled]",
                    "--model.init_args.autocast_dtype", "float32", "--data.init_args.shards", str(root / "shards"),
                    "--data.init_args.resolution", "64", "--data.init_args.batch_size", "4",
                    "--data.init_args.num_workers", "0", "--trainer.accelerator", "cpu", "--store",
                    str(root / "store.zarr")], cwd=root, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    (root / "local.yaml").write_text(yaml.safe_dump({
        "trainer": {"accelerator": "cpu", "max_epochs": 1},
        "model": {"init_args": {"num_heads": 2, "head_dim": 8, "gate_hidden": 8}},
        "data": {"init_args": {"train": [str(root / "store.zarr")], "test": [str(root / "store.zarr")], "val_fraction": 0.25, "batch_size": 8, "allow_shared_images": True,
                               "num_workers": 0}}}))
    done = run_cli(["fit", "--config", str(REPO / "configs/lare2.yaml"), "--config", str(root / "local.yaml")],
                   cwd=root, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (images / "notes.txt").write_text("not an image")
    return {"root": root, "images": images, "ckpt": root / "runs/lare2/both-seed0/checkpoints/last.ckpt"}


def test_two_ranks_score_each_image_once_as_one_rank_does(fitted):
    """Bugs caught: an image scored on both ranks (a padded sampler) or on none, a CSV written by each rank (the
    second overwriting the first with half the rows), rows gathered in rank order instead of by path, and
    predictions that depend on the rank count."""
    root = fitted["root"]
    args = ["predict", "--ckpt", str(fitted["ckpt"]), "--data", str(fitted["images"]), "--num_workers", "0",
            "--accelerator", "cpu", "--batch_size", "3"]
    env = cli_env(OMP_NUM_THREADS="1")
    one = run_cli([*args, "--out", str(root / "one.csv")], cwd=root, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli([*args, "--out", str(root / "two.csv"), "--devices", "2"], cwd=root, env=env, subprocess_=True)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "MEMBER: 2/2" in two.stderr, two.stderr[-3000:]  # two ranks ran, not `--devices` ignored
    assert sum(" files (" in line for line in two.stdout.splitlines()) == 1, two.stdout  # rank 0's summary only
    assert "━" not in two.stdout  # piped: plain progress lines, no stale Rich frame
    a, b = pd.read_csv(root / "one.csv"), pd.read_csv(root / "two.csv")
    files = sorted(str(p) for p in fitted["images"].rglob("*") if p.is_file())
    assert len(files) == 29 and sorted(b["path"]) == files and b["path"].is_unique
    assert a.drop(columns="p_fake").equals(b.drop(columns="p_fake"))
    pd.testing.assert_series_equal(a["p_fake"], b["p_fake"], rtol=1e-5, atol=1e-6)
