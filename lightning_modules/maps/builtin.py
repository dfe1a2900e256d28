"""The built-in guidance maps: LaRE, DEU (closed form or MC), aleatoric variance, mutual information.

All on the ε-prediction scale (see `lightning_modules.uncertainty` for the formulas and why).
"""

from __future__ import annotations

import torch

from lightning_modules.maps.context import MapContext
from lightning_modules.maps.registry import EPS_SQUARED, latent_channels, register_map
from lightning_modules.uncertainty import (aleatoric_variance, closed_form_deu, latent_reconstruction_error, mc_deu,
                                           mutual_information)

# The posterior's path is what `predict` rebuilds the extractor from; its hash is what identifies it.
POSTERIOR_SETTINGS = ("deu_mode", "num_weight_samples", "posterior", "posterior_sha256", "sigma")


@register_map("lare", channels=latent_channels, units=EPS_SQUARED,
              description="LaRE: mean_j (eps_hat_j - eps_j)^2 over the N noises")
def lare(ctx: MapContext) -> torch.Tensor:
    return latent_reconstruction_error(ctx.eps_hat, ctx.noise)


@register_map("deu", channels=latent_channels, settings=POSTERIOR_SETTINGS, needs_posterior=True, units=EPS_SQUARED,
              description="DEU: Var over the conv_out Laplace posterior of W*phi_bar + b (closed form or MC)")
def deu(ctx: MapContext) -> torch.Tensor:
    if ctx.settings["deu_mode"] == "closed_form":
        return closed_form_deu(ctx.phi_bar, ctx.var_w, ctx.var_b)
    return mc_deu(ctx.phi_bar, ctx.conv_weight, ctx.conv_bias, ctx.var_w, ctx.var_b,
                  ctx.settings["num_weight_samples"], ctx.weight_sample_generators)


@register_map("aleatoric", channels=latent_channels, min_noises=2, units=EPS_SQUARED,
              description="aleatoric: Var_j eps_hat_j over the N noises (population variance)")
def aleatoric(ctx: MapContext) -> torch.Tensor:
    return aleatoric_variance(ctx.eps_hat)


@register_map("mi", channels=latent_channels, settings=POSTERIOR_SETTINGS, needs_posterior=True, min_noises=2,
              units="nats",
              description="MI: 0.5 ln(1 + DEU / aleatoric), per pixel")
def mi(ctx: MapContext) -> torch.Tensor:
    return mutual_information(ctx.map("deu"), ctx.map("aleatoric"))
