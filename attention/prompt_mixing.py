"""Prompt mixing (MnM) controllers: proxy-word values and self-attention localization.

Method of Patashnik et al. 2023, "Localizing Object-level Shape Variations with Text-to-Image
Diffusion Models"; procedure and defaults read from the official code
https://github.com/orpatashnik/local-prompt-mixing (src/prompt_mixing.py, commit
5edbdedcb37a3a66e6738c271d84213582ef1216; the repository states no licence, so this is our own
implementation of the published procedure, see docs/prompt-mixing-design.md).

Batch convention: latent item 0 is the original, items 1..k the variations (same x_T).
Shapes: value (rows, m, c) pre-projection text states; probs (rows, h, n_chunk, n); masks (n, n).
"""

from __future__ import annotations

import torch

from .context import AttnContext, context_from_extra_options
from .controller import AttentionController
from .render import upsample
from .store import AttentionStore


class ProxyValuePatch:
    """An ``attn2_patch``: keys keep the prompt, values come from each variation's proxy prompt.

    ``proxy_context``: (k, m, c) text states of the proxy prompts, one per variation item.
    Active for steps whose progress is in [start, end) (official: 7/50 to 17/50).
    """

    def __init__(self, proxy_context: torch.Tensor, start: float, end: float):
        self.proxy_context = proxy_context
        self.start, self.end = start, end

    def __deepcopy__(self, memo):
        return self

    def __call__(self, n, context, value, extra_options):
        ctx = context_from_extra_options(extra_options, True, n)
        p = ctx.progress
        if p is None or not self.start <= p < self.end:
            return n, context, value
        if value.shape[1] != self.proxy_context.shape[1]:
            raise ValueError(f"proxy prompts have {self.proxy_context.shape[1]} tokens but the prompt has "
                             f"{value.shape[1]}; the prompts must tokenize to the same length")
        value = value.clone()
        for row, item in ctx.rows(0):
            if 1 <= item <= self.proxy_context.shape[0]:
                value[row] = self.proxy_context[item - 1].to(value)
        return n, context, value


def injection_masks(original: AttentionStore, preserve: list[tuple[int, ...]], obj: tuple[int, ...],
                    threshold: float, max_tokens: int = 32 * 32) -> dict:
    """Per layer, the (n, n) mask of self-attention entries taken from the original.

    Pixels whose normalized average cross-attention of a preserved word exceeds ``threshold`` give
    their rows and columns; pixels of the object of interest are removed (official
    ``remove_obj_from_self_mask``).
    """
    masks = {}
    for info in original.layers(cross=True):
        if info.tokens > max_tokens:
            continue
        cross = original.layer_map(info.layer)[0]                          # (n, m) of the original
        norm = cross - cross.min()
        norm = norm / norm.max().clamp(min=1e-12)
        m = torch.zeros(info.tokens, info.tokens)
        for pos in preserve:
            pix = (norm[:, list(pos)] > threshold).any(-1)
            m[pix, :] = 1
            m[:, pix] = 1
        obj_pix = (norm[:, list(obj)] > threshold).any(-1)
        m[obj_pix, :] = 0
        m[:, obj_pix] = 0
        masks[info.layer] = m
    return masks


class SelfAttentionInjection(AttentionController):
    """Variations take the original's self-attention on preserved objects' pixels until ``end``."""

    edits_probs = True

    def __init__(self, masks: dict, end: float):
        self.masks, self.end = masks, end

    def wants_probs(self, ctx: AttnContext) -> bool:
        p = ctx.progress
        return (not ctx.is_cross and ctx.layer in self.masks and p is not None and p < self.end
                and 0 in ctx.cond_or_uncond and ctx.items > 1)

    def edit_probs(self, probs, ctx: AttnContext, query_slice: slice):
        mask = self.masks[ctx.layer].to(probs)[query_slice]                # (n_chunk, n)
        rows = ctx.rows(0)
        orig = {r for r, item in rows if item == 0}
        for chunk_start in sorted(orig):
            for row in range(chunk_start + 1, chunk_start + ctx.items):
                probs[row] = probs[row] * (1 - mask) + probs[chunk_start] * mask
        return probs


def blend_mask(var_mask: torch.Tensor, orig_mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Union of the two foreground masks, upsampled (nearest) to ``size`` and dilated 3x3."""
    m = upsample(torch.maximum(var_mask.float(), orig_mask.float()), size, "nearest")
    return torch.nn.functional.max_pool2d(m[None, None], 3, 1, 1)[0, 0]
