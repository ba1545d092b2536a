"""Tier 1: the pure attention core (no ComfyUI)."""

import pytest
import torch

from attention.context import context_from_extra_options, step_from_sigma
from attention.controller import AttentionController, ControlledAttention, chain_patch
from attention.explicit import attention_with_probs, sdpa_attention
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


def test_identity_controllers_change_nothing():
    q, k, v = qkv(b=4, n=64)
    ref = sdpa_attention(q, k, v, 4)
    for c in (AttentionController(), ProbsIdentity()):
        patch = ControlledAttention((c,), is_cross=True)
        assert torch.allclose(patch(q, k, v, opts()), ref, atol=1e-5)


def test_capture_rows_only_and_output_is_fast_path():
    q, k, v = qkv(b=4, n=64)
    store = AttentionStore()
    calls = []
    def base(q_, k_, v_, extra):
        calls.append(q_.shape[0])
        return sdpa_attention(q_, k_, v_, 4)
    patch = chain_patch(base, store, True)
    out = patch(q, k, v, opts(cou=(1, 0)))
    assert calls == [4] and torch.allclose(out, sdpa_attention(q, k, v, 4))
    qh, kh = q.view(4, 64, 4, 8).transpose(1, 2), k.view(4, 77, 4, 8).transpose(1, 2)
    ref = (qh @ kh.transpose(-1, -2) / 8 ** 0.5).softmax(-1)[2:4].mean(1)  # cond rows, mean heads
    assert torch.allclose(store.layer_map(LayerId("output", 3, 0)), ref, atol=1e-5)


def test_chain_keeps_foreign_patch_and_composes():
    q, k, v = qkv(b=2, n=64)
    foreign = lambda q, k, v, extra: torch.zeros_like(q)  # noqa: E731
    p1 = chain_patch(foreign, AttentionController(), True)
    assert torch.count_nonzero(p1(q, k, v, opts(cou=(0,)))) == 0  # foreign fast path kept
    store = AttentionStore()
    p2 = chain_patch(p1, store, True)
    assert p2.controllers[-1] is store and p2.previous is foreign and len(p2.controllers) == 2
    import copy
    assert copy.deepcopy(p2) is p2 and copy.deepcopy(store) is store


def test_step_from_sigma():
    sched = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0])
    assert step_from_sigma(10.0, sched) == (0, 4)
    assert step_from_sigma(2.0, sched) == (2, 4)
    assert step_from_sigma(3.0, sched) == (1, 4)   # between schedule points (Heun, SDE)
    assert step_from_sigma(1.0, sched) == (3, 4)
    assert step_from_sigma(1.0, None) == (None, None)


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
