"""Stored dtypes and codecs of features: encode float32 rows for the store, widen them back on the device.

Dtype names (a feature's `dtype` in the store):
- `float32`: guidance maps (lare, deu, aleatoric, mi, any registered map); DEU ~ sigma^2/n_cal underflows
  float16 at realistic calibration sizes, and the maps are small.
- `float16`: CLIP maps, 2 bytes per value.
- `int8_rowscale`: CLIP maps, 1 byte per value plus a float32 scale per row and channel
  (`NAME__scale`, shape (n, C)): q = round(x / s), s = max|x| / 127 over the channel's values.
- `float8_e4m3`: CLIP maps, 1 byte per value (torch.float8_e4m3fn bits, stored as uint8 because numpy has
  no float8), range +-448, 3 mantissa bits.

Codecs (`codec`): `none`, `lz4` (blosc lz4, byte shuffle: fast decode), `zstd` (blosc zstd-1, byte shuffle).
Readers receive the stored dtype; `widen` turns it into float32 on whatever device the tensor is on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
from zarr.codecs import BloscCodec

# The one definition of the names (the writer's and `precompute`'s arguments are typed with these).
ClipDtype = Literal["float16", "int8_rowscale", "float8_e4m3"]
StoredDtype = Literal["float32", ClipDtype]
Codec = Literal["none", "lz4", "zstd"]
GUIDANCE_DTYPE = "float32"
# The writer's default codecs (one definition; `precompute`'s option and configs/precompute.yaml state CLIP_CODEC).
# Guidance maps: `none`, measured by benchmarks/cache_read.py --guidance-codec none,lz4,zstd (docs/phase2_reading.md):
# float32 variance maps keep ~21 noisy mantissa bits, so blosc saves only 8 % (lz4) or 13 % (zstd) of their bytes,
# a few % of a row's next to its CLIP maps, while every read pays a decode.
GUIDANCE_CODEC: Codec = "none"
CLIP_CODEC: Codec = "lz4"
CLIP_DTYPES: tuple[str, ...] = get_args(ClipDtype)
DTYPES: tuple[str, ...] = get_args(StoredDtype)
CODECS: tuple[str, ...] = get_args(Codec)
_STORAGE = {"float32": np.dtype("float32"), "float16": np.dtype("float16"), "int8_rowscale": np.dtype("int8"),
            "float8_e4m3": np.dtype("uint8")}
_FLOAT_LIMITS = {name: (float(info.tiny), float(info.max), float(info.eps))  # smallest normal, largest, eps
                 for name, info in (("float32", np.finfo(np.float32)), ("float16", np.finfo(np.float16)),
                                    ("float8_e4m3", torch.finfo(torch.float8_e4m3fn)))}


@dataclass(frozen=True)
class Encoded:
    """Rows in their stored form plus what the writer records about them."""

    values: np.ndarray  # stored dtype
    scale: np.ndarray | None  # (B, C) float32 for int8_rowscale, else None
    non_finite: np.ndarray  # (B,) int32: NaN/inf in the input, or values beyond the stored dtype's range
    underflow: np.ndarray  # (B,) int32: values stored subnormal or as zero that are not negligible in their row


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"feature dtype {dtype!r} is not one of {list(DTYPES)}")


def storage_dtype(dtype: str) -> np.dtype:
    """The numpy dtype of the Zarr array holding a feature of this stored dtype."""
    check_dtype(dtype)
    return _STORAGE[dtype]


def has_scale(dtype: str) -> bool:
    return dtype == "int8_rowscale"


def scale_channels(row_shape: tuple[int, ...]) -> int:
    """Channels of the per-row scale: the first axis of a map (C, h, w); one scale for a vector row."""
    return row_shape[0] if len(row_shape) > 1 else 1


def compressor(codec: str, itemsize: int) -> BloscCodec | None:
    """The Zarr compressor of a codec name; byte shuffle groups the bytes of each value (floats compress)."""
    if codec not in CODECS:
        raise ValueError(f"codec {codec!r} is not one of {list(CODECS)}")
    if codec == "none":
        return None
    return BloscCodec(cname=codec, clevel=1, shuffle="shuffle" if itemsize > 1 else "noshuffle", typesize=itemsize)


def _count_per_row(mask: np.ndarray) -> np.ndarray:
    return np.count_nonzero(mask.reshape(len(mask), -1), axis=1).astype(np.int32)


def encode(dtype: str, values: np.ndarray) -> Encoded:
    """float32 rows (B, ...) → stored form, counting non-finite and underflowing values per row.

    Written as few full passes as possible: it runs on every output row (the writer thread's main cost).
    """
    check_dtype(dtype)
    values = np.asarray(values, dtype=np.float32)
    magnitude = np.abs(values)  # NaN stays NaN: every comparison below is False for it
    rows = magnitude.reshape(len(values), -1)
    if dtype == "int8_rowscale":
        channels = scale_channels(values.shape[1:])
        finite = np.isfinite(values)
        scale = (np.where(finite, magnitude, 0).reshape(len(values), channels, -1).max(axis=2) / 127).astype(np.float32)
        safe = np.where(scale > 0, scale, 1).reshape(len(values), channels, *([1] * (values.ndim - 2)))
        quantized = np.rint(np.where(finite, values, 0) / safe).clip(-127, 127).astype(np.int8)
        # A per-channel scale keeps every value within half a step of max/127: nothing non-negligible underflows.
        return Encoded(quantized, scale, _count_per_row(~finite), np.zeros(len(values), dtype=np.int32))
    tiny, largest, eps = _FLOAT_LIMITS[dtype]
    non_finite = len(rows[0]) - np.count_nonzero(rows <= largest, axis=1)  # NaN, inf and beyond the dtype's range
    # Precision lost beyond the dtype's own relative precision of the row: a subnormal (or flushed) value that
    # is not negligible next to the row's largest one (e.g. a float16 DEU row whose values are all ~1e-6).
    row_max = np.fmax.reduce(rows, axis=1) if rows.size else np.zeros(len(values), np.float32)
    lower = np.maximum(row_max * eps, np.finfo(np.float32).smallest_subnormal)[:, None]
    underflow = np.count_nonzero(rows < tiny, axis=1) - np.count_nonzero(rows < lower, axis=1)
    underflow = np.maximum(underflow, 0)  # lower >= tiny (large rows): nothing in between
    if dtype == "float32":
        stored = values
    elif dtype == "float8_e4m3":
        stored = torch.from_numpy(values).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    else:  # torch's vectorised cast: numpy's float32 → float16 is ~8x slower (measured 1.8 s vs 0.23 s, 25M values)
        stored = torch.from_numpy(values).to(torch.float16).numpy()
    return Encoded(stored, None, non_finite.astype(np.int32), underflow.astype(np.int32))


def widen(dtype: str, values: torch.Tensor | np.ndarray, scale: torch.Tensor | np.ndarray | None = None
          ) -> torch.Tensor:
    """Stored values (B, ...) → float32 on the tensor's device; `dtype` is the feature's stored dtype name.

    Cheap enough for a model's first op: a cast, plus a broadcast multiply for int8_rowscale.
    """
    check_dtype(dtype)
    values = torch.as_tensor(values)
    if dtype == "float8_e4m3":
        return values.view(torch.float8_e4m3fn).float()
    if dtype == "int8_rowscale":
        if scale is None:
            raise ValueError("widen: int8_rowscale values need their NAME__scale rows")
        scale = torch.as_tensor(scale, device=values.device).float()
        return values.float() * scale.reshape(*scale.shape, *([1] * (values.dim() - scale.dim())))
    return values.float()
