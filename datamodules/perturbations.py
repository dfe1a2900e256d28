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


# Valid strength per perturbation: JPEG quality, downscale factor, blur sigma in pixels.
STRENGTHS = {"none": (0, 0), "jpeg": (1, 100), "downscale": (0.01, 1), "blur": (0, 100)}


def perturbation_label(name: str, parameter: float) -> str:
    """`none`, `jpeg 75`, `blur 1`: how a sweep level is shown in tables and progress lines."""
    return name if name == "none" else f"{name} {parameter:g}"


def parse_sweep(text: str) -> tuple[tuple[str, float], ...]:
    """Sweep levels from `none,jpeg:95,downscale:0.5,blur:1` (names from PERTURBATIONS; `none` has no value)."""
    levels = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        name, _, value = item.partition(":")
        if name not in PERTURBATIONS:
            raise ValueError(f"--levels {item!r}: unknown perturbation {name!r}; choose from {sorted(PERTURBATIONS)}")
        if name != "none" and not value:
            raise ValueError(f"--levels {item!r}: give its strength as {name}:VALUE (e.g. jpeg:75, blur:1)")
        try:
            strength = float(value or 0)
        except ValueError:
            raise ValueError(f"--levels {item!r}: {value!r} is not a number") from None
        low, high = STRENGTHS[name]
        if not low <= strength <= high:
            raise ValueError(f"--levels {item!r}: {name} strength must be within {low:g}..{high:g}")
        levels.append((name, strength))
    if not levels:
        raise ValueError(f"--levels {text!r}: no levels given")
    return tuple(levels)


def perturb(image: Image.Image, name: str, parameter: float) -> Image.Image:
    """Apply the named perturbation; unknown names are an error naming the choices."""
    if name not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {name!r}; choose from {sorted(PERTURBATIONS)}")
    return PERTURBATIONS[name](image, parameter)
