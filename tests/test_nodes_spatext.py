"""Tier 2: the SpaTextGuider node in ComfyUI, on the tiny SD1.5 model and on ShapesWorld."""


import pytest
import torch
from comfy_env import comfy_or_skip, encode, rel, tiny_sdxl, tiny_sdxl_clip

pack = comfy_or_skip()

import comfy.ldm.modules.attention  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
from attention_lab.attention.shapesworld.world import COLOURS  # noqa: E402
from attention_lab.nodes.capture import AttentionCapture  # noqa: E402
from attention_lab.nodes.shapesworld import load_shapesworld  # noqa: E402
from attention_lab.nodes.spatext import SpaTextGuider  # noqa: E402


def guider(model, clip, positive, negative, cfg_global=7.5, cfg_local=7.5, **regions):
    with torch.inference_mode():
        return SpaTextGuider.execute(model, clip, positive, negative, cfg_global, cfg_local, **regions).result


def run(g, latent, steps=4, seed=1, scheduler="normal", sampler="euler"):
    with torch.inference_mode():
        noise = comfy.sample.prepare_noise(latent, seed)
        sigmas = comfy.samplers.calculate_sigmas(g.model_patcher.get_model_object("model_sampling"), scheduler,
                                                 steps).cpu()
        out = g.sample(noise, latent, comfy.samplers.sampler_object(sampler), sigmas, disable_pbar=True, seed=seed)
    # as SamplerCustomAdvanced: a GUIDER samples on the model's device, the LATENT goes to the intermediate one
    return out.to(comfy.model_management.intermediate_device())


def plain(model, positive, negative, latent, cfg, **kw):
    g = comfy.samplers.CFGGuider(model)
    g.set_conds(positive, negative)
    g.set_cfg(cfg)
    return run(g, latent, **kw)



def half_mask(size=128):
    m = torch.zeros(1, size, size)
    m[:, :, : size // 2] = 1
    return m


def test_empty_region_or_no_local_guidance_samples_as_plain_cfg(sd):
    model, clip = sd
    pos, neg = encode(clip, "a cat and a dog"), encode(clip, "")
    lat = torch.zeros(1, 4, 16, 16)
    ref = plain(model, pos, neg, lat, 7.5)
    g, _ = guider(model, clip, pos, neg, mask_1=torch.zeros(1, 128, 128), prompt_1="a dog")
    assert rel(run(g, lat), ref) < 1e-5                            # the regional pass equals the global one
    g, _ = guider(model, clip, pos, neg, cfg_local=0.0, mask_1=half_mask(), prompt_1="a dog")
    assert torch.equal(run(g, lat), ref)


def test_regions_change_the_sample_and_nothing_stays_on_the_model(sd):
    model, clip = sd
    before = repr(model.model_options)
    pos, neg = encode(clip, "a cat and a dog"), encode(clip, "")
    lat = torch.zeros(1, 4, 16, 16)
    g, region_map = guider(model, clip, pos, neg, mask_1=half_mask(), prompt_1="a dog on grass")
    assert region_map.shape == (1, 128, 128, 3)
    assert region_map[0, :, :64].sum() > 0 and region_map[0, :, 64:].sum() == 0
    out = run(g, lat)
    assert not torch.equal(out, plain(model, pos, neg, lat, 7.5))
    assert repr(model.model_options) == before


def test_the_regional_pass_calls_the_layers_previous_patch_per_part(sd):
    model, clip = sd
    calls = []

    def foreign(q, k, v, extra_options):
        calls.append(k.shape[1])
        return comfy.ldm.modules.attention.optimized_attention(q, k, v, extra_options["n_heads"])
    m = model.clone()
    m.set_model_attn2_replace(foreign, "input", 1)
    pos, neg = encode(clip, "a cat and a dog"), encode(clip, "")
    g, _ = guider(m, clip, pos, neg, mask_1=half_mask(), prompt_1="a dog on grass")
    run(g, torch.zeros(1, 4, 16, 16), steps=2)
    # per step: the [negative, global] batch once, then the spatial pass's global and region parts separately,
    # never the 154-token expanded context
    assert calls == [77] * 3 * 2


def test_capture_on_the_model_records_the_plain_passes(sd):
    model, clip = sd
    with torch.inference_mode():
        m, store = AttentionCapture.execute(model, layers="all", capture_self=False, self_max_size=32, start=0.0,
                                            end=1.0).result
    pos, neg = encode(clip, "a cat and a dog"), encode(clip, "")
    g, _ = guider(m, clip, pos, neg, mask_1=half_mask(), prompt_1="a dog on grass")
    run(g, torch.zeros(1, 4, 16, 16), steps=3)
    assert store.finished and store.steps_recorded == {0, 1, 2}
    for info in store.layers(cross=True):
        assert store.layer_map(info.layer).shape[-1] == 77           # the global prompt's maps, not 154 tokens


def test_sdxl():
    with torch.inference_mode():
        model, clip = tiny_sdxl(), tiny_sdxl_clip()
        pos, neg = clip.encode_from_tokens_scheduled(clip.tokenize("a cat and a dog")), encode(clip, "")
    for c in (pos, neg):
        c[0][1].update(width=128, height=128)
    lat = torch.zeros(1, 4, 16, 16)
    ref = plain(model, pos, neg, lat, 7.5, steps=3)
    g, _ = guider(model, clip, pos, neg, mask_1=torch.zeros(1, 128, 128), prompt_1="a dog")
    assert rel(run(g, lat, steps=3), ref) < 1e-5
    g, _ = guider(model, clip, pos, neg, mask_1=half_mask(), prompt_1="a dog on grass")
    assert not torch.equal(run(g, lat, steps=3), ref)


def test_masks_of_another_aspect_ratio_are_refused_with_the_values(sd):
    model, clip = sd
    pos, neg = encode(clip, "a cat and a dog"), encode(clip, "")
    g, _ = guider(model, clip, pos, neg, mask_1=torch.ones(1, 64, 128), prompt_1="a dog")
    with pytest.raises(ValueError, match=r"SpaTextGuider: 'region masks' is 128x64 \(aspect 2.000\) but the latent "
                                         r"\(latent pixels\) is 16x16 \(aspect 1.000\): 100.0 % off, beyond the 2 %"):
        run(g, torch.zeros(1, 4, 16, 16), steps=2)
    g, _ = guider(model, clip, pos, neg, mask_1=torch.ones(1, 128, 126), prompt_1="a dog")   # 1.6 % off: resized
    assert torch.isfinite(run(g, torch.zeros(1, 4, 16, 16), steps=2)).all()


def test_bad_regions_get_specific_errors(sd):
    model, clip = sd
    pos, neg = encode(clip, "a cat"), encode(clip, "")
    with pytest.raises(ValueError, match="mask_1 is connected but prompt_1 is empty"):
        guider(model, clip, pos, neg, mask_1=half_mask())
    with pytest.raises(ValueError, match="no region"):
        guider(model, clip, pos, neg, prompt_2="a dog")
    with pytest.raises(ValueError, match="different sizes"):
        guider(model, clip, pos, neg, mask_1=half_mask(64), prompt_1="a", mask_2=half_mask(128), prompt_2="b")
    with pytest.raises(ValueError, match="batch of 2 masks"):
        guider(model, clip, pos, neg, mask_1=torch.zeros(2, 64, 64), prompt_1="a dog")


def test_shapesworld_regions_place_the_objects():
    model, clip, _ = load_shapesworld()
    caption = encode(clip, "a red circle and a blue square on a gray background")
    scene = encode(clip, "on a gray background")
    neg = encode(clip, "")
    left, right = torch.zeros(1, 32, 32), torch.zeros(1, 32, 32)
    left[:, 4:18, 1:15] = 1
    right[:, 14:28, 17:31] = 1
    lat = torch.zeros(4, 3, 32, 32)
    kw = dict(steps=20, seed=4, scheduler="simple")
    g, _ = guider(model, clip, scene, neg, 5.0, 7.5, mask_1=left, prompt_1="a red circle", mask_2=right,
                  prompt_2="a blue square")

    def inside(latents):
        share = 0.0
        for img in ((latents + 1) / 2).clamp(0, 1):
            for colour, box in (("red", left[0]), ("blue", right[0])):
                near = ((img - torch.tensor(COLOURS[colour]).view(3, 1, 1)) ** 2).sum(0).sqrt() < 0.3
                share += float((near & (box > 0)).sum() / near.sum().clamp(min=1))
        return share / (2 * len(latents))
    base, spatial = inside(plain(model, caption, neg, lat, 5.0, **kw)), inside(run(g, lat, **kw))
    assert spatial > base + 0.3 and spatial > 0.8, (base, spatial)
