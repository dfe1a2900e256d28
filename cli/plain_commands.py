"""Commands that are not Trainer runs: plain functions whose signatures jsonargparse turns into options.

Each body imports what it needs (`python -m cli NAME --help` imports this module: nothing heavy at the top);
the table of commands is cli/commands.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal


def tiny_models(out_dir: Path, seed: int = 0, train_on: Path | None = None, resolution: int = 128,
                vae_steps: int = 60, unet_steps: int = 100, timesteps: tuple[int, int] = (100, 300)) -> None:
    """Write tiny random-weight SD v1.5 and CLIP RN50 look-alikes to OUT_DIR/sd and OUT_DIR/clip.

    Args:
        out_dir: directory to create; load them with `--model.init_args.sd OUT_DIR/sd` and the CLIP path.
        seed: seed of the random weights (and of the training's draws).
        train_on: a folder of (real) images: train the SD's VAE as an autoencoder and its UNet on the
            denoising objective on them (14 s on one CPU thread for the demo's 48 images), so phase 1's maps tell images like
            them from images unlike them; recorded in OUT_DIR/sd/training.json. Default: untrained.
        resolution: image side the training images are resized to (phase 1's resolution).
        vae_steps: optimisation steps of the VAE (batches of 8 crops of 64 px).
        unet_steps: optimisation steps of the UNet (batches of 16 latents).
        timesteps: range the UNet is trained at (inclusive, recorded in training.json); the default brackets
            phase 1's t=200. For `generate` (samples from t ≈ 999) use `--timesteps [0,999]`; it warns otherwise.
    """
    from core.outputs import output_dir
    from lightning_modules.tiny_models import build_tiny_models, train_tiny_stable_diffusion

    paths = build_tiny_models(output_dir(out_dir, "out_dir"), seed)
    if train_on is not None:
        record = train_tiny_stable_diffusion(paths["sd"], train_on, resolution, vae_steps, unet_steps,
                                             timesteps=tuple(timesteps), seed=seed)
        print(f"trained on {record['num_images']} images under {record['images']}: VAE loss "
              f"{record['vae_final_loss']:.3f} after {vae_steps} steps, UNet loss {record['unet_final_loss']:.3f} "
              f"after {unet_steps} steps at timesteps {record['timesteps'][0]}-{record['timesteps'][1]}")
    for name, path in paths.items():
        print(f"{name}: {path}")


def shards(*, layout: str, root: Path, split: Literal["train", "val"], out: Path,
           shard_size: int = 1000, generators: str | None = None, workers: int | None = None,
           overwrite: bool = False, check_against: str | None = None, layout_modules: list[str] | None = None) -> None:
    """Convert GenImage, DRCT-2M, plain image folders or a layout of yours into WebDataset shards plus a manifest.

    Keyword-only parameters so that jsonargparse makes them named options (--layout, --root, ...).

    Args:
        layout: a registered layout (datamodules/layouts/): genimage = ROOT/<generator>/{train,val}/{ai,nature};
            drct = ROOT/MSCOCO/<split>2017 (real) and ROOT/DRCT-2M/<generator>/<split>2017 (fake); folder =
            ROOT/real and ROOT/fake, or unlabelled; or one that a module in --layout_modules registers.
        root: dataset root directory.
        split: which split to convert (recorded only for the folder layout).
        out: output directory for shard-NNNNNN.tar, manifest.csv, rejected.csv, shards.json.
        shard_size: samples per tar (every tar but the last is full; one tar = one Zarr chunk later).
        generators: comma-separated generator folder names to keep (DRCT: add MSCOCO to keep the reals).
        workers: decoding processes (default: all CPU cores; 1 = no pool).
        overwrite: replace shards already in OUT.
        check_against: comma-separated other shard directories (e.g. the other splits' outputs); images of
            this split found there (same sha256 of the original bytes) are listed in duplicates.csv.
        layout_modules: modules to import first that register layouts (`@register_layout`, on PYTHONPATH).
    """
    from datamodules.layouts import import_layout_modules
    from datamodules.shards import ShardsInputError, convert

    names = [g.strip() for g in generators.split(",") if g.strip()] if generators else None
    others = [Path(d.strip()) for d in check_against.split(",") if d.strip()] if check_against else None
    try:
        import_layout_modules(layout_modules or [])
        summary = convert(layout, root, split, out, shard_size, names, workers, overwrite, others)
    except ShardsInputError as error:
        raise SystemExit(f"python -m cli shards: {error}") from None
    shared = "".join(f", {count} also in {directory}" for directory, count in (summary.duplicates_across or {}).items())
    print(f"{summary.num_samples} images in {summary.num_shards} shards, {summary.num_rejected} rejected "
          f"(see rejected.csv), {summary.duplicates_within} exact duplicates within the split{shared} "
          f"(see duplicates.csv), generators {','.join(summary.generators)}: {summary.out}")


def demo(out: Path = Path("demo_out"), sd: str | None = None, clip: str | None = None, images_per_class: int = 48,
         resolution: int = 128, epochs: int = 10, permute_labels: bool = False, detectors: str = "deua,lare2") -> None:
    """Run the whole two-phase pipeline on built-in data with tiny models (or real ones).

    Args:
        out: output directory (images, shards, posterior, stores, configs, runs, logs).
        sd: a diffusers-layout SD v1.5 directory; default: tiny random models built into OUT/models.
        clip: CLIP RN50 weights (checkpoint file, open_clip local-dir or 'openai'); needed with --sd.
        images_per_class: training images per class (validation gets half).
        resolution: image side fed to the VAE (256 for real SD v1.5 runs).
        epochs: training epochs of each detector.
        permute_labels: control run: swap the real and fake image of a random half of the pairs before
            phase 1, so labels carry no information about the images and every AUROC must sit at chance.
        detectors: comma-separated detectors to train and test (deua, lare2).
    """
    from workflows.demo import run_demo

    run_demo(out, sd, clip, images_per_class, resolution, epochs, permute_labels,
             [name.strip() for name in detectors.split(",") if name.strip()])


def toy_data(out: Path = Path("data"), images_per_class: int = 8, tile_size: int = 64, seed: int = 0) -> None:
    """Write a small GenImage-shaped tree, calibration images and a prompt file, to try the README's workflow.

    Args:
        out: directory to write OUT/GenImage (two generators, imagenet_ai_0419_sdv4 and imagenet_glide, with
            train/val × ai/nature: the demo's synthetic fakes and photo tiles), OUT/calibration (real tiles) and
            OUT/prompts.txt (one prompt, for `generate`).
        images_per_class: images per class and generator in train (val gets half), and calibration images.
        tile_size: image side in pixels.
        seed: seed of the tiles' draws.
    """
    from datamodules.demo_data import build_toy_data

    tree, calibration = build_toy_data(out, images_per_class, tile_size, seed)
    print(f"GenImage-shaped tree: {tree}; calibration images: {calibration}; prompts: {Path(out) / 'prompts.txt'}")


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


def grid(rows: Path, base: Path | None = None, extra: list[Path] | None = None, seeds: list[int] | None = None,
         test: bool = True, dry_run: bool = False, together: bool = False) -> list[Path]:
    """Fit (and test) every row in ROWS for every seed, one subprocess per Trainer run; print the summary.

    A run whose fit fails is reported and skipped (no test); the others still run, and the command
    exits non-zero at the end naming the failed runs. Returns the run directories.

    Args:
        rows: directory of override YAMLs, one per row (run in name order).
        base: base config; default `configs/<rows directory name>.yaml` next to `configs/ablations/`.
        extra: configs stacked after each row (machine-specific paths, shorter schedules), e.g. `--extra local.yaml`.
        seeds: seeds to run each row with (`--seeds 0 1 2`; compare shows mean ± std); default the config's seed.
        test: after fitting, test the run's best checkpoint (writes protocol_table and test_predictions.csv).
        dry_run: print the commands instead of running them.
        together: per seed, fit all rows in one process on the same batches, one read of the stores for all
            of them (workflows/grid_together.py; rows must share their data and training loop), then test each row.
    """
    from cli.lightning_cli import resolve_config
    from workflows.grid import grid as run_grid

    return run_grid(rows, base, extra, seeds, test, dry_run, together, resolve=resolve_config)


def predict(*, ckpt: str, data: str, out: str = "predictions.csv", batch_size: int = 8, num_workers: int = 2,
            accelerator: str = "auto", devices: int = 1, overwrite: bool = False, sd: str | None = None,
            clip: str | None = None, posterior: str | None = None) -> None:
    """Score raw images (a file or a folder, any size or format) with a trained detector; write a CSV.

    Features are computed on the fly with the extractor the detector's cache was made with (no cache).
    Every file gets a row: unreadable and skipped ones (hidden, not a regular file) with the reason.

    Args:
        ckpt: detector checkpoint from `python -m cli fit`.
        data: an image file or a folder (searched recursively; real/ and fake/ subfolders give labels).
        out: CSV with path, key, sha256, generator, label, format, jpeg_quality, width, height, p_fake,
            threshold, prediction, error; checked before any work.
        batch_size: images per batch.
        num_workers: decoding processes.
        accelerator: cpu, gpu or auto.
        devices: ranks (DDP): each scores its share of the files, each file exactly once; rank 0 writes OUT.
        overwrite: replace an existing OUT.
        sd: Stable Diffusion directory, if not where the checkpoint says (checked against its weight hashes).
        clip: CLIP weights, if not where the checkpoint says (checked against its weight hash).
        posterior: posterior file, if not where the checkpoint says (checked against its sha256).
    """
    from workflows.predict import predict_folder

    predict_folder(ckpt, data, out, batch_size, num_workers, accelerator, overwrite, devices, sd=sd, clip=clip,
                   posterior=posterior)


def robustness(*, ckpt: str, shards: str, out: str = "robustness", batch_size: int = 8, num_workers: int = 2,
               accelerator: str = "auto", levels: str | None = None, cache: str | None = None,
               sd: str | None = None, clip: str | None = None, posterior: str | None = None) -> None:
    """Accuracy and AP of a trained detector under JPEG, downscaling and blur, per generator and overall.

    Args:
        ckpt: detector checkpoint from `python -m cli fit`.
        shards: labelled shard directory to evaluate on (e.g. the test split's).
        out: directory for robustness.md/.csv (overall) and robustness_per_generator.md/.csv.
        batch_size: images per batch.
        num_workers: decoding processes.
        accelerator: cpu, gpu or auto.
        levels: sweep levels as `none,jpeg:95,jpeg:75,jpeg:50,downscale:0.75,downscale:0.5,blur:1,blur:2`
            (the default).
        cache: directory of the perturbed-feature stores, reused by every checkpoint with the same extractor
            (default SHARDS/robustness_cache).
        sd: Stable Diffusion directory, if not where the checkpoint says (checked against its weight hashes).
        clip: CLIP weights, if not where the checkpoint says (checked against its weight hash).
        posterior: posterior file, if not where the checkpoint says (checked against its sha256).
    """
    from workflows.robustness import robustness_sweep

    robustness_sweep(ckpt, shards, out, batch_size, num_workers, accelerator, levels, cache, sd=sd, clip=clip,
                     posterior=posterior)


def separability(*, stores: list[Path], out: Path, direction_from: Path | None = None,
                 direction: Literal["higher", "lower"] | None = None, tb: bool = False, bootstrap: int = 1000,
                 double_jpeg: bool = True, max_fit_rows: int = 4000, workers: int = 2, seed: int = 0) -> None:
    """Which guidance map separates real from fake, per generator and protocol, from feature stores alone.

    Guidance maps are scored by scalar summaries; CLIP features (and maps with many channels) by a linear probe.

    Args:
        stores: feature stores to score (e.g. one per protocol: cache/val.zarr cache/val_jpeg.zarr).
        out: directory for separability.{md,csv}, plots/STORE_MAP.png and, with --tb, tb/.
        direction_from: a train/val store on which each map's summary and each summary's direction (higher or
            lower = fake; "undetermined", both scored, when its interval contains 0.5) are chosen and the probes
            and references fitted; the scored stores only report.
        direction: declare the direction instead (default: higher = fake); the best summary is then picked on the
            scored rows (said in the report), probes and references cross-fitted.
        tb: also write the table and the figures to TensorBoard (OUT/tb).
        bootstrap: bootstrap replicates of the 95 % intervals (0: none).
        double_jpeg: compute the double-JPEG reference (decodes every scored image from the store's tars).
        max_fit_rows: rows of --direction_from the double-JPEG reference is fitted on (class-balanced sample).
        workers: threads that summarise a tar's maps.
        seed: seed of the bootstrap and of the cross-fitting folds.
    """
    from reports.separability import separability_report

    separability_report(stores, out, direction_from, direction, tb, bootstrap, double_jpeg, max_fit_rows, workers, seed)
    print(f"separability table: {out / 'separability.md'} (and .csv, plots/)")


def verify(store: Path, checksums: bool = True) -> None:
    """Check a feature store: attributes, every file's presence, size and checksum, done markers; exit 1 if damaged.

    Args:
        store: the feature store directory (from `python -m cli precompute`).
        checksums: read every file back and compare its crc32c (format 2: sha256) with the one recorded when it
            was written; false: presence and sizes only (fast).
    """
    from workflows.verify import verify_store

    verify_store(store, checksums)
