"""Tier 2: AttentionCapture / AttentionMapView / SelfAttnCluster on tiny random Flux and SD3 models built from
ComfyUI's own classes (comfy/ldm/flux, mmdit.py) with ComfyUI's text encoders and bundled tokenizers (issue 28)."""

import copy

import pytest
import torch
from comfy_env import (
    comfy_or_skip,
    encode,
    rel,
    sample,
    tiny_flux,
    tiny_flux_clip,
    tiny_sd3,
    tiny_sd3_clip,
)

pack = comfy_or_skip()

from attention_lab.attention.layers import LayerId  # noqa: E402
from attention_lab.nodes.capture import AttentionCapture, AttentionMapView  # noqa: E402
from attention_lab.nodes.cluster import SelfAttnCluster  # noqa: E402
from attention_lab.nodes.common import UnsupportedModelError, model_layer_ids, word_positions  # noqa: E402

PROMPT = "a photo of a Cat riding a (red bicycle:1.2) under the sky"
WORDS = "a, photo, of, cat, riding, red, bicycle, under, the, sky"


def assert_bit_identical(a, b):
    """Capture only reads: the model's own kernel runs on the q, k, v it was handed, so the samples are the same
    bits (issue 28), not merely close."""
    assert torch.equal(a, b), f"samples differ by {rel(a, b):.2e} of their scale"


@pytest.fixture(scope="module")
def flux():
    return tiny_flux(guidance_embed=True), tiny_flux_clip()


@pytest.fixture(scope="module")
def sd3():
    return tiny_sd3(), tiny_sd3_clip()


def capture(model, **kw):
    args = dict(layers="all", capture_self=True, self_max_size=32, start=0.0, end=1.0)
    args.update(kw)
    with torch.inference_mode():
        return AttentionCapture.execute(model, **args).result


def latent(b=1, h=8, w=12):
    return torch.zeros(b, 16, h, w)     # a non-square image: a 4x6 token grid


def go(model, clip, prompt=PROMPT, lat=None, cfg=1.0, steps=3, negative=""):
    with torch.inference_mode():
        return sample(model, encode(clip, prompt), encode(clip, negative), latent() if lat is None else lat, cfg=cfg,
                      steps=steps, sampler="euler", scheduler="simple")


def view(store, clip, prompt, words, **kw):
    args = dict(resolution="all", threshold=0.5, batch_index=0, tile_size=32, image=None,
                samples={"samples": store.run_output})
    args.update(kw)
    with torch.inference_mode():
        return AttentionMapView.execute(store, clip, prompt, words, **args)


def test_flux_capture_is_bit_identical_and_maps_every_word(flux):
    model, clip = flux
    before = copy.deepcopy(model.model_options)
    ref = go(model, clip)                                          # guidance-distilled, cfg 1: no negative pass
    m, store = capture(model)
    assert_bit_identical(go(m, clip), ref)
    assert model.model_options == before
    ids = {LayerId("double", i, 0) for i in range(2)} | {LayerId("single", i, 0) for i in range(2)}
    assert ids == {i.layer for i in store.layers(cross=True)} == {i.layer for i in store.layers(cross=False)}
    keys = store.layer_map(LayerId("double", 0, 0)).shape[-1]
    assert keys == encode(clip, PROMPT)[0][0].shape[1]             # the T5 context, padded to 256
    assert {(i.height, i.width) for i in store.layers()} == {(4, 6)}
    assert store.steps_recorded == {0, 1, 2}
    heat, over, masks = view(store, clip, PROMPT, WORDS).result
    assert masks.shape == (10, 32, 32) and bool((masks.flatten(1).sum(1) > 0).all())
    for lid in ids:                                                # rows: a share of the joint softmax
        s = store.layer_map(lid).sum(-1) + store.layer_map(lid, False).sum(-1)
        assert bool((s <= 1 + 1e-4).all()) and bool((s > 0.5).all())


def test_flux_t5_words_case_emphasis_long_prompts_and_unknown_words(flux):
    model, clip = flux
    names, pos = word_positions(clip, PROMPT, "cat, CAT, red bicycle, sky")
    assert pos[0] == pos[1] and len(pos[2]) >= 2 and all(p < 256 for p in pos[3])
    with pytest.raises(ValueError, match=r"'horse'.*\['a', 'photo', 'of', 'a', 'Cat'"):
        word_positions(clip, PROMPT, "horse")
    long = " ".join(["a quiet street with old houses and tall trees"] * 30) + " and a giraffe"
    _, (g,) = word_positions(clip, long, "giraffe")
    m, store = capture(model)
    go(m, clip, long)
    keys = store.layer_map(LayerId("single", 1, 0)).shape[-1]
    assert keys > 256 and max(g) < keys and min(g) > 256          # beyond T5's 256-token minimum
    heat, over, masks = view(store, clip, long, "giraffe, street").result
    assert masks.shape[0] == 2


def test_batch_items_are_independent_with_cfg(flux):
    """Schnell's layout (no guidance embedding) at cfg 3: the negative rows are not recorded, and item 0 of a
    batch of two has the maps item 0 has alone (same noise)."""
    model, clip = tiny_flux(guidance_embed=False), flux[1]
    m, store = capture(model)
    ref2 = go(model, clip, lat=latent(2), cfg=3.0)
    assert_bit_identical(go(m, clip, lat=latent(2), cfg=3.0), ref2)
    two = {i.layer: store.layer_map(i.layer).clone() for i in store.layers()}
    go(m, clip, lat=latent(1), cfg=3.0)
    for lid, a in two.items():
        assert a.shape[0] == 2 and rel(store.layer_map(lid)[0], a[0]) < 1e-5
        assert rel(a[0], a[1]) > 1e-4                              # the two items differ


def test_another_override_still_applies_on_flux(flux):
    model, clip = flux
    calls = []

    def with_scale(m):
        m = m.clone()
        to = m.model_options["transformer_options"]
        found = to.get("optimized_attention_override")

        def scale(func, *args, **kwargs):
            calls.append(1)
            return (found(func, *args, **kwargs) if found else func(*args, **kwargs)) * 0.95
        to["optimized_attention_override"] = scale
        return m
    theirs = go(with_scale(model), clip)
    assert rel(theirs, go(model, clip)) > 1e-4
    for m, store in (capture(with_scale(model)), ):
        assert_bit_identical(go(m, clip), theirs)
        assert len(store.layers()) == 4
    m, store = capture(model)
    calls.clear()
    assert_bit_identical(go(with_scale(m), clip), theirs)
    assert calls and len(store.layers()) == 4


def test_concept_attention_maps_on_flux(flux):
    model, clip = flux
    ref = go(model, clip)
    m, store = capture(model, concepts="cat, bicycle, sky", clip=clip, layers="double")
    assert_bit_identical(go(m, clip), ref)
    for info in store.layers("concept"):
        a = store.layer_map(info.layer, "concept")                # (items, N, C): a softmax over concepts
        assert a.shape == (1, 24, 3) and torch.allclose(a.sum(-1), torch.ones(1, 24), atol=1e-5)
    assert {i.layer for i in store.layers("concept")} == {LayerId("double", 0, 0), LayerId("double", 1, 0)}
    heat, over, masks = view(store, clip, PROMPT, "sky, cat", maps="concept attention").result
    assert masks.shape == (2, 32, 32)
    with pytest.raises(ValueError, match=r"\['horse'\] were not captured.*\['cat', 'bicycle', 'sky'\]"):
        view(store, clip, PROMPT, "horse", maps="concept attention")
    with pytest.raises(ValueError, match="at least two"):
        capture(model, concepts="cat", clip=clip)
    with pytest.raises(ValueError, match="connect it to 'clip'"):
        capture(model, concepts="cat, dog")


def test_cluster_on_flux(flux):
    model, clip = flux
    m, store = capture(model, concepts="cat, sky", clip=clip)
    go(m, clip)
    args = dict(clusters=3, threshold=0.3, self_resolution=32, cross_resolution=16, seed=1, batch_index=0,
                samples={"samples": store.run_output})
    with torch.inference_mode():
        for kind, words in (("attention", "cat, sky"), ("concept attention", "cat, sky")):
            masks, bg, pic = SelfAttnCluster.execute(store, clip, PROMPT, words, labels=kind, **args).result
            assert masks.shape == (2, 8, 12) and pic.shape == (1, 8, 12, 3)
            assert torch.equal(masks.sum(0).clamp(max=1) + bg[0], torch.ones(8, 12))


def test_sd3_capture_words_in_clip_and_t5_parts(sd3):
    model, clip = sd3
    ref = go(model, clip, cfg=4.0, negative="blurry")
    m, store = capture(model)
    assert_bit_identical(go(m, clip, cfg=4.0, negative="blurry"), ref)
    assert {i.layer for i in store.layers()} == {LayerId("double", 0, 0), LayerId("double", 1, 0)}
    keys = store.layer_map(LayerId("double", 0, 0)).shape[-1]
    assert keys == encode(clip, PROMPT)[0][0].shape[1] == 77 + 77   # CLIP-L/G part, then T5 (min 77)
    _, (cat,) = word_positions(clip, PROMPT, "cat")
    assert any(p < 77 for p in cat) and any(p >= 77 for p in cat)   # found in each part of the context
    heat, over, masks = view(store, clip, PROMPT, WORDS).result
    assert masks.shape[0] == 10
    long = " ".join(["a quiet street with old houses"] * 14) + " and a giraffe"
    _, (g,) = word_positions(clip, long, "giraffe")
    go(m, clip, long, cfg=4.0)
    assert max(g) < store.layer_map(LayerId("double", 1, 0)).shape[-1] and min(g) >= 77


def test_sd35_image_only_attention_is_left_alone(sd3):
    model, clip = tiny_sd3(x_block_self_attn=True), sd3[1]
    ref = go(model, clip)
    m, store = capture(model)
    assert_bit_identical(go(m, clip), ref)
    assert len(store.layers()) == 2 and store.layer_map(LayerId("double", 0, 0)).shape[1] == 24


def test_other_nodes_refuse_dit_models_by_name(flux, sd3):
    for model in (flux[0], sd3[0]):
        with pytest.raises(UnsupportedModelError, match="Self-Attention Cluster, Prompt Mix Sampler and P2P Edit"):
            model_layer_ids(model)
    with pytest.raises(ValueError, match="Flux-style model"):
        capture(sd3[0], concepts="cat, dog", clip=sd3[1])
