"""Tier 2: DPL Token Optimizer on a LATENT batch optimizes every image, each exactly as it would alone (its own
recorder, tokens, nulls and reconstruction), and P2P Edit Sampler edits each image of the batch inversion with that
image's learned tokens: equal to editing the image's own inversion."""

import pytest
import torch
from comfy_env import comfy_or_skip, encode, sample, tiny_clip, tiny_sd15

pack = comfy_or_skip()

from attention_lab.nodes.dpl import DPLTokenOptimizer  # noqa: E402
from attention_lab.nodes.p2p import P2PEditSampler  # noqa: E402

SRC = "a cat and a dog in a garden"
EDIT = "a cat and a tiger in a garden"


@pytest.fixture(scope="module")
def sd():
    with torch.inference_mode():
        model, clip = tiny_sd15(), tiny_clip()
        images = torch.cat([sample(model, encode(clip, SRC), encode(clip, ""), torch.zeros(1, 4, 16, 16), cfg=7.5,
                                   sampler="euler", steps=4, seed=seed, scheduler="simple") for seed in (3, 4)])
    return model, clip, images


def dpl(model, clip, latent, background=None):
    with torch.inference_mode():
        return DPLTokenOptimizer.execute(model, clip, {"samples": latent}, SRC, "cat, dog", 4, 7.5, "simple", 1.0,
                                         0.05, 0.05, "25, 50, 25", "0.3, 0.7, 0.9", 3, 1e-2, 3, 0.0, 0,
                                         background=background).result


def p2p(model, clip, latent, inversion):
    with torch.inference_mode():
        return P2PEditSampler.execute(model, clip, SRC, EDIT, encode(clip, ""), {"samples": latent}, "auto", 1, 4,
                                      7.5, "simple", 0.8, "", 0.4, "", "cat, tiger", 0.3, 0.2,
                                      inversion=inversion).result


def test_each_image_of_a_batch_is_optimized_as_alone(sd):
    model, clip, images = sd
    bg = torch.zeros(2, 128, 128)
    bg[0, :, 64:] = 1
    bg[1, 64:] = 1                                   # each image its own background mask
    inv, rec, maps = dpl(model, clip, images, bg)
    assert inv.items == 2 and rec["samples"].shape == images.shape and maps.shape[0] == 2
    for k in range(2):
        one, rec_one, maps_one = dpl(model, clip, images[k:k + 1], bg[k:k + 1])
        mine = inv.item(k)
        assert all(torch.equal(a, b) for a, b in zip(mine.trajectory, one.trajectory))
        assert all(torch.equal(a, b) for a, b in zip(mine.nulls, one.nulls)) and torch.equal(mine.cond, one.cond)
        assert all(torch.equal(a, b) for sa, sb in zip(mine.extra["dpl"].values, one.extra["dpl"].values)
                   for a, b in zip(sa, sb))
        assert all(torch.equal(a, b) for a, b in zip(mine.extra["conds"], one.extra["conds"]))
        assert mine.extra["token_updates"] == one.extra["token_updates"] > 0
        assert (mine.unet_forward, mine.unet_backward) == (one.unet_forward, one.unet_backward)
        assert torch.equal(rec["samples"][k:k + 1], rec_one["samples"]) and torch.equal(maps[k:k + 1], maps_one)
    # the two images learned different tokens: the batch is not the first image twice
    assert not torch.equal(inv.item(0).extra["dpl"].values[0][0], inv.item(1).extra["dpl"].values[0][0])

    # P2P edits each image from its own inversion and learned tokens: equal to editing that inversion alone
    out, masks = p2p(model, clip, images, inv)
    assert out["samples"].shape[0] == 4 and masks.shape[0] == 2
    for k in range(2):
        alone, mask_alone = p2p(model, clip, images[k:k + 1], inv.item(k))
        assert torch.equal(out["samples"][2 * k:2 * k + 2], alone["samples"])
        assert torch.equal(masks[k:k + 1], mask_alone)


def test_a_background_batch_of_another_size_is_refused(sd):
    model, clip, images = sd
    with pytest.raises(ValueError, match="'background' holds 3 masks for a LATENT of 2 images; give one mask per "
                                         r"image \(2\) or one for all"):
        dpl(model, clip, images, torch.zeros(3, 128, 128))
