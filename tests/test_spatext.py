"""Tier 1: training-free SpaText (regional cross-attention, two-condition guidance) math and ShapesWorld."""

import pytest
import torch
from compare import assert_same_samples

from attention.explicit import sdpa_attention
from attention.shapesworld.model import ShapesWorldModel
from attention.shapesworld.spatext import generate, layouts
from attention.shapesworld.world import COLOURS
from attention.spatext import ExpandContext, RegionalAttention, region_weights, spatext_guidance

HEADS = 2


def opts(h, w):
    return {"block": ("output", 1), "block_index": 0, "n_heads": HEADS, "cond_or_uncond": [0],
            "activations_shape": (1, 8, h, w)}


@pytest.fixture(scope="module")
def model():
    return ShapesWorldModel()


def test_region_weights_sum_to_one_and_overlaps_share():
    masks = torch.zeros(2, 8, 8)
    masks[0, :, :4] = 1
    masks[1, :, 2:6] = 1                       # columns 2-3 are in both regions
    w = region_weights(masks, 8, 8)[0].view(3, 8, 8)
    assert torch.allclose(w.sum(0), torch.ones(8, 8))
    assert torch.allclose(w[1, :, 2:4], torch.full((8, 2), 0.5)) and torch.equal(w[0, :, 6:], torch.ones(8, 2))
    assert region_weights(torch.zeros(1, 16, 16), 4, 4)[0, 0].eq(1).all()     # no region: all global


def test_regional_attention_reduces_to_one_part_per_pixel():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 16, 8, generator=g) for _ in range(3))
    kr, vr = torch.randn(1, 5, 8, generator=g), torch.randn(1, 5, 8, generator=g)
    ks, vs = torch.cat([k, kr], 1), torch.cat([v, vr], 1)
    none = RegionalAttention(torch.zeros(1, 4, 4), [5])
    assert torch.equal(none(q, ks, vs, opts(4, 4)), sdpa_attention(q, k, v, HEADS))
    left = torch.zeros(1, 4, 4)
    left[:, :, :2] = 1
    out = RegionalAttention(left, [5])(q, ks, vs, opts(4, 4)).view(1, 4, 4, 8)
    assert torch.allclose(out[:, :, :2], sdpa_attention(q, kr, vr, HEADS).view(1, 4, 4, 8)[:, :, :2], atol=1e-6)
    assert torch.allclose(out[:, :, 2:], sdpa_attention(q, k, v, HEADS).view(1, 4, 4, 8)[:, :, 2:], atol=1e-6)
    with pytest.raises(ValueError, match="needs ExpandContext"):
        RegionalAttention(left, [16])(q, k, v, opts(4, 4))


def test_expand_context_appends_the_regions_to_keys_and_values():
    g = torch.Generator().manual_seed(1)
    regions = torch.randn(2, 3, 4, generator=g)
    ctx = torch.randn(5, 6, 4, generator=g)
    _, c, v = ExpandContext(regions)(None, ctx, ctx, {})
    assert c.shape == (5, 12, 4) and torch.equal(c[:, :6], ctx) and torch.equal(c[2, 6:9], regions[0])
    assert torch.equal(v, c)
    with pytest.raises(ValueError, match="same CLIP"):
        ExpandContext(torch.zeros(1, 3, 7))(None, ctx, ctx, {})


def test_guidance_reduces_to_plain_cfg_at_its_ends():
    neg, glob, spatial = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(2)).unbind(0)
    # equal scales: plain CFG on the spatial pass (the same sum in another order, so up to float rounding)
    assert torch.allclose(spatext_guidance(neg, glob, spatial, 5.0, 5.0), neg + 5 * (spatial - neg), atol=1e-5)
    assert torch.equal(spatext_guidance(neg, glob, spatial, 5.0, 0.0), neg + 5 * (glob - neg))


def test_empty_region_map_samples_as_the_global_prompt(model):
    prompts = ["a red circle and a blue square"]
    plain = generate(model, prompts, None, None, seed=2, steps=8)
    empty = generate(model, prompts, [["a red circle", "a blue square"]], torch.zeros(1, 2, 32, 32), seed=2,
                     steps=8, s_local=7.5)
    assert_same_samples(empty, plain, 1e-4)


def test_regions_move_the_objects_into_their_boxes(model):
    caption, scene = ["a red circle and a blue square on a gray background"] * 4, ["on a gray background"] * 4
    masks = layouts(4, seed=3)
    regions = [["a red circle", "a blue square"]] * 4

    def inside(images):
        """Mean share of each named colour's pixels that fall inside its region box."""
        hits = 0
        for img, m in zip(images, masks):
            for colour, box in zip(("red", "blue"), m):
                near = ((img - torch.tensor(COLOURS[colour]).view(3, 1, 1)) ** 2).sum(0).sqrt() < 0.3
                hits += float((near & (box > 0)).sum() / near.sum().clamp(min=1))
        return hits / 8
    plain = inside(generate(model, caption, None, None, seed=5, steps=16))
    spatial = inside(generate(model, scene, regions, masks, seed=5, steps=16, s_local=7.5))
    assert spatial > plain + 0.3 and spatial > 0.8, (plain, spatial)
