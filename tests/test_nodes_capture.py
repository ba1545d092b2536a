"""Tier 2: AttentionCapture / AttentionMapView inside a real ComfyUI (COMFYUI_PATH)."""

import copy

import pytest
import torch
from comfy_env import (
    assert_same_samples,
    comfy_or_skip,
    encode,
    rel,
    sample,
    sdxl_cond,
    tiny_clip,
    tiny_sd15,
    tiny_sdxl,
)

pack = comfy_or_skip()

import comfy.model_management  # noqa: E402
from attention_lab.attention.layers import LayerId  # noqa: E402
from attention_lab.nodes.capture import AttentionCapture, AttentionMapView  # noqa: E402
from attention_lab.nodes.common import model_layer_ids  # noqa: E402


@pytest.fixture(scope="module")
def sd15():
    return tiny_sd15(), tiny_clip()


def run_capture(model, **kw):
    args = dict(layers="all", capture_self=True, self_max_size=32, start=0.0, end=1.0)
    args.update(kw)
    with torch.inference_mode():
        return AttentionCapture.execute(model, **args).result


def latent(b=1, size=16):
    return torch.zeros(b, 4, size, size)


def test_capture_leaves_samples_unchanged_and_input_unpatched(sd15):
    model, clip = sd15
    before = copy.deepcopy(model.model_options)
    pos, neg = encode(clip, "a photo of a cat riding a bicycle"), encode(clip, "")
    with torch.inference_mode():
        ref = sample(model, pos, neg, latent())
        m, store = run_capture(model)
        got = sample(m, pos, neg, latent())
    assert_same_samples(got, ref)
    assert model.model_options == before and "patches_replace" not in model.model_options["transformer_options"]
    # every block of the tiny SD1.5 model, with the right shapes
    ids = {i.layer for i in store.layers(cross=True)}
    assert ids == {LayerId("input", 1, 0), LayerId("input", 3, 0), LayerId("middle", 0, 0)} | {
        LayerId("output", i, 0) for i in range(4)}
    for info in store.layers(cross=True):
        assert store.layer_map(info.layer).shape == (1, info.height * info.width, 77)
        assert info.height in (16, 8)
    for info in store.layers(cross=False):
        assert store.layer_map(info.layer, cross=False).shape == (1, info.tokens, info.tokens)
    assert store.steps_recorded == {0, 1, 2, 3} and store.finished
    row_sums = store.layer_map(LayerId("input", 1, 0)).sum(-1)
    assert torch.allclose(row_sums, torch.ones_like(row_sums), atol=1e-4)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "dpmpp_2m_sde", "euler_ancestral", "heun"])
@pytest.mark.parametrize("cfg", [1.0, 7.0])
def test_every_sampler_and_cfg(sd15, sampler, cfg):
    model, clip = sd15
    pos, neg = encode(clip, "a cat"), encode(clip, "blurry")
    with torch.inference_mode():
        ref = sample(model, pos, neg, latent(2), cfg=cfg, sampler=sampler, steps=3)
        m, store = run_capture(model)
        got = sample(m, pos, neg, latent(2), cfg=cfg, sampler=sampler, steps=3)
    assert_same_samples(got, ref)
    assert store.items == 2 and store.steps_recorded == {0, 1, 2}
    a = store.layer_map(LayerId("middle", 0, 0))
    assert a.shape[0] == 2 and not torch.allclose(a[0], a[1])  # per batch item


def test_low_memory_split_batches(sd15, monkeypatch):
    model, clip = sd15
    pos, neg = encode(clip, "a cat"), encode(clip, "a dog")
    with torch.inference_mode():
        m, store = run_capture(model)
        full = sample(m, pos, neg, latent())
        whole = store.layer_map(LayerId("input", 1, 0)).clone()
        calls = []
        orig = comfy.model_management.get_free_memory
        def no_memory_for_batching(dev=None, torch_free_too=False):
            if torch_free_too:  # attention kernels ask this way; keep them on their normal path
                return orig(dev, True)
            calls.append(1)
            return 0  # _calc_cond_batch: nothing fits, so cond and uncond run in separate calls
        monkeypatch.setattr(comfy.model_management, "get_free_memory", no_memory_for_batching)
        split = sample(m, pos, neg, latent())
        monkeypatch.setattr(comfy.model_management, "get_free_memory", orig)
    assert calls, "the split path was not taken"
    assert_same_samples(split, full)
    assert rel(store.layer_map(LayerId("input", 1, 0)), whole) < 1e-4   # maps: relative to their scale too


def test_sdxl_every_depth_and_unchanged():
    model = tiny_sdxl()
    pos, neg = sdxl_cond(0), sdxl_cond(1)
    lat = torch.zeros(1, 4, 16, 16)
    with torch.inference_mode():
        ref = sample(model, pos, neg, lat, steps=2)
        m, store = run_capture(model, layers="all")
        got = sample(m, pos, neg, lat, steps=2)
    assert_same_samples(got, ref)
    ids = {i.layer for i in store.layers(cross=True)}
    assert ids == set(model_layer_ids(model))  # every depth of every SpatialTransformer
    assert LayerId("input", 3, 1) in ids and LayerId("middle", 0, 1) in ids and LayerId("output", 1, 1) in ids
    assert len(ids) == 2 + 2 + 2 * 2  # depth 2 in input.3, middle, output.0-1


def test_layer_selection_and_bad_inputs(sd15):
    model, clip = sd15
    with pytest.raises(Exception, match="input.1.0"):
        run_capture(model, layers="input.7")
    assert "valid forms" in AttentionCapture.validate_inputs(layers="bogus!", start=0, end=1)
    assert "must be below" in AttentionCapture.validate_inputs(layers="all", start=0.5, end=0.5)
    pos, neg = encode(clip, "a cat"), encode(clip, "")
    with torch.inference_mode():
        m, store = run_capture(model, layers="16")
        sample(m, pos, neg, latent())
    assert {(i.height, i.width) for i in store.layers()} == {(16, 16)}


def view(store, clip, prompt, words, **kw):
    """The viewer wired as in a graph: 'samples' is the LATENT of the run that filled the store."""
    run_latent = store.run_output if store.run_output is not None else torch.zeros(1, 4, 16, 16)
    args = dict(resolution="all", threshold=0.5, batch_index=0, tile_size=32, image=None,
                samples={"samples": run_latent})
    args.update(kw)
    with torch.inference_mode():
        return AttentionMapView.execute(store, clip, prompt, words, **args)


def test_viewer_outputs_and_errors(sd15):
    model, clip = sd15
    prompt = "a photo of a (cat:1.2) riding a bicycle"
    with torch.inference_mode():
        m, store = run_capture(model)
        with pytest.raises(RuntimeError, match="empty"):
            view(store, clip, prompt, "cat")
        sample(m, encode(clip, prompt), encode(clip, ""), latent())
    out = view(store, clip, prompt, "cat, bicycle", image=torch.rand(1, 128, 128, 3))
    heat, over, masks = out.result
    assert over.shape == (2, 128, 128, 3) and masks.shape == (2, 128, 128)
    assert heat.shape[0] == 1 and heat.shape[-1] == 3
    assert out.ui is not None
    with pytest.raises(ValueError, match=r"'horse'.*\['a', 'photo', 'of', 'a', 'cat'"):
        view(store, clip, prompt, "horse")
    with pytest.raises(ValueError, match="captured sizes"):
        view(store, clip, prompt, "cat", resolution="32")
    _, _, m16 = view(store, clip, prompt, "cat", resolution="16").result
    assert m16.shape == (1, 32, 32)


def test_unsupported_model_is_named():
    class Fake:
        def get_model_object(self, name):
            return torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match="SD1.x, SD2.x and SDXL"):
        run_capture(Fake())


def test_interrupted_sampling_leaves_no_state(sd15):
    import comfy.model_management as mm
    import comfy.sample
    model, clip = sd15
    before = copy.deepcopy(model.model_options)
    pos, neg = encode(clip, "a cat"), encode(clip, "")
    lat = latent()
    with torch.inference_mode():
        m, store = run_capture(model)
        sample(m, pos, neg, lat)
        assert store.finished

        def interrupt(step, x0, x, total):
            if step == 1:
                raise mm.InterruptProcessingException()
        noise = comfy.sample.prepare_noise(lat, 0)
        with pytest.raises(mm.InterruptProcessingException):
            comfy.sample.sample(m, noise, 4, 7.0, "euler", "normal", pos, neg, lat, callback=interrupt,
                                disable_pbar=True, seed=0)
    assert not store.finished  # the viewer refuses half-filled maps
    with pytest.raises(RuntimeError, match="did not finish"):
        view(store, clip, "a cat", "cat")
    assert model.model_options == before
    with torch.inference_mode():  # the unpatched model still samples exactly as before
        assert_same_samples(sample(model, pos, neg, lat), sample(tiny_sd15(), pos, neg, lat))


def test_long_prompt_word_in_second_chunk(sd15):
    model, clip = sd15
    prompt = " ".join(["a quiet street with old houses"] * 14) + " and a (giraffe:1.3)"
    chunks = clip.tokenize(prompt)["l"]
    assert len(chunks) == 2  # longer than 77 tokens
    with torch.inference_mode():
        m, store = run_capture(model)
        sample(m, encode(clip, prompt), encode(clip, ""), latent())
    assert store.layer_map(LayerId("middle", 0, 0)).shape[-1] == 154
    from attention_lab.nodes.common import word_positions
    _, positions = word_positions(clip, prompt, "giraffe")
    assert all(p >= 77 for p in positions[0])
    heat, over, masks = view(store, clip, prompt, "giraffe, street").result
    assert masks.shape == (2, 32, 32)
