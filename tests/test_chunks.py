"""Tier 1: which chunks of an attention call stores and editors see (attention/chunks.py), without ComfyUI."""

import torch

from attention.chunks import CHUNKS_KEY, HIDDEN, ChunkFilter, ChunkTable, is_crop, relabel, visible
from attention.context import AttnContext
from attention.controller import AttentionController
from attention.layers import LayerId
from attention.store import AttentionStore, StoreConfig

LID = LayerId("input", 1, 0)


def ctx(h, w, kinds, uuids, table, items=1):
    extra = {"uuids": uuids} if table is None else {"uuids": uuids, CHUNKS_KEY: table}
    return AttnContext(LID, True, h, w, 2, kinds, items, 1.0, 0, 4, extra=extra)


def test_is_crop_follows_comfys_clipping_of_areas():
    frame = (16, 16)
    assert not is_crop(None, frame)
    assert not is_crop((16, 16, 0, 0), frame)
    assert not is_crop((40, 40, 0, 0), frame)              # clipped to the latent: the full frame
    assert is_crop((16, 8, 0, 0), frame) and is_crop((16, 8, 0, 8), frame) and is_crop((8, 16, 4, 0), frame)
    assert not is_crop((2147483648, 16, 16, 0, 0, 0), frame)          # a leading extra dimension (add_area_dims)
    assert is_crop((2147483648, 16, 8, 0, 0, 8), frame)


def test_relabel_hides_crops_and_other_texts_and_nothing_without_a_table():
    table = ChunkTable((16, 16), frozenset({"area"}), frozenset({"prompt"}))
    extra = {CHUNKS_KEY: table, "uuids": ["neg", "prompt", "mask", "area"]}
    assert relabel([1, 0, 0, 0], extra) == [1, 0, HIDDEN, HIDDEN]
    assert relabel([1, 0, 0, 0], extra, text_only=False) == [1, 0, 0, HIDDEN]
    assert relabel([1, 0, 0, 0], extra, full_frame=False) == [1, 0, HIDDEN, HIDDEN]
    assert relabel([1, 0, 0, 0], {"uuids": extra["uuids"]}) == [1, 0, 0, 0]
    unmarked = {CHUNKS_KEY: ChunkTable((16, 16), frozenset()), "uuids": ["neg", "other"]}
    assert relabel([1, 0], unmarked) == [1, 0]              # no marked entry: every full-frame chunk counts


def test_store_skips_a_crop_call_instead_of_restarting_its_sum():
    table = ChunkTable((4, 4), frozenset({"area"}))
    store = AttentionStore(StoreConfig(capture_self=False))
    g = torch.Generator().manual_seed(0)
    full = ctx(4, 4, [1, 0], ["neg", "main"], table)
    crop = ctx(4, 2, [1, 0], ["area", "area"], table)
    for c, n in ((full, 16), (crop, 8), (full, 16)):
        if store.wants_probs(c):
            rows = store.probs_rows(c)
            store.observe_probs(torch.rand(len(rows), 2, n, 5, generator=g).softmax(-1), c, slice(0, n), rows)
    assert store.sizes_seen == {LID: (4, 4)} and store.cross[LID].count == 2
    assert store.layer_map(LID).shape == (1, 16, 5)
    # without the table the crop is recorded as before (a new size restarts the sum)
    plain = AttentionStore(StoreConfig(capture_self=False))
    crop_plain = ctx(4, 2, [1, 0], ["area", "area"], None)
    assert plain.wants_probs(crop_plain)


class Doubler(AttentionController):
    def wants_probs(self, ctx):
        return 0 in ctx.cond_or_uncond

    def edit_probs(self, probs, ctx, query_slice):
        for row, _ in ctx.rows(0):
            probs[row] = probs[row] * 2
        return probs


def test_chunk_filter_edits_only_the_prompts_chunks():
    table = ChunkTable((4, 4), frozenset(), frozenset({"prompt"}))
    c = ctx(4, 4, [0, 0, 1], ["other", "prompt", "neg"], table, items=2)
    probs = torch.ones(6, 2, 16, 5)
    out = ChunkFilter(Doubler()).edit_probs(probs.clone(), c, slice(0, 16))
    assert torch.equal(out[2:4], 2 * probs[2:4])                          # the prompt's chunk
    assert torch.equal(out[:2], probs[:2]) and torch.equal(out[4:], probs[4:])
    hidden = ctx(4, 4, [0, 1], ["other", "neg"], table)
    assert not ChunkFilter(Doubler()).wants_probs(hidden)
    assert visible(hidden).cond_or_uncond == [HIDDEN, 1]
