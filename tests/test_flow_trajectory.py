"""Tier 1: the trajectory diagnostic of ShapesWorld-Flow (attention/shapesworld/flow_trajectory.py)."""

import torch

from attention.shapesworld.flow_model import ShapesWorldFlowModel, flow_sigmas, sample_euler_flow
from attention.shapesworld.flow_trajectory import (
    ONE_STEP,
    TRAJECTORY,
    one_step_scores,
    trailing_sigmas,
    trajectory_figures,
)
from attention.shapesworld.harness import load_classifier, object_scores
from attention.shapesworld.model import ShapesWorldModel
from attention.shapesworld.world import ShapesWorld


def test_trailing_sigmas_start_at_the_noise_level_and_end_at_zero():
    sigmas = flow_sigmas(20)
    tail = trailing_sigmas(sigmas, 0.6)
    assert tail[0] == 0.6 and tail[-1] == 0
    assert (tail[1:] < 0.6).all() and (tail[1:] - tail[:-1] < 0).all()
    assert len(tail) == int((sigmas < 0.6).sum()) + 1


def test_an_exact_denoiser_lands_on_the_scene_from_any_noise_level():
    """Euler over the trailing sigmas with the true x0 as the denoiser recovers x0: the trajectory settings
    measure the model, not the integration."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1, torch.randn(2, 3, 8, 8, generator=g)
    for s in TRAJECTORY:
        out = sample_euler_flow(lambda x, sigma: x0, (1 - s) * x0 + s * eps, trailing_sigmas(flow_sigmas(20), s))
        torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)


def test_scores_use_each_scene_and_its_own_objects():
    model = ShapesWorldFlowModel()
    scores, pictures = trajectory_figures(model, n=4, seed=321, steps=4, cfg=4.0)
    assert list(scores) == ["clean", *(f"x0@{s}" for s in ONE_STEP), *(f"euler_from@{s}" for s in TRAJECTORY),
                            "from_noise"]
    images, _, scenes = ShapesWorld(seed=321, size=model.size).batch(4)
    sets = [[(o.colour, o.shape) for o in s.objects] for s in scenes]
    clean = object_scores(images, sets, load_classifier())
    assert scores["clean"]["shape_agreement"] == round(clean["shape_agreement"], 3)
    torch.testing.assert_close(pictures["clean"], images, atol=1e-6, rtol=0)
    # a low noise level keeps the scene close; a high one does not (the one-step predictions differ by sigma)
    err = {s: (pictures[f"x0@{s}"] - images).abs().mean() for s in ONE_STEP}
    assert err[0.2] < err[0.8]
    for pic in pictures.values():
        assert pic.shape == images.shape and pic.min() >= 0 and pic.max() <= 1


def test_word_sensitivity_is_zero_when_the_words_do_not_reach_the_model(monkeypatch):
    """Captions that encode alike move nothing (exactly 0); the real captions move both models' predictions, the
    colour word more than nothing. Both models are asked at the same signal-to-noise ratios."""
    from attention.shapesworld.flow_trajectory import SENSITIVITY, word_sensitivity
    from attention.shapesworld.model import ShapesWorldModel
    for model in (ShapesWorldFlowModel(), ShapesWorldModel()):
        real = word_sensitivity(model, n=2, seed=3)
        assert list(real) == [str(s) for s in SENSITIVITY]
        assert all(v["colour"] > 0.01 and v["shape"] > 0 for v in real.values())
        encode = model.encode
        monkeypatch.setattr(model, "encode", lambda prompts, enc=encode: enc([prompts[0]] * len(prompts)))
        blind = word_sensitivity(model, n=2, seed=3)
        assert all(v == {"shape": 0.0, "colour": 0.0} for v in blind.values())


def test_one_step_scores_of_the_flow_model_equal_its_trajectory_row_and_the_unet_draws_the_shapes():
    """one_step_scores asks a model the way trajectory_figures does (same scenes, same noise): on the flow model the
    two agree exactly; the UNet's column is the reference a shape-drawing denoiser gives at sigma 0.2."""
    model = ShapesWorldFlowModel()
    scores, _ = trajectory_figures(model, n=4, seed=321, steps=4, cfg=4.0)
    ours = one_step_scores(model, 4, 321)
    assert ours == {k: scores[k] for k in ours}
    unet = one_step_scores(ShapesWorldModel(), 4, 321)
    assert list(unet) == [f"x0@{s}" for s in ONE_STEP] and unet["x0@0.2"]["shape_agreement"] >= 0.8
    # the empty caption takes the words away: colours can then only come from the noisy image
    empty = one_step_scores(model, 4, 321, empty_caption=True)
    assert list(empty) == list(ours) and empty != ours
