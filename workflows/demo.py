"""`python -m cli demo`: the whole two-phase pipeline on built-in data, each phase a real CLI run.

Phases run as subprocesses (`python -m cli <phase> --config OUT/configs/<phase>.yaml`), exactly the
commands a user reruns by hand; the demo writes those configs first. With the tiny models (SD trained for
seconds on the demo's reals, CLIP random) this demonstrates the pipeline, it is not a detector result.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from workflows.run_dirs import latest_fitted_run, run_base
from datamodules.demo_data import GENERATORS, build_demo_images
from datamodules.shards import convert

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEMO_LR = 1e-3  # ten times the paper configs' rate: the demo trains for a few hundred steps, not thousands
DEMO_BATCH_SIZE = 4  # small batches: more optimisation steps from the demo's few dozen rows at the same cost
TRAIN_GENERATOR = GENERATORS[0]  # GenImage protocol: train on one generator, test on every generator
DISCLAIMER = ("With tiny models and synthetic fakes, this is a pipeline demonstration, not a detector result: the "
              "fakes are ×8-downsampled photo tiles with a ±48 checkerboard of 8-pixel cells; the tiny SD's VAE and "
              "UNet were trained for seconds on the demo's own real training images, the CLIP is random. What "
              "separates the classes here is the CLIP maps (the detectors' visual input); the diffusion maps stay "
              "near chance (`python -m cli separability --stores OUT/cache/val.zarr`). The numbers show that "
              "features and labels flow through both phases, not how well DEU or LaRE detect real generators' "
              "images.")


def _load(name: str) -> dict:
    path = CONFIGS / name
    if not path.is_file():
        raise SystemExit(f"python -m cli demo: base config {path} not found; install the repository with "
                         "`pip install -e .` so configs/ is next to the package")
    return yaml.safe_load(path.read_text())


def _write(config: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _run(args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    """Run one phase; on failure show its log tail and stop with one line naming the phase."""
    command = [sys.executable, "-m", "cli", *args]
    print(f"$ python -m cli {shlex.join(args)}", flush=True)
    started = time.monotonic()
    with open(log, "w") as handle:
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, text=True, env=env)
    if result.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
        raise SystemExit(f"{tail}\npython -m cli demo: phase `{args[0]}` failed (exit {result.returncode}); "
                         f"full log: {log}")
    print(f"  done in {time.monotonic() - started:.0f}s (log: {log})", flush=True)


def _detector_config(base: str, features: list[str], out: Path, clip: str, epochs: int) -> dict:
    config = _load(base)
    config["trainer"].update(accelerator="auto", max_epochs=epochs, log_every_n_steps=1)
    config["trainer"]["logger"]["init_args"].update(save_dir=str(out / "runs"), version="demo")
    model = config["model"]["init_args"]
    model["clip"] = clip  # CLIP dimensions come from the stores' shapes (link_arguments)
    model["lr"] = DEMO_LR
    config["data"]["init_args"].update(
        features=features, train=[str(out / "cache" / "train.zarr")], val=[], val_fraction=0.25,
        test=[str(out / "cache" / "val.zarr")], batch_size=DEMO_BATCH_SIZE, num_workers=0)
    return config


DETECTORS = {"deua": ("deua.yaml", ["deu", "clip_layer3"]),
             "lare2": ("lare2.yaml", ["lare", "clip_layer3", "clip_pooled"])}


def run_demo(out: Path, sd: str | None, clip: str | None, images_per_class: int, resolution: int,
             epochs: int, permute_labels: bool = False, detectors: Sequence[str] = tuple(DETECTORS)) -> None:
    unknown = sorted(set(detectors) - set(DETECTORS))
    if unknown:
        raise SystemExit(f"python -m cli demo: unknown detectors {unknown}; choose from {sorted(DETECTORS)}")
    out = out.resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(DISCLAIMER, flush=True)
    tiny = sd is None
    if not tiny and clip is None:
        raise SystemExit("python -m cli demo: --sd needs --clip too (an RN50 checkpoint, open_clip dir or 'openai')")
    images = build_demo_images(out / "images", {"train": images_per_class, "val": max(4, images_per_class // 2)},
                               tile_size=resolution, permute_labels=permute_labels)
    reals = out / "images" / TRAIN_GENERATOR / "train" / "nature"
    if tiny:
        from lightning_modules.tiny_models import build_tiny_models, train_tiny_stable_diffusion

        started = time.monotonic()
        paths = build_tiny_models(out / "models")
        sd, clip = str(paths["sd"]), str(paths["clip"])
        record = train_tiny_stable_diffusion(sd, reals, resolution)
        print(f"tiny SD trained on the {record['num_images']} real training images in {reals} (VAE "
              f"{record['vae_steps']} steps, UNet {record['unet_steps']} steps) in "
              f"{time.monotonic() - started:.0f}s", flush=True)
    shard_size = 16
    convert("genimage", images, "train", out / "shards" / "train", shard_size, [TRAIN_GENERATOR], workers=1,
            overwrite=True)
    convert("genimage", images, "val", out / "shards" / "val", shard_size, None, workers=1, overwrite=True)

    # The demo's images are smaller than CLIP's 224 input: a native crop would be mostly reflected padding.
    data = {"resolution": resolution, "batch_size": 8, "num_workers": 1, "clip_input": "resize"}
    laplace = _load("laplace_fit.yaml")
    laplace["trainer"]["accelerator"] = "auto"
    laplace["model"]["init_args"].update(sd=sd, output=str(out / "posterior.pt"))
    laplace["data"]["init_args"].update(shards=str(out / "shards" / "train"), **data)
    laplace["overwrite"] = True  # the demo rebuilds its whole directory, models included
    precompute = _load("precompute.yaml")
    precompute["trainer"]["accelerator"] = "auto"
    precompute["model"]["init_args"].update(sd=sd, clip=clip, posterior=str(out / "posterior.pt"),
                                            autocast_dtype="float32")
    precompute["data"]["init_args"].update(shards=str(out / "shards" / "train"), **data)
    precompute["store"] = str(out / "cache" / "train.zarr")
    configs = out / "configs"
    _write(laplace, configs / "laplace_fit.yaml")
    _write(precompute, configs / "precompute.yaml")
    detectors = {key: _detector_config(*DETECTORS[key], out=out, clip=clip, epochs=epochs) for key in detectors}
    for key, config in detectors.items():
        _write(config, configs / f"{key}.yaml")

    # Tiny models' tensors are too small to split across threads: on this project's shared 2-core machine a
    # detector fit took 146 s wall with 2 threads and 54 s with one (load ≈ 9); an explicit setting wins.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")} if tiny else None
    _run(["laplace-fit", "--config", str(configs / "laplace_fit.yaml")], logs / "laplace_fit.log", env)
    _run(["precompute", "--config", str(configs / "precompute.yaml")], logs / "precompute_train.log", env)
    _run(["precompute", "--config", str(configs / "precompute.yaml"), "--data.init_args.shards",
          str(out / "shards" / "val"), "--store", str(out / "cache" / "val.zarr")], logs / "precompute_val.log", env)
    tables = []
    for key in detectors:
        _run(["fit", "--config", str(configs / f"{key}.yaml")], logs / f"fit_{key}.log", env)
        _run(["test", "--config", str(configs / f"{key}.yaml")], logs / f"test_{key}.log", env)  # the fitted run's best
        seed = yaml.safe_load((configs / f"{key}.yaml").read_text())["seed_everything"]
        tables.append((key, latest_fitted_run(out / "runs" / key, run_base("demo", seed))))

    print("\n" + DISCLAIMER + "\n")
    for key, run_dir in tables:
        table = run_dir / "protocol_table.md"
        print(f"## {key}\n" + (table.read_text() if table.is_file() else f"(no table at {table})"))
    print(f"TensorBoard: tensorboard --logdir {out / 'runs'}")
    print("Rerun each phase by hand:")
    if tiny:
        print(f"  python -m cli tiny-models {out / 'models'} --train_on {reals} --resolution {resolution}")
    print(f"  python -m cli laplace-fit --config {configs / 'laplace_fit.yaml'}")
    print(f"  python -m cli precompute --config {configs / 'precompute.yaml'}")
    print(f"  python -m cli precompute --config {configs / 'precompute.yaml'} --data.init_args.shards "
          f"{out / 'shards' / 'val'} --store {out / 'cache' / 'val.zarr'}")
    for key in detectors:
        print(f"  python -m cli fit --config {configs / f'{key}.yaml'}")
        print(f"  python -m cli test --config {configs / f'{key}.yaml'}")
