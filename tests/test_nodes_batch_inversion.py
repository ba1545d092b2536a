"""Tier 2: NullTextInvert on a LATENT batch inverts every image, and each image's inversion equals that image
inverted alone (tiny SD1.5 and tiny Flux in ComfyUI).

Tolerance: modes that run the batch through the model together (ddim, negative-prompt, direct, rf-euler, fireflow)
compute the same rows in another float order (batched matrix products), so they agree to ``SAME_SAMPLES`` (1e-5 of
the latent's scale, SD1.5 UNet) or ``FLOW_SAME`` (1e-4, the tiny Flux, whose attention over 5 steps gave 1.6e-5);
direct's offsets are compared at the latent's scale (they are ~1e-3 of it); null-text runs one image after
another, so it is bitwise equal. P2P Edit Sampler edits every image of a batch inversion from its own inversion:
its rows equal the edit of the image alone; Prompt Mix Sampler refuses a batch, naming the fix.
"""

import pytest
import torch
from comfy_env import SAME_SAMPLES, assert_same_samples, comfy_or_skip, encode, rel, sample, tiny_flux, tiny_flux_clip

pack = comfy_or_skip()

from attention_lab.nodes.inversion import NullTextInvert, sample_from_inversion  # noqa: E402
from attention_lab.nodes.p2p import P2PEditSampler  # noqa: E402

SRC = "a cat and a dog in a garden"
STEPS = 4
NULL_TEXT_REC = 1e-2     # null-text at 4 steps, 3 Adam steps each, reconstructs to 2.7e-3 of the scale (measured)
FLOW_SAME = 1e-4         # Flux's batched attention over 5 steps: 1.6e-5 of the scale measured (one image: 0)


def invert(model, clip, latent, mode, steps=STEPS, prompt=SRC, guidance=7.5, scheduler="simple", **kw):
    with torch.inference_mode():
        return NullTextInvert.execute(model, clip, prompt, mode, steps, guidance, scheduler, 3, 1e-5,
                                      latent={"samples": latent}, **kw).result


@pytest.fixture(scope="module")
def images(sd):
    """Two different SD1.5 'images' (4, 16, 16 latents sampled from two seeds), as one LATENT batch."""
    model, clip = sd
    with torch.inference_mode():
        return torch.cat([sample(model, encode(clip, SRC), encode(clip, ""), torch.zeros(1, 4, 16, 16), cfg=7.5,
                                 steps=4, seed=s, scheduler="simple") for s in (3, 8)])


def same(a, b, tol):
    """Bitwise equal (tol 0: the same computation), else equal to ``tol`` of ``b``'s scale."""
    if tol == 0.0:
        assert torch.equal(a, b), rel(a, b)
    else:
        assert_same_samples(a, b, tol)


def assert_item_equals_alone(inv, rec, alone_inv, alone_rec, k, tol):
    one = inv.item(k)
    assert len(one.trajectory) == len(alone_inv.trajectory)
    for a, b in zip(one.trajectory, alone_inv.trajectory):
        same(a, b, tol)
    scale = {"nulls": None, "offsets": float(alone_inv.trajectory[-1].abs().max())}   # offsets: of the latent's
    for name in ("nulls", "offsets"):                                                  # scale (they are ~1e-3 of it)
        got, want = getattr(one, name), getattr(alone_inv, name)
        assert (got is None) == (want is None), name
        for a, b in zip(got or [], want or []):
            r = float((a - b).abs().max() / (scale[name] or b.abs().max()))
            assert a.shape == b.shape and r <= tol, (name, r)
    same(rec["samples"][k:k + 1], alone_rec["samples"], tol)
    assert one.unet_forward == alone_inv.unet_forward and one.unet_backward == alone_inv.unet_backward


@pytest.mark.parametrize("mode,tol", [("ddim", SAME_SAMPLES), ("negative-prompt", SAME_SAMPLES),
                                      ("direct", SAME_SAMPLES), ("null-text", 0.0)])
def test_each_image_of_a_batch_is_that_image_inverted_alone(sd, images, mode, tol):
    model, clip = sd
    inv, rec = invert(model, clip, images, mode)
    assert inv.items == 2 and rec["samples"].shape == images.shape
    assert rel(inv.x_T[0], inv.x_T[1]) > 0.05                 # two images, two different inversions
    for k in range(2):
        alone_inv, alone_rec = invert(model, clip, images[k:k + 1], mode)
        assert_item_equals_alone(inv, rec, alone_inv, alone_rec, k, tol)
        if tol == 0.0:
            assert all(torch.equal(a, b) for a, b in zip(inv.item(k).nulls, alone_inv.nulls))
    if mode in ("direct", "null-text"):                       # these reconstruct each image
        for k in range(2):
            assert_same_samples(rec["samples"][k], images[k], NULL_TEXT_REC if mode == "null-text" else SAME_SAMPLES)
        assert len(inv.extra["reconstruction_mse_items"]) == 2


def test_null_text_keep_best_batch_is_image_by_image(sd, images):
    model, clip = sd
    inv, rec = invert(model, clip, images, "null-text", keep_best_null=True)
    alone_inv, alone_rec = invert(model, clip, images[1:2], "null-text", keep_best_null=True)
    assert_item_equals_alone(inv, rec, alone_inv, alone_rec, 1, 0.0)
    assert inv.unet_forward == sum(f for f, _ in inv.extra["counts_items"])


@pytest.mark.parametrize("mode", ["rf-euler", "fireflow"])
def test_flow_batch_items_equal_alone(mode):
    with torch.inference_mode():
        model, clip = tiny_flux(), tiny_flux_clip()
    g = torch.Generator().manual_seed(2)
    latent = torch.nn.functional.interpolate(torch.randn(2, 16, 2, 3, generator=g), size=(8, 12), mode="bilinear")
    with torch.inference_mode():
        inv, rec = NullTextInvert.execute(model, clip, SRC, mode, 5, 1.0, "simple", 3, 1e-5,
                                          latent={"samples": latent}).result
        for k in range(2):
            alone_inv, alone_rec = NullTextInvert.execute(model, clip, SRC, mode, 5, 1.0, "simple", 3, 1e-5,
                                                          latent={"samples": latent[k:k + 1]}).result
            assert_item_equals_alone(inv, rec, alone_inv, alone_rec, k, FLOW_SAME)


def p2p(model, clip, targets, latent, inversion, **kw):
    args = dict(edit="auto", seed=1, steps=STEPS, cfg=7.5, scheduler="simple", cross_replace_steps=0.8,
                cross_replace_words="", self_replace_steps=0.4, reweight="", blend_words="", blend_threshold=0.3,
                blend_start=0.2)
    args.update(kw)
    with torch.inference_mode():
        return P2PEditSampler.execute(model, clip, SRC, "\n".join(targets), encode(clip, ""),
                                      {"samples": latent}, inversion=inversion, **args).result


@pytest.mark.parametrize("mode", ["direct", "null-text"])
def test_p2p_edits_each_image_from_its_own_inversion(sd, images, mode):
    """A batch of 2 inversions, 2 edits with LocalBlend: rows [source, edit, edit] per image, each equal to the
    edit of that image's inversion made alone; the blend masks are each image's own."""
    model, clip = sd
    targets = ["a tiger and a dog in a garden", "a cat and a fox in a garden"]
    blend = dict(blend_words="cat, tiger, dog, fox", blend_start=0.0)
    inv, _ = invert(model, clip, images, mode)
    out, mask = p2p(model, clip, targets, images, inv, **blend)
    assert out["samples"].shape == (6, 4, 16, 16) and mask.shape == (4, 16, 16)
    tol = SAME_SAMPLES if mode == "direct" else 0.0
    for k in range(2):
        alone_inv, _ = invert(model, clip, images[k:k + 1], mode)
        a_out, a_mask = p2p(model, clip, targets, images[k:k + 1], alone_inv, **blend)
        assert_same_samples(out["samples"][3 * k:3 * k + 3], a_out["samples"], max(tol, SAME_SAMPLES))
        assert torch.equal(mask[2 * k:2 * k + 2], a_mask)
    assert_same_samples(out["samples"][3], images[1], NULL_TEXT_REC if mode == "null-text" else SAME_SAMPLES)


def test_a_batch_inversion_is_refused_where_one_image_is_edited(sd, images):
    model, _ = sd
    inv, _ = invert(model, sd[1], images, "ddim")
    with pytest.raises(ValueError, match=r"holds 2 images.*Latent From Batch"):
        sample_from_inversion(model, inv, [], [], torch.zeros(1, 77, 8), 1, label="PromptMixSampler")
