"""Every per-image random draw: one seed from (seed, purpose, key), the same in every process.

`key` is what the draw is about, never where it happens: the hex sha256 of an image's original bytes (so
the same bytes get the same draw in any row, batch, rank, worker, store or dataset, and inserting or
removing a file changes no other image), a generated sample's key (it has no bytes yet) or an ensemble
member `member:{k}`. No row number, batch index or rank ever keys a draw.

The digest is sha256 of `f"{seed}:{key}"` for `diffusion_noise` (the formula every existing store was made
with, so their values stay bit-identical) and of `f"{seed}:{key}:{purpose}"` otherwise, so two purposes
never share a stream. Python's `hash` is salted per process and is never used.
"""

from __future__ import annotations

import hashlib
import random
from typing import Literal

import torch

# diffusion_noise: the VAE ε, the N noises and weight-sample seeds of a row (phase 1, laplace-fit, ensemble-fit),
#   and a generated sample's x_T / aleatoric / posterior draws (keys `{sample}/latent`, ...);
# jpeg: the JPEG quality drawn for an image (the jpeg protocols, generation's JPEG output);
# member_init: an ensemble member's initial perturbation and bootstrap draw (key `member:{k}`).
Purpose = Literal["diffusion_noise", "jpeg", "member_init"]
PURPOSES: tuple[str, ...] = Purpose.__args__


def image_seed(seed: int, purpose: Purpose, key: str) -> int:
    """A 64-bit seed for one draw about `key`."""
    if purpose not in PURPOSES:
        raise ValueError(f"seed purpose {purpose!r}: choose from {list(PURPOSES)}")
    text = f"{seed}:{key}" if purpose == "diffusion_noise" else f"{seed}:{key}:{purpose}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def image_generator(seed: int, purpose: Purpose, key: str) -> torch.Generator:
    """A CPU torch generator for one draw about `key` (CPU, so the values do not depend on the device)."""
    return torch.Generator().manual_seed(image_seed(seed, purpose, key))


def image_random(seed: int, purpose: Purpose, key: str) -> random.Random:
    """A Python `random.Random` for one draw about `key` (e.g. a choice from a list)."""
    return random.Random(image_seed(seed, purpose, key))
