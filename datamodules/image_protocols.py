"""Read-time image protocols: bytes → (3, R, R) uint8 (or float32 in [-1, 1]), optionally removing format/size biases.

GenImage's reals are ImageNet JPEGs of many sizes while its fakes are PNGs of one size per generator, so
a detector can score well by spotting JPEG artefacts or resize statistics instead of generation traces
(issue 10). The protocols take those shortcuts away before the model sees the image:

- `raw`: decode, RGB, plain resize to R×R (no crop, aspect ratio not kept), as the LaRE² code does
  (torchvision `Resize` on PIL images = PIL bilinear with antialiasing).
- `jpeg_aligned`: re-encode every image, real and fake, with PIL's JPEG encoder, at a fixed quality or
  at a quality drawn per image from the real images' estimated JPEG qualities; then as `raw`.
- `size_aligned`: centre-crop every image to a square of its shorter side, then resize, so the resize
  never stretches one class more than the other. With `size_filter`, real images whose shorter side lies
  outside the range of the fake images' shorter sides (same generator folder; all fakes if it has none)
  are excluded: they come out as zeros with an `error` saying so, so the row accounting stays intact.
- `jpeg_size_aligned`: JPEG first (as if the dataset had been saved that way), then the size alignment.

Every random choice is seeded by (seed, sha256 of the image's original bytes) through `core.seeding`, so an
image looks the same on every rank, worker and rerun, in any row of any shard directory: inserting or
removing a file changes no other image.

How CLIP sees the image (`clip_input`): `resize` gives CLIP the resized R×R image (resized again to 224
by the CLIP preprocessing); `native_crop` gives it a `clip_size`² window of the image at its own
resolution after the protocol (before the final resize), as LaRE² does (its official code: albumentations
PadIfNeeded with reflect-101 padding for smaller images, then CenterCrop at test, RandomCrop in
training), keeping the high-frequency traces a resize averages away. The diffusion maps still see the
whole resized image; the window, as a box of the image (`core.geometry.native_crop_box`),
crops them where they meet CLIP's grid (DetectorBase.pooled_guidance).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image

from datamodules.image_io import decode_rgb, jpeg_reencode
from datamodules.perturbations import PERTURBATIONS, perturb
from core.geometry import center_square, centre_crop_origin, native_crop_box, padded_offsets
from core.hashing import bytes_sha256
from core.seeding import image_random

Protocol = Literal["raw", "jpeg_aligned", "size_aligned", "jpeg_size_aligned"]
ClipInput = Literal["resize", "native_crop"]
CLIP_INPUTS = ("resize", "native_crop")
JPEG_PROTOCOLS = ("jpeg_aligned", "jpeg_size_aligned")
SIZE_PROTOCOLS = ("size_aligned", "jpeg_size_aligned")
RESIZE = "PIL bilinear, antialiased (as torchvision Resize on PIL images in the LaRE² code)"


class ExcludedByProtocol(Exception):
    """An image the protocol deliberately leaves out (reported in `error`, never silently dropped)."""




def to_uint8(image: Image.Image) -> torch.Tensor:
    """(3, H, W) uint8 from an 8-bit RGB image: 4× fewer bytes to batch, pin and copy than float32."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


@dataclass(frozen=True)
class ImagePreprocessor:
    """One image's bytes to the model's input under a protocol; picklable for DataLoader workers."""

    resolution: int
    protocol: Protocol = "raw"
    jpeg_quality: int | None = None
    real_jpeg_qualities: tuple[int, ...] = ()
    seed: int = 0
    # generator → (min, max) shorter side of its fake images; "" holds the range over all fakes.
    fake_side_ranges: tuple[tuple[str, int, int], ...] | None = None
    # What happened to the file before the detector saw it (robustness sweep), e.g. ("jpeg", 75).
    perturbation: tuple[str, float] = ("none", 0.0)
    clip_input: ClipInput = "resize"
    clip_size: int = 224  # side of the native crop (CLIP RN50's input); only used by native_crop

    def __post_init__(self) -> None:
        if self.resolution < 8 or self.resolution % 8:
            raise ValueError(f"resolution {self.resolution}: must be a positive multiple of 8 (the VAE downsamples "
                             "by 8)")
        if self.protocol in JPEG_PROTOCOLS and self.jpeg_quality is None and not self.real_jpeg_qualities:
            raise ValueError(f"protocol {self.protocol}: no jpeg_quality given and no real JPEG image to draw "
                             "qualities from; set jpeg_quality")
        if self.perturbation[0] not in PERTURBATIONS:
            raise ValueError(f"perturbation {self.perturbation[0]!r}: choose from {sorted(PERTURBATIONS)}")
        if self.jpeg_quality is not None and not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality {self.jpeg_quality}: must be within 1..100")
        if self.clip_input not in CLIP_INPUTS:
            raise ValueError(f"clip_input {self.clip_input!r}: choose from {list(CLIP_INPUTS)}")
        if self.clip_size < 1:
            raise ValueError(f"clip_size {self.clip_size}: must be a positive number of pixels")

    def quality_for(self, sha256: str) -> int:
        """The fixed quality, or one drawn from the real images' quality distribution for the image whose original
        bytes have this sha256 (never its row or file name, so no other image's draw depends on it)."""
        if self.jpeg_quality is not None:
            return self.jpeg_quality
        return image_random(self.seed, "jpeg", sha256).choice(self.real_jpeg_qualities)

    def _check_size(self, image: Image.Image, label: int, generator: str) -> None:
        if self.fake_side_ranges is None or label != 0:
            return
        ranges = {name: (low, high) for name, low, high in self.fake_side_ranges}
        low, high = ranges.get(generator, ranges[""])
        side = min(image.size)
        if not low <= side <= high:
            raise ExcludedByProtocol(f"excluded by size_filter: real image's shorter side {side} is outside "
                                     f"the fake images' range [{low}, {high}]")

    def prepared(self, data: bytes, label: int, generator: str) -> Image.Image:
        """The image as the protocol leaves it before the final resize; raises on undecodable data or an exclusion.
        A drawn JPEG quality is keyed by the sha256 of `data` (the original bytes, before any perturbation)."""
        image = perturb(decode_rgb(data)[1], *self.perturbation)
        if self.protocol in JPEG_PROTOCOLS:
            image = jpeg_reencode(image, self.quality_for(bytes_sha256(data)))
        if self.protocol in SIZE_PROTOCOLS:
            self._check_size(image, label, generator)
            image = center_square(image)
        return image

    def resized(self, image: Image.Image) -> torch.Tensor:
        """(3, R, R) uint8 of a prepared image."""
        return to_uint8(image.resize((self.resolution, self.resolution), Image.BILINEAR))

    def pixels(self, data: bytes, label: int, generator: str) -> torch.Tensor:
        """(3, R, R) uint8, normalised later where it is used; raises on undecodable data or a protocol exclusion."""
        return self.resized(self.prepared(data, label, generator))

    def native_crop(self, image: Image.Image, position: tuple[float, float] | None = None
                    ) -> tuple[torch.Tensor, np.ndarray]:
        """((3, S, S) uint8, its box (4,)): the S = clip_size window of a prepared image at native resolution,
        reflect-101 padded where a side is shorter; centred, or (training) at `position` = uniform draws in
        [0, 1) per axis scaled to the free range (drawn by the caller, so threads decoding images keep the
        run's random order)."""
        pixels = np.asarray(image, dtype=np.uint8)
        height, width, size = pixels.shape[0], pixels.shape[1], self.clip_size
        pad_top, pad_left = padded_offsets(width, height, size)
        pad_height, pad_width = max(size - height, 0), max(size - width, 0)
        pixels = np.pad(pixels, ((pad_top, pad_height - pad_top), (pad_left, pad_width - pad_left), (0, 0)),
                        mode="reflect")  # numpy's reflect repeats no edge pixel: OpenCV's BORDER_REFLECT_101
        if position is not None:
            top, left = (int(fraction * (extent - size + 1)) for fraction, extent in zip(position, pixels.shape[:2]))
        else:
            top, left = (int(v) for v in centre_crop_origin(width, height, size))
        crop = torch.from_numpy(np.ascontiguousarray(pixels[top:top + size, left:left + size])).permute(2, 0, 1)
        return crop.contiguous(), native_crop_box(width, height, size, top, left)

    def clip_pixels(self, image: Image.Image) -> dict[str, torch.Tensor]:
        """The batch fields CLIP's input adds under native_crop (centred window and its box); none under resize."""
        if self.clip_input == "resize":
            return {}
        crop, box = self.native_crop(image)
        return {"clip_image": crop, "clip_box": torch.from_numpy(box)}

    def blank_clip_pixels(self) -> dict[str, torch.Tensor]:
        """`clip_pixels` of a row that could not be read: a blank window covering the whole (blank) image."""
        if self.clip_input == "resize":
            return {}
        return {"clip_image": torch.full((3, self.clip_size, self.clip_size), 127, dtype=torch.uint8),
                "clip_box": torch.tensor([0.0, 0.0, 1.0, 1.0])}

    def __call__(self, data: bytes, label: int, generator: str) -> torch.Tensor:
        """(3, R, R) float32 in [-1, 1]: `pixels` normalised with the arithmetic the extractor uses on the device."""
        return self.pixels(data, label, generator).float() / 127.5 - 1

    def effective_metadata(self, sha256: str, image_format: str, jpeg_quality: int | None, width: int,
                           height: int) -> tuple[str, int | None, int, int]:
        """(format, JPEG quality, width, height) of the image as this pipeline passes it to the final resize.

        What a format-only reference may exploit under this protocol: under `jpeg_aligned` every image is a
        JPEG of a quality drawn independently of its label, under `size_aligned` every image is square.
        (Double compression of already-JPEG reals is not visible here; see the README.)
        """
        name, parameter = self.perturbation
        if name == "jpeg":
            image_format, jpeg_quality = "JPEG", int(parameter)
        elif name == "downscale":
            width, height = max(1, round(width * parameter)), max(1, round(height * parameter))
        if self.protocol in JPEG_PROTOCOLS:
            image_format, jpeg_quality = "JPEG", self.quality_for(sha256)
        if self.protocol in SIZE_PROTOCOLS:
            width = height = min(width, height)
        return image_format, jpeg_quality, width, height

    def provenance(self) -> dict:
        """Everything that changes the pixels, for the store's attrs (stores of different settings never mix)."""
        jpeg = self.protocol in JPEG_PROTOCOLS
        drawn = jpeg and self.jpeg_quality is None  # a quality drawn per image, keyed by its bytes' sha256
        return {"resolution": self.resolution, "protocol": self.protocol, "resize": RESIZE,
                "jpeg_quality": self.jpeg_quality if jpeg and self.jpeg_quality is not None else None,
                "jpeg_quality_source": ("fixed" if self.jpeg_quality is not None else "real-image distribution")
                if jpeg else None,
                "seed": self.seed if drawn else None, "quality_key": "sha256" if drawn else None,
                "size_filter": self.fake_side_ranges is not None, "perturbation": list(self.perturbation),
                "clip_input": self.clip_input,
                "clip_size": self.clip_size if self.clip_input == "native_crop" else None}
