"""SpaText, training-free: a region map with free text per region (Avrahami et al., CVPR 2023, "SpaText:
Spatio-Textual Representation for Controllable Image Generation").

The paper fine-tunes a diffusion model on a spatio-textual map (CLIP embeddings stacked in the shapes of the
segments) and extends classifier-free guidance to its two conditions, the global prompt and the spatial map. No
official code was released. Without fine-tuning, the spatial condition is given to an unchanged model through its
cross-attention instead; the guidance keeps the paper's two conditions:

* spatial pass: every pixel of region r attends to region r's prompt only, pixels outside every region to the
  global prompt (masks resized to each layer by area; where regions overlap their weights are divided by their
  sum). ``ExpandContext`` (an ``attn2_patch``) appends the region prompts' states to the context of that pass,
  ``RegionalAttention`` (an attn2 replace patch) splits keys and values back into [global, region 1..R] and
  blends one attention per part by the masks, calling whatever attention the layer had for each part;
* guidance, nested over the two conditions: ``eps = eps(0) + s_global (eps(g) - eps(0)) + s_local (eps(g, map)
  - eps(g))`` with eps(0) the negative prompt, eps(g) the global prompt alone and eps(g, map) the spatial pass.
  ``s_local = s_global`` is plain CFG on the spatial pass (two evaluations a step suffice), ``s_local = 0`` is
  plain CFG on the global prompt (the regions are ignored).

Shape legend:
    q (b, n, h*d) with n = hq * wq pixels      k, v (b, m_g + sum_r m_r, h*d)      context (b, m, c)
    masks (1 or b, R, H, W) in [0, 1], any H, W      weights (1 or b, R + 1, n): global first
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .context import context_from_extra_options
from .explicit import sdpa_attention


def spatext_guidance(eps_negative: torch.Tensor, eps_global: torch.Tensor, eps_spatial: torch.Tensor,
                     s_global: float, s_local: float) -> torch.Tensor:
    """The nested two-condition guidance (works the same on eps or on x0 predictions)."""
    return eps_negative + s_global * (eps_global - eps_negative) + s_local * (eps_spatial - eps_global)


def region_weights(masks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(1 or b, R + 1, height * width) blend weights: the global part first, then each region."""
    if masks.dim() == 3:
        masks = masks[None]
    m = F.interpolate(masks.float(), size=(height, width), mode="area").clamp(0, 1).flatten(2)   # (b, R, n)
    total = m.sum(1, keepdim=True)
    m = m / total.clamp(min=1.0)                                   # overlaps share their pixel
    return torch.cat([1 - m.sum(1, keepdim=True), m], dim=1)


class ExpandContext:
    """``attn2_patch``: append each region prompt's states (R, m_r, c), or per item (b, R, m_r, c), to every row's
    key and value context."""

    def __init__(self, contexts: torch.Tensor):
        self.contexts = contexts if contexts.dim() == 4 else contexts[None]

    def __deepcopy__(self, memo):
        return self

    @property
    def lengths(self) -> list[int]:
        return [self.contexts.shape[2]] * self.contexts.shape[1]

    def __call__(self, n, context, value, extra_options):
        b = context.shape[0]
        regions = self.contexts.to(context)
        if regions.shape[0] not in (1, b):
            raise ValueError(f"{regions.shape[0]} per-item region contexts for a batch of {b} rows")
        if regions.shape[-1] != context.shape[-1]:
            raise ValueError(f"region prompts are {regions.shape[-1]} wide but the prompt is {context.shape[-1]}; "
                             f"encode both with the same CLIP")
        flat = regions.flatten(1, 2).expand(b, -1, -1)
        return n, torch.cat([context, flat], dim=1), torch.cat([value, flat.to(value)], dim=1)


class RegionalAttention:
    """attn2 replace patch of the spatial pass: one attention per part of the context, blended by the masks.

    ``lengths``: the region prompts' token counts, in order (the global part is what precedes them).
    ``previous``: the replace patch the layer had (called per part), else ``attention_fn(q, k, v, heads)``.
    ``weight_cache``: a dict to keep the resized masks in, shared by patches built anew for the same masks.
    Opaque to the pack's attention hook (``hook.OPAQUE_ATTR``): capture and P2P see the plain passes only.
    """

    attention_lab_opaque = True

    def __init__(self, masks: torch.Tensor, lengths: list[int], previous: Callable | None = None,
                 attention_fn: Callable | None = None, weight_cache: dict | None = None):
        self.masks = masks if masks.dim() == 4 else masks[None]
        if self.masks.shape[1] != len(lengths):
            raise ValueError(f"{self.masks.shape[1]} region masks for {len(lengths)} region prompts")
        self.lengths = list(lengths)
        self.previous = previous
        self.attention_fn = attention_fn or sdpa_attention
        self._weights = {} if weight_cache is None else weight_cache   # shareable: it depends on the masks only

    def __deepcopy__(self, memo):
        return self

    def weights(self, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
        key = (height, width, like.device, like.dtype)
        if key not in self._weights:
            self._weights[key] = region_weights(self.masks, height, width).to(like)
        return self._weights[key]

    def __call__(self, q, k, v, extra_options):
        ctx = context_from_extra_options(extra_options, True, q)
        m_g = k.shape[1] - sum(self.lengths)
        if m_g <= 0:
            raise ValueError(f"the context has {k.shape[1]} tokens, not more than the region prompts' "
                             f"{sum(self.lengths)}: the spatial pass needs ExpandContext before this patch")
        w = self.weights(ctx.height, ctx.width, q)                        # (1 or b, R + 1, n)
        if w.shape[0] not in (1, q.shape[0]):
            raise ValueError(f"{w.shape[0]} per-item region maps for a batch of {q.shape[0]} rows")
        bounds = [0, m_g]
        for length in self.lengths:
            bounds.append(bounds[-1] + length)
        out = None
        for part, (a, b) in enumerate(zip(bounds, bounds[1:])):
            wp = w[:, part, :, None]                                        # (1 or b, n, 1)
            if not bool((wp > 0).any()):
                continue
            if self.previous is not None:
                o = self.previous(q, k[:, a:b], v[:, a:b], extra_options)
            else:
                o = self.attention_fn(q, k[:, a:b], v[:, a:b], ctx.heads)
            out = o * wp if out is None else out + o * wp
        return out
