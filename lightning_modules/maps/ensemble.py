"""DECU's ensemble maps (Berry, Brando, Meger, arXiv 2406.18580) in the map registry: `ensemble_mi`, `ensemble_var`,
`ensemble_mi_pixel`.

Enable them in the extractor config (the first maps added the registry way: this file plus YAML lines; the
module is among the default `map_modules`, so phase 2 knows the names too):

    map_settings: {ensemble_members: members/sd15_conv_out_t200.pt, ensemble_distance: bhattacharyya}
    outputs: [lare, deu, ensemble_mi, ensemble_var]

The members file comes from `python -m cli ensemble-fit`; μ_k = E_j ε̂_k(x_t^j), the member's prediction averaged
over the pass's N noised latents:
- kind `conv_out`: the K heads run on the fused pass's φ̄ (no extra UNet call), μ_k = W_k∗φ̄ + b_k by linearity;
- kind `embedding`: K more UNet calls on the pass's own x_t (B·N rows each), member k's learned text embedding
  as the conditioning, so the map stays a function of the image (same noises as every other map).
`ensemble_var` = Var_k μ_k; `ensemble_mi` = PaiDE's I(y; k) for the mixture of N(μ_k, σ²), σ² per channel from
the fit's residuals, per latent element; `ensemble_mi_pixel` = DECU's per-pixel I(y; k) for the mixture of
C-dimensional N(μ_k, diag σ²) (one channel, at most ln K; not the sum of `ensemble_mi` over channels, which
ignores that the member index is shared by the channels). The maps share one set of means per batch.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_modules.ensemble_fit import check_members, load_members
from lightning_modules.ensemble_uncertainty import (conv_out_member_means, ensemble_variance, paide_mutual_information,
                                                    paide_mutual_information_per_pixel)
from lightning_modules.maps.context import MapContext
from lightning_modules.maps.registry import EPS_SQUARED, latent_channels, register_map

# What the maps depend on: the members file (path and content hash), the PaiDE distance, and the settings the
# members must have been trained with (checked on first use).
ENSEMBLE_SETTINGS = ("ensemble_members", "ensemble_members_sha256", "ensemble_distance", "unet_hash", "timestep",
                     "prompt", "latent")
_LOADED: dict[str, dict[str, Any]] = {}


def checked_members(settings: dict[str, Any]) -> dict[str, Any]:
    """The members file named by `ensemble_members` (loaded once per process), checked against the extractor's
    settings (a dict comparison); the maps' `check`, run before any store is grown, and their first step."""
    path = settings.get("ensemble_members")
    if not path:
        raise ValueError("maps ensemble_mi/ensemble_var need map_settings: {ensemble_members: PATH} "
                         "(a file from `python -m cli ensemble-fit`)")
    if path not in _LOADED:
        _LOADED[path] = load_members(path)
    members = _LOADED[path]
    check_members(members, path, {k: settings[k] for k in ("unet_hash", "timestep", "prompt", "latent")})
    return members


def _members(ctx: MapContext) -> dict[str, Any]:
    """The checked members, and the latents they were trained on match this batch's."""
    members = checked_members(ctx.settings)
    path = ctx.settings["ensemble_members"]
    latent_size = tuple(members["metadata"]["latent_size"])
    if tuple(ctx.phi.shape[-2:]) != latent_size:
        raise ValueError(f"ensemble members {path} were trained on {latent_size} latents but the images give "
                         f"{tuple(ctx.phi.shape[-2:])}: refit them at this resolution (ensemble-fit)")
    return members


def member_means(ctx: MapContext) -> tuple[torch.Tensor, torch.Tensor]:
    """(μ (B, K, C, h, w) on the pass's device, σ² (C, 1, 1)) for this batch, computed once for both maps."""
    return ctx.shared("ensemble_member_means", lambda: _member_means(ctx))


def _member_means(ctx: MapContext) -> tuple[torch.Tensor, torch.Tensor]:
    members = _members(ctx)
    device = ctx.phi.device
    if members["kind"] == "conv_out":
        means = conv_out_member_means(ctx.phi_bar, members["weights"].to(device), members["biases"].to(device))
    else:  # embedding: one UNet call per member on the pass's B·N noised latents, averaged over the N noises
        means = torch.stack([ctx.conditioned_eps(embedding).mean(dim=1) for embedding in members["embeddings"]], 1)
    return means, members["sigma2"].to(device).view(-1, 1, 1)


@register_map("ensemble_var", channels=latent_channels, settings=ENSEMBLE_SETTINGS, units=EPS_SQUARED,
              check=checked_members,
              description="DECU ensemble variance: Var_k of the members' noise-averaged eps prediction")
def ensemble_var(ctx: MapContext) -> torch.Tensor:
    return ensemble_variance(member_means(ctx)[0])


@register_map("ensemble_mi", channels=latent_channels, settings=ENSEMBLE_SETTINGS, units="nats",
              check=checked_members,
              description="DECU: PaiDE mutual information I(y; member) of the members' Gaussian mixture, per pixel")
def ensemble_mi(ctx: MapContext) -> torch.Tensor:
    means, sigma2 = member_means(ctx)
    return paide_mutual_information(means, sigma2, ctx.settings.get("ensemble_distance") or "bhattacharyya")


@register_map("ensemble_mi_pixel", channels=1, settings=ENSEMBLE_SETTINGS,
              description="DECU: PaiDE I(y; member) per pixel, the mixture of the members' channel vectors (<= ln K)")
def ensemble_mi_pixel(ctx: MapContext) -> torch.Tensor:
    means, sigma2 = member_means(ctx)
    return paide_mutual_information_per_pixel(means, sigma2, ctx.settings.get("ensemble_distance") or "bhattacharyya")
