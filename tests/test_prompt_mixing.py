"""Tier 1: prompt-mixing invariants on the ShapesWorld model."""

import pytest
import torch
from compare import assert_same_samples

from attention.shapesworld.model import ShapesWorldModel
from attention.shapesworld.prompt_mix import MixSettings, prompt_mix

PROMPT = "a red circle and a blue square on a gray background"


@pytest.fixture(scope="module")
def model():
    return ShapesWorldModel()


def test_proxy_equal_to_object_reproduces_the_original(model):
    out = prompt_mix(model, PROMPT, "circle", ["circle"], ["square"], seed=1, steps=12)
    assert_same_samples(out["images"][0], out["original"], 1e-4)  # the original row is untouched
    assert_same_samples(out["images"][1], out["original"], 1e-4)


def test_empty_window_without_localization_changes_nothing(model):
    s = MixSettings(window=(0.3, 0.3), self_injection_end=0.0, blend_at=None)
    out = prompt_mix(model, PROMPT, "circle", ["triangle", "star"], ["square"], seed=2, steps=12, settings=s)
    for b in (1, 2):
        assert_same_samples(out["images"][b], out["original"], 1e-4)


def test_mixing_changes_the_object_and_keeps_the_rest(model):
    out = prompt_mix(model, PROMPT, "circle", ["triangle"], ["square"], seed=3, steps=20)
    diff = (out["images"][1] - out["original"]).abs().amax(0)
    fg = out["blend_masks"][0]
    fg = torch.nn.functional.interpolate(fg[None, None], size=diff.shape, mode="nearest")[0, 0] > 0
    assert diff[fg].mean() > diff[~fg].mean()  # the change is inside the blended foreground


def test_bad_window_is_refused(model):
    with pytest.raises(ValueError, match="mixing window"):
        prompt_mix(model, PROMPT, "circle", ["star"], [], steps=4, settings=MixSettings(window=(0.5, 0.2)))
