"""Phase-1 writer throughput on the host: inline vs background thread, per CLIP dtype and codec (CPU only).

Run by hand (prints, asserts nothing):
    python benchmarks/writer.py                        # 512 rows, batch 32, tars of 64 rows, queue of 1 tar
    python benchmarks/writer.py --rows 1024 --device-ms 80

Rows are RN50-shaped: clip_layer3 (1024, 14, 14) plus four guidance maps (4, 32, 32) (lare, deu,
aleatoric, mi), ReLU-like CLIP activations and positive maps, through a real `Trainer.predict` with the real
`ZarrFeatureWriter` into a real Zarr store. The extractor stands in for the device: it returns rows from a
pool and sleeps `--device-ms` per batch (80 ms = 32 images at 400 images/s).
First the encoding error of each CLIP dtype on those activations, then per configuration:
- rows/s: rows written per second of the whole predict (device time 0: the writer's own throughput);
- wait ms/batch: time the loop spent in `write_on_batch_end` per batch with the device busy `--device-ms`
  per batch (inline: the whole encode + write; background: the hand-over plus any wait on a full queue).
  The run must be several queues long (rows >> queue_tars x shard size) to show the steady state, where
  the background wait is about max(0, write time - device time) per batch.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from feature_cache_fakes import FakeShardDataModule, make_shard_dir  # noqa: E402

from feature_cache.codecs import encode, widen  # noqa: E402
from feature_cache.provenance import FeatureSpec  # noqa: E402
from feature_cache.writer import ZarrFeatureWriter  # noqa: E402
from lightning_modules.maps import feature_spec  # noqa: E402

MAPS = ("lare", "deu", "aleatoric", "mi")


class PoolExtractor(pl.LightningModule):
    """Returns RN50-shaped rows from a fixed pool (no compute), after `device_ms` of simulated device time."""

    def __init__(self, batch_size: int, device_ms: float) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.pool = {"clip_layer3": torch.relu(torch.randn(batch_size, 1024, 14, 14, generator=generator)),
                     **{name: torch.rand(batch_size, 4, 32, 32, generator=generator) * 1e-3 for name in MAPS}}
        self.device_ms, self.outputs = device_ms, ["clip_layer3", *MAPS]
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def provenance(self) -> dict[str, Any]:
        return {"common": {"extractor": "pool"}, "maps": {name: {} for name in self.outputs}}

    def set_outputs(self, names: list[str]) -> None:
        self.outputs = list(names)

    def feature_specs(self, resolution: int, storage: dict[str, tuple[str, str]]) -> dict[str, FeatureSpec]:
        return {name: feature_spec(name, tuple(self.pool[name].shape[1:]), storage) for name in self.outputs}

    def predict_step(self, batch: dict[str, Any]) -> dict[str, Any]:
        time.sleep(self.device_ms / 1000)
        count = len(batch["row"])
        return {**{k: batch[k] for k in ("key", "row", "shard_index", "label", "generator", "error")},
                **{name: self.pool[name][:count] for name in self.outputs}}


def measure(shard_dir: Path, work: Path, batch_size: int, device_ms: float, **writer_kwargs: Any) -> tuple[float, float]:
    """(seconds of the whole predict, seconds the loop spent in the writer's batch hook) for one fresh store."""
    store = work / "store.zarr"
    shutil.rmtree(store, ignore_errors=True)
    writer = ZarrFeatureWriter(str(store), verify_checksums=False, **writer_kwargs)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[writer])
    datamodule = FakeShardDataModule(str(shard_dir), batch_size=batch_size)
    started = time.perf_counter()
    trainer.predict(PoolExtractor(batch_size, device_ms), datamodule=datamodule, return_predictions=False)
    return time.perf_counter() - started, writer.wait_seconds


def encoding_errors(values: torch.Tensor) -> None:
    """Relative L2 and max abs error of each CLIP dtype on ReLU-like (B, 1024, 14, 14) activations."""
    reference = values.numpy()
    for dtype in ("float16", "int8_rowscale", "float8_e4m3"):
        encoded = encode(dtype, reference)
        error = widen(dtype, encoded.values, encoded.scale).numpy() - reference
        print(f"encoding error {dtype:14s}: relative L2 {np.linalg.norm(error) / np.linalg.norm(reference):.2e}, "
              f"max abs {np.abs(error).max():.2e} (values up to {reference.max():.2f}), "
              f"{encoded.values.itemsize} byte(s)/value")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--queue-tars", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device-ms", type=float, default=80.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shard_dir = make_shard_dir(work / "shards", args.rows, args.shard_size, image_size=8)
        batches = -(-args.rows // args.batch_size)
        print(f"{args.rows} rows (clip_layer3 1024x14x14 + 4 maps 4x32x32), batch {args.batch_size}, "
              f"tars of {args.shard_size}, queue of {args.queue_tars} tar(s); torch threads {torch.get_num_threads()}")
        encoding_errors(PoolExtractor(args.batch_size, 0).pool["clip_layer3"])
        print(f"{'clip dtype':14s} {'codec':5s} {'writer':10s} {'rows/s':>8s} "
              f"{'wait ms/batch at ' + format(args.device_ms, 'g') + ' ms device':>32s}")
        configs = [("float16", "none"), ("float16", "lz4"), ("float16", "zstd"), ("int8_rowscale", "lz4"),
                   ("float8_e4m3", "lz4")]
        for clip_dtype, codec in configs:
            for background in (False, True):
                kwargs = {"clip_dtype": clip_dtype, "clip_codec": codec, "background": background,
                          "queue_tars": args.queue_tars}
                seconds, _ = measure(shard_dir, work, args.batch_size, 0.0, **kwargs)
                _, waited = measure(shard_dir, work, args.batch_size, args.device_ms, **kwargs)
                print(f"{clip_dtype:14s} {codec:5s} {'background' if background else 'inline':10s} "
                      f"{args.rows / seconds:8.0f} {1000 * waited / batches:32.1f}", flush=True)


if __name__ == "__main__":
    main()
