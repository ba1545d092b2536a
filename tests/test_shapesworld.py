"""Tier 1: the ShapesWorld generator, model contract and weights file handling."""

import pytest
import torch
from compare import assert_same_samples

from attention.controller import AttentionController
from attention.shapesworld.model import ShapesWorldModel, WeightsError, patches_for
from attention.shapesworld.weights import ASSETS
from attention.shapesworld.world import BACKGROUNDS, COLOURS, SHAPES, ImpossibleSceneError, SceneSpec, ShapesWorld
from attention.store import AttentionStore, StoreConfig


@pytest.fixture(scope="module")
def model():
    return ShapesWorldModel()


def test_world_is_seeded_and_masks_are_exact():
    a, b = ShapesWorld(seed=5).sample(), ShapesWorld(seed=5).sample()
    assert a.caption == b.caption and torch.equal(a.image, b.image)
    assert len(SHAPES) >= 5 and len(COLOURS) >= 6 and len(BACKGROUNDS) >= 2
    w = ShapesWorld(seed=1)
    for _ in range(20):
        s = w.sample()
        union = torch.zeros_like(s.background_mask)
        for ob in s.objects:
            assert ob.mask.sum() > 10
            assert not (union & ob.mask).any()  # objects never overlap
            union |= ob.mask
            pix = s.image[:, ob.mask].median(1).values  # edge pixels blend with the background
            assert torch.allclose(pix, torch.tensor(COLOURS[ob.colour]), atol=0.08)
            assert ob.colour in s.caption and ob.shape in s.caption
        assert torch.equal(~union, s.background_mask)


def test_hard_cases_and_impossible_requests():
    w = ShapesWorld(seed=2)
    same = w.sample(SceneSpec([("red", "circle"), ("red", "square")], background="gray", name_background=True))
    assert same.caption == "a red circle and a red square on a gray background"
    twins = w.sample(SceneSpec([("blue", "star"), ("green", "star")]))
    assert twins.caption.count("star") == 2
    small = w.sample(SceneSpec([(None, None)]), radius_range=(3.0, 4.0))
    assert small.background_mask.float().mean() > 0.8  # background-heavy
    with pytest.raises(ImpossibleSceneError, match="1 to 3 objects"):
        w.sample(SceneSpec([(None, None)] * 4))
    with pytest.raises(ImpossibleSceneError, match="cannot place"):
        w.sample(SceneSpec([(None, None)] * 3), radius_range=(14.0, 15.0))
    with pytest.raises(ValueError, match="shapes: circle"):
        w.sample(SceneSpec([("red", "hexagon")]))


def test_weights_errors_name_the_file_and_the_fix(tmp_path):
    # a user's path gets a hint about paths; only the shipped file is restored with git (tests/test_cli.py)
    with pytest.raises(WeightsError, match=r"none.safetensors is missing: give the path.*use the shipped"):
        ShapesWorldModel(tmp_path / "none.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(WeightsError, match=r"bad.safetensors is corrupt"):
        ShapesWorldModel(bad)
    # the other kinds of file the pack ships are named as what they are, not a KeyError of a missing config entry
    with pytest.raises(WeightsError, match=r"shapesworld_flow.safetensors is a ShapesWorld-Flow weights file.*"
                                           r"ShapesWorld-Flow Loader"):
        ShapesWorldModel(ASSETS / "shapesworld_flow.safetensors")
    with pytest.raises(WeightsError, match=r"holds no ShapesWorld UNet config"):
        ShapesWorldModel(ASSETS / "shapesworld_grounding.safetensors")


def test_identity_and_capture_patches_leave_sampling_unchanged(model):
    prompts = ["a red circle and a blue square", "a green star"]
    ref = model.generate(prompts, seed=3, steps=6)
    same = model.generate(prompts, seed=3, steps=6, patches=patches_for(AttentionController()))
    store = AttentionStore(StoreConfig())
    captured = model.generate(prompts, seed=3, steps=6, patches=patches_for(store))
    assert_same_samples(same, ref)
    assert_same_samples(captured, ref)
    assert {(i.height, i.width) for i in store.layers()} == {(16, 16), (8, 8)}
    assert store.items == 2 and store.steps_recorded == set(range(6))


def test_a_patch_that_changes_attention_changes_the_image(model):
    class ZeroCross(AttentionController):
        def edit_qkv(self, q, k, v, ctx):
            return q, k, torch.zeros_like(v) if ctx.is_cross else v
    ref = model.generate(["a red circle"], seed=3, steps=4)
    out = model.generate(["a red circle"], seed=3, steps=4, patches=patches_for(ZeroCross()))
    assert (ref - out).abs().max() > 0.05
