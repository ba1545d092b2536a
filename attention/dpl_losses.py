"""Dynamic Prompt Learning losses (Wang et al. 2023) on layer- and head-averaged cross-attention maps.

Ported from the official code, https://github.com/wangkai930418/DPL (commit
233afcb7b08c942d98056c271df95d20890170a7, ``pipelines/null_attend_textinv_pipeline.py``; the repository
states no licence, so the procedure is reimplemented here and only its numbers are kept):
* L_at, Attend-and-Excite's attention balancing: the maps of every key token but the first and the last
  of the context (BOS and the final padding token) x100, softmax over those tokens, each noun's map
  smoothed by Attend-and-Excite's ``GaussianSmoothing`` (kernel 3, sigma 0.5, reflect padding); loss = max over
  nouns of max(0, 1 - max(map)). Upstream quirk kept: that class evaluates exp(-((x - mu) / (2 sigma))^2), i.e.
  a Gaussian of effective sigma sqrt(2) * 0.5 = 0.707 (centre weight 0.332 after normalization, where a true
  sigma 0.5 gives 0.619) - https://github.com/yuval-alaluf/Attend-and-Excite ``utils/gaussian_smoothing.py``
  (main-branch commit 163efdfd341bf3590df3c0c2b582935fbc8e8343, MIT), copied into DPL's pipeline;
* L_dj, disjoint objects: mean cosine similarity over the pairs of nouns' raw maps;
* L_bg, background leakage: mean over nouns of the cosine similarity of its raw map and the background mask;
* gradual thresholds beta * exp(-i / alpha), i = 0 at the noisiest sampling step (official ``DPL.sh``:
  alpha 25 / 50 / 25, beta 0.3 / 0.7 / 0.9 for at / bg / dj).
A noun of several tokens (a multi-token word or a phrase such as 'red circle') uses the mean of its tokens'
maps, where the official code has one placeholder token per noun.

Shape legend:
    h, w  map size (16x16 for SD at 512 px)     m  key tokens (77 for one CLIP chunk)
    maps (h, w, m)    nouns: key positions per noun    background (h, w) in {0, 1}
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_kernel(size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """(size, size) normalized separable kernel of Attend-and-Excite's ``GaussianSmoothing``:
    exp(-((x - mu) / (2 sigma))^2), an effective sigma of sigma * sqrt(2) (upstream's formula, kept)."""
    ax = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    k = torch.exp(-((ax / (2 * sigma)) ** 2))
    k2 = torch.outer(k, k)
    return k2 / k2.sum()


def attend_excite_loss(maps: torch.Tensor, nouns: list[tuple[int, ...]]) -> torch.Tensor:
    """max over nouns of max(0, 1 - max of its smoothed, token-softmaxed map)."""
    text = (maps[..., 1:-1] * 100).softmax(-1)
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
    """Mean cosine similarity between each noun's map and the background mask (same h, w)."""
    if tuple(background.shape) != tuple(maps.shape[:2]):
        raise ValueError(f"background mask {tuple(background.shape)} and maps {tuple(maps.shape[:2])} differ; "
                         f"resize the mask to the maps first")
    bg = background.float().to(maps)
    return torch.stack([_cos(m, bg) for m in noun_maps(maps, nouns)]).mean()


def gradual_threshold(i: float, alpha: float, beta: float) -> float:
    """beta * exp(-i / alpha); i is the sampling step index, 0 at the noisiest step."""
    return beta * math.exp(-i / alpha)
