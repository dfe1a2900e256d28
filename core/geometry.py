"""Crops applied identically to an image and to its cached feature maps.

The box is in normalized coordinates, so one box means the same image region at any grid size
(a 256² image, a 32² DEU map, a 14² CLIP map); resampling goes through `grid_sample` with
`align_corners=False`, where ±1 are the outer pixel edges at every resolution. LaRE²'s code crops
the image but not the maps, which misaligns them: this is the fix.

Two kinds: a flip + random resized crop of the resized image (`clip_input: resize`, fine-tuning), and
LaRE²'s native-resolution crop (`clip_input: native_crop`): a `size`² window of the image at its own
resolution, reflect-padded first where a side is shorter (albumentations' PadIfNeeded, centred, whose
default border is BORDER_REFLECT_101, then RandomCrop / CenterCrop, as in the official code). The
window as a box of the unpadded image (`native_crop_box`, beyond [0, 1] where it was padded) crops the
maps of the whole image (`crop_to_boxes`, reflecting them where the image was reflected).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from PIL import Image


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


def center_square(image: Image.Image) -> Image.Image:
    """The centred square of side min(width, height) (the protocols' `center_crop`, tiny-model training images)."""
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))


def padded_offsets(width: np.ndarray | int, height: np.ndarray | int, size: int) -> tuple:
    """(top, left) of the image inside its padding to at least `size`² (PadIfNeeded, centred: the odd pixel
    goes to the bottom/right)."""
    return np.maximum(size - np.asarray(height), 0) // 2, np.maximum(size - np.asarray(width), 0) // 2


def centre_crop_origin(width: np.ndarray | int, height: np.ndarray | int, size: int) -> tuple:
    """(top, left) pixel of the centred `size`² window in the padded image (albumentations' CenterCrop)."""
    return (np.maximum(np.asarray(height), size) - size) // 2, (np.maximum(np.asarray(width), size) - size) // 2


def native_crop_box(width: np.ndarray | int, height: np.ndarray | int, size: int, top: np.ndarray | int,
                    left: np.ndarray | int) -> np.ndarray:
    """The window [top, top+size) × [left, left+size) of the padded image as (top, left, height, width)
    fractions of the unpadded image (..., 4) float32; vectorised over rows."""
    width, height = np.asarray(width, dtype=np.float64), np.asarray(height, dtype=np.float64)
    pad_top, pad_left = padded_offsets(width.astype(np.int64), height.astype(np.int64), size)
    box = np.stack(np.broadcast_arrays((np.asarray(top) - pad_top) / height, (np.asarray(left) - pad_left) / width,
                                       size / height, size / width), axis=-1)
    return box.astype(np.float32)


def crop_to_boxes(maps: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Each row's box of `maps` (B, C, H, W) resampled (bilinear) to `size` (default H, W); boxes (B, 4) as
    (top, left, height, width) fractions. Outside [0, 1] the maps are reflected, as the image was padded."""
    height, width = size if size is not None else maps.shape[-2:]
    boxes = boxes.to(device=maps.device, dtype=torch.float32)
    top, left, box_height, box_width = boxes.unbind(dim=1)
    theta = torch.zeros(maps.shape[0], 2, 3, device=maps.device)
    theta[:, 0, 0], theta[:, 0, 2] = box_width, 2 * left + box_width - 1
    theta[:, 1, 1], theta[:, 1, 2] = box_height, 2 * top + box_height - 1
    grid = F.affine_grid(theta, [maps.shape[0], maps.shape[1], height, width], align_corners=False)
    return F.grid_sample(maps.float(), grid, mode="bilinear", padding_mode="reflection", align_corners=False)
