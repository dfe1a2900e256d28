"""What each array of a feature store means, written into its Zarr v3 metadata for readers without this code.

Every array gets `dimension_names` (the sample axis is `row`) and attributes: `kind` (guidance, clip or
metadata: `feature_cache.provenance.FeatureKind`), `description`, `units` where values have units, and `codes`
where integers or strings stand for something (labels, generator names, "not a JPEG", flag columns). So
`zarr.open_group(STORE)["rows/label"].attrs["codes"]` says that 1 is fake, and `xarray.open_zarr` names the axes.
The store (`store.py`) calls these when it creates an array; this module only says what to write.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from feature_cache.provenance import FeatureSpec

LABEL_CODES = {"0": "real", "1": "fake", "-1": "unlabelled"}
_ROWS: dict[str, dict[str, Any]] = {
    "key": {"description": "the image's sample key (__key__) in its shard tar"},
    "sha256": {"description": "hex sha256 of the image's original file bytes: the row's identity, which keys its "
                              "random draws (noise, JPEG quality, crops)"},
    "label": {"description": "ground truth of the image", "codes": LABEL_CODES},
    "generator": {"description": "code of the generator (dataset folder) the image belongs to; -1: none"},
    "format": {"description": "image file format as the read-time pixel protocol leaves it (png, jpeg, webp, ...)"},
    "jpeg_quality": {"description": "JPEG quality as the read-time pixel protocol leaves it", "units": "JPEG quality "
                     "factor (1-100)", "codes": {"-1": "not a JPEG"}},
    "width": {"description": "image width as the read-time pixel protocol leaves it (before the resize to the "
                             "model's resolution)", "units": "pixels"},
    "height": {"description": "image height as the read-time pixel protocol leaves it (before the resize to the "
                              "model's resolution)", "units": "pixels"},
    "path": {"description": "the image file's path relative to the dataset root given to `python -m cli shards` "
                            "(manifest.csv's path column)"},
}
_FLAGS = {"non_finite": "number of NaN/inf values, or values beyond the stored dtype's range (phase 2 refuses the row)",
          "underflow": "number of values stored subnormal or as zero that are not negligible in their row"}
# Axis names of a feature's per-row shape by its rank: maps are (channel, y, x), vectors (channel,).
_FEATURE_AXES = {1: ("channel",), 2: ("y", "x"), 3: ("channel", "y", "x")}
_ENCODING = {"float32": "values as stored", "float16": "values as stored (float16)",
             "int8_rowscale": "value = stored int8 * NAME__scale[row, channel]",
             "float8_e4m3": "uint8 bits of float8_e4m3fn (view the bytes as torch.float8_e4m3fn, then widen)"}


def row_column(name: str, generator_names: Sequence[str]) -> tuple[tuple[str, ...], dict[str, Any]]:
    """Dimension names and attributes of rows/NAME."""
    attrs = {"kind": "metadata", **_ROWS[name]}
    if name == "generator":
        attrs["codes"] = {str(code): generator for code, generator in enumerate(generator_names)}
    return ("row",), attrs


def feature(name: str, spec: FeatureSpec) -> tuple[tuple[str, ...], dict[str, Any]]:
    """Dimension names and attributes of a feature array (GROUP/NAME)."""
    axes = _FEATURE_AXES.get(len(spec.shape), tuple(f"axis_{k}" for k in range(len(spec.shape))))
    attrs = {"kind": spec.kind, "description": spec.description, "units": spec.units, "stored_dtype": spec.dtype,
             "encoding": _ENCODING[spec.dtype].replace("NAME", name),
             "fill": "rows whose `error` is set keep the fill value 0"}
    return ("row", *axes), attrs


def scale(name: str, spec: FeatureSpec) -> tuple[tuple[str, ...], dict[str, Any]]:
    """Dimension names and attributes of NAME__scale (int8_rowscale features)."""
    return ("row", "channel"), {"kind": spec.kind, "description": f"per-row, per-channel scale of {name}: value = "
                                f"stored int8 * scale", "units": spec.units}


def error() -> tuple[tuple[str, ...], dict[str, Any]]:
    """Dimension names and attributes of GROUP/error."""
    return ("row",), {"kind": "metadata", "description": "why phase 1 could not compute the row's features "
                      "(decode failure, lost tar, ...); \"\" = computed"}


def flags(columns: Sequence[str]) -> tuple[tuple[str, ...], dict[str, Any]]:
    """Dimension names and attributes of GROUP/flags (one column per entry of `columns`)."""
    return ("row", "flag"), {"kind": "metadata", "description": "per-row counts of values the stored dtype did not "
                             "keep (0 = clean)", "columns": list(columns),
                             "codes": {str(k): f"{column}: {_FLAGS[column]}" for k, column in enumerate(columns)}}
