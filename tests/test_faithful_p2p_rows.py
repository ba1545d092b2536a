"""Tier 1: P2P's cross-attention edit stays inside the positive chunk when that chunk comes first in the batch
(ComfyUI's cond_or_uncond [0, 1]) and the batch holds fewer items than the plan has edits. The official side is
prompt-to-prompt's ``AttentionControlEdit.forward`` as transcribed in tests/test_faithful_p2p.py (its
``official_layer``), on the same rows in upstream's order."""

from __future__ import annotations

import torch
from standins import through_hook
from test_faithful_attention import SIGMAS, official_probs
from test_faithful_p2p import HEADS, STEPS, M, identity_values, official_layer, qk, two_edits_official_one

from attention.p2p import P2PController


def test_fewer_items_than_edits_with_the_positive_chunk_first():
    """Two edits planned, a batch of the source and one edit, rows [cond source, cond edit, uncond, uncond]: the
    edit row equals upstream's with the first edit, and the negative rows stay plain attention."""
    plan, official = two_edits_official_one()
    q, kk = qk(torch.Generator().manual_seed(8), 4, 6)
    flip = [2, 3, 0, 1]                                 # upstream's [uncond, cond] rows -> ComfyUI's [cond, uncond]
    opts = {"block": ("input", 4), "block_index": 0, "n_heads": HEADS, "cond_or_uncond": [0, 1],
            "sigmas": SIGMAS[2].reshape(1), "sample_sigmas": SIGMAS, "activations_shape": [4, 8, 2, 3]}
    out = through_hook([P2PController(plan, STEPS)], True, q[flip], kk[flip], identity_values(4), opts)
    ours = out.reshape(4, 6, HEADS, M).transpose(1, 2)
    want = official_layer(official, q, kk, 2)[flip]
    assert torch.allclose(ours, want, atol=1e-6)
    plain = official_probs(q, kk, HEADS)[flip]
    assert not torch.allclose(want[1], plain[1], atol=1e-4) and torch.allclose(ours[2:], plain[2:], atol=1e-6)
