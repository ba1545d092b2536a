"""Tier 1: self-attention clustering labelled by cross-attention."""

import pytest
import torch

from attention.cluster import cluster_colours, cluster_self_attention, label_clusters


def block_self_attention(regions: torch.Tensor) -> torch.Tensor:
    """Self-attention where every pixel attends uniformly to the pixels of its own region."""
    flat = regions.flatten()
    same = (flat[:, None] == flat[None, :]).float()
    return same / same.sum(1, keepdim=True)


def test_clusters_recover_regions_and_labels_follow_cross_attention():
    regions = torch.zeros(8, 8, dtype=torch.long)
    regions[1:4, 1:4] = 1
    regions[5:8, 4:8] = 2
    attn = block_self_attention(regions)
    labels = cluster_self_attention(attn, 3, seed=1)
    for r in range(3):  # each region is exactly one cluster
        assert len(labels[regions == r].unique()) == 1
    maps = torch.stack([(regions == 1).float(), (regions == 2).float()])   # word 0 -> region 1, word 1 -> region 2
    result = label_clusters(labels, maps, threshold=0.3)
    assert torch.equal(result.word_mask(0).bool(), regions == 1)
    assert torch.equal(result.word_mask(1).bool(), regions == 2)
    assert torch.equal(result.background_mask().bool(), regions == 0)
    assert cluster_colours(labels).shape == (8, 8, 3)


def test_clustering_is_deterministic_for_a_seed():
    g = torch.Generator().manual_seed(0)
    attn = torch.rand(64, 64, generator=g).softmax(-1)
    assert torch.equal(cluster_self_attention(attn, 5, seed=3), cluster_self_attention(attn, 5, seed=3))


def test_threshold_sends_weak_clusters_to_background_and_bad_counts_fail():
    regions = torch.zeros(4, 4, dtype=torch.long)
    regions[:2] = 1
    labels = cluster_self_attention(block_self_attention(regions), 2)
    weak = label_clusters(labels, torch.full((1, 4, 4), 0.1) + (regions == 1) * 0.01, threshold=0.99)
    assert weak.cluster_word == [-1, -1]
    with pytest.raises(ValueError, match="out of range 1..16"):
        cluster_self_attention(torch.rand(16, 16), 17)
