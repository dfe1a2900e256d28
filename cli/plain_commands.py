"""Commands that are not Trainer runs: plain functions whose signatures jsonargparse turns into options."""

from __future__ import annotations

from pathlib import Path

from cli.grid import grid
from typing import Literal


def tiny_models(out_dir: Path, seed: int = 0) -> None:
    """Write tiny random-weight SD v1.5 and CLIP RN50 look-alikes to OUT_DIR/sd and OUT_DIR/clip.

    Args:
        out_dir: directory to create; load them with `--model.init_args.sd OUT_DIR/sd` and the CLIP path.
        seed: seed of the random weights.
    """
    from lightning_modules.tiny_models import build_tiny_models

    paths = build_tiny_models(out_dir, seed)
    for name, path in paths.items():
        print(f"{name}: {path}")


def shards(*, layout: Literal["genimage", "drct", "folder"], root: Path, split: Literal["train", "val"], out: Path,
           shard_size: int = 1000, generators: str | None = None, workers: int | None = None,
           overwrite: bool = False) -> None:
    """Convert GenImage, DRCT-2M or plain image folders into WebDataset shards plus a manifest.

    Keyword-only parameters so that jsonargparse makes them named options (--layout, --root, ...).

    Args:
        layout: genimage = ROOT/<generator>/{train,val}/{ai,nature}; drct = ROOT/MSCOCO/<split>2017 (real)
            and ROOT/DRCT-2M/<generator>/<split>2017 (fake); folder = ROOT/real and ROOT/fake, or unlabelled.
        root: dataset root directory.
        split: which split to convert (recorded only for the folder layout).
        out: output directory for shard-NNNNNN.tar, manifest.csv, rejected.csv, shards.json.
        shard_size: samples per tar (every tar but the last is full; one tar = one Zarr chunk later).
        generators: comma-separated generator folder names to keep (DRCT: add MSCOCO to keep the reals).
        workers: decoding processes (default: all CPU cores; 1 = no pool).
        overwrite: replace shards already in OUT.
    """
    from datamodules.shards import ShardsInputError, convert

    names = [g.strip() for g in generators.split(",") if g.strip()] if generators else None
    try:
        summary = convert(layout, root, split, out, shard_size, names, workers, overwrite)
    except ShardsInputError as error:
        raise SystemExit(f"python -m cli shards: {error}") from None
    print(f"{summary.num_samples} images in {summary.num_shards} shards, {summary.num_rejected} rejected "
          f"(see rejected.csv), generators {','.join(summary.generators)}: {summary.out}")


def demo(out: Path = Path("demo_out"), sd: str | None = None, clip: str | None = None, images_per_class: int = 24,
         resolution: int = 64, epochs: int = 3) -> None:
    """Run the whole two-phase pipeline on built-in data with tiny models (or real ones).

    Args:
        out: output directory (images, shards, posterior, stores, configs, runs, logs).
        sd: a diffusers-layout SD v1.5 directory; default: tiny random models built into OUT/models.
        clip: CLIP RN50 weights (checkpoint file, open_clip local-dir or 'openai'); needed with --sd.
        images_per_class: training images per class (validation gets half).
        resolution: image side fed to the VAE (256 for real SD v1.5 runs).
        epochs: training epochs of each detector.
    """
    from cli.demo import run_demo

    run_demo(out, sd, clip, images_per_class, resolution, epochs)


def compare(runs_dir: Path, sort_by: str = "test_acc", metrics: list[str] | None = None, matrix: bool = False) -> None:
    """One table of all runs under a directory (an ablation grid): mean ± std over seeds, the settings that differ.

    Args:
        runs_dir: directory searched recursively for runs (e.g. runs/deua).
        sort_by: metric to sort by, best first (a name from compare.csv's columns, e.g. test_auroc).
        metrics: metrics to show (default: test_acc, test_auroc, test_mean_generator_acc/auroc,
            test_format_only_auroc, val_auroc); every metric of every run is in RUNS_DIR/compare.csv.
        matrix: instead, the cross-generator matrix (rows = training generator, columns = test generator,
            cells ACC / AUROC with the row mean) of a grid over training generators; writes matrix.{md,csv}.
    """
    from reports.compare import compare_runs

    compare_runs(runs_dir, sort_by, metrics, matrix)


def predict(*, ckpt: str, data: str, out: str = "predictions.csv", batch_size: int = 8, num_workers: int = 2,
            accelerator: str = "auto") -> None:
    """Score raw images (a file or a folder, any size or format) with a trained detector; write a CSV.

    Features are computed on the fly with the extractor the detector's cache was made with (no cache).

    Args:
        ckpt: detector checkpoint from `python -m cli fit`.
        data: an image file or a folder (searched recursively); unreadable files get a row with the error.
        out: CSV with path, p_fake, prediction, error.
        batch_size: images per batch.
        num_workers: decoding processes.
        accelerator: cpu, gpu or auto.
    """
    from cli.predict import predict_folder

    predict_folder(ckpt, data, out, batch_size, num_workers, accelerator)


def robustness(*, ckpt: str, shards: str, out: str = "robustness", batch_size: int = 8, num_workers: int = 2,
               accelerator: str = "auto") -> None:
    """Accuracy and AP of a trained detector under JPEG (95/75/50), downscaling (0.75/0.5) and blur.

    Args:
        ckpt: detector checkpoint from `python -m cli fit`.
        shards: labelled shard directory to evaluate on (e.g. the test split's).
        out: directory for robustness.md and robustness.csv.
        batch_size: images per batch.
        num_workers: decoding processes.
        accelerator: cpu, gpu or auto.
    """
    from cli.predict import robustness_sweep

    robustness_sweep(ckpt, shards, out, batch_size, num_workers, accelerator)


PLAIN_COMMANDS = {"shards": shards, "tiny-models": tiny_models, "demo": demo, "compare": compare, "grid": grid,
                  "predict": predict, "robustness": robustness}
