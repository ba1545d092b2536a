"""Self-attention clustering labelled by cross-attention (MnM and DPL's background masks).

Method of Patashnik et al. 2023, "Localizing Object-level Shape Variations with
Text-to-Image Diffusion Models", as in the official code
https://github.com/orpatashnik/local-prompt-mixing (src/attention_based_segmentation.py,
commit 5edbdedcb37a3a66e6738c271d84213582ef1216; the repository states no licence, so
nothing is copied: this is our implementation of the published procedure and defaults).
DPL (wangkai930418/DPL) reuses it with threshold 0.2 for its background mask.

Procedure: KMeans (n_init 10, seeded) over the rows of the head/step-averaged
self-attention map at one resolution (default 32x32); each noun's cross-attention map (default
16x16) is resized to that resolution and normalized as upstream, (m - |min m|) / max m; a
cluster's score for a noun is sum(A * M) / sum(M) over the cluster mask M, and the cluster
takes the best noun when its score exceeds the threshold, else it is background.

On DiT models (Flux, SD3) the self- and cross-attention maps are the image rows of the joint attention
(``joint.py``); every block has the image token grid's size.

Shapes: self_attn (n, n) with n = h*w pixels of the map (the latent's aspect, e.g. 16x24); word_maps
(words, h', w') -> resized to (words, h, w).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans

from .store import AttentionStore, word_maps


@dataclass
class Clustering:
    labels: torch.Tensor          # (h, w) cluster index per pixel
    cluster_word: list[int]       # per cluster: index of its word, or -1 for background
    scores: torch.Tensor          # (clusters, words) agreement scores
    resolution: tuple[int, int]   # (h, w)

    def word_mask(self, word: int) -> torch.Tensor:
        """(h, w) float mask of the clusters labelled with ``word``."""
        ids = [c for c, w in enumerate(self.cluster_word) if w == word]
        return torch.isin(self.labels, torch.tensor(ids, dtype=self.labels.dtype)).float()

    def background_mask(self) -> torch.Tensor:
        return self.word_mask(-1)


def nearest_size(wanted: int, sizes: list[tuple[int, int]], what: str) -> tuple[int, int]:
    """The captured map size (h, w) whose longer side is closest to ``wanted`` pixels (ties: the larger)."""
    if not sizes:
        raise ValueError(f"no {what} maps were captured; enable them on Attention Capture "
                         f"(capture_self and self_max_size for self-attention)")
    return min(sizes, key=lambda s: (abs(max(s) - wanted), -max(s)))


def cluster_self_attention(self_attn: torch.Tensor, n_clusters: int, seed: int = 1,
                           hw: tuple[int, int] | None = None) -> torch.Tensor:
    """KMeans over the rows of a (n, n) self-attention map of an (h, w) feature map (``hw``; square when
    None); returns (h, w) labels."""
    n = self_attn.shape[0]
    if hw is None:
        r = int(round(n ** 0.5))
        hw = (r, r)
    h, w = hw
    if h * w != n:
        raise ValueError(f"a self-attention map of {n} pixels is not {h}x{w}; give the feature map's size")
    if not 1 <= n_clusters <= n:
        raise ValueError(f"cluster count {n_clusters} is out of range 1..{n} (no more than the {n} pixels of the "
                         f"{h}x{w} self-attention map); lower 'clusters' or pick a larger resolution")
    km = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed)
    labels = km.fit_predict(self_attn.detach().float().cpu().numpy().astype(np.float64))
    return torch.from_numpy(labels.reshape(h, w).astype(np.int64))


def label_clusters(labels: torch.Tensor, word_maps: torch.Tensor, threshold: float) -> Clustering:
    """Score every cluster against every word's cross-attention map and label it."""
    hw = tuple(labels.shape)
    maps = F.interpolate(word_maps[None].float(), size=hw, mode="nearest")[0]         # (words, h, w)
    flat = maps.flatten(1)
    norm = (flat - flat.min(1, keepdim=True).values.abs()) / flat.max(1, keepdim=True).values.clamp(min=1e-12)
    maps = norm.view_as(maps)
    k = int(labels.max()) + 1
    scores = torch.zeros(k, maps.shape[0])
    words: list[int] = []
    for c in range(k):
        m = (labels == c).float()
        scores[c] = (maps * m).flatten(1).sum(1) / m.sum().clamp(min=1)
        best = int(scores[c].argmax())
        words.append(best if float(scores[c, best]) > threshold else -1)
    return Clustering(labels, words, scores, hw)


def cluster_store(store: AttentionStore, positions: list[tuple[int, ...]], item: int, n_clusters: int,
                  threshold: float, self_size: tuple[int, int], cross_size: tuple[int, int],
                  seed: int = 1, labels_from: bool | str = True) -> Clustering:
    """Cluster batch ``item``'s self-attention at ``self_size``, labelled by the words at ``cross_size``
    (``labels_from="concept"``: by the store's ConceptAttention maps, ``positions`` being concept indices)."""
    n = self_size[0] * self_size[1]
    labels = cluster_self_attention(store.aggregate(self_size, cross=False)[item].reshape(n, n), n_clusters, seed,
                                    tuple(self_size))
    return label_clusters(labels, word_maps(store, positions, cross_size, item, labels_from).cpu(), threshold)


def cluster_colours(labels: torch.Tensor) -> torch.Tensor:
    """(h, w) labels -> (h, w, 3) distinct colours (golden-angle hues)."""
    k = int(labels.max()) + 1
    hues = (torch.arange(k) * 0.618033988749895) % 1.0
    h6 = hues * 6
    x = 1 - (h6 % 2 - 1).abs()
    zero, one = torch.zeros(k), torch.ones(k)
    table = torch.stack([one, x, zero], 1)
    sector = h6.long() % 6
    perms = torch.tensor([[0, 1, 2], [1, 0, 2], [2, 0, 1], [2, 1, 0], [1, 2, 0], [0, 2, 1]])
    rgb = torch.stack([table[i, perms[sector[i]]] for i in range(k)]) * 0.85 + 0.1
    return rgb[labels]
