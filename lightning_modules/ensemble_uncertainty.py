"""DECU's epistemic uncertainty of an ensemble (Berry, Brando, Meger, arXiv 2406.18580): plain torch.

Each member k predicts ε̂_k; its noise-averaged prediction μ_k = E_j ε̂_k(x_t^j) is the mean of a Gaussian
N(μ_k, σ²) with σ² the fit's residual variance (per latent channel). The output given the ensemble is the
uniform mixture p(y) = (1/K)·Σ_k N(y; μ_k, σ²), and the epistemic uncertainty is the mutual information
I(y; k) between the output and the member, estimated with Kolchinsky & Tracey's pairwise-distance
estimator (PaiDE), as DECU does:

    Î_D = −(1/K)·Σ_i ln( (1/K)·Σ_j exp(−D(p_i ‖ p_j)) )

With equal variances, D_Bhattacharyya = (μ_i − μ_j)²/(8σ²) (a lower bound on I) and D_KL = (μ_i − μ_j)²/(2σ²)
(an upper bound). Both are 0 for identical members and at most ln K. Adaptation: every latent element
(channel, y, x) is its own 1-D mixture, so the map has the latent's shape like the other maps.

DECU's per-pixel view is not the sum of these per-channel maps: the member index k is shared by all channels
of a pixel, so the pixel's output is one mixture over k of C-dimensional Gaussians N(μ_k, diag σ²), whose I(y; k)
is at most ln K, while a sum of C per-channel estimates can reach C·ln K (K = 2, 4 channels 6σ apart: 2.73
nats against the per-pixel 0.693). With a diagonal covariance the pairwise distances add over channels *inside* the logsumexp:
D(p_i ‖ p_j) = Σ_c (μ_ic − μ_jc)²/(8σ²_c) (Bhattacharyya); `paide_mutual_information_per_pixel` computes that.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

Distance = Literal["bhattacharyya", "kl"]
_DIVISOR = {"bhattacharyya": 8.0, "kl": 2.0}


def paide_mutual_information(means: torch.Tensor, sigma2: torch.Tensor | float,
                             distance: Distance = "bhattacharyya") -> torch.Tensor:
    """PaiDE Î(y; k) for the uniform mixture of N(means[:, k], σ²) → shape of means without dim 1, fp32.

    means: (B, K, ...); sigma2 broadcastable to means[:, 0] (e.g. (C, 1, 1) per channel), > 0.
    Computed in float64 with logsumexp (the diagonal term exp(0) = 1 keeps it finite).
    """
    return _paide(_pairwise_distances(means, sigma2, distance))


def paide_mutual_information_per_pixel(means: torch.Tensor, sigma2: torch.Tensor | float,
                                       distance: Distance = "bhattacharyya") -> torch.Tensor:
    """PaiDE Î(y; k) per pixel: the mixture over members of C-dimensional N(means[:, k, :, y, x], diag σ²),
    means (B, K, C, h, w) → (B, 1, h, w) fp32, at most ln K. The channel distances add before the logsumexp."""
    if means.dim() != 5:
        raise ValueError(f"means must be (B, K, C, h, w), got shape {tuple(means.shape)}")
    return _paide(_pairwise_distances(means, sigma2, distance).sum(dim=3, keepdim=True))


def _pairwise_distances(means: torch.Tensor, sigma2: torch.Tensor | float, distance: Distance) -> torch.Tensor:
    """D(p_i ‖ p_j) per element, (B, K, K, ...) float64, for equal-variance Gaussians."""
    if distance not in _DIVISOR:
        raise ValueError(f"distance must be one of {sorted(_DIVISOR)}, got {distance!r}")
    if means.dim() < 2 or means.shape[1] < 2:
        raise ValueError(f"means must be (B, K >= 2, ...), got shape {tuple(means.shape)}")
    sigma2 = torch.as_tensor(sigma2, dtype=torch.float64, device=means.device)
    if (sigma2 <= 0).any():
        raise ValueError("sigma2 must be > 0 (the members' residual variance)")
    mu = means.double()
    return (mu.unsqueeze(2) - mu.unsqueeze(1)).square() / (_DIVISOR[distance] * sigma2)


def _paide(divergence: torch.Tensor) -> torch.Tensor:
    """−(1/K)·Σ_i ln((1/K)·Σ_j exp(−D_ij)) from (B, K, K, ...) distances (the diagonal exp(0) = 1 keeps it finite)."""
    k = divergence.shape[1]
    log_inner = torch.logsumexp(-divergence, dim=2) - math.log(k)
    return (-log_inner.mean(dim=1)).float()


def ensemble_variance(means: torch.Tensor) -> torch.Tensor:
    """Var_k μ_k over the K members (dim 1), population variance: the ensemble is the (uniform) mixture itself."""
    return means.float().var(dim=1, correction=0)


def conv_out_member_means(phi_bar: torch.Tensor, weights: torch.Tensor, biases: torch.Tensor) -> torch.Tensor:
    """μ_k = W_k∗φ̄ + b_k for K conv_out heads on one noise-averaged φ̄ (B, C, h, w) → (B, K, O, h, w).

    conv_out is linear, so the mean over noises of each head's output is the head applied to φ̄: the K heads
    cost one convolution with K·O output channels and no UNet call.
    """
    members, out_channels = weights.shape[:2]
    out = F.conv2d(phi_bar.float(), weights.reshape(members * out_channels, *weights.shape[2:]).float(),
                   biases.reshape(-1).float(), padding=weights.shape[-1] // 2)
    return out.unflatten(1, (members, out_channels))
