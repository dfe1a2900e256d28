"""The uncertainty maths against independent computations: laplace-torch, brute-force unfold, MC limits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.uncertainty import (aleatoric_variance, closed_form_deu, conv3x3_ggn_sums, diagonal_posterior,
                                           latent_reconstruction_error, log_marginal_likelihood, mc_deu,
                                           mutual_information, tune_prior_precision)


def _conv_and_features(channels: int = 3, out_channels: int = 4, size: int = 5, batch: int = 6):
    torch.manual_seed(0)
    conv = nn.Conv2d(channels, out_channels, 3, padding=1).double()
    phi = torch.randn(batch, channels, size, size, dtype=torch.float64)
    return conv, phi


def test_ggn_sums_equal_unfold_formula() -> None:
    _, phi = _conv_and_features()
    expected = (F.unfold(phi, 3, padding=1) ** 2).sum((0, 2)).view(-1, 3, 3)
    torch.testing.assert_close(conv3x3_ggn_sums(phi), expected, rtol=1e-12, atol=0)


def test_diagonal_posterior_matches_laplace_torch() -> None:
    from laplace import Laplace

    conv, phi = _conv_and_features()
    sigma, prior = 0.7, 2.5
    model = nn.Sequential(conv, nn.Flatten())
    targets = torch.randn(phi.shape[0], conv.out_channels * phi.shape[-2] * phi.shape[-1], dtype=torch.float64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(phi, targets), batch_size=3)
    la = Laplace(model, "regression", subset_of_weights="all", hessian_structure="diag", sigma_noise=sigma,
                 prior_precision=prior)
    la.fit(loader)

    ggn_w = conv3x3_ggn_sums(phi)
    count = phi.shape[0] * phi.shape[-2] * phi.shape[-1]
    ours_h = torch.cat([ggn_w.flatten().repeat(conv.out_channels),
                        torch.full((conv.out_channels,), float(count), dtype=torch.float64)])
    torch.testing.assert_close(la.H.double(), ours_h, rtol=1e-10, atol=1e-10)
    post = diagonal_posterior(ggn_w, count, conv.out_channels, sigma, prior)
    ours_precision = torch.cat([1 / post.var_w.double().flatten(), 1 / post.var_b.double()])
    torch.testing.assert_close(la.posterior_precision.double(), ours_precision, rtol=1e-6, atol=0)  # var stored fp32


def test_tuned_prior_precision_is_evidence_stationary_point() -> None:
    """MacKay's condition λ‖θ‖² = Σ H/(H+λ) (effective parameter count) holds at the tuned λ."""
    conv, phi = _conv_and_features(size=2, batch=1)
    ggn_w, count, sigma = conv3x3_ggn_sums(phi), phi.shape[-2] * phi.shape[-1], 3.0
    lam = tune_prior_precision(ggn_w, count, conv.weight, conv.bias, sigma, sum_sq_residual=10.0)
    h = torch.cat([(ggn_w / sigma**2).flatten().repeat(conv.out_channels),
                   torch.full((conv.out_channels,), count / sigma**2, dtype=torch.float64)])
    theta_sq = float(conv.weight.detach().square().sum() + conv.bias.detach().square().sum())
    assert lam * theta_sq == pytest.approx(float((h / (h + lam)).sum()), rel=1e-6)
    evidence = [log_marginal_likelihood(lam * f, ggn_w, count, conv.weight, conv.bias, sigma, 10.0)
                for f in (0.9, 1.0, 1.1)]
    assert evidence[1] > max(evidence[0], evidence[2])


def test_closed_form_deu_equals_brute_force_sum() -> None:
    _, phi_bar = _conv_and_features(batch=2)
    var_w = torch.rand(4, 3, 3, 3, dtype=torch.float64)
    var_b = torch.rand(4, dtype=torch.float64)
    cols = F.unfold(phi_bar, 3, padding=1) ** 2  # (B, C·9, P)
    expected = torch.einsum("ok,bkp->bop", var_w.flatten(1), cols) + var_b[None, :, None]
    torch.testing.assert_close(closed_form_deu(phi_bar, var_w, var_b), expected.view(2, 4, 5, 5).float())


def test_mc_deu_converges_to_closed_form() -> None:
    """M = 20000: per-pixel relative sd of the sample variance is √(2/(M−1)) ≈ 1%, bound 5 sd over 64 pixels."""
    torch.manual_seed(1)
    phi_bar = torch.randn(1, 4, 4, 4)
    weight, bias = torch.randn(4, 4, 3, 3), torch.randn(4)
    var_w, var_b = 0.1 * torch.rand(4, 4, 3, 3), 0.1 * torch.rand(4)
    exact = closed_form_deu(phi_bar, var_w, var_b)
    estimate = mc_deu(phi_bar, weight, bias, var_w, var_b, 20000, torch.Generator().manual_seed(0))
    rel = (estimate - exact).abs() / exact
    assert rel.max() < 5 * math.sqrt(2 / 19999)
    assert rel.mean() < 1.5 * math.sqrt(2 / 19999)


def test_mc_deu_is_unbiased_at_small_m() -> None:
    """M = 8 per row, 400 rows with their own generators: the row mean has relative sd √(2/7)/20 ≈ 2.7%."""
    torch.manual_seed(2)
    phi_bar = torch.randn(1, 4, 3, 3).expand(400, -1, -1, -1)
    weight, bias = torch.randn(4, 4, 3, 3), torch.randn(4)
    var_w, var_b = 0.1 * torch.rand(4, 4, 3, 3), 0.1 * torch.rand(4)
    gens = [torch.Generator().manual_seed(s) for s in range(400)]
    mean_estimate = mc_deu(phi_bar, weight, bias, var_w, var_b, 8, gens).mean(0)
    exact = closed_form_deu(phi_bar[:1], var_w, var_b)[0]
    assert ((mean_estimate - exact).abs() / exact).max() < 5 * math.sqrt(2 / 7) / 20


def test_mc_deu_rows_do_not_depend_on_batch() -> None:
    torch.manual_seed(3)
    phi_bar, weight, bias = torch.randn(3, 4, 3, 3), torch.randn(4, 4, 3, 3), torch.randn(4)
    var_w, var_b = torch.rand(4, 4, 3, 3), torch.rand(4)
    together = mc_deu(phi_bar, weight, bias, var_w, var_b, 6, [torch.Generator().manual_seed(s) for s in range(3)])
    alone = torch.cat([mc_deu(phi_bar[i:i + 1], weight, bias, var_w, var_b, 6, [torch.Generator().manual_seed(i)])
                       for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


def test_aleatoric_mi_and_lare_formulas() -> None:
    eps_hat = torch.tensor([[[1.0, 2.0]], [[3.0, 2.0]]]).view(1, 2, 1, 1, 2)  # (B=1, N=2, C=1, 1, 2)
    noise = torch.zeros_like(eps_hat)
    aleatoric = aleatoric_variance(eps_hat)
    torch.testing.assert_close(aleatoric, torch.tensor([1.0, 0.0]).view(1, 1, 1, 2))  # population: ((1-2)²+(3-2)²)/2
    torch.testing.assert_close(latent_reconstruction_error(eps_hat, noise), torch.tensor([5.0, 4.0]).view(1, 1, 1, 2))
    mi = mutual_information(torch.tensor([3.0, 0.0]), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(mi, torch.tensor([0.5 * math.log(4.0), 0.0]))
