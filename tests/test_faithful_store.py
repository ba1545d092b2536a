"""Tier 1: what the attention store adds around upstream's ``AttentionStore`` average (several positive entries,
per-head maps, sizes, concept maps, reading defaults, refusals), filled through the attention hook as in a sampling run;
upstream's average itself is ``test_faithful_attention.py::test_store_averages_equal_upstream_attention_store``.
Split from that file (issue 26's mutation triage) to keep each file readable in one sitting."""

from __future__ import annotations

import pytest
import torch
from standins import through_hook
from test_faithful_attention import SIGMAS, official_probs

from attention.store import AttentionStore, StoreConfig, word_maps


def _one_call(store, block, hw, cross, cond_or_uncond, step=0, heads=2, m=5, seed=0):
    """One attention call of ``block`` through the hook into ``store`` with the batch order ``cond_or_uncond``
    (chunks of two images each); returns the probabilities of every row (rows, heads, n, keys)."""
    g = torch.Generator().manual_seed(seed)
    n, rows = hw[0] * hw[1], 2 * len(cond_or_uncond)
    q = torch.randn(rows, n, heads * 4, generator=g) * 2
    k = torch.randn(rows, m if cross else n, heads * 4, generator=g) * 2
    opts = {"block": block, "block_index": 0, "n_heads": heads, "cond_or_uncond": list(cond_or_uncond),
            "sigmas": SIGMAS[step].reshape(1), "sample_sigmas": SIGMAS, "activations_shape": [rows, heads * 4, *hw]}
    through_hook([store], cross, q, k, torch.zeros_like(k), opts)
    return official_probs(q, k, heads)


def test_store_two_positive_entries_mixed_sizes_and_refusals(caplog):
    """What the store adds around upstream's average (the nodes read all of it): two positive entries in one call
    are averaged together; per-head maps kept up to ``self_max_tokens`` inclusive and exact after one call; size
    None averages every cross layer resized (bilinear, half-pixel) to the largest, the largest chosen by area even
    when a smaller layer sorts first, while self maps of another size are never mixed in; ``word_maps`` reads the
    table it is asked for; the refusals and the shape-change warning name what they found."""
    from attention.layers import LayerId
    store = AttentionStore(StoreConfig(self_max_tokens=64, keep_heads=True))
    order = [1, 0, 0]                                              # uncond, then two positive entries
    big = _one_call(store, ("output", 0), (8, 8), True, order, seed=1)
    small = _one_call(store, ("input", 1), (4, 4), True, order, seed=2)
    self_big = _one_call(store, ("output", 1), (8, 8), False, order, seed=3)
    _one_call(store, ("input", 2), (4, 4), False, order, seed=4)
    store.finish()

    def entries_mean(probs):                                       # (2 images, heads, n, m): the two entries' mean
        return (probs[2:4] + probs[4:6]) / 2
    heads_big = entries_mean(big)
    assert torch.allclose(store.layer_heads(LayerId("output", 0, 0)), heads_big, atol=1e-6)   # n = 64 = the limit
    assert torch.allclose(store.layer_map(LayerId("output", 0, 0)), heads_big.mean(1), atol=1e-6)
    grid_small = entries_mean(small).mean(1).reshape(2, 4, 4, -1).permute(0, 3, 1, 2)
    up = torch.nn.Upsample(size=(8, 8), mode="bilinear")(grid_small).permute(0, 2, 3, 1)
    want = (heads_big.mean(1).reshape(2, 8, 8, -1) + up) / 2
    assert torch.allclose(store.aggregate(None, cross=True), want, atol=1e-6)
    self_want = entries_mean(self_big).mean(1).reshape(2, 8, 8, -1)
    assert torch.allclose(store.aggregate(None, cross=False), self_want, atol=1e-6)
    assert torch.allclose(word_maps(store, [(3,), (60, 63)], None, item=1, cross=False),
                          torch.stack([self_want[1, ..., 3], self_want[1, ..., [60, 63]].mean(-1)]), atol=1e-6)
    assert store.items == 2 and store.n_steps == len(SIGMAS) - 1 and store.steps_recorded == {0}
    assert torch.equal(store.aggregate(None), store.aggregate(None, cross=True))       # cross maps by default
    assert store.layers() == store.layers(True) and store.resolutions() == [(8, 8), (4, 4)]
    with pytest.raises(ValueError) as err:
        store.aggregate((2, 2), cross=True)
    assert str(err.value) == "no captured cross-attention layer at size (2, 2); captured sizes: [(8, 8), (4, 4)]"
    with pytest.raises(ValueError) as err:
        store.aggregate((2, 2), cross=False)
    assert str(err.value) == "no captured self-attention layer at size (2, 2); captured sizes: [(8, 8), (4, 4)]"
    with pytest.raises(ValueError) as err:
        store.aggregate(None, cross="concept")
    assert str(err.value) == "no captured concept-attention layer at size None; captured sizes: []"
    for item in (2, -1):
        with pytest.raises(IndexError) as err:
            word_maps(store, [(1,)], (8, 8), item=item)
        assert str(err.value) == f"batch item {item} is out of range 0..1 of the captured batch"
    with pytest.raises(IndexError) as err:
        word_maps(store, [(1, 5)], (8, 8))
    assert str(err.value) == ("token positions [5] are beyond the 5 keys that were captured; was the store "
                              "filled with a different prompt?")
    one = AttentionStore(StoreConfig(keep_heads=True))               # one call of one entry: the maps themselves
    probs = _one_call(one, ("input", 4), (4, 4), True, [1, 0], seed=5)
    assert torch.allclose(one.layer_heads(LayerId("input", 4, 0)), probs[2:], atol=1e-6)
    assert one.resolutions() == [(4, 4)] and one.resolutions(cross=False) == []        # cross maps by default
    with caplog.at_level("WARNING", logger="attention_lab"):
        _one_call(one, ("input", 4), (2, 2), True, [1, 0], seed=6)
    assert ("attention store: layer input.4.0 changed shape (2, 16, 5) -> (2, 4, 5); restarting its sum"
            in caplog.messages), caplog.messages


def test_store_averages_concept_maps_over_entries_and_calls():
    """ConceptAttention's maps (upstream: averaged over the recorded blocks and steps): the positive rows of each
    call, summed per image over the positive entries and the calls, divided by their count, (items, n, C); only
    recorded when the store has concepts, the call is recorded and the layer is selected."""
    from attention.context import AttnContext
    from attention.layers import LayerId, parse_layer_selection
    lid = LayerId("double", 3, 0)
    store = AttentionStore(StoreConfig(concepts=("cat", "dog", "sky")))
    g = torch.Generator().manual_seed(11)
    want = torch.zeros(2, 6, 3)
    for step in (0, 1):
        ctx = AttnContext(lid, True, 2, 3, 4, [1, 0, 0], 2, float(SIGMAS[step]), step, len(SIGMAS) - 1)
        assert store.wants_concepts(ctx)
        scores = torch.rand(4, 3, 6, generator=g).softmax(1)          # rows 2..5: the two positive entries
        store.observe_concepts(scores, ctx, [2, 3, 4, 5])
        want += (scores[:2] + scores[2:]).transpose(1, 2)
    assert torch.allclose(store.layer_map(lid, "concept"), want / 4, atol=1e-6)
    assert store.layers("concept")[0].height == 2 and store.layers("concept")[0].width == 3
    assert store.items == 2 and store.n_steps == len(SIGMAS) - 1 and store.steps_recorded == {0, 1}
    ctx = AttnContext(lid, True, 2, 3, 4, [1, 0], 2, float(SIGMAS[2]), 2, len(SIGMAS) - 1)
    assert not AttentionStore(StoreConfig()).wants_concepts(ctx)                      # no concepts
    assert not AttentionStore(StoreConfig(concepts=("a",), step_end=0.1)).wants_concepts(ctx)   # out of range
    for text in ("double.0-2", "4x6", "2x4"):                                        # another block / size
        other = AttentionStore(StoreConfig(concepts=("a",), selection=parse_layer_selection(text)))
        assert not other.wants_concepts(ctx), text
    assert AttentionStore(StoreConfig(concepts=("a",), selection=parse_layer_selection("2x3"))).wants_concepts(ctx)


@pytest.mark.parametrize("keys", [(1, 2), (0, 3)])           # a run of keys (a view) and scattered keys (a gather)
def test_store_narrowed_to_keys_keeps_those_columns_bit_for_bit(keys):
    """``keep_keys`` (LocalBlend's store): the cross maps of the kept keys equal, bit for bit, those columns of a
    store that keeps every key (per-head maps too); ``key_index``/``word_maps`` read them by key position; a store
    that has recorded, or is narrowed already, is left as it is; a kept key beyond the attention's keys and a
    position the store does not keep are refused by name."""
    from attention.layers import LayerId
    full = AttentionStore(StoreConfig(self_max_tokens=64, keep_heads=True))
    narrow = AttentionStore(StoreConfig(self_max_tokens=64, keep_heads=True))
    assert narrow.keep_keys(reversed(keys)) and narrow.config.keys == keys
    assert not narrow.keep_keys((4,)) and narrow.config.keys == keys                # narrowed already
    for store in (full, narrow):
        for step, seed in ((0, 1), (1, 2)):
            _one_call(store, ("output", 0), (4, 4), True, [1, 0, 0], step=step, seed=seed)
        _one_call(store, ("output", 1), (4, 4), False, [1, 0], seed=3)
    lid = LayerId("output", 0, 0)
    assert torch.equal(narrow.layer_map(lid), full.layer_map(lid)[..., list(keys)])
    assert torch.equal(narrow.layer_heads(lid), full.layer_heads(lid)[..., list(keys)])
    assert torch.equal(narrow.layer_map(LayerId("output", 1, 0), False), full.layer_map(LayerId("output", 1, 0), False))
    assert narrow.key_index([keys[1], keys[0]]) == [1, 0] and full.key_index([3, 1]) == [3, 1]
    assert torch.equal(word_maps(narrow, [keys], (4, 4), item=1), word_maps(full, [keys], (4, 4), item=1))
    with pytest.raises(IndexError, match="not among the keys"):
        narrow.key_index([4])
    assert not full.keep_keys(keys) and full.config.keys is None                     # it has recorded
    late = AttentionStore(StoreConfig())
    late.keep_keys((7,))
    with pytest.raises(IndexError, match=r"keeps key positions \[7\] but the attention has 5 keys"):
        _one_call(late, ("output", 0), (4, 4), True, [0])
