"""Tier 1: the pure attention core (no ComfyUI)."""

import pytest
import torch

from attention.context import context_from_extra_options, step_from_sigma
from attention.controller import AttentionController
from attention.explicit import attention_with_probs, sdpa_attention, sdpa_kernel
from attention.hook import AttentionHook, Install, SlotProxy
from attention.layers import LayerId, LayerInfo, LayerSelectionError, parse_layer_selection
from attention.store import AttentionStore, StoreConfig, word_maps


def qkv(b=4, n=64, m=77, heads=4, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, n, heads * d, generator=g), torch.randn(b, m, heads * d, generator=g),
            torch.randn(b, m, heads * d, generator=g))


@pytest.mark.parametrize("max_elements", [64 * 1024 * 1024, 4 * 77 * 4 * 5])
def test_explicit_attention_equals_sdpa(max_elements):
    q, k, v = qkv()
    ref = sdpa_attention(q, k, v, 4)
    seen = []
    out = attention_with_probs(q, k, v, 4, lambda p, sl: seen.append(sl) or p, max_elements=max_elements)
    assert torch.allclose(out, ref, atol=1e-5)
    assert sum(sl.stop - sl.start for sl in seen) == 64
    if max_elements < 10_000:
        assert len(seen) > 1  # really chunked


def test_probabilities_sum_to_one_and_match_softmax():
    q, k, v = qkv(b=1, n=5, m=7, heads=2, d=4)
    got = []
    attention_with_probs(q, k, v, 2, lambda p, sl: got.append(p) or p)
    qh = q.view(1, 5, 2, 4).transpose(1, 2)
    kh = k.view(1, 7, 2, 4).transpose(1, 2)
    ref = (qh @ kh.transpose(-1, -2) / 2.0).softmax(-1)
    assert torch.allclose(got[0], ref, atol=1e-6)
    assert torch.allclose(got[0].sum(-1), torch.ones(1, 2, 5))


def opts(block=("output", 3), cou=(1, 0), sigma=1.0, sched=None, shape=(8, 8)):
    return {"block": block, "block_index": 0, "n_heads": 4, "cond_or_uncond": list(cou),
            "activations_shape": [2, 32, *shape], "sigmas": torch.tensor([sigma]),
            "sample_sigmas": sched}


class ProbsIdentity(AttentionController):
    def wants_probs(self, ctx):
        return True


LID = LayerId("output", 3, 0)


def hooked(controllers, previous=None, slot="attn2"):
    """The hook with ``controllers`` on output.3 (cross or self), and a caller that runs one attention call the way
    ComfyUI's BasicTransformerBlock does: the slot marker, then the override around the kernel."""
    hook = AttentionHook(previous=previous)
    for c in controllers:
        hook = hook.with_install(Install(c, frozenset([LID]), slot == "attn1", slot == "attn2"))
    marker = hook.markers()[f"{slot}_patch"]

    def call(q, k, v, to, kernel=sdpa_kernel):
        marker(q, k, v, to)
        return hook(kernel, q, k, v, 4, transformer_options=to, _inside_attn_wrapper=True)
    return hook, call


def test_identity_controllers_change_nothing():
    q, k, v = qkv(b=4, n=64)
    ref = sdpa_attention(q, k, v, 4)
    for c in (AttentionController(), ProbsIdentity()):
        _, call = hooked([c])
        assert torch.allclose(call(q, k, v, opts()), ref, atol=1e-5)


def test_capture_rows_only_and_output_is_fast_path():
    q, k, v = qkv(b=4, n=64)
    store = AttentionStore()
    calls = []
    def kernel(q_, k_, v_, heads, **kw):
        calls.append(q_.shape[0])
        return sdpa_attention(q_, k_, v_, heads)
    _, call = hooked([store])
    out = call(q, k, v, opts(cou=(1, 0)), kernel)
    assert calls == [4] and torch.equal(out, sdpa_attention(q, k, v, 4))
    qh, kh = q.view(4, 64, 4, 8).transpose(1, 2), k.view(4, 77, 4, 8).transpose(1, 2)
    ref = (qh @ kh.transpose(-1, -2) / 8 ** 0.5).softmax(-1)[2:4].mean(1)  # cond rows, mean heads
    assert torch.allclose(store.layer_map(LID), ref, atol=1e-5)


def test_foreign_patch_and_override_stay_the_fast_path_and_compose():
    q, k, v = qkv(b=2, n=64)
    extra_term = torch.full_like(q, 0.25)
    def foreign(q_, k_, v_, extra):     # an IPAdapter-style replace function: plain attention plus a term
        return sdpa_attention(q_, k_, v_, 4) + extra_term
    store = AttentionStore()
    hook, _ = hooked([store])
    proxy = SlotProxy(foreign, hook, True)
    out = proxy(q, k, v, opts(cou=(0,)))
    assert torch.equal(out, foreign(q, k, v, None))          # readers only: their output, unchanged
    assert torch.allclose(store.layer_map(LID).sum(-1), torch.ones(1, 64), atol=1e-5)
    hook2, _ = hooked([ProbsIdentity()])                     # an editor: edited + (theirs - plain)
    assert torch.allclose(SlotProxy(foreign, hook2, True)(q, k, v, opts(cou=(0,))), foreign(q, k, v, None),
                          atol=1e-5)
    seen = []
    def previous(func, *args, **kwargs):                     # another override on the model
        seen.append(kwargs["transformer_options"].get("attention_lab_inside"))
        return func(*args, **kwargs) * 2
    for c in (AttentionController(), ProbsIdentity()):
        _, call = hooked([c], previous=previous)
        assert torch.allclose(call(q, k, v, opts(cou=(0,))), 2 * sdpa_attention(q, k, v, 4), atol=1e-5)
    assert seen == [True, True]    # called once as the fast path each, told that our hook is outside
    import copy
    assert copy.deepcopy(hook) is hook and copy.deepcopy(store) is store
    hook3 = hook.with_install(Install(ProbsIdentity(), frozenset([LID]), False, True))
    assert hook3.controllers(LID, True)[0] is store and len(hook3.controllers(LID, True)) == 2
    assert hook3.controllers(LID, False) == () and hook3.tracker is hook.tracker


def test_step_from_sigma():
    sched = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0])
    assert step_from_sigma(10.0, sched) == (0, 4)
    assert step_from_sigma(2.0, sched) == (2, 4)
    assert step_from_sigma(3.0, sched) == (1, 4)   # between schedule points (Heun, SDE)
    assert step_from_sigma(1.0, sched) == (3, 4)
    assert step_from_sigma(1.0, None) == (None, None)


def test_step_from_sigma_equals_the_tensor_search():
    """The plain-Python search gives what the former tensor search gave (float32 schedule, 1e-4 relative exact
    hits first, else the last point at or above sigma) on schedules and sigmas at, between and beside the points."""
    def tensor_search(sigma, sched):
        s = sched.detach().float().cpu()
        n = len(s) - 1
        exact = (s - sigma).abs() <= 1e-4 * max(float(sigma), 1e-8)
        if exact.any():
            return min(int(exact.nonzero()[0]), n - 1), n
        above = (s >= sigma).nonzero()
        return min(int(above[-1]) if len(above) else 0, n - 1), n

    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 5, 20, 50):
        sched = torch.cat([torch.rand(n, generator=g).sort(descending=True).values * 14.6, torch.zeros(1)])
        sched = sched.to(torch.float64 if n % 2 else torch.float32)
        points = sched.tolist()
        mids = [(a + b) / 2 for a, b in zip(points, points[1:])]
        near = [p * (1 + d) for p in points for d in (5e-5, -5e-5, 2e-4, -2e-4)]
        for sigma in points + mids + near + [20.0, 1e-9]:
            assert step_from_sigma(sigma, sched) == tensor_search(sigma, sched), (n, sigma)


def test_context_rows_follow_cond_or_uncond():
    q = torch.zeros(6, 64, 16)
    ctx = context_from_extra_options(opts(cou=(1, 0, 0)), True, q)
    assert ctx.items == 2 and (ctx.height, ctx.width) == (8, 8)
    assert ctx.rows(0) == [(2, 0), (3, 1), (4, 0), (5, 1)]
    assert ctx.rows(1) == [(0, 0), (1, 1)]


def synthetic_probs(rows, heads, n, m, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(rows, heads, n, m, generator=g).softmax(-1)


def test_store_averages_cond_rows_heads_and_steps():
    store = AttentionStore(StoreConfig(capture_self=False))
    sched = torch.tensor([3.0, 2.0, 1.0, 0.0])
    expected = torch.zeros(2, 64, 77)
    for step, sigma in enumerate([3.0, 2.0, 1.0]):
        probs = synthetic_probs(4, 4, 64, 77, step)
        ctx = context_from_extra_options(opts(cou=(1, 0), sigma=sigma, sched=sched), True, torch.zeros(4, 64, 16))
        assert store.wants_probs(ctx)
        for sl in (slice(0, 40), slice(40, 64)):  # chunked like the explicit attention
            store.observe_probs(probs[2:4, :, sl], ctx, sl, [2, 3])
        expected += probs[2:4].mean(1)  # cond rows are the second chunk
    lid = LayerId("output", 3, 0)
    assert torch.allclose(store.layer_map(lid), expected / 3, atol=1e-6)
    assert store.steps_recorded == {0, 1, 2}
    nbytes = store.nbytes()
    ctx = context_from_extra_options(opts(cou=(1,), sigma=1.0, sched=sched), True, torch.zeros(2, 64, 16))
    assert not store.wants_probs(ctx)  # uncond-only call (split batch) is ignored
    assert store.nbytes() == nbytes


def test_store_step_range_and_self_limit():
    sched = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    store = AttentionStore(StoreConfig(step_start=0.25, step_end=0.75, self_max_tokens=32))
    wants = []
    for sigma in (4.0, 3.0, 2.0, 1.0):
        ctx = context_from_extra_options(opts(sigma=sigma, sched=sched), True, torch.zeros(4, 64, 16))
        wants.append(store.wants_probs(ctx))
    assert wants == [False, True, True, False]
    ctx = context_from_extra_options(opts(sigma=3.0, sched=sched), False, torch.zeros(4, 64, 16))
    assert not store.wants_probs(ctx)  # 8x8 = 64 tokens > 32


def test_word_maps_and_aggregate_known_answer():
    store = AttentionStore()
    sched = torch.tensor([1.0, 0.0])
    probs = torch.zeros(2, 1, 64, 5)
    probs[1, 0, :32, 2] = 1.0   # top half looks at token 2 (cond row)
    probs[1, 0, 32:, 3] = 1.0   # bottom half at token 3
    ctx = context_from_extra_options(opts(cou=(1, 0), sched=sched), True, torch.zeros(2, 64, 16))
    store.observe_probs(probs, ctx, slice(0, 64), [0, 1])
    maps = word_maps(store, [(2,), (3,), (2, 3)], (8, 8))
    assert maps.shape == (3, 8, 8)
    assert maps[0, :4].min() == 1 and maps[0, 4:].max() == 0
    assert maps[1, 4:].min() == 1 and torch.allclose(maps[2], torch.full((8, 8), 0.5))
    with pytest.raises(ValueError, match="captured sizes"):
        store.aggregate((16, 16))


def test_layer_selection_parser():
    avail = [LayerInfo(LayerId("input", 7, 0), 16, 16), LayerInfo(LayerId("output", 3, 0), 16, 16),
             LayerInfo(LayerId("output", 4, 1), 16, 16), LayerInfo(LayerId("middle", 0, 0), 8, 8),
             LayerInfo(LayerId("output", 9, 0), 64, 64)]
    ids = [i.layer for i in avail]
    assert parse_layer_selection("all").select(avail) == set(ids)
    assert parse_layer_selection("16").select(avail) == set(ids[:3])
    assert parse_layer_selection("8x8, input.7").select(avail) == {ids[3], ids[0]}
    assert parse_layer_selection("output.3-5").select(avail) == {ids[1], ids[2]}
    assert parse_layer_selection("output.0-9.1").select(avail) == {ids[2]}
    with pytest.raises(LayerSelectionError, match="valid forms"):
        parse_layer_selection("outptu.3")
    with pytest.raises(LayerSelectionError, match="reversed"):
        parse_layer_selection("output.5-3")
    with pytest.raises(LayerSelectionError, match="input.7.0"):
        parse_layer_selection("input.2").validate_ids(ids)
    with pytest.raises(LayerSelectionError, match="64x64: output.9.0"):
        parse_layer_selection("32").select(avail)
    with pytest.raises(LayerSelectionError, match="empty"):
        parse_layer_selection(" , ")
