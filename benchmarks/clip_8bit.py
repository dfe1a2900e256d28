"""8-bit CLIP maps vs float16: encoding error on RN50-shaped activations and a detector's validation metrics.

    python benchmarks/clip_8bit.py [--images 768] [--epochs 4]

Activations: layer3 (1024x14x14) of open_clip's RN50 architecture (random initial weights: no model hub
here) on 224² tiles of real photos (skimage's sample images, as the demo uses). Each stored dtype goes
through the store's own `encode` and `widen` (feature_cache/codecs.py); printed per dtype: relative L2
error, the worst per-row max error relative to the row's max |x|, and the share of non-zero values
stored as zero. Detector: DEUA (no guidance) trained with the same seed on each dtype's decoded maps to
tell fakes from reals, where a "fake" tile carries a faint high-frequency pattern (amplitude 2/255) that
the maps must preserve; printed: validation accuracy and AUROC per dtype.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import open_clip
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.demo_data import _photos, _random_tile  # noqa: E402
from feature_cache.codecs import encode, widen  # noqa: E402
from lightning_modules.detectors import DEUADetector  # noqa: E402

DTYPES = ("float32", "float16", "int8_rowscale", "float8_e4m3")
MEAN, STD = torch.tensor([0.4815, 0.4578, 0.4082]), torch.tensor([0.2686, 0.2613, 0.2758])


def activations(count: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer3 maps (count, 1024, 14, 14) float32, labels): half the tiles carry the faint pattern."""
    rng = np.random.default_rng(0)
    photos = _photos()
    tiles = torch.from_numpy(np.stack([_random_tile(photos, 224, rng) for _ in range(count)])).permute(0, 3, 1, 2).float()
    labels = torch.arange(count) % 2
    checker = ((torch.arange(224)[:, None] + torch.arange(224)[None, :]) % 2).float() * 2 - 1
    tiles = (tiles + labels.view(-1, 1, 1, 1) * 2 * checker).clamp(0, 255) / 255
    torch.manual_seed(0)
    visual = open_clip.create_model("RN50", pretrained=None).visual.to(device).eval()
    maps = []
    with torch.no_grad():
        for batch in tiles.split(64):
            x = ((batch - MEAN.view(1, 3, 1, 1)) / STD.view(1, 3, 1, 1)).to(device)
            maps.append(visual.layer3(visual.layer2(visual.layer1(visual.stem(x)))).float().cpu())
    return torch.cat(maps), labels


def decoded(dtype: str, maps: torch.Tensor) -> torch.Tensor:
    encoded = encode(dtype, maps.numpy())
    return widen(dtype, torch.from_numpy(encoded.values), None if encoded.scale is None else torch.from_numpy(encoded.scale))


def errors(maps: torch.Tensor, approx: torch.Tensor) -> str:
    relative_l2 = float((approx - maps).norm() / maps.norm())
    row_max = (approx - maps).abs().flatten(1).amax(1) / maps.abs().flatten(1).amax(1)
    zeroed = float(((maps != 0) & (approx == 0)).sum() / (maps != 0).sum())
    return f"relative L2 {relative_l2:.2e}, worst row max error {float(row_max.max()):.2e} of the row's max, {zeroed:.1%} of non-zeros stored as 0"


def validation_metrics(maps: torch.Tensor, labels: torch.Tensor, epochs: int) -> str:
    """DEUA (frozen maps, no guidance), seed 0, trained on 2/3 of the rows, validated on the rest."""
    pl.seed_everything(0, verbose=False)
    split = len(maps) * 2 // 3

    def loader(rows: slice, shuffle: bool) -> DataLoader:
        data = TensorDataset(maps[rows], labels[rows], torch.zeros_like(labels[rows]), torch.arange(len(labels))[rows])
        return DataLoader(data, batch_size=48, shuffle=shuffle, generator=torch.Generator().manual_seed(0),
                          collate_fn=lambda items: dict(zip(("clip_layer3", "label", "generator", "row"),
                                                            map(torch.stack, zip(*items)))))

    model = DEUADetector(guidance=[], lr=1e-4)
    with tempfile.TemporaryDirectory() as root:  # Lightning writes under default_root_dir
        trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=root)
        trainer.fit(model, loader(slice(0, split), True), loader(slice(split, None), False))
        result = trainer.validate(model, loader(slice(split, None), False), verbose=False)[0]
    return f"val acc {result['val_acc']:.3f}, val AUROC {result['val_auroc']:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=768)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    maps, labels = activations(args.images, device)
    print(f"RN50 layer3 maps {tuple(maps.shape)}: {float((maps == 0).float().mean()):.0%} zeros, "
          f"max {float(maps.max()):.2f}, mean {float(maps.mean()):.3f}")
    for dtype in DTYPES:
        approx = decoded(dtype, maps)
        print(f"{dtype}: {errors(maps, approx)}; {validation_metrics(approx, labels, args.epochs)}", flush=True)


if __name__ == "__main__":
    main()
