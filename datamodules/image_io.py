"""Decode image files the same way at conversion time and at read time: full decode, RGB, JPEG quality.

The converter rejects exactly what the reader could not decode, because both use `decode_rgb`.
"""

from __future__ import annotations

import io
import os
import stat

import numpy as np
from PIL import Image, UnidentifiedImageError

# Real photos (DRCT's MSCOCO, Midjourney upscales, user folders) can exceed PIL's default ~89 MP
# decompression-bomb guard, which would reject them as if they were corrupt. 2^28 pixels (16384²,
# above any camera or upscaler) accepts every real image; `decode_rgb`, the one place the framework
# decodes files, refuses larger ones from the header, before a pixel is decoded, naming the size.
# PIL's own guard is switched off because it only raises at twice its limit (it merely warns at
# once), which let a 109 KB PNG of 30000² through at 5.2 GB RSS.
MAX_PIXELS = 1 << 28
Image.MAX_IMAGE_PIXELS = None

# Canonical tar-member extension per PIL format, for files whose own extension is missing or odd.
FORMAT_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif",
                     "TIFF": "tif", "PPM": "ppm", "JPEG2000": "jp2", "ICO": "ico", "AVIF": "avif"}
KNOWN_EXTENSIONS = {"jpg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "jp2", "ico", "avif", "jfif"}

# IJG (libjpeg) standard luminance quantisation table, natural (row-major) order as PIL reports it.
IJG_LUMINANCE = np.array([
    16, 11, 10, 16, 24, 40, 51, 61,
    12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77,
    24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101,
    72, 92, 95, 98, 112, 100, 103, 99], dtype=np.int64)


def ijg_luminance_table(quality: int) -> np.ndarray:
    """libjpeg's `jpeg_quality_scaling` applied to the standard table (baseline: entries in 1..255)."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return np.clip((IJG_LUMINANCE * scale + 50) // 100, 1, 255)


_IJG_TABLES = np.stack([ijg_luminance_table(q) for q in range(1, 101)])


def estimate_jpeg_quality(image: Image.Image) -> int | None:
    """IJG quality 1..100 whose scaled luminance table is closest (L1) to the file's; None if not JPEG.

    Encoders that use the IJG tables (libjpeg, PIL, most cameras' "quality" settings) are recovered
    exactly; custom tables (Photoshop, some phones) get the nearest IJG equivalent.
    """
    tables = getattr(image, "quantization", None)
    if not tables or 0 not in tables:
        return None
    luminance = np.asarray(tables[0], dtype=np.int64)
    if luminance.shape != (64,):
        return None
    distance = np.abs(_IJG_TABLES - luminance).sum(axis=1)
    return int(np.argmin(distance)) + 1  # ties go to the lowest quality, deterministically


def _gray_to_rgb(values: np.ndarray, scale: float) -> Image.Image:
    return Image.fromarray(np.clip(np.round(values * scale), 0, 255).astype(np.uint8)).convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB of any mode; alpha is dropped (not composited), as `Image.convert("RGB")` in the papers' code.

    Wide grayscale is scaled by the range its mode implies, since PIL's own convert clips (a float image in
    0..1 became black, a 32-bit one white): 16-bit integers from 0..65535, 32-bit integers the same when
    they fit in it, floats from 0..1. Values outside those ranges have no known scale and are refused.
    Palette images with transparency go through RGBA so PIL applies the palette correctly.
    """
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if image.mode == "F":
            if not np.isfinite(values).all() or low < 0 or high > 1:
                raise ValueError(f"floating-point pixels span {low:g}..{high:g}, not 0..1: unknown brightness scale")
            return _gray_to_rgb(values, 255.0)
        if low < 0 or high > 65535:
            raise ValueError(f"32-bit integer pixels span {low:g}..{high:g}, beyond 0..65535: unknown brightness scale")
        return _gray_to_rgb(values, 1 / 257.0)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image if image.mode == "RGB" else image.convert("RGB")


def read_regular_file(path: str | os.PathLike) -> bytes:
    """The bytes of a regular file. Anything else (a FIFO swapped in after the folder walk) is refused
    without blocking: the file is opened non-blocking and checked by its open descriptor, not its name."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise ValueError("not a regular file")
        with os.fdopen(descriptor, "rb", closefd=False) as handle:
            return handle.read()
    finally:
        os.close(descriptor)


def decode_rgb(data: bytes) -> tuple[Image.Image, Image.Image]:
    """(original, rgb): the fully decoded file (format, quantisation tables intact) and its RGB version.

    `load()` decodes every pixel, so truncated files fail here, unlike `verify()` which only checks headers.
    The pixel count is checked from the header first, so a decompression bomb costs no memory.
    """
    if not data:
        raise ValueError("empty file")
    try:
        original = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        # PIL's message names the BytesIO object's memory address, which would make rejected.csv irreproducible.
        raise UnidentifiedImageError("cannot identify image file (not an image format PIL can read)") from None
    if original.width * original.height > MAX_PIXELS:
        raise ValueError(f"{original.width}x{original.height} pixels exceed the limit of {MAX_PIXELS} "
                         "(decompression-bomb guard); not decoded")
    original.load()
    return original, to_rgb(original)


def jpeg_reencode(image: Image.Image, quality: int) -> Image.Image:
    """Round-trip an RGB image through PIL's JPEG encoder at `quality` (4:2:0, as libjpeg's default)."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    decoded = Image.open(io.BytesIO(buffer.getvalue()))
    decoded.load()
    return decoded.convert("RGB")


def describe_error(error: BaseException) -> str:
    """One-line reason for rejected.csv and the batch's `error` field."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
