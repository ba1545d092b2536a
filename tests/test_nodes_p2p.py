"""Tier 2: NullTextInvert and P2PEditSampler in ComfyUI (tiny SD1.5 and ShapesWorld)."""

import pytest
import torch
from comfy_env import (
    assert_same_samples,
    comfy_or_skip,
    encode,
    rel,
    sample,
    tiny_sdxl,
    tiny_sdxl_clip,
)

pack = comfy_or_skip()

import comfy.model_management as mm  # noqa: E402
from attention_lab.nodes.capture import AttentionCapture  # noqa: E402
from attention_lab.nodes.inversion import NullTextInvert  # noqa: E402
from attention_lab.nodes.p2p import P2PEditSampler  # noqa: E402
from attention_lab.nodes.shapesworld import load_shapesworld  # noqa: E402

SRC = "a cat and a dog in a garden"



def invert(model, clip, latent, mode="null-text", steps=4, prompt=SRC, **kw):
    args = dict(guidance=7.5, scheduler="simple", inner_steps=3, early_stop=1e-5)
    args.update(kw)
    with torch.inference_mode():
        return NullTextInvert.execute(model, clip, prompt, mode, steps, latent={"samples": latent}, **args).result


def p2p(model, clip, targets, latent, inversion=None, source=SRC, **kw):
    args = dict(edit="auto", seed=1, steps=4, cfg=7.5, scheduler="simple", cross_replace_steps=0.8,
                cross_replace_words="", self_replace_steps=0.4, reweight="", blend_words="", blend_threshold=0.3,
                blend_start=0.2)
    args.update(kw)
    with torch.inference_mode():
        return P2PEditSampler.execute(model, clip, source, "\n".join(targets), encode(clip, ""),
                                      {"samples": latent}, inversion=inversion, **args).result


def weights_are_pristine(model):
    """The UNet holds its own inference-mode weights again (autograd_safe swapped them for copies)."""
    return all(p.is_inference() for p in model.model.diffusion_model.parameters())


def test_equal_target_reproduces_the_source_which_is_the_plain_generation(sd):
    model, clip = sd
    before = repr(model.model_options)
    lat = torch.zeros(1, 4, 16, 16)
    out, mask = p2p(model, clip, [SRC, "a tiger and a dog in a garden"], lat)
    o = out["samples"]
    assert o.shape == (3, 4, 16, 16) and mask.shape == (2, 16, 16)
    with torch.inference_mode():
        plain = sample(model, encode(clip, SRC), encode(clip, ""), lat, cfg=7.5, sampler="euler", steps=4, seed=1,
                       scheduler="simple")
    assert_same_samples(o[0], plain[0])
    assert_same_samples(o[1], o[0])
    same = p2p(model, clip, ["a tiger and a dog in a garden"], lat, reweight="tiger:1")[0]["samples"]
    heavy = p2p(model, clip, ["a tiger and a dog in a garden"], lat, reweight="tiger:20")[0]["samples"]
    assert rel(same[1], o[2]) < 2e-6                               # reweight by 1 is a no-op
    assert rel(heavy[1], o[2]) > 2e-5, rel(heavy[1], o[2])         # a real factor is not (noise: 1e-6)
    assert repr(model.model_options) == before


def test_null_text_inversion_reconstructs_better_than_ddim_and_feeds_p2p(sd):
    model, clip = sd
    with torch.inference_mode():
        image = sample(model, encode(clip, SRC), encode(clip, ""), torch.zeros(1, 4, 16, 16), cfg=7.5,
                       sampler="euler", steps=4, seed=3, scheduler="simple")
    inv_d, rec_d = invert(model, clip, image, "ddim")
    inv_n, rec_n = invert(model, clip, image, "null-text")
    err_d = float(((rec_d["samples"] - image) ** 2).mean())
    err_n = float(((rec_n["samples"] - image) ** 2).mean())
    assert err_n < err_d, (err_n, err_d)
    assert inv_n.unet_backward > 0 and len(inv_n.nulls) == 4 and inv_d.nulls is None
    assert weights_are_pristine(model)
    out = p2p(model, clip, [SRC], image, inversion=inv_n)[0]["samples"]
    assert_same_samples(out[0], rec_n["samples"][0])  # P2P's source row is the reconstruction
    with pytest.raises(ValueError, match="inversion was made with the prompt"):
        p2p(model, clip, ["a tiger and a dog in a garden"], image, inversion=inv_n, source="a cat in a garden")


def test_interrupted_inversion_restores_the_weights(sd):
    model, clip = sd
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            invert(model, clip, torch.zeros(1, 4, 16, 16))
    finally:
        mm.interrupt_current_processing(False)
    assert weights_are_pristine(model)


def test_capture_records_the_inversion(sd):
    model, clip = sd
    with torch.inference_mode():
        m, store = AttentionCapture.execute(model, "all", True, 32, 0.0, 1.0).result
    invert(m, clip, torch.zeros(1, 4, 16, 16), "ddim")
    assert store.finished and not store.empty and len(store.steps_recorded) == 4


def test_bad_input_errors(sd):
    model, clip = sd
    lat = torch.zeros(1, 4, 16, 16)
    with pytest.raises(ValueError, match="target_prompts is empty"):
        p2p(model, clip, [], lat)
    with pytest.raises(ValueError, match="blend words \\['horse'\\] are in none of the prompts"):
        p2p(model, clip, ["a tiger and a dog in a garden"], lat, blend_words="horse")
    with pytest.raises(ValueError, match="same number of words"):
        p2p(model, clip, ["a tiger in a garden"], lat, edit="replace")
    with pytest.raises(ValueError, match="needs an image to invert"):
        with torch.inference_mode():
            NullTextInvert.execute(model, clip, SRC, "ddim", 4, 7.5, "simple", 3, 1e-5)


def test_shapesworld_swap_with_local_blend():
    model, clip, _ = load_shapesworld()
    src = "a red circle and a blue square on a gray background"
    tgt = "a red triangle and a blue square on a gray background"
    lat = torch.zeros(1, 3, 32, 32)
    out, mask = p2p(model, clip, [tgt], lat, source=src, steps=20, cfg=5.0, blend_words="circle, triangle")
    o = out["samples"]
    changed = (o[1] - o[0]).abs().amax(0) > 0.1
    assert changed.any() and mask.shape == (1, 32, 32)
    assert not (changed & (mask[0] < 0.5)).any()                  # nothing changed outside the blend mask


def test_sdxl_equal_target_inversion_and_reconstruction():
    with torch.inference_mode():
        model, clip = tiny_sdxl(), tiny_sdxl_clip()
    lat = torch.zeros(1, 4, 16, 16)
    o = p2p(model, clip, [SRC, "a tiger and a dog in a garden"], lat, blend_words="cat, tiger")[0]["samples"]
    assert o.shape == (3, 4, 16, 16) and torch.isfinite(o).all()
    assert rel(o[1], o[0]) < 2e-6
    inv_d, rec_d = invert(model, clip, o[:1], "ddim", steps=3)
    inv_n, rec_n = invert(model, clip, o[:1], "null-text", steps=3)
    err = [float(((r["samples"] - o[:1]) ** 2).mean()) for r in (rec_d, rec_n)]
    assert err[1] < err[0], err
    assert weights_are_pristine(model)


def test_inversion_step_count_and_token_count_errors(sd):
    model, clip = sd
    lat = torch.zeros(1, 4, 16, 16)
    inv, _ = invert(model, clip, lat, "ddim", steps=4)
    with pytest.raises(ValueError, match="made with 4 steps but steps is 6"):
        p2p(model, clip, [SRC], lat, inversion=inv, steps=6)
    with pytest.raises(ValueError, match="different token counts"):
        p2p(model, clip, ["a zxqvbnmkjh and a dog in a garden"], lat, edit="replace")
