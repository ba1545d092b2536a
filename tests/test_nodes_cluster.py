"""Tier 2: SelfAttnCluster in ComfyUI, on the tiny SD1.5 model and on ShapesWorld."""

import pytest
import torch
from comfy_env import comfy_or_skip, encode, sample, tiny_clip, tiny_sd15

pack = comfy_or_skip()

from attention_lab.attention.shapesworld.harness import colour_blobs, mask_iou  # noqa: E402
from attention_lab.nodes.capture import AttentionCapture  # noqa: E402
from attention_lab.nodes.cluster import SelfAttnCluster  # noqa: E402
from attention_lab.nodes.shapesworld import load_shapesworld  # noqa: E402


def captured(model, clip, prompt, latent, **kw):
    with torch.inference_mode():
        m, store = AttentionCapture.execute(model, "all", True, 32, 0.0, 1.0).result
        out = sample(m, encode(clip, prompt), encode(clip, ""), latent, **kw)
    return store, out


def cluster(store, clip, prompt, words, latent, **kw):
    args = dict(clusters=5, threshold=0.3, self_resolution=32, cross_resolution=16, seed=1, batch_index=0,
                image=None)
    args.update(kw)
    with torch.inference_mode():
        return SelfAttnCluster.execute(store, clip, prompt, words, {"samples": latent}, **args).result


def test_sd15_shapes_determinism_and_errors():
    model, clip = tiny_sd15(), tiny_clip()
    lat = torch.zeros(1, 4, 16, 16)
    prompt = "a cat and a dog in a garden"
    store, lat = captured(model, clip, prompt, lat)            # the sampler's LATENT goes to 'samples'
    masks, bg, pic = cluster(store, clip, prompt, "cat, dog", lat)
    assert masks.shape == (2, 16, 16) and bg.shape == (1, 16, 16) and pic.shape == (1, 16, 16, 3)
    assert torch.all((masks.sum(0) + bg[0]) == 1)  # every pixel is one word's or background
    again = cluster(store, clip, prompt, "cat, dog", lat)
    assert torch.equal(masks, again[0]) and torch.equal(bg, again[1])
    with pytest.raises(ValueError, match="more than the 256 pixels"):
        cluster(store, clip, prompt, "cat", lat, clusters=300, self_resolution=16)
    with pytest.raises(ValueError, match="'horse' is not in the prompt"):
        cluster(store, clip, prompt, "horse", lat)


def test_shapesworld_masks_find_the_objects():
    model, clip, vae = load_shapesworld()
    prompt = "a red circle and a blue square on a white background"
    lat = torch.zeros(1, 3, 32, 32)
    hits = 0
    for seed in range(4):
        store, out = captured(model, clip, prompt, lat, cfg=5.0, steps=20, sampler="euler", scheduler="simple",
                              seed=seed)
        image = ((out[0] + 1) / 2).clamp(0, 1)
        masks, bg, _ = cluster(store, clip, prompt, "circle, square", out, clusters=4, threshold=0.3)
        for mask, colour in zip(masks, ("red", "blue")):
            blobs = colour_blobs(image, colour)
            if blobs:
                hits += mask_iou(mask, blobs[0]) > 0.3
    assert hits >= 5, hits  # of 8 (object, seed) pairs
