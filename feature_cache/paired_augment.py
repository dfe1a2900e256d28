"""Flip + random resized crop applied identically to an image and to its cached feature maps.

The box is in normalized coordinates, so one box means the same image region at any grid size
(a 256² image, a 32² DEU map, a 14² CLIP map); resampling goes through `grid_sample` with
`align_corners=False`, where ±1 are the outer pixel edges at every resolution. LaRE²'s code crops
the image but not the maps, which misaligns them: this is the fix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class FlipCrop:
    """A crop box as fractions of the image side ([0, 1]), then an optional horizontal flip."""

    top: float
    left: float
    height: float
    width: float
    flip: bool


def sample_flip_crop(scale: tuple[float, float] = (0.5, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                     flip_probability: float = 0.5, generator: torch.Generator | None = None) -> FlipCrop:
    """torchvision's RandomResizedCrop sampling (area fraction, log-uniform aspect) on a square image."""

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator))

    box = FlipCrop(0.0, 0.0, 1.0, 1.0, False)
    for _ in range(10):
        area = uniform(*scale)
        aspect = math.exp(uniform(math.log(ratio[0]), math.log(ratio[1])))
        width, height = math.sqrt(area * aspect), math.sqrt(area / aspect)
        if width <= 1 and height <= 1:
            box = FlipCrop(uniform(0, 1 - height), uniform(0, 1 - width), height, width, False)
            break
    flip = float(torch.rand((), generator=generator)) < flip_probability
    return FlipCrop(box.top, box.left, box.height, box.width, flip)


def apply_flip_crop(x: torch.Tensor, box: FlipCrop, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Resample the box of `x` (C, H, W) to `size` (default: x's own H, W), bilinear, flipped if asked."""
    height, width = size if size is not None else x.shape[-2:]
    centre_x, centre_y = 2 * box.left + box.width - 1, 2 * box.top + box.height - 1
    theta = torch.tensor([[-box.width if box.flip else box.width, 0.0, centre_x],
                          [0.0, box.height, centre_y]], dtype=torch.float32).unsqueeze(0)
    grid = F.affine_grid(theta, [1, x.shape[0], height, width], align_corners=False)
    out = F.grid_sample(x.unsqueeze(0).float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.squeeze(0).to(x.dtype)
