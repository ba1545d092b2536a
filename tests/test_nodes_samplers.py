"""Tier 2: P2PEditSampler and PromptMixSampler with ComfyUI's samplers (SAMPLER + SIGMAS inputs).

Every comparison is against a stock SamplerCustomAdvanced run (RandomNoise, CFGGuider, KSamplerSelect or
SamplerEulerAncestral, BasicScheduler) of the same model, prompt, seed and sampler.
"""

import pytest
import torch
from comfy_env import ON_GPU, bound, comfy_or_skip, encode, rel, sdxl_cond, tiny_sdxl

pack = comfy_or_skip()

import comfy.samplers  # noqa: E402
from attention_lab.nodes.comfy_sampling import sample_rows  # noqa: E402
from attention_lab.nodes.guided import rows_conditioning  # noqa: E402
from attention_lab.nodes.inversion import NullTextInvert  # noqa: E402
from attention_lab.nodes.p2p import P2PEditSampler  # noqa: E402
from attention_lab.nodes.prompt_mix import PromptMixSampler  # noqa: E402
from attention_lab.nodes.shapesworld import load_shapesworld  # noqa: E402
from comfy_extras.nodes_custom_sampler import (  # noqa: E402
    BasicScheduler,
    CFGGuider,
    KarrasScheduler,
    KSamplerSelect,
    RandomNoise,
    SamplerCustomAdvanced,
    SamplerEulerAncestral,
)

SRC = "a cat and a dog in a garden"
TGT = "a tiger and a dog in a garden"
LAT = torch.zeros(1, 4, 16, 16)



def sampler(name):
    with torch.inference_mode():
        if name == "euler_ancestral_eta":
            return SamplerEulerAncestral.execute(1.0, 1.0).result[0]
        return KSamplerSelect.execute(name).result[0]


def sigmas(model, steps=6, scheduler="normal"):
    with torch.inference_mode():
        if scheduler == "karras":
            return KarrasScheduler.execute(steps, 14.61, 0.03, 7.0).result[0]
        return BasicScheduler.execute(model, scheduler, steps, 1.0).result[0]


def stock(model, positive, negative, smp, sig, seed=1, cfg=7.5, latent=LAT):
    """SamplerCustomAdvanced as the graph runs it."""
    with torch.inference_mode():
        guider = CFGGuider.execute(model, positive, negative, cfg).result[0]
        noise = RandomNoise.execute(seed).result[0]
        return SamplerCustomAdvanced.execute(noise, guider, smp, sig, {"samples": latent}).result[0]["samples"]


def p2p(model, clip, targets, smp, sig, source=SRC, latent=LAT, **kw):
    args = dict(edit="auto", seed=1, steps=4, cfg=7.5, scheduler="simple", cross_replace_steps=0.8,
                cross_replace_words="", self_replace_steps=0.4, reweight="", blend_words="", blend_threshold=0.3,
                blend_start=0.2)
    args.update(kw)
    with torch.inference_mode():
        return P2PEditSampler.execute(model, clip, source, "\n".join(targets), encode(clip, ""),
                                      {"samples": latent}, sampler=smp, sigmas=sig, **args).result


def mix(model, clip, smp, sig, proxies="cat, dog", **kw):
    args = dict(suggestions=2, seed=3, steps=6, cfg=7.5, scheduler="simple", mix_start=0.14, mix_end=0.34,
                self_injection_end=0.8, injection_threshold=0.05, blend_at=0.7, clusters=5, cluster_threshold=0.3)
    args.update(kw)
    with torch.inference_mode():
        return PromptMixSampler.execute(model, clip, SRC, encode(clip, ""), {"samples": LAT}, "cat", proxies,
                                        preserve_words="dog", sampler=smp, sigmas=sig, **args).result


@pytest.mark.parametrize("name,scheduler", [("euler", "normal"), ("dpmpp_2m", "karras"), ("uni_pc", "normal"),
                                            ("heun", "simple"), ("lms", "normal")])
def test_edit_row_equal_to_the_source_is_the_stock_sampler_run(sd, name, scheduler):
    model, clip = sd
    before = repr(model.model_options)
    smp, sig = sampler(name), sigmas(model, 6, scheduler)
    out, _ = p2p(model, clip, [SRC, TGT], smp, sig)
    o = out["samples"]
    plain = stock(model, encode(clip, SRC), encode(clip, ""), smp, sig)
    assert o.shape == (3, 4, 16, 16)
    assert rel(o[0], plain[0]) < 1e-4, rel(o[0], plain[0])       # the source row is the stock run
    assert rel(o[1], o[0]) < 1e-4, rel(o[1], o[0])                # an edit equal to the source
    assert repr(model.model_options) == before


def test_reweight_one_is_a_no_op_with_a_sampler(sd):
    model, clip = sd
    smp, sig = sampler("dpmpp_2m"), sigmas(model, 6, "karras")
    base = p2p(model, clip, [TGT], smp, sig)[0]["samples"]
    same = p2p(model, clip, [TGT], smp, sig, reweight="tiger:1")[0]["samples"]
    heavy = p2p(model, clip, [TGT], smp, sig, reweight="tiger:20")[0]["samples"]
    assert rel(same[1], base[1]) < 2e-6
    assert rel(heavy[1], base[1]) > 2e-5


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m", "uni_pc"])
def test_local_blend_keeps_everything_outside_its_mask(name):
    model, clip, _ = load_shapesworld()
    smp, sig = sampler(name), sigmas(model, 12, "karras")
    src = "a red circle and a blue square on a gray background"
    tgt = "a red triangle and a blue square on a gray background"
    out, mask = p2p(model, clip, [tgt], smp, sig, source=src, latent=torch.zeros(1, 3, 32, 32), cfg=5.0,
                    blend_words="circle, triangle")
    o = out["samples"]
    outside = (mask[0] == 0).expand_as(o[1])
    assert 0 < int(outside[0].sum()) < mask[0].numel()              # a real mask, neither empty nor full
    assert torch.equal(o[1][outside], o[0][outside])               # bit for bit outside
    assert (o[1] - o[0]).abs().amax() > 0.1                        # the edit changed the object


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2m_sde", "euler_ancestral_eta"])
def test_stochastic_samplers_share_each_steps_noise_across_rows(sd, name):
    model, clip = sd
    smp, sig = sampler(name), sigmas(model, 6, "karras")
    o = p2p(model, clip, [SRC, TGT], smp, sig)[0]["samples"]
    plain = stock(model, encode(clip, SRC), encode(clip, ""), smp, sig)
    assert rel(o[0], plain[0]) < 1e-4, rel(o[0], plain[0])
    assert rel(o[1], o[0]) < 1e-4, rel(o[1], o[0])
    # what sharing prevents: the stock sampler on two identical rows draws a different noise per row
    two = stock(model, encode(clip, SRC), encode(clip, ""), smp, sig, latent=LAT.expand(2, -1, -1, -1))
    assert rel(two[1], two[0]) > 1e-2


def test_sdxl_rows_take_their_own_prompt_and_pooled_output():
    with torch.inference_mode():
        model = tiny_sdxl()
    smp, sig = sampler("dpmpp_2m"), sigmas(model, 4, "karras")
    lat, neg = torch.zeros(1, 4, 16, 16), sdxl_cond(9)
    a, b = sdxl_cond(1), sdxl_cond(2)
    pooled_only = [[a[0][0], dict(a[0][1], pooled_output=b[0][1]["pooled_output"])]]   # same text, b's pooled
    rows = [a, b, pooled_only]
    with torch.inference_mode():
        out = sample_rows(model, smp, sig, rows_conditioning("test", a, a, rows), neg, 7.0, {"samples": lat}, 5,
                          len(rows))
    plain = [stock(model, c, neg, smp, sig, seed=5, cfg=7.0, latent=lat)[0] for c in rows]
    err = max(rel(out[i], plain[i]) for i in range(len(rows)))     # each row is its own conditioning's stock run
    gap = min(rel(plain[i], plain[j]) for i in range(3) for j in range(i))
    # and the three runs differ (pooled alone too), well over the float noise (a GPU's is larger: 6.7e-6, gap 1.7e-4)
    assert err < bound(1e-5) and gap > (10 if ON_GPU else 50) * err, (err, gap)


def test_prompt_mix_with_a_sampler(sd):
    model, clip = sd
    for name in ("dpmpp_2m", "euler_ancestral"):
        smp, sig = sampler(name), sigmas(model, 6, "karras")
        out = mix(model, clip, smp, sig)[0]["samples"]
        plain = stock(model, encode(clip, SRC), encode(clip, ""), smp, sig, seed=3)
        assert rel(out[0], plain[0]) < 1e-4, (name, rel(out[0], plain[0]))   # the original row: the stock run
        assert rel(out[1], out[0]) < 1e-4, (name, rel(out[1], out[0]))       # proxy == object word: a no-op


def test_sampler_errors(sd):
    model, clip = sd
    smp, sig = sampler("euler"), sigmas(model, 4)
    with pytest.raises(ValueError, match="'sampler' is connected but 'sigmas' is not"):
        p2p(model, clip, [TGT], smp, None)
    with pytest.raises(ValueError, match="descending"):
        p2p(model, clip, [TGT], smp, sig.flip(0))
    with torch.inference_mode():
        inv = NullTextInvert.execute(model, clip, SRC, "ddim", 4, latent={"samples": LAT}, guidance=7.5,
                                     scheduler="simple", inner_steps=1, early_stop=1e-5).result[0]
        with pytest.raises(ValueError, match="retracing its own DDIM steps"):
            P2PEditSampler.execute(model, clip, SRC, TGT, encode(clip, ""), {"samples": LAT}, edit="auto", seed=1,
                                   steps=4, cfg=7.5, scheduler="simple", cross_replace_steps=0.8,
                                   cross_replace_words="", self_replace_steps=0.4, reweight="", blend_words="",
                                   blend_threshold=0.3, blend_start=0.2, inversion=inv, sampler=smp, sigmas=sig)
    churn = comfy.samplers.ksampler("euler", {"s_churn": 1.0})
    with pytest.raises(ValueError, match="s_churn"):
        mix(model, clip, churn, sig)
