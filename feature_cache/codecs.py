"""Stored dtypes of cached features and their widening to float32 on the device.

Phase 2 moves features in the dtype they are stored in (half or a quarter of float32's bytes through
memory, PCIe and any shuffle buffer); the model's first op widens them where the arithmetic happens.
"""

from __future__ import annotations

import torch

NARROW_FLOATS = (torch.float16, torch.bfloat16, torch.float8_e4m3fn)


def widen(name: str, values: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """float32 values of a batch of feature `name`: narrow floats cast; int8 rows times their per-row-per-channel
    `scale` (B, C); anything else (labels, codes, float32 maps) returned as is."""
    if values.dtype == torch.int8:
        if scale is None:
            raise ValueError(f"feature {name}: int8 values need their per-row scale ({name}__scale) in the batch")
        return values.float() * scale.float().reshape(*scale.shape, *[1] * (values.ndim - scale.ndim))
    return values.float() if values.dtype in NARROW_FLOATS else values
