"""Tier 2: the StructureDiffusion node in ComfyUI, on tiny SD1.5 and SDXL models and on ShapesWorld."""

import logging

import pytest
import torch
from comfy_env import comfy_or_skip, encode, rel, sample, tiny_sdxl, tiny_sdxl_clip

pack = comfy_or_skip()

from attention_lab.attention.shapesworld.harness import colour_blobs  # noqa: E402
from attention_lab.attention.structure import StructuredValuePatch  # noqa: E402
from attention_lab.nodes.shapesworld import load_shapesworld  # noqa: E402
from attention_lab.nodes.structure import StructureDiffusion  # noqa: E402

PROMPT = "a red car and a white sheep"


def apply(model, clip, prompt, phrases=""):
    with torch.inference_mode():
        return StructureDiffusion.execute(model, clip, prompt, phrases).result


def our_patch(m) -> StructuredValuePatch:
    patches = m.model_options["transformer_options"]["patches"]["attn2_patch"]
    return next(p for p in patches if isinstance(p, StructuredValuePatch))



def recorded_values(m, positive, negative, latent, steps=3):
    """Sample with a recorder chained after every patch: (context, value) of each cross-attention call."""
    calls = []

    def recorder(n, context, value, extra_options):
        calls.append((context.clone(), value.clone(), list(extra_options["cond_or_uncond"])))
        return n, context, value
    m2 = m.clone()
    m2.set_model_attn2_patch(recorder)
    with torch.inference_mode():
        out = sample(m2, positive, negative, latent, steps=steps, seed=2)
    return out, calls


def test_prompt_rows_get_the_phrase_values_and_the_input_model_stays_alone(sd):
    model, clip = sd
    before = repr(model.model_options)
    m, positive, phrases = apply(model, clip, PROMPT)
    assert phrases == "a red car | a white sheep"
    assert repr(model.model_options) == before                       # the user's MODEL is not patched
    assert torch.equal(positive[0][0], encode(clip, PROMPT)[0][0])  # the CONDITIONING is CLIP Text Encode's
    lat = torch.zeros(1, 4, 16, 16)
    out, calls = recorded_values(m, positive, encode(clip, ""), lat)
    patch = our_patch(m)
    assert calls and patch.hits == len(calls)                       # one prompt row per cross-attention call
    for context, value, cou in calls:
        for row, kind in enumerate(cou):
            expected = patch.values[0] if kind == 0 else context[row]
            assert torch.allclose(value[row], expected.to(value)), (row, kind)
    assert not torch.allclose(patch.values[0], patch.keys[0], atol=1e-4)  # "a white sheep" brings new states
    with torch.inference_mode():
        plain = sample(model, positive, encode(clip, ""), lat, steps=3, seed=2)
    assert not torch.equal(out, plain)


def test_no_phrase_or_another_prompt_samples_exactly_as_without(sd, caplog):
    model, clip = sd
    lat = torch.zeros(1, 4, 16, 16)
    m, positive, phrases = apply(model, clip, "a cat")
    assert phrases == ""
    with torch.inference_mode():
        plain = sample(model, positive, encode(clip, ""), lat, steps=4, seed=5)
        assert torch.equal(sample(m, positive, encode(clip, ""), lat, steps=4, seed=5), plain)
    m, _, _ = apply(model, clip, PROMPT)
    other = encode(clip, "a blue bird and a green frog")
    with caplog.at_level(logging.WARNING, logger="attention_lab"), torch.inference_mode():
        plain = sample(model, other, encode(clip, ""), lat, steps=4, seed=5)
        assert torch.equal(sample(m, other, encode(clip, ""), lat, steps=4, seed=5), plain)
    assert our_patch(m).hits == 0
    assert "no row of the sampled batch carried this node's prompt" in caplog.text


def test_chains_after_an_existing_value_patch(sd):
    model, clip = sd
    seen = []

    def earlier(n, context, value, extra_options):
        seen.append(1)
        return n, context, value
    pre = model.clone()
    pre.set_model_attn2_patch(earlier)
    m, positive, _ = apply(pre, clip, PROMPT)
    assert m.model_options["transformer_options"]["patches"]["attn2_patch"][0] is earlier
    with torch.inference_mode():
        sample(m, positive, encode(clip, ""), torch.zeros(1, 4, 16, 16), steps=2, seed=1)
    assert seen and our_patch(m).hits > 0


def test_sdxl():
    with torch.inference_mode():
        model, clip = tiny_sdxl(), tiny_sdxl_clip()
    m, positive, phrases = apply(model, clip, PROMPT, "a red car, a white sheep")
    assert phrases == "a red car | a white sheep"
    negative = encode(clip, "")
    out, calls = recorded_values(m, positive, negative, torch.zeros(1, 4, 16, 16))
    patch = our_patch(m)
    assert patch.values.shape[-1] == 2048 and patch.hits == len(calls) > 0
    assert all(torch.allclose(v[cou.index(0)], patch.values[0].to(v)) for _, v, cou in calls)
    with torch.inference_mode():
        assert not torch.equal(out, sample(model, positive, negative, torch.zeros(1, 4, 16, 16), steps=3, seed=2))


def test_bad_phrases_get_specific_errors(sd):
    model, clip = sd
    with pytest.raises(ValueError, match="'a blue car' is not in the prompt"):
        apply(model, clip, PROMPT, "a blue car")
    with pytest.raises(ValueError, match="listed 2 times but occurs 1"):
        apply(model, clip, PROMPT, "a red car, a red car")


def test_shapesworld_keeps_both_objects():
    model, clip, _ = load_shapesworld()
    prompt = "a red circle and a blue square on a gray background"
    m, positive, phrases = apply(model, clip, prompt)
    assert phrases == "a red circle | a blue square | a gray background | a red circle and a blue square"
    lat = torch.zeros(2, 3, 32, 32)
    with torch.inference_mode():
        plain = sample(model, positive, encode(clip, ""), lat, cfg=5.0, steps=20, seed=3, scheduler="simple")
        out = sample(m, positive, encode(clip, ""), lat, cfg=5.0, steps=20, seed=3, scheduler="simple")
    assert rel(out, plain) > 1e-3
    for img in ((out + 1) / 2).clamp(0, 1):
        assert colour_blobs(img, "red") and colour_blobs(img, "blue")

