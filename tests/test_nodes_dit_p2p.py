"""Tier 2: P2PEditSampler on DiT models (issue 29): tiny random Flux (guidance-distilled, and schnell's layout at
CFG) and SD3 built from ComfyUI's own classes, and the shipped ShapesWorld-Flow, from a seed (our loop and a
connected sampler) and from rectified-flow inversions."""

import copy

import pytest
import torch
from comfy_env import comfy_or_skip, encode, sample, tiny_flux
from compare import assert_same_samples, rel

pack = comfy_or_skip()

import comfy.samplers  # noqa: E402
from attention_lab.attention.shapesworld.flow_model import DEFAULT_FLOW_WEIGHTS  # noqa: E402
from attention_lab.nodes.inversion import NullTextInvert  # noqa: E402
from attention_lab.nodes.p2p import P2PEditSampler  # noqa: E402
from attention_lab.nodes.shapesworld_flow import load_shapesworld_flow  # noqa: E402

SRC = "a photo of a cat riding a red bicycle"
# The tiny random models barely read their text (Flux: the plain samples of SRC and SWAP differ by 1.2e-5 of their
# scale, SD3 by 1e-3), so an edit's change is asserted against that scale.
CHANGED = 5e-6
SWAP = "a photo of a dog riding a red bicycle"
ADD = "a photo of a fluffy cat riding a red bicycle"


def latent(h=8, w=12):
    return torch.zeros(1, 16, h, w)          # non-square: a 4x6 token grid


def p2p(model, clip, targets, lat, inversion=None, source=SRC, **kw):
    args = dict(edit="auto", seed=3, steps=5, cfg=1.0, scheduler="simple", cross_replace_steps=0.8,
                cross_replace_words="", self_replace_steps=0.4, reweight="", blend_words="", blend_threshold=0.3,
                blend_start=0.2)
    args.update(kw)
    with torch.inference_mode():
        return P2PEditSampler.execute(model, clip, source, "\n".join(targets), encode(clip, ""),
                                      {"samples": lat}, inversion=inversion, **args).result


def plain(model, clip, lat, prompt=SRC, cfg=1.0, steps=5, seed=3, sampler="euler"):
    with torch.inference_mode():
        return sample(model, encode(clip, prompt), encode(clip, ""), lat, cfg=cfg, sampler=sampler, steps=steps,
                      seed=seed, scheduler="simple")


def check_edit(model, clip, cfg, lat):
    """Source = plain sampling; identical target = source row; a swap and a refine change their rows; no state."""
    before = copy.deepcopy(model.model_options)
    (out, mask) = p2p(model, clip, [SRC, SWAP, ADD], lat, cfg=cfg)
    o = out["samples"]
    assert o.shape == (4, *lat.shape[1:]) and mask.shape == (3, *lat.shape[-2:])
    assert_same_samples(o[0], plain(model, clip, lat, cfg=cfg)[0])
    assert torch.equal(o[1], o[0]), rel(o[1], o[0])   # identical target: the source row, bit for bit
    assert rel(o[2], o[0]) > CHANGED and rel(o[3], o[0]) > CHANGED
    assert model.model_options == before
    return o


def test_flux_guidance_distilled_identical_target_is_source_and_edits_change(flux):
    model, clip = flux
    o = check_edit(model, clip, 1.0, latent())
    alone = p2p(model, clip, [SWAP], latent())[0]["samples"]          # batch: an edit row does not see the others
    assert_same_samples(alone[1], o[2])


def test_flux_schnell_layout_with_cfg_and_reweight(flux):
    model, clip = tiny_flux(guidance_embed=False), flux[1]
    check_edit(model, clip, 3.0, latent(12, 8))
    base = p2p(model, clip, [SRC], latent(), cfg=3.0)[0]["samples"]
    heavy = p2p(model, clip, [SRC], latent(), cfg=3.0, reweight="cat:4")[0]["samples"]
    assert torch.equal(base[1], base[0]) and rel(heavy[1], heavy[0]) > CHANGED


def test_sd3_cfg_words_in_clip_and_t5_parts(sd3):
    model, clip = sd3
    o = check_edit(model, clip, 4.0, latent())
    assert rel(o[2], o[0]) > 1e-4


def test_long_prompts_on_flux(flux):
    model, clip = flux
    tail = " ".join(["a quiet street with old houses and tall trees"] * 30)
    src, tgt = f"{tail} and a cat", f"{tail} and a dog"
    assert encode(clip, src)[0][0].shape[1] > 256                     # beyond T5's 256-token minimum
    o = p2p(model, clip, [src, tgt], latent(), source=src)[0]["samples"]
    assert torch.equal(o[1], o[0]) and rel(o[2], o[0]) > CHANGED


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2m_sde", "heun"])
def test_connected_samplers_run_with_shared_noise(flux, name):
    """Ancestral and SDE samplers (one shared noise per step for every row) and a second-order one: the source row
    is KSampler's run of that sampler, an identical target its copy."""
    model, clip = flux
    sampler = comfy.samplers.sampler_object(name)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 5).cpu()
    o = p2p(model, clip, [SRC, SWAP], latent(), sampler=sampler, sigmas=sigmas)[0]["samples"]
    assert_same_samples(o[0], plain(model, clip, latent(), sampler=name)[0])
    assert torch.equal(o[1], o[0]) and rel(o[2], o[0]) > CHANGED


def invert(model, clip, lat, mode, steps=5, guidance=1.0):
    with torch.inference_mode():
        return NullTextInvert.execute(model, clip, SRC, mode, steps, guidance, "simple", 3, 1e-5,
                                      latent={"samples": lat}).result


def smooth_latent(h=8, w=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    small = torch.randn(1, 16, h // 4, w // 4, generator=g)
    return torch.nn.functional.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)


@pytest.mark.parametrize("mode", ["rf-euler", "fireflow"])
def test_equal_prompts_from_an_rf_inversion_reproduce_its_reconstruction(flux, mode):
    model, clip = flux
    lat = smooth_latent()
    inv, rec = invert(model, clip, lat, mode)
    o = p2p(model, clip, [SRC, SWAP], lat, inversion=inv)[0]["samples"]
    assert_same_samples(o[0], rec["samples"][0])
    assert torch.equal(o[1], o[0]) and rel(o[2], o[0]) > CHANGED


def test_sd3_from_a_null_text_inversion(sd3):
    """CFG flow model: NullTextInvert's null-text mode (Euler inversion with the prompt, then the per-step null
    embeddings), edited with them."""
    model, clip = sd3
    lat = smooth_latent(seed=2)
    inv, rec = invert(model, clip, lat, "null-text", steps=4, guidance=3.0)
    o = p2p(model, clip, [SRC, SWAP], lat, inversion=inv, steps=4, cfg=3.0)[0]["samples"]
    assert_same_samples(o[0], rec["samples"][0])
    assert torch.equal(o[1], o[0]) and rel(o[2], o[0]) > CHANGED


@pytest.fixture(scope="module")
def flow():
    if not DEFAULT_FLOW_WEIGHTS.is_file():
        pytest.skip("no shipped ShapesWorld-Flow weights")
    model, clip, _ = load_shapesworld_flow()
    return model, clip


def test_shapesworld_flow_colour_swap(flow):
    """The trained model: the swapped colour shows where the source's object was, the rest stays."""
    model, clip = flow
    src, tgt = "a red circle and a blue square on a gray background", "a green circle and a blue square on a gray " \
                                                                      "background"
    lat = torch.zeros(1, 3, 32, 32)
    o, mask = p2p(model, clip, [src, tgt], lat, source=src, steps=12, cfg=4.0, seed=1, blend_words="red, green")
    s = o["samples"]
    assert torch.equal(s[1], s[0])
    img = (s.clamp(-1, 1) + 1) / 2                                   # ShapesWorld's pixel-space latent, [-1, 1]
    changed = (img[2] - img[0]).abs().amax(0) > 0.2
    green = (img[2, 1] > 0.5) & (img[2, 0] < 0.4) & (img[2, 2] < 0.4)
    assert changed.any() and bool(green[changed].float().mean() > 0.5)
    m = mask[1] > 0                                                  # the green edit's LocalBlend mask
    assert 0.01 < float(m.float().mean()) < 0.9 and bool(m[changed].all())   # 66 %: an 8x8 grid, 3x3 max-pool
    assert torch.allclose(s[2][:, ~m], s[0][:, ~m], atol=1e-5)       # outside it: the source
    without = p2p(model, clip, [src, tgt], lat, source=src, steps=12, cfg=4.0, seed=1)[0]["samples"]
    assert float((without[2] - s[0]).abs()[:, ~m].amax()) > 0.05     # which the edit without LocalBlend changes


def test_another_override_still_applies(flux):
    """An attention override already on the MODEL keeps its effect on every row (its difference to plain
    attention is added on the rows P2P recomputes)."""
    model, clip = flux
    m = model.clone()
    to = m.model_options.setdefault("transformer_options", {})

    def scale(func, *args, **kwargs):
        return func(*args, **kwargs) * 0.9
    to["optimized_attention_override"] = scale
    theirs = plain(m, clip, latent())
    assert rel(theirs, plain(model, clip, latent())) > 1e-3
    o = p2p(m, clip, [SRC, SWAP], latent())[0]["samples"]
    assert_same_samples(o[0], theirs[0])
    assert torch.equal(o[1], o[0]) and rel(o[2], o[0]) > CHANGED


def test_shapesworld_flow_p2p_workflow_runs_through_comfyuis_executor(flow, tmp_path_factory):
    """workflows/api/p2p_edit_shapesworld_flow_api.json as the HTTP API would queue it: the source and two colour
    edits saved, the LocalBlend masks previewed; the green edit is green where the red circle was."""
    from test_nodes_workflow import api_graph, load_png, new_executor, run
    out_dir = tmp_path_factory.mktemp("comfy_out")
    from comfy_env import register_pack
    register_pack(out_dir)
    out = run(new_executor(), api_graph("p2p_edit_shapesworld_flow", 12))
    saved = [load_png(out_dir, e).astype(float) / 255 for e in out["6"]["images"]]
    assert len(saved) == 3 and out["8"]["images"]
    src, green = torch.tensor(saved[0]).permute(2, 0, 1), torch.tensor(saved[1]).permute(2, 0, 1)
    changed = (green - src).abs().amax(0) > 0.2
    assert changed.any() and float(green[1][changed].mean()) > float(green[0][changed].mean())
