"""Tier 1 quality gates of the committed ShapesWorld weights (its issue's acceptance figures)."""

import pytest

from attention.shapesworld.evaluate import attention_localization, generation_quality, token_mass
from attention.shapesworld.harness import classifier_accuracy
from attention.shapesworld.model import ShapesWorldModel


@pytest.fixture(scope="module")
def model():
    return ShapesWorldModel()


def test_classifier_is_accurate_on_held_out_scenes():
    acc = classifier_accuracy()
    assert acc["shape_accuracy"] >= 0.95 and acc["colour_accuracy"] >= 0.95


def test_generation_shows_named_colours_and_shapes(model):
    q = generation_quality(model, n=50, seed=0, steps=20, cfg=5.0)
    print(q)
    assert q["colour_presence"] >= 0.9, q
    assert q["shape_agreement"] >= 0.7, q


def test_cross_attention_localizes_objects_at_coarsest_resolution(model):
    loc = attention_localization(model, n=30)
    print(loc)
    coarsest = min((k for k in loc["iou"] if k != "mean"), key=lambda k: int(k.split("x")[0]))
    assert coarsest == "8x8"
    assert loc["iou"][coarsest]["all_bands"]["best_iou"] >= 0.5, loc["iou"][coarsest]
    assert loc["leakage_coarsest"]["own"] > loc["leakage_coarsest"]["others"]


def test_token_mass_accounts_for_every_token(model):
    """Start token, words, end token and padding partition each pixel's attention: the shares sum to one."""
    mass = token_mass(model, n=2, bands=(400,))
    assert set(mass["share"]) == {"8x8", "16x16"}
    for shares in mass["share"].values():
        assert min(shares.values()) >= 0.0, shares
        assert abs(sum(shares.values()) - 1.0) < 2e-3, shares
        assert shares["words"] > 0.05, shares   # the nouns do receive attention
