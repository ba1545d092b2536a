"""Tier 1: MnM's two DiT controllers (attention/prompt_mixing.py) on joint attention tensors, against the rule
written out here, and through the DiT hook path (joint.dit_call) the nodes run."""

import torch

from attention.context import AttnContext
from attention.hook import AttentionHook, Install
from attention.joint import BLOCK_KEY, JointBlock, JointLayout, dit_call
from attention.layers import LayerId
from attention.prompt_mixing import JointProxyValues, JointSelfAttentionInjection

LAYOUT = JointLayout(txt=5, grid=(2, 3))          # 5 text tokens, then a 2x3 grid: L = 11
LAYER = LayerId("double", 0, 0)


def ctx(cou, items, step, n_steps=10):
    return AttnContext(layer=LAYER, is_cross=True, height=2, width=3, heads=2, cond_or_uncond=cou, items=items,
                       sigma=None, step=step, n_steps=n_steps, joint=LAYOUT)


def qkv(b, g=0):
    gen = torch.Generator().manual_seed(g)
    return [torch.randn(b, 2, LAYOUT.length, 4, generator=gen) for _ in range(3)]


def test_proxy_values_keys_always_values_outside_the_window_from_the_original():
    """Batch [uncond x3, cond x3] (items: original, two variations): text keys of the variation rows of the
    positive chunk are the original row's at every step; text values too outside [0.2, 0.5); image tokens and the
    negative chunk untouched."""
    c = JointProxyValues(0.2, 0.5)
    q, k, v = qkv(6)
    for step, inside in ((1, False), (2, True), (4, True), (5, False)):
        q2, k2, v2 = c.edit_qkv(q, k, v, ctx([1, 0], 3, step))
        ek, ev = k.clone(), v.clone()
        for row in (4, 5):                                   # chunk 1 (cond): rows 3, 4, 5; item 0 = row 3
            ek[row, :, :5] = k[3, :, :5]
            if not inside:
                ev[row, :, :5] = v[3, :, :5]
        assert q2 is q and torch.equal(k2, ek) and torch.equal(v2, ev)
    assert torch.equal(k, qkv(6)[1])                         # the inputs are not written to


def test_proxy_values_leave_a_single_item_and_unet_layers_alone():
    c = JointProxyValues(0.0, 1.0)
    q, k, v = qkv(2)
    assert c.edit_qkv(q, k, v, ctx([1, 0], 1, 3))[1] is k
    unet = AttnContext(layer=LAYER, is_cross=True, height=2, width=3, heads=2, cond_or_uncond=[0], items=2,
                       sigma=None, step=0, n_steps=4)
    assert c.edit_qkv(q, k, v, unet)[1] is k and not c.wants_probs(unet)


def test_self_injection_swaps_the_image_block_of_variation_rows():
    mask = (torch.rand(6, 6, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    c = JointSelfAttentionInjection({LAYER: mask}, end=0.8)
    probs = torch.rand(4, 2, LAYOUT.length, LAYOUT.length, generator=torch.Generator().manual_seed(2))
    x = ctx([0, 1], 2, 3)
    assert c.wants_probs(x) and not c.wants_probs(ctx([0, 1], 2, 8)) and not c.wants_probs(ctx([0, 1], 1, 3))
    for sl in (slice(0, 11), slice(3, 8), slice(0, 4)):     # query chunks: grid rows 5..10 of the joint queries
        p = probs[:, :, sl].clone()
        out = c.edit_probs(p.clone(), x, sl)
        want = p.clone()
        for qi in range(sl.start, sl.stop):
            if qi >= 5:                                      # a grid query: its grid keys 5..10 are mixed
                m = mask[qi - 5]
                r = qi - sl.start
                want[1, :, r, 5:] = p[1, :, r, 5:] * (1 - m) + p[0, :, r, 5:] * m
        assert torch.equal(out, want)


def test_dit_call_runs_the_kernel_on_the_edited_keys_and_values():
    """Through the hook path: the output is the kernel's on (q, k', v') with the variation's text k, v replaced."""
    seen = {}

    def kernel(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, **kw):
        seen["k"], seen["v"] = k, v
        return (q @ k.transpose(-1, -2)).softmax(-1) @ v

    c = JointProxyValues(0.5, 1.0)
    hook = AttentionHook(kernel=kernel).with_install(Install(c, frozenset([LAYER]), True, True))
    q, k, v = qkv(2, 3)
    to = {BLOCK_KEY: JointBlock("double", 0, LAYOUT), "cond_or_uncond": [0],
          "sigmas": torch.tensor([0.9]), "sample_sigmas": torch.tensor([1.0, 0.9, 0.5, 0.0])}
    dit_call(hook, kernel, (q, k, v, 2), {"skip_reshape": True, "skip_output_reshape": True, "transformer_options": to},
             to)
    assert torch.equal(seen["k"][1, :, :5], k[0, :, :5]) and torch.equal(seen["v"][1, :, :5], v[0, :, :5])
    assert torch.equal(seen["k"][1, :, 5:], k[1, :, 5:]) and torch.equal(seen["k"][0], k[0])
