"""DEUA's asymmetric margin loss: real and fake features cluster with different tightness.

A symmetric contrastive loss lets one class become a "sink" that absorbs the decision boundary.
DEUA asks fakes to be tighter (margin 1.0: cosine similarity pushed to 1) than reals (margin 0.6: any
similarity above 0.6 is enough, real images are diverse), and any real/fake pair to be at most
orthogonal.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def asymmetric_margin_loss(features: torch.Tensor, labels: torch.Tensor, margin_real: float = 0.6,
                           margin_fake: float = 1.0) -> torch.Tensor:
    """Mean pair loss over all ordered pairs (i, j), i ≠ j, of the batch.

    With s_ij the cosine similarity of features i and j:
    same class c → max(0, m_c − s_ij); different classes → max(0, s_ij).
    Reduction: sum over the B·(B−1) ordered pairs divided by B·(B−1) (each unordered pair counts
    twice, which equals the mean over unordered pairs). A batch of fewer than two rows has no pair
    and gives 0 (still attached to the graph so a step does not break).

    Args:
        features: (B, D) feature vectors (need not be normalised).
        labels: (B,) 0 real, 1 fake.
    """
    batch = features.shape[0]
    if batch < 2:
        return features.sum() * 0.0
    unit = F.normalize(features, dim=1)
    similarity = unit @ unit.T
    same = labels[:, None] == labels[None, :]
    margins = torch.where(labels == 1, margin_fake, margin_real).to(similarity.dtype)
    pair_loss = torch.where(same, F.relu(margins[:, None] - similarity), F.relu(similarity))
    off_diagonal = ~torch.eye(batch, dtype=torch.bool, device=features.device)
    return pair_loss[off_diagonal].sum() / (batch * (batch - 1))


class AsymmetricMarginLoss(nn.Module):
    """`asymmetric_margin_loss` with its margins held as settings."""

    def __init__(self, margin_real: float = 0.6, margin_fake: float = 1.0) -> None:
        super().__init__()
        self.margin_real = margin_real
        self.margin_fake = margin_fake

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return asymmetric_margin_loss(features, labels, self.margin_real, self.margin_fake)
