"""Tier 2: PromptMixSampler (MnM) on DiT models: tiny random Flux and SD3 from ComfyUI's own classes, and
ShapesWorld-Flow (issue 29): the original row is plain sampling, equal prompts and an empty window reproduce it,
the proxy changes the image, non-square latents, variations independent of their batch neighbours, the input MODEL
left as it was."""

import pytest
import torch
from comfy_env import (
    assert_same_samples,
    comfy_or_skip,
    encode,
    rel,
    sample,
)

pack = comfy_or_skip()

from attention_lab.attention.shapesworld.flow_model import DEFAULT_FLOW_WEIGHTS  # noqa: E402
from attention_lab.attention.shapesworld.harness import psnr  # noqa: E402
from attention_lab.nodes.capture import AttentionCapture  # noqa: E402
from attention_lab.nodes.cluster import SelfAttnCluster  # noqa: E402
from attention_lab.nodes.prompt_mix import PromptMixSampler  # noqa: E402
from attention_lab.nodes.shapesworld_flow import load_shapesworld_flow  # noqa: E402

PROMPT = "a photo of a cat and a dog in a garden"
SW_PROMPT = "a red circle and a blue square on a gray background"


def run(model, clip, prompt, latent, obj, proxies, keep, negative="", **kw):
    args = dict(suggestions=2, seed=3, steps=6, cfg=1.0, scheduler="simple", mix_start=0.0, mix_end=0.5,
                self_injection_end=0.8, injection_threshold=0.05, blend_at=0.7, clusters=3, cluster_threshold=0.3)
    args.update(kw)
    with torch.inference_mode():
        return PromptMixSampler.execute(model, clip, prompt, encode(clip, negative), {"samples": latent}, obj,
                                        proxies, preserve_words=keep, **args).result


def plain(model, clip, prompt, latent, cfg=1.0, negative="", steps=6):
    with torch.inference_mode():
        return sample(model, encode(clip, prompt), encode(clip, negative), latent, cfg=cfg, sampler="euler",
                      steps=steps, seed=3, scheduler="simple")


def test_flux_original_row_equal_prompts_and_empty_window(flux):
    """Guidance-distilled Flux at cfg 1 on a non-square 4x6 token grid."""
    model, clip = flux
    before = repr(model.model_options)
    lat = torch.zeros(1, 16, 8, 12)
    latents, masks, proxies = run(model, clip, PROMPT, lat, "cat", "cat, horse", "dog")
    out = latents["samples"]
    assert out.shape == (3, 16, 8, 12) and masks.shape == (2, 8, 12) and proxies == "cat, horse"
    assert_same_samples(out[0], plain(model, clip, PROMPT, lat)[0])     # the original row is plain sampling
    assert rel(out[1], out[0]) < 2e-6                                  # proxy == object word
    assert repr(model.model_options) == before                         # the input MODEL stays unpatched
    # no mixing window: the variation rows (conditioned on their proxy prompts) attend exactly as the original
    empty = run(model, clip, PROMPT, lat, "cat", "horse, bird", "dog", mix_start=0.5, mix_end=0.5)[0]["samples"]
    for b in (1, 2):
        assert rel(empty[b], empty[0]) < 2e-6
    # the window's proxy values change the image (no blend: on random weights the clusters may all be background,
    # and after the blend and the window a variation would then follow the original exactly)
    # The random model barely listens to its prompt: the yardstick is the change of switching the whole prompt.
    mixed = run(model, clip, PROMPT, lat, "cat", "cat, horse", "dog", blend_at=1.0)[0]["samples"]
    switched = rel(plain(model, clip, PROMPT.replace("cat", "horse"), lat)[0], out[0])
    assert rel(mixed[1], mixed[0]) < 2e-6 and rel(mixed[2], mixed[0]) > 0.1 * switched > 0


def test_flux_variations_do_not_depend_on_their_batch_neighbours(flux):
    model, clip = flux
    lat = torch.zeros(1, 16, 8, 8)
    kw = dict(blend_at=1.0, self_injection_end=0.0)                   # no blend: rows only meet through item 0
    two = run(model, clip, PROMPT, lat, "cat", "horse, bird", "", **kw)[0]["samples"]
    one = run(model, clip, PROMPT, lat, "cat", "bird", "", **kw)[0]["samples"]
    assert rel(two[2], one[1]) < 1e-7 < rel(two[1], two[2])


def test_flux_self_injection_acts_on_preserved_pixels(flux):
    model, clip = flux
    lat = torch.zeros(1, 16, 8, 8)
    kw = dict(blend_at=1.0, injection_threshold=0.6)                   # at 0.6 some pixels of "dog" are not "cat"
    off = run(model, clip, PROMPT, lat, "cat", "horse", "dog", self_injection_end=0.0, **kw)[0]["samples"]
    on = run(model, clip, PROMPT, lat, "cat", "horse", "dog", self_injection_end=1.0, **kw)[0]["samples"]
    assert torch.equal(on[0], off[0]) and not torch.equal(on[1], off[1])   # (its formula: tier 1)


def test_sd3_with_cfg(sd3):
    model, clip = sd3
    lat = torch.zeros(1, 16, 12, 8)
    out = run(model, clip, PROMPT, lat, "cat", "cat, horse", "dog", cfg=4.0, negative="blurry",
              blend_at=1.0)[0]["samples"]
    assert_same_samples(out[0], plain(model, clip, PROMPT, lat, cfg=4.0, negative="blurry")[0])
    switched = rel(plain(model, clip, PROMPT.replace("cat", "horse"), lat, cfg=4.0, negative="blurry")[0], out[0])
    assert rel(out[1], out[0]) < 2e-6 and rel(out[2], out[0]) > 0.1 * switched > 0
    empty = run(model, clip, PROMPT, lat, "cat", "horse", "dog", cfg=4.0, negative="blurry", mix_start=0.5,
                mix_end=0.5)[0]["samples"]
    assert rel(empty[1], empty[0]) < 2e-6


def test_dit_refuses_an_inversion(flux):
    model, clip = flux

    class Inv:
        mode, prompt = "ddim", PROMPT
    with pytest.raises(ValueError, match="not supported on Flux/SD3"):
        run(model, clip, PROMPT, torch.zeros(1, 16, 8, 8), "cat", "horse", "", inversion=Inv())


@pytest.mark.skipif(not DEFAULT_FLOW_WEIGHTS.is_file(), reason="no shipped ShapesWorld-Flow weights")
def test_shapesworld_flow_variation_changes_the_object_and_keeps_the_rest():
    model, clip, _ = load_shapesworld_flow()
    lat = torch.zeros(1, 3, 32, 32)                                    # ShapesWorld-Flow samples pixels
    kw = dict(steps=20, cfg=4.0, mix_start=0.0, mix_end=0.5, clusters=5)
    latents, masks, _ = run(model, clip, SW_PROMPT, lat, "circle", "circle, triangle", "square", **kw)
    out = latents["samples"]
    # the original row of a 3-row batch against a 1-row run: float sums in another order, 20 steps at cfg 4
    assert rel(out[0], plain(model, clip, SW_PROMPT, lat, cfg=4.0, steps=20)[0]) < 1e-4
    assert rel(out[1], out[0]) < 2e-6
    img = ((out + 1) / 2).clamp(0, 1)
    changed = psnr(img[2], img[0])
    outside = masks[1] < 0.5
    kept = psnr(img[2], img[0], outside) if bool(outside.any()) else float("inf")
    assert changed < 35 and kept > changed, (changed, kept)           # the object changed, the rest less


def test_dit_refuses_a_grid_above_the_kept_self_attention(flux):
    model, clip = flux
    with pytest.raises(ValueError, match=r"the image is 33x32 = 1056 tokens, above the 1024"):
        run(model, clip, PROMPT, torch.zeros(1, 16, 66, 64), "cat", "horse", "")


def test_self_attention_cluster_on_sd3(sd3):
    """SelfAttnCluster on SD3's joint attention (its image->image part clustered, labelled by image->text maps),
    non-square, the second item of a batch of two (Flux: tests/test_nodes_dit.py)."""
    model, clip = sd3
    with torch.inference_mode():
        m, store = AttentionCapture.execute(model, layers="all", capture_self=True, self_max_size=32, start=0.0,
                                            end=1.0).result
        out = sample(m, encode(clip, PROMPT), encode(clip, ""), torch.zeros(2, 16, 12, 8), cfg=4.0, steps=3,
                     seed=3, scheduler="simple")
        masks, bg, pic = SelfAttnCluster.execute(store, clip, PROMPT, "cat, dog", clusters=3, threshold=0.3,
                                                 self_resolution=32, cross_resolution=16, seed=1, batch_index=1,
                                                 samples={"samples": out}).result
    assert masks.shape == (2, 12, 8) and pic.shape == (1, 12, 8, 3)
    assert torch.equal(masks.sum(0).clamp(max=1) + bg[0], torch.ones(12, 8))   # every pixel: a word or background
