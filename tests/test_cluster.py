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


def official_kmeans(self_attn, k):
    """local-prompt-mixing ``Segmentor.cluster``: ``np.random.seed(1)``, then ``KMeans(n_clusters=k, n_init=10)``
    (no random_state: the global generator) on the map's rows."""
    import numpy as np
    from sklearn.cluster import KMeans
    state = np.random.get_state()
    try:
        np.random.seed(1)
        return KMeans(n_clusters=k, n_init=10).fit(self_attn.double().numpy()).labels_
    finally:
        np.random.set_state(state)


def official_cluster2noun(labels, maps, threshold):
    """``Segmentor.cluster2noun``: each noun's map resized (nearest) to the clusters, normalized
    ``(m - |min m|) / max m``; a cluster's score per noun is ``sum(m * mask) / sum(mask)``; it takes the best noun
    when that score is above the threshold (strictly), else it is background (-1). Returns words and scores."""
    h, w = labels.shape
    words, scores = [], []
    for c in range(int(labels.max()) + 1):
        mask = (labels == c).float()
        row = []
        for m in maps:
            m = torch.nn.functional.interpolate(m[None, None], size=(h, w), mode="nearest")[0, 0]
            m = (m - m.min().abs()) / m.max()
            row.append(float((m * mask).sum() / mask.sum()))
        best = max(range(len(row)), key=lambda i: (row[i], -i))
        words.append(best if row[best] > threshold else -1)
        scores.append(row)
    return words, torch.tensor(scores)


def test_clustering_and_labels_equal_upstream_on_hard_maps():
    """KMeans on a noisy non-square map where the number of initializations changes the result (n_init 10 as
    upstream); labels of clusters that include a one-pixel one, on word maps of different scales per column, the
    scores and the size kept; a score exactly at the threshold is background (upstream's ``>``)."""
    g = torch.Generator().manual_seed(10)
    attn = torch.rand(48, 48, generator=g)
    labels = cluster_self_attention(attn, 6, seed=1, hw=(6, 8))
    assert labels.shape == (6, 8) and torch.equal(labels.flatten(), torch.from_numpy(official_kmeans(attn, 6)))
    cut = torch.randint(0, 3, (6, 8), generator=g)
    cut[0, 0] = 3                                                   # a cluster of one pixel
    maps = torch.rand(2, 3, 4, generator=g) * torch.tensor([1.0, 3.0, 0.5, 2.0]) - 0.2
    res = label_clusters(cut, maps, threshold=0.3)
    words, scores = official_cluster2noun(cut, maps, 0.3)
    assert res.cluster_word == words and torch.allclose(res.scores, scores, atol=1e-6) and res.resolution == (6, 8)
    flat = label_clusters(cut, torch.ones(1, 3, 4), threshold=0.0)  # normalized to 0 everywhere: score 0 = threshold
    assert flat.cluster_word == [-1] * 4


def test_cluster_counts_and_map_sizes_are_checked_with_their_values():
    attn = torch.rand(8, 8, generator=torch.Generator().manual_seed(0))
    assert cluster_self_attention(attn, 1, hw=(2, 4)).unique().tolist() == [0]
    assert sorted(cluster_self_attention(attn, 8, hw=(2, 4)).flatten().tolist()) == list(range(8))
    for bad in (0, 9):
        with pytest.raises(ValueError) as err:
            cluster_self_attention(attn, bad, hw=(2, 4))
        assert str(err.value) == (f"cluster count {bad} is out of range 1..8 (no more than the 8 pixels of the 2x4 "
                                  f"self-attention map); lower 'clusters' or pick a larger resolution")
    with pytest.raises(ValueError) as err:
        cluster_self_attention(attn, 2)
    assert str(err.value) == "a self-attention map of 8 pixels is not 3x3; give the feature map's size"


def test_cluster_store_reads_the_self_maps_of_the_size_asked():
    """``cluster_store`` (Self-Attention Cluster, MnM's blend, DPL's mask) on a store with non-square self maps of
    two sizes: the smaller one asked is clustered at its own shape, labelled by the word maps of the size asked."""
    from standins import through_hook

    from attention.cluster import cluster_store
    from attention.schedule import simple_sigmas
    from attention.store import AttentionStore, StoreConfig, word_maps
    sigmas = simple_sigmas(4)
    store = AttentionStore(StoreConfig())
    g = torch.Generator().manual_seed(2)
    for block, hw, cross in ((("input", 1), (4, 8), False), (("input", 2), (2, 4), False),
                             (("input", 4), (4, 8), True)):
        n = hw[0] * hw[1]
        q = torch.randn(4, n, 8, generator=g) * 3
        k = torch.randn(4, 5 if cross else n, 8, generator=g) * 3
        opts = {"block": block, "block_index": 0, "n_heads": 2, "cond_or_uncond": [1, 0], "sigmas": sigmas[:1],
                "sample_sigmas": sigmas, "activations_shape": [4, 8, *hw]}
        through_hook([store], cross, q, k, torch.zeros_like(k), opts)
    store.finish()
    got = cluster_store(store, [(1,), (2, 3)], 1, 3, 0.2, (2, 4), (4, 8), seed=1)
    labels = cluster_self_attention(store.aggregate((2, 4), cross=False)[1].reshape(8, 8), 3, 1, (2, 4))
    want = label_clusters(labels, word_maps(store, [(1,), (2, 3)], (4, 8), 1), 0.2)
    assert torch.equal(got.labels, labels) and got.cluster_word == want.cluster_word
    assert torch.equal(got.scores, want.scores)
    from attention.context import AttnContext
    from attention.layers import LayerId
    concepts = AttentionStore(StoreConfig(concepts=("a", "b")))   # concept maps label the clusters instead
    concepts.self_ = store.self_
    ctx = AttnContext(LayerId("double", 0, 0), True, 4, 8, 2, [1, 0], 2, float(sigmas[0]), 0, 4)
    concepts.observe_concepts(torch.rand(2, 2, 32, generator=g).softmax(1), ctx, [2, 3])
    by_concept = cluster_store(concepts, [(0,), (1,)], 1, 3, 0.2, (2, 4), (4, 8), seed=1, labels_from="concept")
    want = label_clusters(labels, word_maps(concepts, [(0,), (1,)], (4, 8), 1, "concept"), 0.2)
    assert torch.equal(by_concept.scores, want.scores)


def test_nearest_size_prefers_the_larger_on_a_tie_and_names_what_to_enable():
    from attention.cluster import nearest_size
    assert nearest_size(12, [(8, 8), (16, 16)], "self-attention") == (16, 16)
    assert nearest_size(12, [(16, 16), (8, 8)], "self-attention") == (16, 16)
    with pytest.raises(ValueError, match="^no self-attention maps were captured; enable them on Attention Capture"):
        nearest_size(12, [], "self-attention")
