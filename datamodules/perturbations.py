"""Image perturbations of the robustness sweep standard in forensics benchmarks.

Each is a named, parameterised PIL → PIL function applied at read time, before preprocessing,
so the detector sees exactly what a re-shared image would look like: JPEG re-compression,
downscaling and Gaussian blur.
"""

from __future__ import annotations

from collections.abc import Callable

from PIL import Image, ImageFilter

from datamodules.image_io import jpeg_reencode

# The sweep the evaluation reports, as (name, parameter) pairs.
ROBUSTNESS_SWEEP: tuple[tuple[str, float], ...] = (
    ("none", 0), ("jpeg", 95), ("jpeg", 75), ("jpeg", 50), ("downscale", 0.75), ("downscale", 0.5),
    ("blur", 1.0), ("blur", 2.0))


def jpeg(image: Image.Image, quality: float) -> Image.Image:
    """Re-encode as JPEG at `quality` (libjpeg's 1..100 scale) and decode again."""
    return jpeg_reencode(image.convert("RGB"), int(quality))


def downscale(image: Image.Image, factor: float) -> Image.Image:
    """Shrink both sides by `factor` with antialiasing (as a platform's resizing does)."""
    width, height = image.size
    return image.resize((max(1, round(width * factor)), max(1, round(height * factor))), Image.Resampling.LANCZOS)


def blur(image: Image.Image, sigma: float) -> Image.Image:
    """Gaussian blur with standard deviation `sigma` pixels."""
    return image.filter(ImageFilter.GaussianBlur(radius=sigma))


PERTURBATIONS: dict[str, Callable[[Image.Image, float], Image.Image]] = {
    "none": lambda image, _: image, "jpeg": jpeg, "downscale": downscale, "blur": blur}


def perturb(image: Image.Image, name: str, parameter: float) -> Image.Image:
    """Apply the named perturbation; unknown names are an error naming the choices."""
    if name not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {name!r}; choose from {sorted(PERTURBATIONS)}")
    return PERTURBATIONS[name](image, parameter)
