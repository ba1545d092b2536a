"""Tier 2: PromptMixSampler in ComfyUI, on the tiny SD1.5 model and on ShapesWorld."""

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

from attention_lab.attention.shapesworld.harness import colour_blobs, load_classifier, psnr  # noqa: E402
from attention_lab.nodes.prompt_mix import PromptMixSampler  # noqa: E402
from attention_lab.nodes.shapesworld import load_shapesworld  # noqa: E402

SD_PROMPT = "a cat and a dog in a garden"
SW_PROMPT = "a red circle and a blue square on a gray background"


def run(model, clip, prompt, latent, obj, proxies, keep, **kw):
    args = dict(suggestions=2, seed=3, steps=6, cfg=7.5, scheduler="simple", mix_start=0.14, mix_end=0.34,
                self_injection_end=0.8, injection_threshold=0.05, blend_at=0.7, clusters=5, cluster_threshold=0.3)
    args.update(kw)
    with torch.inference_mode():
        return PromptMixSampler.execute(model, clip, prompt, encode(clip, ""), {"samples": latent}, obj, proxies,
                                        preserve_words=keep, **args).result



def test_original_row_is_the_plain_generation_and_proxy_equal_to_object_is_a_no_op(sd):
    model, clip = sd
    before = repr(model.model_options)
    lat = torch.zeros(1, 4, 16, 16)
    latents, masks, proxies = run(model, clip, SD_PROMPT, lat, "cat", "cat, dog", "dog")
    out = latents["samples"]
    assert out.shape == (3, 4, 16, 16) and masks.shape == (2, 16, 16) and proxies == "cat, dog"
    with torch.inference_mode():
        plain = sample(model, encode(clip, SD_PROMPT), encode(clip, ""), lat, cfg=7.5, sampler="euler", steps=6,
                       seed=3, scheduler="simple")
    assert_same_samples(out[0], plain[0])                         # the original row is untouched
    assert rel(out[1], out[0]) < 2e-6                            # proxy == object word
    assert repr(model.model_options) == before                   # the input MODEL stays unpatched


def test_empty_window_changes_nothing_even_with_localization(sd):
    model, clip = sd
    out = run(model, clip, SD_PROMPT, torch.zeros(1, 4, 16, 16), "cat", "dog, bird", "dog",
              mix_start=0.5, mix_end=0.5)[0]["samples"]
    for b in (1, 2):
        assert rel(out[b], out[0]) < 2e-6


def test_bad_input_gets_specific_errors(sd):
    model, clip = sd
    lat = torch.zeros(1, 4, 16, 16)
    with pytest.raises(ValueError, match="'horse' is not in the prompt"):
        run(model, clip, SD_PROMPT, lat, "horse", "dog", "")
    with pytest.raises(ValueError, match="same token count"):
        run(model, clip, SD_PROMPT, lat, "cat", "zxqvbnmkjh", "")
    with pytest.raises(ValueError, match="more than the 16 pixels"):
        run(model, clip, SD_PROMPT, torch.zeros(1, 4, 4, 4), "cat", "dog", "", clusters=20)
    assert "mix_start (0.6) is above mix_end (0.2)" in PromptMixSampler.validate_inputs(mix_start=0.6, mix_end=0.2)


def test_shapesworld_variations_take_the_proxy_shape_and_keep_the_rest():
    model, clip, _ = load_shapesworld()
    clf = load_classifier()
    lat = torch.zeros(1, 3, 32, 32)
    hits, psnrs = 0, []
    for seed in range(2):
        latents, masks, _ = run(model, clip, SW_PROMPT, lat, "circle", "triangle, star", "square", seed=seed,
                                steps=25, cfg=5.0, mix_start=0.34, mix_end=1.0, self_injection_end=1.0)
        images = ((latents["samples"] + 1) / 2).clamp(0, 1)
        for j, proxy in enumerate(("triangle", "star")):
            img = images[1 + j]
            blobs = colour_blobs(img, "red")
            if blobs:
                hits += clf.predict(img[None], blobs[0][None])[0][0] == proxy
            psnrs.append(psnr(img, images[0], masks[j] < 0.5))
    assert hits >= 3, hits                                        # of 4 variations
    assert min(psnrs) > 30, psnrs                                 # outside the blended foreground


def test_proxy_suggestion_from_the_vocabulary():
    model, clip, _ = load_shapesworld()
    _, _, proxies = run(model, clip, SW_PROMPT, torch.zeros(1, 3, 32, 32), "circle", "", "square",
                        suggestions=3, steps=4, cfg=5.0)
    words = proxies.split(", ")
    assert len(words) == 3 and "circle" not in words and len(set(words)) == 3


def test_sdxl_proxy_equal_to_object_is_a_no_op():
    with torch.inference_mode():
        model, clip = tiny_sdxl(), tiny_sdxl_clip()
    out = run(model, clip, SD_PROMPT, torch.zeros(1, 4, 16, 16), "cat", "cat, dog", "dog")[0]["samples"]
    assert out.shape == (3, 4, 16, 16) and rel(out[1], out[0]) < 2e-6


def test_shapesworld_mixing_from_an_inversion():
    from attention_lab.nodes.inversion import NullTextInvert
    model, clip, _ = load_shapesworld()
    with torch.inference_mode():
        image = sample(model, encode(clip, SW_PROMPT), encode(clip, ""), torch.zeros(1, 3, 32, 32), cfg=5.0,
                       sampler="euler", steps=20, seed=4, scheduler="simple")
        inv, rec = NullTextInvert.execute(model, clip, SW_PROMPT, "negative-prompt", 20, 5.0, "simple", 10, 1e-5,
                                          latent={"samples": image}).result
    out = run(model, clip, SW_PROMPT, torch.zeros(1, 3, 32, 32), "circle", "circle, triangle", "square",
              mix_start=0.34, mix_end=1.0, self_injection_end=1.0, inversion=inv)[0]["samples"]
    assert_same_samples(out[0], rec["samples"][0])                 # the original row reconstructs the image
    assert_same_samples(out[1], out[0])                            # proxy == object word
    assert (out[2] - out[0]).abs().max() > 0.3                     # the triangle proxy changes the object
    with pytest.raises(ValueError, match="inversion was made with the prompt"):
        run(model, clip, "a red circle on a gray background", torch.zeros(1, 3, 32, 32), "circle", "star", "",
            inversion=inv)
