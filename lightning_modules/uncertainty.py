"""Uncertainty mathematics of phase 1: diagonal last-layer Laplace over the UNet's `conv_out`, DEU, aleatoric, MI.

Plain torch, no Lightning, so every formula is testable on its own.

Which output μ means here: the UNet's ε-prediction ε̂_θ(x_t, t), i.e. the output of `conv_out`.
DEUA Eq. 13 writes the variance of the reverse-process mean μ_θ = (x_t − β_t/√(1−ᾱ_t)·ε̂_θ)/√α_t.
x_t does not depend on θ, so Var_θ(E_j μ_θ) = c_t²·Var_θ(E_j ε̂_θ) with the constant
c_t = β_t/(√α_t·√(1−ᾱ_t)): the two differ by one global factor per t, and we report the ε-scale,
whose size does not depend on the noise schedule. The aleatoric map is also on the ε-scale
(Var_j ε̂(x_t^j)), so the MI ratio compares like with like.

Why E_j μ_θ = W∗φ̄ + b: only conv_out's weights are random, so the penultimate features φ_j
(conv_out's input for noise j) do not depend on θ, and conv_out is linear in its input:
E_j (W∗φ_j + b) = W∗(E_j φ_j) + b = W∗φ̄ + b. Its variance over the diagonal Gaussian q(θ) is
Σ_{c,kh,kw} σ²_W[o,c,kh,kw]·φ̄²[c, y+kh−1, x+kw−1] + σ²_b[o] = conv2d(φ̄², σ²_W, pad 1) + σ²_b, exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Keeps MI finite where the aleatoric variance is exactly 0 (e.g. constant maps); far below any
# variance an fp32 ε-prediction produces, so it changes MI nowhere else.
MI_EPS = 1e-12


def conv3x3_ggn_sums(phi: torch.Tensor) -> torch.Tensor:
    """Σ over batch and pixels of unfold(φ, 3, pad 1)² → (C, 3, 3) in float64.

    This is the GGN diagonal of an MSE loss w.r.t. one output channel's 3×3 conv weights
    (identical for every output channel). Computed as 9 shifted window sums of the padded
    Σ_b φ² instead of materialising the 9× larger unfold tensor.
    """
    if phi.dim() != 4:
        raise ValueError(f"phi must be (B, C, H, W), got shape {tuple(phi.shape)}")
    height, width = phi.shape[-2:]
    sq = F.pad(phi.to(torch.promote_types(phi.dtype, torch.float32)).square().sum(0).double(), (1, 1, 1, 1))
    return torch.stack([sq[:, kh:kh + height, kw:kw + width].sum((-2, -1))
                        for kh in range(3) for kw in range(3)], dim=-1).view(-1, 3, 3)


@dataclass
class DiagonalPosterior:
    """Diagonal Laplace posterior of a C→O 3×3 conv: variances plus what produced them."""

    var_w: torch.Tensor  # (O, C, 3, 3)
    var_b: torch.Tensor  # (O,)
    prior_precision: float
    sigma_noise: float


def diagonal_posterior(ggn_w: torch.Tensor, count: float, out_channels: int, sigma_noise: float,
                       prior_precision: float) -> DiagonalPosterior:
    """Posterior variance 1/(H + λ) from accumulated sums: H_W = ggn_w/σ² (per output channel), H_b = count/σ²."""
    if sigma_noise <= 0 or prior_precision <= 0:
        raise ValueError(f"sigma_noise and prior_precision must be > 0, got {sigma_noise} and {prior_precision}")
    h_w = ggn_w.double() / sigma_noise ** 2
    h_b = torch.full((out_channels,), float(count), dtype=torch.float64) / sigma_noise ** 2
    var_w = (1.0 / (h_w + prior_precision)).unsqueeze(0).expand(out_channels, *h_w.shape)
    return DiagonalPosterior(var_w.float().contiguous(), (1.0 / (h_b + prior_precision)).float(),
                             prior_precision, sigma_noise)


def estimated_sigma(sum_sq_residual: float, count: float, out_channels: int) -> float:
    """Maximum-likelihood σ of N(ε | ε̂, σ²): √(RSS / observations), one observation per latent element.

    `count` is Σ over images × noises × pixels (each noise a separate observation), so the number of
    observations is count · out_channels. σ² = ∂/∂σ² of the Gaussian log-likelihood set to zero.
    """
    observations = count * out_channels
    if observations <= 0 or not sum_sq_residual > 0:
        raise ValueError(f"cannot estimate sigma from RSS {sum_sq_residual} over {observations} observations")
    return math.sqrt(sum_sq_residual / observations)


def log_marginal_likelihood(prior_precision: float, ggn_w: torch.Tensor, count: float, weight: torch.Tensor,
                            bias: torch.Tensor, sigma_noise: float, sum_sq_residual: float) -> float:
    """Laplace evidence log p(D|λ) around the MAP θ* (the pretrained weights), Gaussian likelihood and prior.

    log p(D|λ) ≈ log N(D|θ*) − ½λ‖θ*‖² + ½P·log λ − ½Σ log(H + λ)   (constants in λ dropped: −½P·log 2π
    cancels against the prior's normaliser). log N(D|θ*) = −RSS/(2σ²) − ½n·log(2πσ²).
    """
    out_channels = weight.shape[0]
    h = torch.cat([(ggn_w.double() / sigma_noise ** 2).flatten().repeat(out_channels),
                   torch.full((out_channels,), float(count), dtype=torch.float64) / sigma_noise ** 2])
    theta_sq = weight.detach().double().square().sum() + bias.detach().double().square().sum()
    num_outputs = count * out_channels  # every (output channel, pixel, noise, image) is one observation
    log_lik = -sum_sq_residual / (2 * sigma_noise ** 2) - 0.5 * num_outputs * math.log(2 * math.pi * sigma_noise ** 2)
    return float(log_lik - 0.5 * prior_precision * theta_sq + 0.5 * h.numel() * math.log(prior_precision)
                 - 0.5 * torch.log(h + prior_precision).sum())


def tune_prior_precision(ggn_w: torch.Tensor, count: float, weight: torch.Tensor, bias: torch.Tensor,
                         sigma_noise: float, sum_sq_residual: float, log10_range: tuple[float, float] = (-6.0, 8.0),
                         grid_points: int = 281) -> float:
    """λ maximising the Laplace evidence: a grid over log10 λ, then golden-section refinement around the best.

    A 1-D search rather than MacKay's fixed point because it needs no convergence argument and the
    evidence is cheap (P terms). The grid (0.05 decades) brackets the optimum; 60 golden steps
    shrink the bracket to ~1e-13 decades.
    """
    def objective(log10_lam: float) -> float:
        return log_marginal_likelihood(10.0 ** log10_lam, ggn_w, count, weight, bias, sigma_noise, sum_sq_residual)

    grid = torch.linspace(*log10_range, grid_points).tolist()
    values = [objective(x) for x in grid]
    best = max(range(grid_points), key=values.__getitem__)
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, grid_points - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(60):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if objective(a) >= objective(b):
            hi = b
        else:
            lo = a
    return 10.0 ** ((lo + hi) / 2)


def closed_form_deu(phi_bar: torch.Tensor, var_w: torch.Tensor, var_b: torch.Tensor) -> torch.Tensor:
    """Exact Var_θ(W∗φ̄ + b) under the diagonal posterior: conv2d(φ̄², σ²_W, pad 1) + σ²_b, in fp32."""
    return F.conv2d(phi_bar.float().square(), var_w.float(), var_b.float(), padding=1)


def mc_deu(phi_bar: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, var_w: torch.Tensor,
           var_b: torch.Tensor, num_samples: int, generator: torch.Generator | Sequence[torch.Generator]) -> torch.Tensor:
    """Monte Carlo Var_i(W_i∗φ̄ + b_i) over M draws θ_i ~ N(θ*, diag σ²) of conv_out only (DEUA Eq. 13).

    φ̄ is reused, so M samples cost M small convolutions (one grouped conv), not M UNet passes.
    `generator`: one generator shares the M draws across the batch (the plain estimator); a sequence
    with one generator per row gives each row its own draws, so a row's map never depends on which
    rows share its batch. The variance is the unbiased sample variance (divisor M−1), so its
    expectation equals `closed_form_deu` for every M ≥ 2. Draws happen on the generator's device.
    """
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 for a sample variance, got {num_samples}")
    batch, channels, height, width = phi_bar.shape
    out_channels = weight.shape[0]
    w_shape, b_shape = (num_samples, *weight.shape), (num_samples, out_channels)

    def draw(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        z_w = torch.randn(w_shape, generator=gen, device=gen.device)
        z_b = torch.randn(b_shape, generator=gen, device=gen.device)
        return z_w.to(phi_bar.device), z_b.to(phi_bar.device)

    if isinstance(generator, torch.Generator):
        z_w, z_b = (z.expand(batch, *z.shape) for z in draw(generator))
    else:
        if len(generator) != batch:
            raise ValueError(f"mc_deu got {len(generator)} generators for a batch of {batch} rows")
        z_w, z_b = (torch.stack(zs) for zs in zip(*(draw(g) for g in generator)))
    weights = weight.float() + var_w.float().sqrt() * z_w  # (B, M, O, C, 3, 3)
    biases = bias.float() + var_b.float().sqrt() * z_b  # (B, M, O)
    out = F.conv2d(phi_bar.float().reshape(1, batch * channels, height, width),
                   weights.reshape(batch * num_samples * out_channels, channels, 3, 3),
                   biases.reshape(-1), padding=1, groups=batch)
    return out.view(batch, num_samples, out_channels, height, width).var(dim=1, correction=1)


def aleatoric_variance(eps_hat: torch.Tensor) -> torch.Tensor:
    """Var_j ε̂_MAP(x_t^j) over the N noises (dim 1 of (B, N, ...)), population variance (divisor N).

    Population rather than unbiased: it is the spread of the N-member ensemble that LaRE averages
    over, it is defined for N = 1, and it matches `lare`'s plain mean over j.
    """
    return eps_hat.float().var(dim=1, correction=0)


def mutual_information(epistemic: torch.Tensor, aleatoric: torch.Tensor) -> torch.Tensor:
    """Per-pixel MI between output and weights for Gaussians: ½·ln(1 + epistemic/(aleatoric + MI_EPS))."""
    return 0.5 * torch.log1p(epistemic.float() / (aleatoric.float() + MI_EPS))


def latent_reconstruction_error(eps_hat: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """LaRE: mean over the N noises (dim 1) of (ε̂_j − ε_j)², elementwise, in fp32."""
    return (eps_hat.float() - noise.float()).square().mean(dim=1)
