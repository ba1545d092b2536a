"""Tier 1: MnM's three sampling-time edits against the official controller, written out here in our own words, on
identical small tensors: the proxy values of cross-attention (``ProxyValuePatch``, the attn2_patch PromptMixSampler
installs), the self-attention injection on the preserved objects (``SelfAttentionInjection`` through the pack's
attention hook) and the background blend of the latents (``BackgroundBlend`` and ``blend_mask``, the after-step hook).

Official code: https://github.com/orpatashnik/local-prompt-mixing at commit
5edbdedcb37a3a66e6738c271d84213582ef1216 (its src/ is unchanged at 4bc225db751ae755604677cb2cdbb7bd8e732fe8):
``src/prompt_mixing.py`` (``PromptMixing.get_context_for_v``, ``get_self_attn``, ``mask_self_attn_patches``) and
``src/diffusion_model_wrapper.py`` (``DiffusionModelWrapper.forward``'s ``post_background`` blend, the
``ca_forward`` that calls them). The repository states no licence: nothing is copied, the rules are described.
Upstream's batch: item 0 the original (its "other prompt" is the prompt itself), items 1..k the variations; its step
``t`` is the 0-based step index of 50 steps (LPMConfig: proxy values for 7 <= t < 17, injection for t < 40, the
blend after step 35).

Shape legend: context (rows, m, c) text states; q (rows, n, heads * d); probs (rows, heads, n, n); latents
(items, C, H, W); rows = chunks x items.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from standins import through_hook

from attention.chunks import CHUNKS_KEY, ChunkTable
from attention.context import context_from_extra_options
from attention.layers import LayerId
from attention.prompt_mixing import (
    BackgroundBlend,
    MixSettings,
    ProxyValuePatch,
    SelfAttentionInjection,
    blend_mask,
    foreground,
)
from attention.schedule import simple_sigmas
from attention.store import AttentionStore, StoreConfig

STEPS = 50
SIGMAS = simple_sigmas(STEPS)
S = MixSettings()                                   # the official fractions: window [7, 17)/50, injection 40/50


def options(cou, step, block=("output", 3), heads=2, hw=None, rows=None, **more):
    """ComfyUI's extra_options of one attention call at schedule step ``step`` (None: no sigmas)."""
    opts = {"block": block, "block_index": 0, "n_heads": heads, "cond_or_uncond": list(cou), **more}
    if step is not None:
        opts.update(sigmas=SIGMAS[step].reshape(1), sample_sigmas=SIGMAS)
    if hw is not None:
        opts["activations_shape"] = [rows, 8, *hw]
    return opts


# ----------------------------------------------------------------------------- proxy values (cross-attention)
def official_context_for_v(t: int, context: torch.Tensor, other_context: torch.Tensor, cou: list[int],
                           start: int = 7, end: int = 17) -> torch.Tensor:
    """``PromptMixing.get_context_for_v``: inside start <= t < end the positive rows take ``other_context`` (item 0:
    the prompt itself, items 1..k: the proxy prompts), the negative rows keep theirs; outside, the context."""
    if not start <= t < end:
        return context
    v = context.clone()
    items = other_context.shape[0]
    for chunk, kind in enumerate(cou):
        if kind == 0:
            v[chunk * items:(chunk + 1) * items] = other_context
    return v


def projection(g, c=6, inner=8):
    w = torch.randn(c, inner, generator=g)
    return lambda t: t @ w


def text_states(g, k=2, m=5, c=6):
    prompt, neg = torch.randn(1, m, c, generator=g), torch.randn(1, m, c, generator=g)
    return prompt, neg, torch.randn(k, m, c, generator=g)


@pytest.mark.parametrize("cou", [[1, 0], [0, 1], [0], [1]])
def test_proxy_values_equal_upstream_context_for_v_at_every_step(cou):
    """Every step of 50, both batch orders and split cond/uncond calls: the value context our attn2_patch returns
    is upstream's ``get_context_for_v``; the key context (ComfyUI passes the same tensor as value) stays the prompt,
    and the attention output equals upstream's ``ca_forward`` with ``to_k(context)``, ``to_v(v_context)``."""
    g = torch.Generator().manual_seed(1)
    prompt, neg, proxies = text_states(g)
    items = 1 + proxies.shape[0]
    context = torch.cat([(prompt if kind == 0 else neg).expand(items, -1, -1) for kind in cou])
    other = torch.cat([prompt, proxies])
    to_q, to_k, to_v = (projection(g) for _ in range(3))
    x = torch.randn(len(cou) * items, 4, 6, generator=g)
    patch = ProxyValuePatch(proxies, *S.window)
    assert copy.deepcopy(patch) is patch                         # ComfyUI's model.clone() shares it
    seen = set()
    for t in range(STEPS):
        before = context.clone()
        n2, ctx2, val2 = patch(x, context, context, options(cou, t))
        theirs = official_context_for_v(t, context, other, cou)
        assert n2 is x and torch.equal(ctx2, before) and torch.equal(context, before), t   # keys keep the prompt
        assert torch.equal(val2, theirs), t
        seen.add(not torch.equal(val2, context))
        if t in (6, 7, 16, 17):
            ours = F.scaled_dot_product_attention(to_q(n2), to_k(ctx2), to_v(val2))
            official = (to_q(x) @ to_k(context).transpose(-1, -2) * 8 ** -0.5).softmax(-1) @ to_v(theirs)
            assert torch.allclose(ours, official, atol=1e-6), t
    assert seen == ({True, False} if 0 in cou else {False})


def test_proxy_values_with_a_longer_negative_and_the_prompts_entries_only():
    """ComfyUI repeats a shorter context to the batch's length (here a negative of 2m tokens): the proxies repeat
    alike, so the positive rows attend as upstream's do on one copy. With a run's chunk table, a positive entry that
    is not the node's prompt (an area prompt) keeps its values, the prompt's entry is edited even on a crop; a
    context whose length is no multiple of the proxies' is refused; without sigmas nothing changes."""
    g = torch.Generator().manual_seed(2)
    prompt, neg, proxies = text_states(g)
    m = prompt.shape[1]
    long_neg = torch.randn(1, 2 * m, 6, generator=g)
    context = torch.cat([long_neg.expand(3, -1, -1), prompt.repeat(1, 2, 1).expand(3, -1, -1)])
    patch = ProxyValuePatch(proxies, *S.window)
    x = torch.zeros(6, 4, 6)
    _, _, val = patch(x, context, context, options([1, 0], 10))
    short = official_context_for_v(10, torch.cat([prompt] * 3), torch.cat([prompt, proxies]), [0])
    to_k, to_v = projection(g), projection(g)
    q = torch.randn(3, 4, 8, generator=g)
    ours = F.scaled_dot_product_attention(q, to_k(context[3:]), to_v(val[3:]))
    official = F.scaled_dot_product_attention(q, to_k(prompt.expand(3, -1, -1)), to_v(short))
    assert torch.allclose(ours, official, atol=1e-6) and torch.equal(val[:3], context[:3])
    assert torch.equal(val[4:], proxies.repeat(1, 2, 1))

    area = torch.randn(1, m, 6, generator=g)
    ctx3 = torch.cat([neg.expand(3, -1, -1), prompt.expand(3, -1, -1), area.expand(3, -1, -1)])
    table = ChunkTable(frame=(8, 8), crops=frozenset({"p"}), text=frozenset({"p"}))
    opts = options([1, 0, 0], 10, uuids=["n", "p", "a"], **{CHUNKS_KEY: table})
    _, _, val = patch(torch.zeros(9, 4, 6), ctx3, ctx3, opts)
    expect = ctx3.clone()
    expect[4:6] = proxies
    assert torch.equal(val, expect)

    # a batch with more items than proxies (four items, two proxies): the extra item keeps its values
    ctx4 = torch.cat([neg.expand(4, -1, -1), prompt.expand(4, -1, -1)])
    _, _, val = patch(torch.zeros(8, 4, 6), ctx4, ctx4, options([1, 0], 10))
    assert torch.equal(val[5:7], proxies) and torch.equal(val[7], prompt[0]) and torch.equal(val[:5], ctx4[:5])

    with pytest.raises(ValueError, match=r"^proxy prompts have 5 tokens but the prompt has 7; the prompts must "
                                         r"tokenize to the same length$"):
        patch(x, torch.zeros(6, 7, 6), torch.zeros(6, 7, 6), options([1, 0], 10))
    out = patch(x, context, context, options([1, 0], None))
    assert out[1] is context and out[2] is context
    assert patch(x, torch.zeros(6, 7, 6), torch.zeros(6, 7, 6), options([1, 0], 17))[2].shape == (6, 7, 6)


# ----------------------------------------------------------------------------- self-attention injection
def official_self_attn(probs: torch.Tensor, mask: torch.Tensor, cou: list[int], t: int, end: int = 40):
    """``PromptMixing.get_self_attn`` + ``mask_self_attn_patches`` on one layer's probabilities (rows, h, n, n): for
    t < end, each positive chunk ``[orig, var...]`` is ``attn[h:] = attn[h:] * (1 - mask) + attn[:h].repeat(...) *
    mask`` in upstream's (b h) layout: every variation head takes the original's same head where the mask is 1."""
    out = probs.clone()
    if t >= end:
        return out
    items = probs.shape[0] // len(cou)
    for chunk, kind in enumerate(cou):
        if kind != 0:
            continue
        block = out[chunk * items:(chunk + 1) * items]
        b, h, n, _ = block.shape
        flat = block.reshape(b * h, n, n)
        flat[h:] = flat[h:] * (1 - mask) + flat[:h].repeat(b - 1, 1, 1) * mask
        out[chunk * items:(chunk + 1) * items] = flat.reshape(b, h, n, n)
    return out


def split_heads(x, heads):
    b, n, inner = x.shape
    return x.reshape(b, n, heads, inner // heads).transpose(1, 2)


def official_attention(q, k, v, heads, edit):
    """``ca_forward``: softmax(q k^T * scale) per head, ``edit`` on the probabilities, then probs @ v."""
    qh, kh, vh = (split_heads(t, heads) for t in (q, k, v))
    probs = edit((qh @ kh.transpose(-1, -2) * qh.shape[-1] ** -0.5).softmax(-1))
    out = probs @ vh
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)


LAYER = LayerId("output", 3, 0)


@pytest.mark.parametrize("cou", [[1, 0], [0, 1], [0]])
def test_self_attention_injection_equals_upstream_mask_self_attn_patches(cou):
    """A 4x4 self-attention layer, three items (original, two variations), two heads, through the hook the node
    installs: the output equals upstream's with the injected probabilities for t < 40 and plain attention after;
    a layer without a mask (upstream: over 32x32 pixels) is never edited."""
    g = torch.Generator().manual_seed(3)
    heads, d, n, items = 2, 4, 16, 3
    rows = len(cou) * items
    q, k, v = (torch.randn(rows, n, heads * d, generator=g) * 2 for _ in range(3))
    mask = (torch.rand(n, n, generator=g) > 0.6).float()
    ctl = SelfAttentionInjection({LAYER: mask}, S.self_injection_end)
    for t in (0, 20, 39, 40, 49):
        ours = through_hook([ctl], False, q, k, v, options(cou, t, hw=(4, 4), rows=rows))
        theirs = official_attention(q, k, v, heads, lambda p, t=t: official_self_attn(p, mask, cou, t))
        plain = official_attention(q, k, v, heads, lambda p: p)
        assert torch.allclose(ours, theirs, atol=1e-5), t
        assert torch.equal(torch.isclose(ours, plain, atol=1e-5).all(-1).all(-1),
                           torch.tensor([t >= 40 or kind != 0 or b == 0 for kind in cou for b in range(items)])), t
    other = through_hook([ctl], False, q, k, v, options(cou, 0, block=("input", 1), hw=(4, 4), rows=rows))
    assert torch.allclose(other, official_attention(q, k, v, heads, lambda p: p), atol=1e-5)


def test_self_attention_injection_calls_it_leaves_and_a_query_chunk():
    """Which calls are edited (``wants_probs``): not without sigmas, not a negative-only call, not one item, not a
    cross-attention call, not a layer without a mask; and ``edit_probs`` on a chunk of queries (as the explicit
    attention calls it on long sequences) uses the mask's rows of that chunk, as upstream's full mask does there,
    on the probabilities' device."""
    g = torch.Generator().manual_seed(4)
    n, heads = 16, 2
    mask = (torch.rand(n, n, generator=g) > 0.5).float()
    ctl = SelfAttentionInjection({LAYER: mask}, S.self_injection_end)
    probs = torch.rand(6, heads, n, n, generator=g).softmax(-1)

    def ctx(cou, step, cross=False, items=None, block=("output", 3)):
        opts = options(cou, step, block=block, heads=heads, hw=(4, 4), rows=items or 6)
        return context_from_extra_options(opts, cross, torch.zeros(items or 6, n, 8))
    assert ctl.wants_probs(ctx([1, 0], 39)) and ctl.wants_probs(ctx([0], 0, items=3))
    assert ctl.wants_probs(ctx([1, 0], 39, items=4))                 # [orig, one variation] x 2 chunks
    for c in (ctx([1, 0], None), ctx([1], 5, items=3), ctx([0], 5, items=1), ctx([1, 0], 5, cross=True),
              ctx([1, 0], 5, block=("input", 1)), ctx([1, 0], 40)):
        assert not ctl.wants_probs(c), c
    sl = slice(4, 12)
    ours = ctl.edit_probs(probs[:, :, sl].clone(), ctx([1, 0], 5), sl)
    theirs = official_self_attn(probs, mask, [1, 0], 5)[:, :, sl]
    assert torch.equal(ours, theirs) and not torch.equal(ours, probs[:, :, sl])
    # probabilities on another device than the (CPU) masks, as on a GPU: the mask follows them (meta stands in)
    assert ctl.edit_probs(torch.zeros(6, heads, 8, n, device="meta"), ctx([1, 0], 5), sl).device.type == "meta"
    assert ctl.masks == {LAYER: mask} and ctl.end == S.self_injection_end


# ----------------------------------------------------------------------------- background blend of the latents
def official_dilate(mask: np.ndarray) -> np.ndarray:
    """cv2.dilate with a 3x3 kernel of ones, one iteration: each pixel the maximum of its 3x3 neighbourhood (the
    border adds nothing)."""
    h, w = mask.shape
    out = np.zeros_like(mask)
    for i in range(h):
        for j in range(w):
            out[i, j] = mask[max(i - 1, 0):i + 2, max(j - 1, 0):j + 2].max()
    return out


def official_blend_mask(object_mask: np.ndarray, orig_mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``forward``'s post_background mask: the union of the two boolean masks, nn.Upsample(size, 'nearest')
    (pixel (i, j) of the output reads floor(i * h / H), floor(j * w / W)), then the 3x3 dilation."""
    union = (object_mask.astype(bool) | orig_mask.astype(bool)).astype(np.float32)
    rows = (np.arange(size[0]) * union.shape[0]) // size[0]
    cols = (np.arange(size[1]) * union.shape[1]) // size[1]
    return official_dilate(union[rows][:, cols])


def test_blend_mask_equals_upstream_union_upsample_dilate():
    """Sparse masks (single pixels, so the dilation and the union are visible), integer and boolean inputs, the
    square latent of upstream (8 -> 16) and a non-square one, each side to its own size."""
    g = torch.Generator().manual_seed(5)
    for shape, size in (((8, 8), (16, 16)), ((4, 6), (12, 18)), ((6, 4), (6, 4)), ((4, 4), (12, 8))):
        a = torch.rand(shape, generator=g) > 0.85
        b = torch.rand(shape, generator=g) > 0.85
        b[0, 0], a[-1, -1] = True, False
        for x, y in ((a, b), (a.long(), b.float())):
            ours = blend_mask(x, y, size)
            theirs = official_blend_mask(x.numpy(), y.numpy(), size)
            assert ours.shape == size and ours.dtype == torch.float32
            assert np.array_equal(ours.numpy(), theirs), (shape, size)
            assert 0 < theirs.sum() < theirs.size


def filled_store(g, items=3, r=8, m=12):
    """A store as PromptMixSampler's second pass fills it: per item, a self layer (r x r) whose rows group into
    blobs and a cross layer (r/2 x r/2) that puts words 3, 7, 11 on them; every item's blobs sit elsewhere."""
    store = AttentionStore(StoreConfig(self_max_tokens=32 * 32))
    store.reset()
    yy, xx = torch.meshgrid(torch.arange(r // 2).float(), torch.arange(r // 2).float(), indexing="ij")
    q_c, q_s = [], []
    for b in range(items):
        target = torch.rand(r // 2, r // 2, m, generator=g) * 0.05 + 0.01
        cy, cx = [(0.5, 0.5), (3, 0), (0, 3)][b]
        target[..., 3] += torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2))
        target[..., 7] += torch.exp(-((yy - 3 + cy / 2) ** 2 + (xx - 3 + cx / 3) ** 2))
        target[..., 11] += ((yy - cy).abs() + (xx - 3 + cx).abs() < 1.5).float()
        q_c.append(target.reshape(-1, m).log())
        up = target.repeat_interleave(2, 0).repeat_interleave(2, 1).reshape(r * r, m)
        q_s.append(torch.randn(r * r, 4, generator=g) + up[:, [3, 7, 11, 0]] * 6)
    q_c = torch.stack(q_c).repeat(2, 1, 1)                    # [uncond x items, cond x items]
    q_s = torch.stack(q_s).repeat(2, 1, 1)
    k_c = (torch.eye(m) * m ** 0.5)[None].expand(2 * items, -1, -1).contiguous()
    for step in range(2):
        through_hook([store], True, q_c, k_c, torch.zeros_like(k_c),
                     options([1, 0], step, heads=1, hw=(r // 2, r // 2), rows=2 * items))
        through_hook([store], False, q_s, q_s * 2, torch.zeros(2 * items, r * r, 4),
                     options([1, 0], step, block=("input", 1), heads=1, hw=(r, r), rows=2 * items))
    store.finish()
    return store


def official_post_background(latents, object_masks, orig_mask, orig_latents):
    """``forward`` at ``diff_step == background_blend_timestep``: latents = mask * latents + (1 - mask) * the
    original's latents of that step, with each variation's own Segmentor mask (upstream blends one variation per
    batch, ``select=len(prompts) - 1``); item 0 is the original itself."""
    out, masks = latents.clone(), []
    for b, obj in enumerate(object_masks, start=1):
        mask = torch.from_numpy(official_blend_mask(obj.numpy(), orig_mask.numpy(), tuple(latents.shape[-2:])))
        masks.append(mask)
        out[b] = mask.to(out) * out[b] + (1 - mask.to(out)) * orig_latents
    return out, masks


def test_background_blend_equals_upstream_post_background():
    """The after-step hook at the blend step (35 of 50) on float64 latents (3 items, 16x16 from 8x8 masks): each
    variation's foreground (``foreground``, upstream's ``Segmentor.get_background_mask``, its own test in
    test_faithful_attention.py) on that variation's maps, united with the original's, blends the variation with
    item 0; other steps and a blend that is off return the latents unchanged; the input is not written to."""
    g = torch.Generator().manual_seed(6)
    store = filled_store(g)
    s = MixSettings(self_size=8, cross_size=4)
    positions, bg, obj = [(3,), (7,), (11,)], frozenset({1}), 0
    orig_fg = foreground(store, 0, positions, s, bg, obj)
    x = torch.randn(3, 4, 16, 16, generator=g, dtype=torch.float64)
    before = x.clone()
    step = s.blend_step(STEPS)
    assert step == 35 and MixSettings(blend_at=1.0).blend_step(STEPS) == STEPS - 1    # at most after the last step
    blend = BackgroundBlend(store, orig_fg, positions, s, step, bg, obj)
    for i in (0, 34, 36, 49):
        assert torch.equal(blend(i, x), before) and blend.masks == []
    ours = blend(step, x)
    obj_masks = [foreground(store, b, positions, s, bg, obj) for b in (1, 2)]
    theirs, masks = official_post_background(x, obj_masks, orig_fg, x[0])
    assert torch.equal(x, before) and ours.dtype == torch.float64
    assert torch.equal(ours, theirs)
    assert len(blend.masks) == 2 and all(torch.equal(a, b.to(a)) for a, b in zip(blend.masks, masks))
    assert all(mk.dtype == torch.float64 and mk.device.type == "cpu" for mk in blend.masks)
    assert not torch.equal(masks[0], masks[1]) and all(0 < mk.mean() < 1 for mk in masks)
    # the background noun and the object index reach the variations' foregrounds
    for other_bg, other_obj in ((frozenset(), 0), (frozenset({1}), 1)):
        again = BackgroundBlend(store, orig_fg, positions, s, step, other_bg, other_obj)(step, x)
        fg = [foreground(store, b, positions, s, other_bg, other_obj) for b in (1, 2)]
        assert torch.equal(again, official_post_background(x, fg, orig_fg, x[0])[0])
        assert not torch.equal(again, ours), (other_bg, other_obj)
    # a latent with a frame axis (b, C, T, H, W): the (H, W) mask blends every frame alike
    video = torch.randn(3, 4, 2, 16, 16, generator=g)
    blended = BackgroundBlend(store, orig_fg, positions, s, step, bg, obj)(step, video)
    for f in range(2):
        assert torch.equal(blended[:, :, f], official_post_background(video[:, :, f], obj_masks, orig_fg,
                                                                      video[0, :, f])[0])
    off = BackgroundBlend(store, orig_fg, positions, s, MixSettings(blend_at=None).blend_step(STEPS), bg, obj)
    assert all(torch.equal(off(i, x), x) for i in range(STEPS)) and off.masks == []
