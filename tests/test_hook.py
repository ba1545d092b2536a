"""Tier 1: the attention hook (attention/hook.py) on the ShapesWorld UNet, which calls ComfyUI's override
exactly as ComfyUI's UNet does, with another pack's replace slots and overrides on the same layers."""

import pytest
import torch
from standins import CrossAttentionPatchStandIn

from attention.controller import AttentionController
from attention.explicit import attention_with_probs, sdpa_attention
from attention.hook import HOOK_KEY, OVERRIDE_KEY, merge_options, with_foreign_slots
from attention.shapesworld.model import ShapesWorldModel, layer_patches, patches_for
from attention.shapesworld.unet import ShapesUNet
from attention.store import AttentionStore, StoreConfig

PROMPT = "a red circle and a blue square"


@pytest.fixture(scope="module")
def model():
    return ShapesWorldModel()


def standin(weight: float) -> CrossAttentionPatchStandIn:
    return CrossAttentionPatchStandIn(weight, sdpa_attention)


def standin_slots(weight: float) -> dict:
    return {"patches_replace": {"attn2": {(lid.kind, lid.number, lid.depth): standin(weight)
                                          for lid in ShapesUNet.attention_layer_ids()}}}


def run(model, to_extra: dict, prepare: bool = True, seed: int = 0):
    """One CFG denoiser call through the UNet, the options prepared per call as the APPLY_MODEL wrapper does."""
    x = model.noise(2, seed) * 3.0
    sigma = torch.full((4,), 3.0)
    ctx = torch.cat([model.encode(["", ""]), model.encode([PROMPT, "a green star"])])
    to = {"cond_or_uncond": [1, 0], "sigmas": sigma[:1], "sample_sigmas": torch.tensor([3.0, 1.0, 0.0]),
          **to_extra}
    if prepare:
        to = with_foreign_slots(to)
    with torch.no_grad():
        return model.eps(torch.cat([x, x]), sigma, ctx, to)


class ByKind(AttentionController):
    """Records which slot each call was dispatched as, with its key count."""

    edits_probs = False

    def __init__(self):
        self.seen = set()

    def wants_probs(self, ctx):
        self.seen.add((str(ctx.layer), ctx.is_cross))
        return False


def test_identity_capture_and_slots_from_the_models_call_order(model):
    plain = run(model, {})
    assert torch.equal(run(model, patches_for(AttentionController())), plain)      # identity hook = no hook
    store = AttentionStore(StoreConfig(self_max_tokens=32 * 32))
    assert torch.equal(run(model, patches_for(store)), plain)                      # capture only reads
    ids = ShapesUNet.attention_layer_ids()
    assert {i.layer for i in store.layers(cross=True)} == set(ids) == {i.layer for i in store.layers(cross=False)}
    kinds = ByKind()
    run(model, layer_patches([kinds], [kinds]))
    assert kinds.seen == {(str(lid), c) for lid in ids for c in (False, True)}   # every layer, both slots
    for info in store.layers(cross=False):          # self maps are pixel x pixel: really the self slot
        assert store.layer_map(info.layer, cross=False).shape[-1] == info.tokens


@pytest.mark.parametrize("order", ["ours first", "theirs first"])
def test_another_packs_slot_objects_stay_theirs_and_both_apply(model, order):
    theirs_alone = run(model, standin_slots(0.5))
    plain = run(model, {})
    assert not torch.allclose(theirs_alone, plain, atol=1e-3)          # the stand-in has an effect
    store = AttentionStore(StoreConfig(capture_self=False))
    a, b = patches_for(store, self_layers=False), standin_slots(0.5)
    opts = merge_options(a, b) if order == "ours first" else merge_options(b, a)
    slots = opts["patches_replace"]["attn2"]
    for slot in slots.values():     # what IPAdapter does with whatever it finds in a slot
        slot.add(0.0)
        slot.set_new_condition(0.0)
    assert all(isinstance(s, CrossAttentionPatchStandIn) for s in slots.values())    # we took no slot
    assert torch.equal(run(model, opts), theirs_alone)                    # their effect, exactly
    assert {i.layer for i in store.layers(cross=True)} == set(ShapesUNet.attention_layer_ids())
    # our maps are the probabilities of the q, k their function received: with a zero-weight stand-in they are
    # the maps without it
    ref, zero = AttentionStore(StoreConfig(capture_self=False)), AttentionStore(StoreConfig(capture_self=False))
    run(model, patches_for(ref, self_layers=False))
    run(model, merge_options(patches_for(zero, self_layers=False), standin_slots(0.0)))
    for info in ref.layers():
        assert torch.allclose(zero.layer_map(info.layer), ref.layer_map(info.layer), atol=1e-6)


class Reweight(AttentionController):
    """An editor: scales the probabilities of token 2 and renormalizes (P2P-style)."""

    def wants_probs(self, ctx):
        return ctx.is_cross

    def edit_probs(self, probs, ctx, query_slice):
        probs = probs.clone()
        probs[..., 2] *= 3.0
        return probs / probs.sum(-1, keepdim=True)


def test_probability_edits_compose_with_another_packs_term(model):
    """On their slot an edit returns edited + (theirs - plain): their additive term is kept."""
    edit_only = run(model, patches_for(Reweight(), self_layers=False))
    assert not torch.allclose(edit_only, run(model, {}), atol=1e-3)
    both = run(model, merge_options(patches_for(Reweight(), self_layers=False), standin_slots(0.5)))
    theirs = run(model, standin_slots(0.5))
    assert not torch.allclose(both, edit_only, atol=1e-3) and not torch.allclose(both, theirs, atol=1e-3)
    zero = run(model, merge_options(patches_for(Reweight(), self_layers=False), standin_slots(0.0)))
    assert torch.allclose(zero, edit_only, atol=1e-5)          # a zero term: exactly the edit
    # one layer by hand: the proxy's output is the explicit edit plus their term
    q, k, v = (torch.randn(2, 64, 128, generator=torch.Generator().manual_seed(i)) for i in range(3))
    extra = {"block": ("middle", 0), "block_index": 0, "n_heads": 4, "cond_or_uncond": [0],
             "activations_shape": [2, 128, 8, 8]}
    hook = patches_for(Reweight(), self_layers=False)[HOOK_KEY]
    theirs = standin(0.5)
    got = with_foreign_slots({"patches_replace": {"attn2": {("middle", 0, 0): theirs}}}, hook)
    out = got["patches_replace"]["attn2"][("middle", 0, 0)](q, k, v, extra)
    edited = attention_with_probs(q, k, v, 4, lambda p, sl: Reweight().edit_probs(p, None, sl))
    assert torch.allclose(out, edited + theirs(q, k, v, extra) - sdpa_attention(q, k, v, 4), atol=1e-5)


def test_another_override_stays_the_fast_path(model):
    calls = []

    def scale(func, *args, **kwargs):     # another pack's override: records and halves every attention output
        calls.append(1)
        return func(*args, **kwargs) * 0.5
    theirs = run(model, {OVERRIDE_KEY: scale})
    n = len(calls)
    store = AttentionStore(StoreConfig())
    from attention.hook import AttentionHook, Install
    hook = AttentionHook(previous=scale)
    hook = hook.with_install(Install(store, frozenset(ShapesUNet.attention_layer_ids())))
    opts = {OVERRIDE_KEY: hook, HOOK_KEY: hook, "patches": {k: [m] for k, m in hook.markers().items()}}
    assert torch.equal(run(model, opts), theirs) and len(calls) == 2 * n
    assert len(store.layers(cross=True)) == 7 and len(store.layers(cross=False)) == 7
