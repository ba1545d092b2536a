"""Tier 2: the attention hook beside other packs' attention patches, in a real ComfyUI (COMFYUI_PATH), issue 27
item 6. The stand-in does to ComfyUI what IPAdapter / InstantID / PuLID do: one replace object per attn2 slot,
found again and extended with ``.add`` / ``.set_new_condition`` by every later node of that pack.

The conditionings are seeded random contexts: with the tiny random CLIP's near-constant token states a
probability edit would move the samples by ~1e-6 of their scale, under the bound of "the same samples"; with
these, each effect tested here moves them by 1e-3 (measured), and "unchanged" stays under 1e-5."""

import pytest
import torch
from comfy_env import CTX, assert_same_samples, comfy_or_skip, rel, sample, tiny_sd15
from standins import CrossAttentionPatchStandIn

pack = comfy_or_skip()

from attention_lab.attention.controller import AttentionController  # noqa: E402
from attention_lab.nodes.capture import AttentionCapture  # noqa: E402
from attention_lab.nodes.common import install_controller, model_layer_ids  # noqa: E402
from comfy.ldm.modules.attention import optimized_attention  # noqa: E402

EFFECT = 1e-4       # an effect moves the samples by more than this share of their scale (measured: 1e-3)


def apply_standin(model, weight: float):
    """What IPAdapter's ``set_model_patch_replace`` does on every cross-attention layer of a MODEL."""
    m = model.clone()
    for lid in model_layer_ids(model):
        key = (lid.kind, lid.number, lid.depth)
        to = m.model_options["transformer_options"].copy()
        to["patches_replace"] = dict(to.get("patches_replace", {}))
        to["patches_replace"]["attn2"] = dict(to["patches_replace"].get("attn2", {}))
        if key not in to["patches_replace"]["attn2"]:
            to["patches_replace"]["attn2"][key] = CrossAttentionPatchStandIn(weight, optimized_attention)
            m.model_options["transformer_options"] = to
        else:
            to["patches_replace"]["attn2"][key].add(weight)      # crashed on our old slot objects
    return m


@pytest.fixture(scope="module")
def sd15():
    return tiny_sd15()


def capture(model, **kw):
    args = dict(layers="all", capture_self=True, self_max_size=32, start=0.0, end=1.0)
    args.update(kw)
    with torch.inference_mode():
        return AttentionCapture.execute(model, **args).result


def go(model, steps=3):
    g = torch.Generator().manual_seed(0)
    pos, neg = [[torch.randn(1, 77, CTX, generator=g), {}]], [[torch.randn(1, 77, CTX, generator=g), {}]]
    with torch.inference_mode():
        return sample(model, pos, neg, torch.zeros(1, 4, 16, 16), steps=steps)


@pytest.mark.parametrize("order", ["capture first", "pack first"])
def test_slot_owning_pack_and_capture_both_apply(sd15, order):
    model = sd15
    theirs = go(apply_standin(model, 3.0))
    assert rel(theirs, go(model)) > EFFECT                          # the stand-in changes the image
    if order == "capture first":
        m, store = capture(model)
        m = apply_standin(apply_standin(m, 3.0), 0.0)               # two nodes of that pack: the second .add()s
    else:
        m, store = capture(apply_standin(apply_standin(model, 3.0), 0.0))
    slots = m.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert all(isinstance(s, CrossAttentionPatchStandIn) and s.weights == [3.0, 0.0] for s in slots.values())
    assert_same_samples(go(m), theirs)                              # their effect, kept
    ids = set(model_layer_ids(model))
    assert {i.layer for i in store.layers(cross=True)} == ids == {i.layer for i in store.layers(cross=False)}
    # the maps are those of the q, k their function received: with a zero-weight pack they are capture's alone
    m0, zero = capture(apply_standin(model, 0.0))
    m1, ref = capture(model)
    go(m0), go(m1)
    for lid in ids:
        assert rel(zero.layer_map(lid), ref.layer_map(lid)) < 1e-5


class Reweight(AttentionController):
    """A probability editor (P2P-style reweighting of tokens 1-7)."""

    def wants_probs(self, ctx):
        return ctx.is_cross

    def edit_probs(self, probs, ctx, query_slice):
        probs = probs.clone()
        probs[..., 1:8] *= 50.0
        return probs / probs.sum(-1, keepdim=True)


def edited(model, controller):
    m = model.clone()
    install_controller(m, controller, model_layer_ids(model), self_attn=False, cross_attn=True)
    return m


@pytest.mark.parametrize("order", ["edit first", "pack first"])
def test_probability_edit_and_slot_owning_pack_compose(sd15, order):
    model = sd15
    build = (lambda c, w: apply_standin(edited(model, c), w)) if order == "edit first" else \
        (lambda c, w: edited(apply_standin(model, w), c))
    edit_only, theirs = go(edited(model, Reweight())), go(apply_standin(model, 3.0))
    assert rel(edit_only, go(model)) > EFFECT
    both = go(build(Reweight(), 3.0))
    assert rel(both, edit_only) > EFFECT and rel(both, theirs) > EFFECT     # each contributes
    assert_same_samples(go(build(Reweight(), 0.0)), edit_only)              # a zero term leaves the edit alone


class ProbsIdentity(AttentionController):
    def wants_probs(self, ctx):
        return ctx.is_cross


def test_identity_edit_keeps_the_packs_image(sd15):
    model = sd15
    theirs = go(apply_standin(model, 3.0))
    assert_same_samples(go(edited(apply_standin(model, 3.0), ProbsIdentity())), theirs)


@pytest.mark.parametrize("order", ["theirs first", "ours first"])
def test_another_override_still_applies(sd15, order):
    model = sd15
    calls = []

    def install_scale(m):
        m = m.clone()
        to = m.model_options["transformer_options"]
        found = to.get("optimized_attention_override")

        def scale(func, *args, **kwargs):     # another pack's override; it calls the one it found, by convention
            calls.append(1)
            out = found(func, *args, **kwargs) if found is not None else func(*args, **kwargs)
            return out * 3.0
        to["optimized_attention_override"] = scale
        return m
    theirs = go(install_scale(model))
    assert rel(theirs, go(model)) > EFFECT
    if order == "theirs first":
        m, store = capture(install_scale(model))
    else:
        m, store = capture(model)
        m = install_scale(m)
    calls.clear()
    assert_same_samples(go(m), theirs)
    assert calls and store.finished and len(store.layers(cross=True)) == len(model_layer_ids(model))
    # a second capture after that override: both stores fill, the image stays theirs
    m2, store2 = capture(m)
    assert_same_samples(go(m2), theirs)
    assert len(store2.layers(cross=True)) == len(store.layers(cross=True))
    assert rel(store2.layer_map(model_layer_ids(model)[0]), store.layer_map(model_layer_ids(model)[0])) < 1e-5
