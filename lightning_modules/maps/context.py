"""What a map function sees: one batch's fused-pass output, the posterior, the settings and the per-row draws.

Maps ask each other for values through `ctx.map(name)` (cached per batch), so MI reuses the DEU and
aleatoric maps of the same rows instead of recomputing them, and a map computed alone equals the
same map computed beside others. Intermediates that several maps share (the ensemble members' means)
go through `ctx.shared(key, compute)`. A map that needs more UNet evaluations than the fused pass's one
asks `ctx.conditioned_eps(text)`: ε̂ of the pass's own x_t under another conditioning, run only when called,
so the default pass costs nothing more.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from lightning_modules.diffusion_pass import PassOutput


@dataclass
class MapContext:
    """One batch's inputs to the map functions (all per-row tensors shaped (B, ...), fp32)."""

    out: PassOutput
    generators: list[torch.Generator]  # per-row CPU generators, already past the VAE ε and the N noises
    settings: Mapping[str, Any]  # the extractor's settings (deu_mode, num_weight_samples, ...)
    conv_weight: torch.Tensor  # conv_out's pretrained weight (the MAP of the Laplace posterior)
    conv_bias: torch.Tensor
    var_w: torch.Tensor | None = None  # posterior variances of conv_out (None without a posterior)
    var_b: torch.Tensor | None = None
    # text (L, D) → ε̂ (B, N, C, h, w) of the pass's x_t under that conditioning: one UNet call on the B·N rows
    conditioned_eps: Callable[[torch.Tensor], torch.Tensor] | None = None
    _maps: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _shared: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def eps_hat(self) -> torch.Tensor:
        """UNet ε-predictions (B, N, C, h, w)."""
        return self.out.eps_hat

    @property
    def noise(self) -> torch.Tensor:
        """The diffusion noises ε_j that were added (B, N, C, h, w)."""
        return self.out.noise

    @property
    def phi(self) -> torch.Tensor:
        """conv_out's input per noise (B, N, C_φ, h, w)."""
        return self.out.phi

    @cached_property
    def phi_bar(self) -> torch.Tensor:
        """φ averaged over the N noises (B, C_φ, h, w): all that the posterior's variance needs."""
        return self.out.phi.mean(dim=1)

    @cached_property
    def weight_sample_generators(self) -> list[torch.Generator]:
        """Per-row generators on the compute device for MC weight samples (third in the draw order).

        Each is seeded by one int64 drawn from the row's CPU generator after its VAE ε and N noises, so
        the samples are a function of (seed, sha256) alone, drawn where they are used (no host copy).
        """
        device = self.phi.device
        seeds = [int(torch.randint(0, 2**62, (1,), generator=g)) for g in self.generators]
        return [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def shared(self, key: str, compute: Callable[[], Any]) -> Any:
        """An intermediate that several maps of this batch use, computed once (e.g. K members' UNet calls)."""
        if key not in self._shared:
            self._shared[key] = compute()
        return self._shared[key]

    def map(self, name: str) -> torch.Tensor:
        """Map `name` for this batch, computed once."""
        from lightning_modules.maps.registry import MAP_REGISTRY

        if name not in self._maps:
            self._maps[name] = MAP_REGISTRY[name].fn(self)
        return self._maps[name]
