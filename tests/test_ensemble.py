"""DECU: PaiDE against a Monte Carlo estimate of a Gaussian mixture's mutual information, the member heads,
and the members' fit through Lightning on the tiny models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_modules.ensemble_uncertainty import conv_out_member_means, ensemble_variance, paide_mutual_information

# (member means, σ²): overlapping, well separated, nearly identical, two members, eight members.
MIXTURES = [([0.0, 0.5, 1.0, -0.3], 1.0), ([0.0, 3.0, 6.0, 9.0, 12.0], 1.0), ([0.0, 0.1, 0.05], 0.5),
            ([0.0, 1.5], 0.25), ([0.0, 2.0, 2.5, 4.0, -1.0, 0.3, 7.0, 1.0], 1.3)]


def monte_carlo_mixture_mi(means: list[float], sigma2: float, samples: int = 100_000) -> tuple[float, float]:
    """I(y; k) = E_k E_{y~p_k}[ln p_k(y) − ln (1/K)Σ_j p_j(y)] by sampling, with its standard error."""
    mu = torch.tensor(means, dtype=torch.float64)
    k = len(means)
    y = mu[:, None] + math.sqrt(sigma2) * torch.randn(k, samples, generator=torch.Generator().manual_seed(0),
                                                       dtype=torch.float64)
    log_p = -(y[:, :, None] - mu[None, None, :]).square() / (2 * sigma2)  # shared normaliser cancels
    terms = (log_p[torch.arange(k), :, torch.arange(k)] - (torch.logsumexp(log_p, dim=2) - math.log(k))).flatten()
    return terms.mean().item(), terms.std().item() / math.sqrt(terms.numel())


@pytest.mark.parametrize("means,sigma2", MIXTURES)
def test_paide_brackets_the_monte_carlo_mutual_information(means: list[float], sigma2: float) -> None:
    """Error bound stated: Kolchinsky & Tracey's Î_Bhattacharyya ≤ I ≤ Î_KL, checked against a Monte Carlo I
    with a tolerance of 5 standard errors (~1e-3 nats here). Catches a wrong distance constant (1/8 vs 1/2),
    a missing −ln K, or logsumexp over the wrong axis, each of which breaks one side of the bracket."""
    mi, stderr = monte_carlo_mixture_mi(means, sigma2)
    row = torch.tensor(means)[None, :]
    lower = paide_mutual_information(row, sigma2, "bhattacharyya").item()
    upper = paide_mutual_information(row, sigma2, "kl").item()
    assert lower - 5 * stderr <= mi <= upper + 5 * stderr
    assert 0 <= lower <= upper <= math.log(len(means)) + 1e-6


def test_paide_reaches_log_k_for_separated_members_and_zero_for_identical_ones() -> None:
    """Identical members carry no epistemic information (exactly 0, no NaN); members 40σ apart carry ln K.
    Catches a missing diagonal term or a per-pixel normalisation that leaks across pixels."""
    identical = torch.full((2, 5, 4, 3, 3), 0.7)
    assert torch.equal(paide_mutual_information(identical, torch.ones(4, 1, 1)), torch.zeros(2, 4, 3, 3))
    separated = (torch.arange(5.0) * 40).view(1, 5, 1).expand(1, 5, 6)
    for distance in ("bhattacharyya", "kl"):
        torch.testing.assert_close(paide_mutual_information(separated, 1.0, distance),
                                   torch.full((1, 6), math.log(5)))


def test_paide_is_per_element_and_batch_invariant() -> None:
    """Each latent element is its own mixture and σ² is per channel: a row alone equals the row in a batch,
    and one element equals a scalar computation. Catches broadcasting σ² over the wrong axis."""
    gen = torch.Generator().manual_seed(0)
    means, sigma2 = torch.randn(3, 4, 2, 5, 5, generator=gen), torch.tensor([0.5, 2.0]).view(2, 1, 1)
    batch = paide_mutual_information(means, sigma2)
    assert torch.equal(paide_mutual_information(means[1:2], sigma2), batch[1:2])
    element = paide_mutual_information(means[2:3, :, 1, 3, 4], 2.0)
    torch.testing.assert_close(batch[2, 1, 3, 4], element[0])


def test_conv_out_member_means_and_variance_match_a_loop() -> None:
    """K heads in one convolution equal K separate conv_out calls; the variance is the population variance
    over members. Catches a reshape that pairs one member's weights with another's bias."""
    gen = torch.Generator().manual_seed(1)
    phi, weights, biases = torch.randn(2, 6, 5, 5, generator=gen), torch.randn(3, 4, 6, 3, 3, generator=gen), \
        torch.randn(3, 4, generator=gen)
    means = conv_out_member_means(phi, weights, biases)
    expected = torch.stack([F.conv2d(phi, weights[k], biases[k], padding=1) for k in range(3)], dim=1)
    torch.testing.assert_close(means, expected)
    torch.testing.assert_close(ensemble_variance(means), ((expected - expected.mean(1, keepdim=True)) ** 2).mean(1))
