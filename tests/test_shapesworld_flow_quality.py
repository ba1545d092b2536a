"""Tier 1 quality gates of the shipped ShapesWorld-Flow weights (the UNet's gates, tests/test_shapesworld_quality.py,
on the DiT: named colours, named shapes by the region classifier, word-map IoU of the joint attention)."""

import pytest

from attention.shapesworld.evaluate import generation_quality
from attention.shapesworld.flow_evaluate import GATE_MAPS, attention_localization
from attention.shapesworld.flow_model import DEFAULT_FLOW_WEIGHTS, ShapesWorldFlowModel


@pytest.fixture(scope="module")
def model():
    assert DEFAULT_FLOW_WEIGHTS.is_file(), f"{DEFAULT_FLOW_WEIGHTS} is not shipped"
    return ShapesWorldFlowModel()


@pytest.fixture(scope="module")
def generation(model):
    q = generation_quality(model, n=50, seed=0, steps=20, cfg=4.0)
    print(q)
    return q


def test_generation_shows_named_colours(generation):
    assert generation["colour_presence"] >= 0.9, generation


@pytest.mark.xfail(strict=True, reason=(
    "known quality gap of the shipped weights: named shapes in 24 % of objects against the 70 % gate "
    "(python -m attention.shapesworld.flow_evaluate; docs/shapesworld-flow.md); strict, so a retrained model that "
    "passes turns this into a failure until the mark is removed"))
def test_generation_shows_named_shapes(generation):
    assert generation["shape_agreement"] >= 0.7, generation


def test_joint_attention_localizes_the_shape_words(model):
    loc = attention_localization(model, n=30)
    print(loc)
    row = loc["iou"][GATE_MAPS]
    assert row["all_bands"]["best_iou"] >= 0.5, row
    assert row["leakage"]["own"] > row["leakage"]["others"], row
