"""Tier 1: the DPL losses behave as their definitions say."""

import torch

from attention.dpl_losses import (
    attend_excite_loss,
    background_loss,
    disjoint_loss,
    gaussian_kernel,
    gradual_threshold,
)


def blob_maps(centres, size=16, m=8, spread=2.0):
    """(size, size, m) maps: token 1+i peaks at centres[i]; other tokens flat."""
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    maps = torch.full((size, size, m), 0.01)
    for i, (cy, cx) in enumerate(centres):
        maps[..., 1 + i] = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * spread ** 2))
    return maps


def test_kernel_is_normalized():
    assert abs(float(gaussian_kernel().sum()) - 1) < 1e-6


def test_disjoint_loss_is_high_for_overlapping_nouns():
    apart, together = blob_maps([(3, 3), (12, 12)]), blob_maps([(8, 8), (8, 9)])
    nouns = [(1,), (2,)]
    assert disjoint_loss(apart, nouns) < 0.2 < 0.8 < disjoint_loss(together, nouns)
    assert float(disjoint_loss(apart, [(1,)])) == 0.0


def test_background_loss_grows_with_leakage():
    bg = torch.ones(16, 16)
    bg[:8, :8] = 0                                          # the object sits in the top-left quarter
    inside, leaking = blob_maps([(3, 3)]), blob_maps([(12, 12)])
    assert background_loss(inside, [(1,)], bg) < background_loss(leaking, [(1,)], bg)


def test_attend_excite_loss_is_lower_for_a_strong_noun_and_has_gradients():
    weak = blob_maps([(8, 8)], spread=6.0) * 0.02
    strong = blob_maps([(8, 8)], spread=1.5)
    assert attend_excite_loss(strong, [(1,)]) < attend_excite_loss(weak, [(1,)])
    x = weak.clone().requires_grad_(True)                  # a positive loss (the strong noun's may clamp to 0)
    loss = attend_excite_loss(x, [(1,)])
    loss.backward()
    assert loss > 0 and x.grad is not None and x.grad.abs().sum() > 0


def test_gradual_thresholds_decay():
    assert gradual_threshold(0, 25, 0.3) == 0.3
    assert gradual_threshold(50, 25, 0.3) < gradual_threshold(10, 25, 0.3) < 0.3
