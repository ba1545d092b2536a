"""Prompt mixing (MnM) controllers: proxy-word values and self-attention localization.

Method of Patashnik et al. 2023, "Localizing Object-level Shape Variations with Text-to-Image
Diffusion Models"; procedure and defaults read from the official code
https://github.com/orpatashnik/local-prompt-mixing (src/prompt_mixing.py, commit
5edbdedcb37a3a66e6738c271d84213582ef1216; the repository states no licence, so this is our own
implementation of the published procedure, see docs/prompt-mixing-design.md).

Batch convention: latent item 0 is the original, items 1..k the variations (same x_T).
Shapes: value (rows, m, c) pre-projection text states; probs (rows, h, n_chunk, n); masks (n, n).
On DiT joint attention (``JointProxyValues``, ``JointSelfAttentionInjection``): q, k, v (b, h, L, d) with L = T
text + I image tokens; probs (b, h, n_chunk, L); masks (N, N) over the image grid.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .chunks import visible
from .cluster import cluster_store, nearest_size
from .context import AttnContext, context_from_extra_options
from .controller import AttentionController
from .render import upsample
from .store import AttentionStore
from .structure import prompt_nouns
from .words import PromptWords, split_word_list


@dataclass
class MixSettings:
    """The official ``LPMConfig`` numbers as fractions of the step count (see the design notes)."""

    window: tuple[float, float] = (7 / 50, 17 / 50)   # proxy values for steps in [start, end)
    self_injection_end: float = 40 / 50               # original self-attention on kept objects until here
    injection_threshold: float = 0.05                 # on min-max normalized cross-attention
    blend_at: float | None = 35 / 50                  # one background blend after this step (None: off)
    clusters: int = 5
    cluster_threshold: float = 0.3
    self_size: int = 32                               # clustered self-attention size (nearest captured)
    cross_size: int = 16                              # labelling cross-attention size (nearest captured)

    def validate(self) -> "MixSettings":
        start, end = self.window
        if not 0 <= start <= end <= 1:
            raise ValueError(f"mixing window [{start}, {end}) must satisfy 0 <= start <= end <= 1 (fractions of "
                             f"the steps; official [0.14, 0.34)); set mix_start below mix_end")
        for name, v in (("self_injection_end", self.self_injection_end), ("injection_threshold",
                        self.injection_threshold), ("cluster_threshold", self.cluster_threshold)):
            if not 0 <= v <= 1:
                raise ValueError(f"{name} = {v} is outside [0, 1]")
        if self.blend_at is not None and not 0 <= self.blend_at <= 1:
            raise ValueError(f"blend_at = {self.blend_at} is outside [0, 1] (official 0.7)")
        if self.clusters < 1:
            raise ValueError(f"clusters = {self.clusters} must be at least 1 (official 5)")
        return self

    def blend_step(self, steps: int) -> int | None:
        return None if self.blend_at is None else min(int(round(self.blend_at * steps)), steps - 1)


def proxy_prompt(prompt: str, word: str, proxy: str) -> str:
    """``prompt`` with the first whole-word occurrence of ``word`` replaced by ``proxy``."""
    out, n = re.subn(rf"(?<![\w]){re.escape(word)}(?![\w])", proxy, prompt, count=1, flags=re.IGNORECASE)
    if n == 0:
        raise ValueError(f"object word {word!r} is not in the prompt {prompt!r}; write it as it appears there")
    return out


@dataclass
class BlendLabels:
    """The words that label the blend's clusters, one entry per occurrence in the prompt, in prompt order."""

    positions: list[tuple[int, ...]]      # key positions of each labelling word occurrence
    names: list[str]                      # the word (or phrase) of each entry, as the user or the finder wrote it
    background: frozenset[int]            # entries whose clusters go to the original (upstream's background_nouns)
    obj: int                              # the object word's first occurrence (upstream's obj_token_index)


def blend_labels(pw: PromptWords, object_word: str, nouns: str = "", background_nouns: str = "") -> BlendLabels:
    """Upstream ``Segmentor``: every noun of the prompt labels the clusters, one label per occurrence (NLTK's
    ``(word index, word)`` pairs); a cluster of a noun in ``background_nouns`` (by its text) is background unless
    it is the object's. ``nouns``: comma-separated nouns, or empty (the default) for ``prompt_nouns``, which stands
    in for NLTK's tagger. The object word and the background nouns always label (upstream assumes they are
    nouns). A listed noun that is not in the prompt is refused; a found one that the tokenizer cannot match
    (an embedding) is skipped."""
    bg_names = split_word_list(background_nouns)
    listed = split_word_list(nouns)
    for n in [object_word] + listed + bg_names:
        pw.positions(n, "object word" if n == object_word else "noun")        # refuse a word not in the prompt
    found = [n for n in (listed or prompt_nouns(pw.prompt))]
    entries: dict[tuple[int, ...], str] = {}
    for name in dict.fromkeys([object_word] + found + bg_names):
        for occ in pw.occurrences(name):
            entries.setdefault(occ, name)
    order = sorted(entries)
    bg = {n.casefold() for n in bg_names}
    obj = order.index(pw.occurrences(object_word)[0])
    return BlendLabels(order, [entries[o] for o in order],
                       frozenset(i for i, o in enumerate(order) if entries[o].casefold() in bg), obj)


def foreground(store: AttentionStore, item: int, positions: list[tuple[int, ...]], s: MixSettings,
               background_words: frozenset[int] = frozenset(), obj: int | None = None) -> torch.Tensor:
    """(r, r) mask of the official ``Segmentor.get_background_mask``: the clusters are labelled with the words
    at ``positions`` (upstream: every noun of the prompt, found by NLTK's tagger) or background; 0 on clusters
    that are background or whose word is in ``background_words`` (indices into ``positions``; upstream's
    ``background_nouns``), unless the word is ``obj`` (the object of interest's index); 1 elsewhere."""
    self_hw = nearest_size(s.self_size, store.resolutions(cross=False), "self-attention")
    cross_hw = nearest_size(s.cross_size, store.resolutions(cross=True), "cross-attention")
    res = cluster_store(store, positions, item, s.clusters, s.cluster_threshold, self_hw, cross_hw)
    out = torch.ones_like(res.labels, dtype=torch.float32)
    for c, w in enumerate(res.cluster_word):
        if (w == -1 or w in background_words) and w != obj:
            out[res.labels == c] = 0
    return out


class BackgroundBlend:
    """After-step hook: at ``step``, variations keep their foreground and take the original elsewhere.

    The foreground of variation b is the union of its own clusters' foreground (from ``store``, filled
    during this pass) and the original's; item 0 of the batch is the original (same x_T). ``positions``: the
    words that label clusters (upstream: every noun of the prompt); ``background_words`` / ``obj``: see
    ``foreground``.
    """

    def __init__(self, store: AttentionStore, original_fg: torch.Tensor, positions: list[tuple[int, ...]],
                 settings: MixSettings, step: int | None, background_words: frozenset[int] = frozenset(),
                 obj: int | None = None):
        self.store, self.original_fg, self.positions = store, original_fg, positions
        self.settings, self.step = settings, step
        self.background_words, self.obj = background_words, obj
        self.masks: list[torch.Tensor] = []              # one (h, w) latent-size mask per variation

    def __call__(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if i != self.step:
            return x
        x = x.clone()
        for b in range(1, x.shape[0]):
            fg = foreground(self.store, b, self.positions, self.settings, self.background_words, self.obj)
            m = blend_mask(fg, self.original_fg, tuple(x.shape[-2:])).to(x)
            self.masks.append(m.cpu())
            x[b] = m * x[b] + (1 - m) * x[0]
        return x


PROXY_TEMPLATE = "a photo of a {word}"           # upstream get_proxy_words' shortlist prompt
PROXY_SHORTLIST = 50                             # upstream k of the shortlist


def proxy_candidates(vocab: list[str], word: str) -> list[str]:
    """The vocabulary entries upstream ranks (alphabetic, two letters or more), in order, once each; the
    object word itself is skipped (a proxy equal to the object is no variation; upstream keeps it)."""
    return [w for w in dict.fromkeys(vocab) if w.isalpha() and len(w) > 1 and w.lower() != word.lower()]


def top_similar(reference: torch.Tensor, features: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` rows of ``features`` (n, d) closest to ``reference`` (1, d) or (d,) by cosine,
    best first: upstream ``get_topk_similar_words`` (L2-normalize both, matmul, numpy argsort flipped, so
    ties resolve as upstream's)."""
    ref = reference.float().reshape(1, -1)
    ref = ref / ref.norm(p=2, dim=-1, keepdim=True)
    feats = features.float()
    feats = feats / feats.norm(p=2, dim=-1, keepdim=True)
    sims = feats.matmul(ref.view(-1, 1))                                      # (n, 1)
    return np.flip(sims.cpu().numpy().reshape(-1).argsort())[:k].tolist()


def suggest_proxies(encode_pooled: Callable[[list[str]], torch.Tensor], vocab: list[str], prompt: str,
                    word: str, count: int, shortlist: int = PROXY_SHORTLIST, template: str = PROXY_TEMPLATE,
                    vocab_features: Callable[[list[str]], torch.Tensor] | None = None) -> list[str]:
    """Proxy words as the official ``prompt_utils.get_proxy_words``: the ``shortlist`` candidates whose
    ``template`` prompt is closest (cosine of pooled text features, ``top_similar``) to the object word's,
    then the ``count`` of those whose full prompt (the object word replaced) is closest to the prompt.

    ``encode_pooled``: texts -> (n, d) pooled features. ``vocab``: candidate entries (``proxy_candidates``
    filters them). ``vocab_features``: candidate entries -> (n, d) features of their ``template`` prompts, e.g.
    from a cache; default ``encode_pooled`` of the filled template."""
    words = proxy_candidates(vocab, word)
    if count < 1 or not words:
        return []
    if vocab_features is None:
        def vocab_features(ws):
            return encode_pooled([template.format(word=w) for w in ws])
    short_idx = top_similar(encode_pooled([template.format(word=word)]), vocab_features(words), shortlist)
    short = [words[j] for j in short_idx]
    ref = encode_pooled([proxy_prompt(prompt, word, word)])
    feats = encode_pooled([proxy_prompt(prompt, word, w) for w in short])
    return [short[j] for j in top_similar(ref, feats, count)]


class ProxyValuePatch:
    """An ``attn2_patch``: keys keep the prompt, values come from each variation's proxy prompt.

    ``proxy_context``: (k, m, c) text states of the proxy prompts, one per variation item.
    Active for steps whose progress is in [start, end) (official: 7/50 to 17/50). Where the sampling run marks
    the prompt's conditioning entries (``chunks.py``), other entries (an area prompt) keep their values.
    """

    def __init__(self, proxy_context: torch.Tensor, start: float, end: float):
        self.proxy_context = proxy_context
        self.start, self.end = start, end

    def __deepcopy__(self, memo):
        return self

    def __call__(self, n, context, value, extra_options):
        ctx = visible(context_from_extra_options(extra_options, True, n), full_frame=False)  # the prompt's entries
        p = ctx.progress
        if p is None or not self.start <= p < self.end:
            return n, context, value
        m = self.proxy_context.shape[1]
        if value.shape[1] % m:
            raise ValueError(f"proxy prompts have {m} tokens but the prompt has {value.shape[1]}; the prompts must "
                             f"tokenize to the same length")
        # a longer negative in the batch repeats the prompt's context (ComfyUI's concat): repeat the proxies alike
        proxies = self.proxy_context.repeat(1, value.shape[1] // m, 1)
        value = value.clone()
        for row, item in ctx.rows(0):
            if 1 <= item <= proxies.shape[0]:
                value[row] = proxies[item - 1].to(value)
        return n, context, value


def injection_masks(original: AttentionStore, preserve: list[tuple[int, ...]], obj: tuple[int, ...],
                    threshold: float, max_tokens: int = 32 * 32) -> dict:
    """Per layer, the (n, n) mask of self-attention entries taken from the original.

    As the official ``mask_self_attn_patches``: the original's step-averaged cross-attention of the layer per
    head (heads, n, m) is min-max normalized once over all heads, pixels and tokens; a pixel belongs to a
    preserved word when *any* head's normalized attention to one of its tokens exceeds ``threshold``; those
    pixels give their rows and columns; pixels of the object of interest are removed (official
    ``remove_obj_from_self_mask``). Needs a store filled with ``keep_heads=True``; otherwise (a capture without
    heads) the head-averaged map stands in for one head.
    """
    masks = {}
    for info in original.layers(cross=True):
        if info.tokens > max_tokens:
            continue
        heads = original.layer_heads(info.layer)
        cross = heads[0] if heads is not None else original.layer_map(info.layer)[0][None]   # (heads, n, m)
        norm = cross - cross.min()
        norm = norm / norm.max().clamp(min=1e-12)
        m = torch.zeros(info.tokens, info.tokens)
        for pos in preserve:
            pix = (norm[:, :, list(pos)] > threshold).any(-1).any(0)
            m[pix, :] = 1
            m[:, pix] = 1
        obj_pix = (norm[:, :, list(obj)] > threshold).any(-1).any(0)
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


class JointProxyValues(AttentionController):
    """MnM's proxy values on a DiT's joint attention (``joint.dit_call``'s ``edit_qkv``): the counterpart of
    ``ProxyValuePatch`` where text keys and values are made by every block from its text stream.

    The variation rows are conditioned on their proxy prompts (their own text streams; the pooled vector stays
    the original's, see ``nodes/prompt_mix.py``). In every block this makes each variation row's text *keys* the
    original row's (item 0 of the same chunk), and its text *values* the original's too outside the window
    [start, end) of the steps' progress: inside it they stay the variation's own, i.e. the proxy prompt's. Image
    tokens meet the text only in this attention (the other layers are per token, modulated by the pooled vector),
    so outside the window a variation's image tokens are computed exactly as the original's. Not a port: the
    official code (UNet) takes the values from the proxy prompt's context in cross-attention; this is that rule
    where a context has no fixed values. q, k, v: (b, h, L, d); text keys ``ctx.joint.text_keys()``.
    """

    edits_probs = True          # edits k and v only: ``wants_probs`` is always False

    def __init__(self, start: float, end: float):
        self.start, self.end = start, end

    def __deepcopy__(self, memo):
        return self

    def wants_probs(self, ctx: AttnContext) -> bool:
        return False

    def edit_qkv(self, q, k, v, ctx: AttnContext):
        if ctx.joint is None or ctx.items < 2:
            return q, k, v
        p = ctx.progress
        in_window = p is not None and self.start <= p < self.end
        t = ctx.joint.text_keys()
        k = k.clone()
        v = v if in_window else v.clone()
        for row, item in ctx.rows(0):
            if item >= 1:
                k[row, :, t] = k[row - item, :, t]                 # row - item: the chunk's item 0
                if not in_window:
                    v[row, :, t] = v[row - item, :, t]
        return q, k, v


class JointSelfAttentionInjection(SelfAttentionInjection):
    """``SelfAttentionInjection`` on a DiT's joint attention: the image->image block of the joint probabilities
    (image-grid queries over image-grid keys) of every variation row takes the original row's where the layer's
    (N, N) mask is 1, until ``end``; the image->text part of the rows stays the variation's (so a row may no longer
    sum to exactly 1, as the joint softmax's image part is swapped alone). probs: (b, h, n_chunk, L) of the joint
    queries ``query_slice``."""

    def wants_probs(self, ctx: AttnContext) -> bool:
        p = ctx.progress
        return (ctx.joint is not None and ctx.layer in self.masks and p is not None and p < self.end
                and 0 in ctx.cond_or_uncond and ctx.items > 1)

    def edit_probs(self, probs, ctx: AttnContext, query_slice: slice):
        g = ctx.joint.grid_tokens()
        lo, hi = max(query_slice.start, g.start), min(query_slice.stop, g.stop)
        if lo >= hi:
            return probs
        mask = self.masks[ctx.layer].to(probs)[lo - g.start:hi - g.start]          # (n, N)
        qs = slice(lo - query_slice.start, hi - query_slice.start)
        for row, item in ctx.rows(0):
            if item >= 1:
                probs[row, :, qs, g] = probs[row, :, qs, g] * (1 - mask) + probs[row - item, :, qs, g] * mask
        return probs


def blend_mask(var_mask: torch.Tensor, orig_mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Union of the two foreground masks, upsampled (nearest) to ``size`` and dilated 3x3."""
    m = upsample(torch.maximum(var_mask.float(), orig_mask.float()), size, "nearest")
    return torch.nn.functional.max_pool2d(m[None, None], 3, 1, 1)[0, 0]
