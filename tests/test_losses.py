"""The asymmetric margin loss against a hand-computed batch."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.losses import AsymmetricMarginLoss, asymmetric_margin_loss

# Two reals, two fakes; norms differ on purpose (the loss uses cosine similarity).
FEATURES = torch.tensor([[1.0, 0.0, 0.0],     # real r0
                         [0.0, 2.0, 0.0],     # real r1
                         [-0.6, 0.0, 0.8],    # fake k0
                         [0.0, 3.0, 4.0]])    # fake k1 (unit: 0, 0.6, 0.8)
LABELS = torch.tensor([0, 0, 1, 1])


def test_hand_computed_batch_covers_both_margins_and_the_cross_class_term():
    # Unordered pairs and their cosine s:
    #   r0-r1 s=0     same real  → 0.6 − 0    = 0.6
    #   k0-k1 s=0.64  same fake  → 1.0 − 0.64 = 0.36
    #   r0-k0 s=−0.6  cross      → max(0, −0.6) = 0
    #   r0-k1 s=0     cross      → 0
    #   r1-k0 s=0     cross      → 0
    #   r1-k1 s=0.6   cross      → 0.6
    # Mean over pairs: 1.56 / 6 = 0.26 (ordered pairs: 3.12 / 12, the same).
    loss = asymmetric_margin_loss(FEATURES, LABELS, margin_real=0.6, margin_fake=1.0)
    assert loss.item() == pytest.approx(0.26, abs=1e-6)


def test_margins_belong_to_their_class():
    # Swapped margins: real pair → 1.0, fake pair → max(0, 0.6 − 0.64) = 0, cross unchanged 0.6.
    swapped = asymmetric_margin_loss(FEATURES, LABELS, margin_real=1.0, margin_fake=0.6)
    assert swapped.item() == pytest.approx(1.6 / 6, abs=1e-6)
    assert AsymmetricMarginLoss(0.6, 1.0)(FEATURES, LABELS).item() == pytest.approx(0.26, abs=1e-6)


def test_single_row_batch_has_no_pairs_but_keeps_the_graph():
    features = torch.randn(1, 5, requires_grad=True)
    loss = asymmetric_margin_loss(features, torch.tensor([1]))
    loss.backward()
    assert loss.item() == 0.0 and features.grad is not None
