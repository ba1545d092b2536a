"""Tier 1: the ShapesWorld-Flow editing figures' own logic (attention/shapesworld/flow_p2p_figures.py's shape swap,
attention/shapesworld/flow_prompt_mix_figures.py's window sweep): the classifier reads the edited object's region,
an identical target leaves the object, a zero-length mixing window reproduces the original."""

import pytest
import torch

from attention.prompt_mixing import MixSettings
from attention.shapesworld.flow_model import DEFAULT_FLOW_WEIGHTS, ShapesWorldFlowModel
from attention.shapesworld.harness import load_classifier
from attention.shapesworld.world import SceneSpec, ShapesWorld


@pytest.fixture(scope="module")
def clf():
    return load_classifier()


@pytest.fixture(scope="module")
def model():
    if not DEFAULT_FLOW_WEIGHTS.is_file():
        pytest.skip("no shipped ShapesWorld-Flow weights")
    return ShapesWorldFlowModel()


def scene(objects, seed=0):
    return ShapesWorld(seed=seed, size=32).sample(SceneSpec(objects, background="gray", name_background=True))


def test_shape_swap_scores_the_red_object_with_the_classifier(clf):
    """A red triangle where the source had a red circle counts as taking 'triangle' (the classifier reads the red
    blob, not the blue square or the image); the same image does not count as a star; a red circle does not count
    as a triangle; an edit whose red object is elsewhere does not count (overlap rule)."""
    from attention.shapesworld.flow_p2p_figures import SHAPE_SWAP, Scores, draws
    src = scene([("red", "circle"), ("blue", "square")], seed=0)
    tri = scene([("red", "triangle"), ("blue", "square")], seed=1)
    shown, blob = draws(tri.image, SHAPE_SWAP, "triangle", clf)
    assert shown and (blob & tri.objects[0].mask).sum() >= 0.9 * tri.objects[0].mask.sum()   # the red object
    assert clf.predict(tri.image[None], tri.objects[1].mask[None])[0][0] == "square"          # not the blue one
    assert not draws(tri.image, SHAPE_SWAP, "star", clf)[0]
    assert not draws(src.image, SHAPE_SWAP, "triangle", clf)[0]
    assert draws(src.image, SHAPE_SWAP, "circle", clf)[0]
    sc = Scores(SHAPE_SWAP, clf)
    sc.add("x", tri.image, tri.objects[0].mask, tri.image, "triangle")       # on the object: taken
    sc.add("x", src.image, src.objects[0].mask, src.image, "triangle")       # still a circle: not taken
    far = torch.zeros_like(tri.objects[0].mask)                              # red object off the source's object
    sc.add("x", tri.image, far, tri.image, "triangle")
    sc.add_plain("x", torch.stack([src.image, tri.image, tri.image]))        # source circle; triangle, not star
    row = sc.table()["x"]
    assert row["edits"] == 3 and row["takes_new_shape"] == round(1 / 3, 3)
    assert row["plain_target_prompt_draws_new_shape"] == 0.5 and row["plain_source_prompt_draws_circle"] == 1.0
    assert row["psnr_outside_object_db"] > 60                               # unchanged images: only rounding


def test_shape_swap_identical_target_is_the_source_row_with_localblend(model):
    """A 'swap' to the source prompt itself, with LocalBlend on the shape words, gives the source row (bit for bit at
    one thread; with several, rows of one batch may round apart, so to 1e-4)."""
    from dataclasses import replace

    from attention.shapesworld.flow_p2p_figures import SHAPE_SWAP, SOURCE, edit
    sigmas = model.sigmas(4)
    x_T = model.noise(1, 5) * sigmas[0]
    swap = replace(SHAPE_SWAP, targets=(SOURCE, SHAPE_SWAP.targets[0]), new=("circle", "triangle"))
    out = edit(model, x_T, sigmas, 4.0, swap.targets, blend=True, swap=swap)
    assert (out[1] - out[0]).abs().max() < 1e-4
    assert (out[2] - out[0]).abs().max() > 0.05                       # the circle -> triangle row is edited


def test_prompt_mix_score_reads_the_object_and_the_rest(clf):
    """The sweep's metrics on rendered scenes: the same image is no change; a red triangle for the circle takes the
    proxy's shape and changes shape, and its change is on the object (the blue square is untouched)."""
    from attention.shapesworld.flow_prompt_mix_figures import score
    a = scene([("red", "circle"), ("blue", "square")], seed=0)
    same = score(a.image, a.image, "triangle", clf)
    assert not same["proxy_shape"] and not same["changed"] and same["kept"]
    assert same["object_change"] == 0 and same["psnr_outside"] > 60 and same["shift"] == 0
    b = a.image.clone()
    b[:, a.objects[0].mask] = torch.tensor([0.5, 0.5, 0.5]).view(3, 1)    # the circle painted over in gray
    b[0, 0:8, 0:8], b[1:, 0:8, 0:8] = 1.0, 0.0                               # a red square elsewhere
    moved = score(a.image, b, "triangle", clf)
    assert moved["kept"] and moved["shift"] > 5 and moved["object_change"] > 0.1
    assert moved["psnr_other"] > 60                                          # the blue square is untouched


def test_prompt_mix_zero_length_window_reproduces_the_original(model):
    """Window [0, 0) with the injection and the blend on (the node's whole DiT path): the variation rows see the
    original's text keys and values at every step, so they are the original; the original row is pass 1's image.
    A full window moves the rows."""
    from attention.shapesworld.flow_prompt_mix_figures import original, variations
    steps = 4
    s = MixSettings(window=(0.0, 0.0), self_injection_end=0.8, blend_at=0.5)
    orig = original(model, 2, steps, 4.0, s)
    imgs = variations(model, orig, steps, 4.0, s, proxies=["triangle", "star"])
    assert (imgs[1:] - imgs[0]).abs().max() < 1e-4                 # rows of one batch: rounding (several threads)
    assert (imgs[0] - orig.image).abs().max() < 1e-4               # pass 1's image, up to batch rounding
    full = variations(model, orig, steps, 4.0, MixSettings(window=(0.0, 1.0), self_injection_end=0.0,
                                                           blend_at=None), proxies=["triangle"])
    assert (full[1] - full[0]).abs().max() > 0.05


def test_window_front_keeps_only_settings_nothing_beats_on_both():
    """A setting beaten on shape changes and on PSNR outside the object leaves the front; a tie on both keeps both;
    the front is ordered by shape changes."""
    from attention.shapesworld.flow_prompt_mix_figures import front

    def row(c, q):
        return {"changes_shape": c, "psnr_outside_object_db": q}
    table = {"ceiling": {}, "window a": row(0.5, 24.0), "window b": row(0.4, 31.0), "window c": row(0.4, 27.0),
             "window d": row(0.1, 34.0), "window e": row(0.5, 23.0), "window f": row(0.1, 34.0)}
    assert front(table) == ["window a", "window b", "window d", "window f"]
