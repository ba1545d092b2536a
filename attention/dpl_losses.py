"""Dynamic Prompt Learning losses (Wang et al. 2023), on 16x16 cross-attention maps. Groundwork for DPL.

Written from the paper's definitions as the DPL issue states them (official code: wangkai930418/DPL; not yet
checked line by line against it — to do before the DPLTokenOptimizer node uses these):
* L_at, Attend-and-Excite's attention balancing: the text tokens' maps (start token excluded) x100, softmax
  over tokens, each noun's map Gaussian-smoothed (3x3, sigma 0.5, reflect padding), loss = the largest
  1 - max(map) over the nouns;
* L_dj, disjoint objects: mean pairwise cosine similarity between the nouns' maps;
* L_bg, background leakage: mean cosine similarity between each noun's map and the background mask;
* gradual thresholds beta * exp(-t / alpha) per loss (DPL.sh: alpha 25 / 50 / 25, beta 0.3 / 0.7 / 0.9 for
  at / bg / dj).

Shapes: maps (h, w, m) head- and layer-averaged cross-attention of one image; nouns: token positions;
background (h, w) in {0, 1}.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_kernel(size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    ax = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    k = torch.exp(-(ax ** 2) / (2 * sigma ** 2))
    k2 = torch.outer(k, k)
    return k2 / k2.sum()


def attend_excite_loss(maps: torch.Tensor, nouns: list[tuple[int, ...]], eos: int) -> torch.Tensor:
    """max over nouns of (1 - max of its smoothed, token-softmaxed map); ``eos``: index of the end token."""
    text = maps[..., 1:eos] * 100
    text = text.softmax(-1)
    kernel = gaussian_kernel().to(maps)[None, None]
    losses = []
    for pos in nouns:
        m = text[..., [p - 1 for p in pos]].mean(-1)
        m = F.conv2d(F.pad(m[None, None], (1, 1, 1, 1), mode="reflect"), kernel)[0, 0]
        losses.append(1 - m.max())
    return torch.stack(losses).clamp(min=0).max()


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.flatten()[None], b.flatten()[None], eps=1e-8)[0]


def noun_maps(maps: torch.Tensor, nouns: list[tuple[int, ...]]) -> list[torch.Tensor]:
    return [maps[..., list(pos)].mean(-1) for pos in nouns]


def disjoint_loss(maps: torch.Tensor, nouns: list[tuple[int, ...]]) -> torch.Tensor:
    """Mean pairwise cosine similarity between the nouns' maps (0 with one noun)."""
    ms = noun_maps(maps, nouns)
    pairs = [_cos(ms[i], ms[j]) for i in range(len(ms)) for j in range(i + 1, len(ms))]
    return torch.stack(pairs).mean() if pairs else maps.new_zeros(())


def background_loss(maps: torch.Tensor, nouns: list[tuple[int, ...]], background: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity between each noun's map and the background mask (resized to the maps)."""
    bg = background.float().to(maps)
    if bg.shape != maps.shape[:2]:
        bg = F.interpolate(bg[None, None], size=maps.shape[:2], mode="nearest")[0, 0]
    return torch.stack([_cos(m, bg) for m in noun_maps(maps, nouns)]).mean()


def gradual_threshold(t: float, alpha: float, beta: float) -> float:
    """beta * exp(-t / alpha)."""
    return beta * math.exp(-t / alpha)
