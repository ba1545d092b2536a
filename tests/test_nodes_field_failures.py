"""Tier 2: issue 17's field failures, each example with the right value or the specific error (tiny SD1.5/SDXL)."""

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

import comfy.sd1_clip  # noqa: E402
from attention_lab.attention.layers import LayerSelectionError  # noqa: E402
from attention_lab.attention.p2p import build_plan  # noqa: E402
from attention_lab.attention.words import emphasis_segments  # noqa: E402
from attention_lab.nodes.capture import AttentionCapture, AttentionMapView  # noqa: E402
from attention_lab.nodes.cluster import SelfAttnCluster  # noqa: E402
from attention_lab.nodes.common import prompt_words  # noqa: E402
from attention_lab.nodes.p2p import P2PEditSampler, words_fn  # noqa: E402
from attention_lab.nodes.prompt_mix import PromptMixSampler  # noqa: E402
from attention_lab.nodes.structure import StructureDiffusion  # noqa: E402

SRC = "a cat and a dog in a garden"
TGT = "a tiger and a dog in a garden"
LONG = " ".join(["a quiet street with old houses"] * 13)



def p2p(model, clip, source, targets, negative=None, lat=None, **kw):
    args = dict(edit="auto", seed=1, steps=4, cfg=7.5, scheduler="simple", cross_replace_steps=0.8,
                cross_replace_words="", self_replace_steps=0.4, reweight="", blend_words="", blend_threshold=0.3,
                blend_start=0.2)
    args.update(kw)
    lat = torch.zeros(1, 4, 16, 16) if lat is None else lat
    neg = encode(clip, "") if negative is None else negative
    with torch.inference_mode():
        return P2PEditSampler.execute(model, clip, source, "\n".join(targets), neg, {"samples": lat},
                                      **args).result[0]["samples"]


def capture(model, **kw):
    args = dict(layers="all", capture_self=True, self_max_size=32, start=0.0, end=1.0)
    args.update(kw)
    with torch.inference_mode():
        return AttentionCapture.execute(model, **args).result


def view(store, clip, prompt, words, samples):
    with torch.inference_mode():
        return AttentionMapView.execute(store, clip, prompt, words, {"samples": samples}, "all", 0.5, 0, 32).result


def mix(model, clip, prompt, obj, lat, negative=None, **kw):
    args = dict(proxy_words="tiger", suggestions=1, preserve_words="dog", seed=0, steps=4, cfg=7.5,
                scheduler="simple", mix_start=0.0, mix_end=0.5, self_injection_end=0.5, injection_threshold=0.05,
                blend_at=0.5, clusters=2, cluster_threshold=0.3)
    args.update(kw)
    with torch.inference_mode():
        neg = encode(clip, "") if negative is None else negative
        return PromptMixSampler.execute(model, clip, prompt, neg, {"samples": lat}, obj, **args).result


# 1, 2: case and emphasis -------------------------------------------------------------------------------------

def reweight_factors(clip, source, target, reweight):
    words_of = words_fn(clip)
    plan = build_plan(source, [target], "auto", 4, 0.8, {}, 0.4, reweight, 77, 64, words_of)
    return plan.equalizer[0], words_of


def test_case_matches_as_the_tokenizer_sees_it(sd):
    model, clip = sd
    low = p2p(model, clip, SRC, [TGT], blend_words="cat, tiger", reweight="tiger:2")
    up = p2p(model, clip, "A Cat and a dog in a garden", ["A Tiger and a dog in a garden"], blend_words="Cat, TIGER",
             reweight="Tiger:2")
    assert rel(up, low) < 1e-6                       # CLIP lower-cases: the same edit
    eq, words_of = reweight_factors(clip, "A Cat and a dog in a garden", "A Tiger and a dog in a garden", {"tiger": 2})
    (pos,) = words_of("A Tiger and a dog in a garden").positions("TIGER")
    assert pos == 2 and eq[pos] == 2 and (eq == 2).sum() == 1


def test_emphasis_words_are_matched_inside_and_parsed_as_comfyui(sd):
    model, clip = sd
    for prompt in ["a (cat:1.2) and ((dog)) \\(x\\) (a (b:0.5) c:1.3) (time: noon) [d] (unclosed", "plain",
                   "(((deep))) ((a:1.1):1.2)", "a\\(b:1.2\\)"]:
        ours = [(t, round(w, 6)) for t, w in emphasis_segments(prompt)]
        theirs = [(comfy.sd1_clip.unescape_important(t), round(w, 6))
                  for t, w in comfy.sd1_clip.token_weights(comfy.sd1_clip.escape_important(prompt), 1.0)]
        assert ours == theirs, prompt
    emph = "a (tiger:1.2) and a dog in a garden"
    assert prompt_words(clip, emph).positions("tiger") == prompt_words(clip, TGT).positions("tiger") == (2,)
    pw = prompt_words(clip, "a [tiger] and a \\(dog\\)")          # '[', ']', '(' are tokens of their own
    ids = [t for c in pw.chunks for t in c]
    assert pw.positions("dog") == (ids.index(pw.ids("dog")[0]),) and pw.positions("tiger") == (3,)
    eq, _ = reweight_factors(clip, "a (cat:1.2) and a dog in a garden", emph, {"tiger": 2})
    assert eq[2] == 2 and (eq == 2).sum() == 1
    out = p2p(model, clip, "a (cat:1.2) and a dog in a garden", [emph], blend_words="cat, tiger", reweight="tiger:2")
    assert out.shape == (2, 4, 16, 16) and torch.isfinite(out).all()


# 3: unknown words are refused everywhere -------------------------------------------------------------------

def test_every_word_option_refuses_a_word_not_in_its_prompt(sd):
    model, clip = sd
    with pytest.raises(ValueError, match=r"cross_replace_words word 'tigr'.*\['a', 'tiger', 'and'"):
        p2p(model, clip, SRC, [TGT], cross_replace_words="tigr:0.0")
    with pytest.raises(ValueError, match=r"reweight word 'tigr'"):
        p2p(model, clip, SRC, [TGT], reweight="tigr:2")
    with pytest.raises(ValueError, match=r"blend words \['tigr'\]"):
        p2p(model, clip, SRC, [TGT], blend_words="tigr")
    lat = torch.zeros(1, 4, 16, 16)
    with pytest.raises(ValueError, match=r"object word 'cta' is not in the prompt.*\['a', 'cat'"):
        mix(model, clip, SRC, "cta", lat)
    with pytest.raises(ValueError, match=r"preserve word 'dgo'"):
        mix(model, clip, SRC, "cat", lat, preserve_words="dgo")
    with pytest.raises(ValueError, match=r"noun phrase 'a red cra'.*\['a', 'red', 'car'"):
        with torch.inference_mode():
            StructureDiffusion.execute(model, clip, "a red car and a white sheep", "a red cra")
    m, store = capture(model)
    with torch.inference_mode():
        out = sample(m, encode(clip, SRC), encode(clip, ""), lat)
    with pytest.raises(ValueError, match=r"word 'hrose' is not in the prompt"):
        view(store, clip, SRC, "hrose", out)
    with pytest.raises(ValueError, match=r"word 'hrose' is not in the prompt"):
        with torch.inference_mode():
            SelfAttnCluster.execute(store, clip, SRC, "cat, hrose", {"samples": out}, 2, 0.3, 16, 16, 1, 0)


# 4: long prompts ---------------------------------------------------------------------------------------------

def test_refine_of_a_two_chunk_prompt_aligns_the_second_chunk(sd):
    model, clip = sd
    src, tgt = LONG + " and a cat", LONG + " and a fluffy cat"
    words_of = words_fn(clip)
    assert len(words_of(src).chunks) == len(words_of(tgt).chunks) == 2
    plan = build_plan(src, [tgt], "auto", 4, 0.8, {"cat": 0.2}, 0.4, {"cat": 3.0}, 154, 64, words_of)
    (fluffy,), (cat_t,), (cat_s,) = (words_of(tgt).positions("fluffy"), words_of(tgt).positions("cat"),
                                     words_of(src).positions("cat"))
    assert plan.kind == ["refine"] and min(fluffy, cat_t, cat_s) >= 77
    assert plan.refine_alphas[0, fluffy] == 0 and plan.refine_alphas[0, cat_t] == 1
    assert plan.refine[0, cat_t] == cat_s
    assert plan.equalizer[0, cat_t] == 3.0 and plan.alpha[2, 0, cat_t] == 0   # reweight / cross words too
    out = p2p(model, clip, src, [tgt], blend_words="cat, fluffy", reweight="cat:3")
    assert out.shape == (2, 4, 16, 16) and torch.isfinite(out).all()


def test_long_prompt_word_map_in_the_second_chunk(sd):
    model, clip = sd
    prompt = LONG + " and a (giraffe:1.3)"
    m, store = capture(model)
    with torch.inference_mode():
        out = sample(m, encode(clip, prompt), encode(clip, ""), torch.zeros(1, 4, 16, 16))
    (pos,) = prompt_words(clip, prompt).positions("Giraffe")
    assert pos >= 77
    heat, over, masks = view(store, clip, prompt, "Giraffe", out)
    assert masks.shape == (1, 32, 32) and masks.sum() > 0


# 5: a negative longer than the prompts ----------------------------------------------------------------------

def test_p2p_source_row_with_a_two_chunk_negative_is_the_plain_generation(sd):
    model, clip = sd
    negative = encode(clip, LONG + " and blurry")
    assert negative[0][0].shape[1] == 154
    lat = torch.zeros(1, 4, 16, 16)
    out = p2p(model, clip, SRC, [SRC, TGT], negative=negative, blend_words="cat, tiger", reweight="tiger:2")
    with torch.inference_mode():
        plain = sample(model, encode(clip, SRC), negative, lat, cfg=7.5, sampler="euler", steps=4, seed=1,
                       scheduler="simple")
    assert rel(out[0], plain[0]) < 1e-5
    assert rel(out[1], out[0]) < 1e-5


def test_prompt_mix_with_a_two_chunk_negative_keeps_the_original_row(sd):
    model, clip = sd
    negative = encode(clip, LONG + " and blurry")
    lat = torch.zeros(1, 4, 16, 16)
    out = mix(model, clip, SRC, "cat", lat, negative=negative, proxy_words="cat")[0]["samples"]
    with torch.inference_mode():
        plain = sample(model, encode(clip, SRC), negative, lat, cfg=7.5, sampler="euler", steps=4, seed=0,
                       scheduler="simple")
    assert rel(out[0], plain[0]) < 1e-5 and rel(out[1], out[0]) < 1e-5   # proxy == object: no change


# 6, 7: non-square latents, MnM with two object words -------------------------------------------------------

def test_non_square_latent_cluster_and_prompt_mix(sd):
    model, clip = sd
    lat = torch.zeros(1, 4, 16, 24)
    m, store = capture(model)
    with torch.inference_mode():
        out = sample(m, encode(clip, SRC), encode(clip, ""), lat)
        masks, background, picture = SelfAttnCluster.execute(store, clip, SRC, "cat, dog", {"samples": out}, 3, 0.3,
                                                              16, 16, 1, 0).result
    assert masks.shape == (2, 16, 24) and background.shape == (1, 16, 24) and picture.shape == (1, 16, 24, 3)
    lat_out, blend_masks, proxies = mix(model, clip, SRC, "cat", lat)
    assert lat_out["samples"].shape == (2, 4, 16, 24) and blend_masks.shape == (1, 16, 24)


def test_prompt_mix_with_two_object_words_names_them(sd):
    model, clip = sd
    with pytest.raises(ValueError, match=r"object_word takes one word.*\['cat', 'dog'\]"):
        mix(model, clip, SRC, "cat, dog", torch.zeros(1, 4, 16, 16), preserve_words="")


# 8: a capture size matching no layer ---------------------------------------------------------------------

@pytest.mark.parametrize("layers,hw,named", [("16", (16, 24), "'16x24', '8x12'"), ("32", (16, 16), "'16x16', '8x8'")])
def test_capture_size_matching_no_layer_is_refused_at_sampling(sd, layers, hw, named):
    model, clip = sd
    m, store = capture(model, layers=layers)
    with pytest.raises(LayerSelectionError, match=rf"'{layers}' matches no attention layer.*{named}"):
        with torch.inference_mode():
            sample(m, encode(clip, SRC), encode(clip, ""), torch.zeros(1, 4, *hw))
    assert not store.finished


# also: a store tied to its run -------------------------------------------------------------------------------

def test_viewer_refuses_a_store_refilled_by_another_run(sd):
    model, clip = sd
    m, store = capture(model)
    lat = torch.zeros(1, 4, 16, 16)
    with torch.inference_mode():
        first = sample(m, encode(clip, SRC), encode(clip, ""), lat, seed=0)
        second = sample(m, encode(clip, TGT), encode(clip, ""), lat, seed=1)
    with pytest.raises(ValueError, match="another sampling run"):
        view(store, clip, SRC, "cat", first)
    with pytest.raises(ValueError, match="another sampling run"):
        with torch.inference_mode():
            SelfAttnCluster.execute(store, clip, SRC, "cat", {"samples": first}, 2, 0.3, 16, 16, 1, 0)
    assert view(store, clip, TGT, "tiger", second)[2].shape == (1, 32, 32)


# 9: SDXL conditioning in our loops ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def xl():
    with torch.inference_mode():
        return tiny_sdxl(), tiny_sdxl_clip()


def test_sdxl_p2p_source_row_is_the_plain_generation(xl):
    model, clip = xl
    lat = torch.zeros(1, 4, 16, 16)
    negative = encode(clip, "blurry")
    out = p2p(model, clip, SRC, [SRC], negative=negative)
    with torch.inference_mode():
        plain = sample(model, encode(clip, SRC), negative, lat, cfg=7.5, sampler="euler", steps=4, seed=1,
                       scheduler="simple")
    assert_same_samples(out[0], plain[0])          # was 2e-4 off: one 768x768 pooled/size vector for every row
    assert_same_samples(out[1], out[0])


# also: a bf16 UNet's null-text inversion -------------------------------------------------------------------

def tiny_sd15_bf16():
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    from comfy_env import CTX
    cfg = {'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True,
           'legacy': False, 'adm_in_channels': None, 'dtype': torch.bfloat16, 'in_channels': 4,
           'model_channels': 32, 'num_res_blocks': [1, 1], 'transformer_depth': [1, 1], 'channel_mult': [1, 2],
           'transformer_depth_middle': 1, 'use_linear_in_transformer': False, 'context_dim': CTX,
           'transformer_depth_output': [1, 1, 1, 1], 'use_temporal_attention': False, 'use_temporal_resblock': False}
    mc = comfy.supported_models.SD15(cfg)
    mc.set_inference_dtype(torch.bfloat16, None)
    model = mc.get_model({})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.diffusion_model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def test_bf16_null_text_inversion_is_not_worse_than_ddim_inversion(sd):
    from attention_lab.nodes.inversion import NullTextInvert
    _, clip = sd
    with torch.inference_mode():
        model = tiny_sd15_bf16()
        assert next(model.model.diffusion_model.parameters()).dtype == torch.bfloat16
        image = sample(model, encode(clip, SRC), encode(clip, ""), torch.zeros(1, 4, 16, 16), cfg=7.5,
                       sampler="euler", steps=4, seed=3, scheduler="simple")
        err = {}
        for mode, keep_best in (("ddim", False), ("null-text", True)):
            inv, rec = NullTextInvert.execute(model, clip, SRC, mode, 4, 7.5, "simple", 10, 1e-5,
                                              keep_best_null=keep_best, latent={"samples": image}).result
            err[mode] = float(((rec["samples"] - image) ** 2).mean())
    assert inv.nulls[0].dtype == torch.float32                # optimized in float32
    # with keep_best_null (an input, off by default as upstream): measured 3.91e-3 vs 3.96e-3; upstream's last
    # null gives 4.18e-3 on this random bf16 UNet
    assert err["null-text"] <= err["ddim"], err
