"""Commands that are not Trainer runs: plain functions whose signatures jsonargparse turns into options."""

from __future__ import annotations

from pathlib import Path


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


def shards() -> None:
    """Convert GenImage, DRCT-2M or plain image folders into WebDataset shards plus a manifest."""
    raise SystemExit("python -m cli shards: not implemented yet (image shards issue)")


def demo() -> None:
    """Run the whole two-phase pipeline on built-in data with tiny models (or real ones)."""
    raise SystemExit("python -m cli demo: not implemented yet (demo issue)")


def compare(runs_dir: Path, sort_by: str = "test_acc", metrics: list[str] | None = None) -> None:
    """One table of all runs under a directory (an ablation grid), sorted, with the hparams that differ.

    Args:
        runs_dir: directory searched recursively for TensorBoard runs (e.g. runs/).
        sort_by: metric to sort by, best first.
        metrics: metric names to show (default: every val*/test* scalar).
    """
    from cli.compare import compare_runs

    compare_runs(runs_dir, sort_by, metrics)


PLAIN_COMMANDS = {"shards": shards, "tiny-models": tiny_models, "demo": demo, "compare": compare}
