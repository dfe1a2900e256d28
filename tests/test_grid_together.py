"""`grid --together`: rows trained in one process on shared batches end where they end when trained alone."""

from __future__ import annotations

import shlex
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from workflows.grid_together import SharedBatches
from cli_runner import REPO, run_cli
from test_feature_cache_datamodule import write_store
from feature_cache.provenance import FeatureSpec

CHANNELS = 8
ENV = {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}  # the whole environment of a run
SPECS = {"clip_layer3": FeatureSpec((CHANNELS, 14, 14), "float16", "lz4", "clip"),
         "deu": FeatureSpec((4, 8, 8), "float32", "zstd", "guidance")}


def _values(rows: np.ndarray) -> dict[str, np.ndarray]:
    """Label-independent CLIP noise; fakes (odd rows) have DEU shifted up, so the detectors learn."""
    rng = np.random.default_rng(rows[0])
    shift = (rows % 2).reshape(-1, 1, 1, 1).astype(np.float32)
    return {"clip_layer3": rng.random((len(rows), CHANNELS, 14, 14), dtype=np.float32),
            "deu": rng.random((len(rows), 4, 8, 8), dtype=np.float32) + shift}


def _write_configs(root: Path, store: Path) -> tuple[Path, dict[str, Path]]:
    base = {"seed_everything": 3,
            "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 2, "enable_model_summary": False,
                        "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                   "init_args": {"save_dir": str(root / "runs"), "name": "deua", "version": "x",
                                                 "default_hp_metric": False}},
                        "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                       "init_args": {"save_last": True}}]},
            "model": {"class_path": "lightning_modules.detectors.DEUADetector",
                      "init_args": {"guidance": ["deu"], "visual_channels": CHANNELS, "num_heads": 2,
                                    "guidance_dim": 8, "lr": 1e-3}},
            "data": {"class_path": "datamodules.cached_features.FeatureCacheDataModule",
                     "init_args": {"features": ["clip_layer3", "deu"], "train": [str(store)], "val_fraction": 0.25,
                                   "batch_size": 8, "seed": 1}}}
    rows = {"deu": {"trainer": {"logger": {"init_args": {"version": "deu"}}}, "model": {"init_args": {"asym_weight": 0.0}}},
            "asym": {"trainer": {"logger": {"init_args": {"version": "asym"}}},
                     "model": {"init_args": {"guidance": [], "asym_weight": 0.5}}}}
    (root / "rows").mkdir(parents=True)
    (root / "base.yaml").write_text(yaml.safe_dump(base))
    for name, row in rows.items():
        (root / "rows" / f"{name}.yaml").write_text(yaml.safe_dump(row))
    return root / "base.yaml", {name: root / "rows" / f"{name}.yaml" for name in rows}


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["state_dict"]


@pytest.mark.slow
def test_rows_trained_together_equal_rows_trained_alone(tmp_path: Path) -> None:
    """Catches rows that see other batches together than alone (order tied to a Trainer, a shared RNG), rows
    that share a model, optimiser or run directory, a fan-out that skips or repeats batches, and rows built
    without the reports every detector run gets (no val_predictions.csv; `val_threshold` never chosen)."""
    store = write_store(tmp_path / "store", _values, SPECS, ["sdv4", "nature"], num_rows=48, shard_size=16)
    alone_root, together_root = tmp_path / "alone", tmp_path / "together"
    for root in (alone_root, together_root):
        _write_configs(root, store.path)
    for name in ("deu", "asym"):
        alone = run_cli(["fit", "--config", str(alone_root / "base.yaml"), "--config",
                         str(alone_root / "rows" / f"{name}.yaml")], env=ENV)
        assert alone.returncode == 0, alone.stderr[-3000:]
    done = run_cli(["grid", str(together_root / "rows"), "--base", str(together_root / "base.yaml"), "--together",
                    "true", "--test", "false"], env=ENV)  # the rows together: one `python -m cli.together` subprocess
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fit together in one process" in done.stdout
    weights = {}
    for name in ("deu", "asym"):
        run = f"{name}-seed3"  # one run directory per row and seed
        alone, together = _weights(alone_root / "runs" / "deua" / run), _weights(together_root / "runs" / "deua" / run)
        assert list(together) == list(alone)
        for key in alone:
            torch.testing.assert_close(together[key], alone[key], rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
        assert list((together_root / "runs" / "deua" / run).glob("events.out.tfevents.*"))
        assert (together_root / "runs" / "deua" / run / "val_predictions.csv").is_file()
        weights[name] = together
    common = set(weights["deu"]) & set(weights["asym"])  # the rows are different models, not one shared
    assert any(not torch.equal(weights["deu"][k], weights["asym"][k]) for k in common)


@pytest.mark.slow
@pytest.mark.parametrize("stdout", ["terminal", "pipe"])
def test_grid_together_runs_with_the_progress_bar_on(tmp_path: Path, stdout: str) -> None:
    """`grid --together` with Lightning's default progress bar, stdout a terminal (`script`) and a pipe.

    Catches rows in threads that each start and stop the one Rich live display (6 of 8 rows ended in
    `IndexError: pop from empty list` and were reported failed), and a fix that only works when piped."""
    store = write_store(tmp_path / "store", _values, SPECS, ["sdv4", "nature"], num_rows=16, shard_size=16)
    base, _ = _write_configs(tmp_path, store.path)
    args = ["grid", str(tmp_path / "rows"), "--base", str(base), "--together", "true", "--test", "false"]
    env = {**ENV, "TERM": "xterm", "COLUMNS": "120"}
    if stdout == "terminal":  # script(1) runs a fresh `python -m cli` with a pseudo-terminal as its stdout and stderr
        done = subprocess.run(["script", "-qec", shlex.join([sys.executable, "-m", "cli", *args]), "/dev/null"],
                              env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
    else:  # in-process: stdout goes to a file, which `python -m cli` treats as a pipe (no terminal: core/progress.py)
        done = run_cli(args, env=env)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "Error" not in output, output[-3000:]
    for name in ("deu", "asym"):
        assert (tmp_path / "runs" / "deua" / f"{name}-seed3" / "checkpoints" / "last.ckpt").is_file()
    shown = [f"{name} seed 3: epoch 1 " in output for name in ("deu", "asym")]  # the shared display's final rows
    if stdout == "pipe":  # the plain-log default of `python -m cli fit`: lines, not redrawn frames
        assert "train: " in output and " batches" in output and not any(shown), output[-3000:]
    else:  # one display, a bar per row, drawn on the terminal
        assert all(shown), output[-3000:]


def test_shared_batches_reach_every_row_once_in_order_and_are_produced_once() -> None:
    """Catches a fan-out that re-reads a batch per row, lets a fast row run ahead into buffers a slow row still
    holds, or hangs when a row stops early."""
    produced: list[tuple[int, int]] = []

    class Source:
        def __init__(self, epoch: int) -> None:
            self.epoch = epoch

        def __len__(self) -> int:
            return 5

        def __iter__(self):
            for k in range(5):
                produced.append((self.epoch, k))
                yield (self.epoch, k)

    shared = SharedBatches(Source, consumers=3)
    seen: dict[int, list] = {c: [] for c in range(3)}
    lead: list[int] = []

    def consume(c: int) -> None:
        view = shared.view(c)
        for epoch in range(2):
            for k, batch in enumerate(view):
                seen[c].append(batch)
                lead.append(len(produced) - len(seen[c]) if c == 0 else 0)
                if c == 2 and epoch == 1 and k == 1:
                    break  # this row stops early (e.g. early stopping)
        shared.retire(c)

    threads = [threading.Thread(target=consume, args=(c,)) for c in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    expected = [(e, k) for e in range(2) for k in range(5)]
    assert produced == expected  # each batch read once for all rows
    assert seen[0] == seen[1] == expected and seen[2] == expected[:7]
    assert max(lead) <= 2  # production never runs more than a prefetch ahead of a row
