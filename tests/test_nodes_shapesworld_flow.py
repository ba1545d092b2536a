"""Tier 2: ShapesWorld-Flow's pure-torch twin against ComfyUI's own Flux loaded by ShapesWorldFlowLoader.

Same velocity for the same inputs (square and not), the same attention-override calls, CONST flow sampling, and
KSampler (euler) giving the twin's own sampler's image; the loader node in graphs with the stock samplers.
"""

import asyncio
import uuid
from pathlib import Path

import pytest
import torch
from comfy_env import ROOT, StubServer, comfy_or_skip, encode, register_pack

pack = comfy_or_skip()

import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
import execution  # noqa: E402
from attention_lab.attention.shapesworld.flow import FlowConfig, FluxTwin  # noqa: E402
from attention_lab.attention.shapesworld.flow_model import (  # noqa: E402
    DEFAULT_FLOW_WEIGHTS,
    ShapesWorldFlowModel,
    flow_sigmas,
    load_text_encoder,
    sample_euler_flow,
    save_flow_weights,
)
from attention_lab.attention.shapesworld.harness import colour_blobs  # noqa: E402
from attention_lab.nodes.shapesworld_flow import ShapesWorldFlowLoader, load_shapesworld_flow  # noqa: E402

import nodes  # noqa: E402

PROMPTS = ["a red circle and a blue square on a gray background", "a green star"]
SHIPPED = pytest.mark.skipif(not DEFAULT_FLOW_WEIGHTS.is_file(), reason="no shipped ShapesWorld-Flow weights")


def random_weights(path: Path, seed: int, **config) -> Path:
    """A weights file of a randomly initialised twin (every weight ~ N(0, 0.05)) with the ShapesWorld encoder."""
    cfg = FlowConfig(**config)
    twin = FluxTwin(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in twin.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    conf = {"flux": cfg.flux_params(), "text_width": 128, "text_layers": 3, "image_size": 32,
            "sampling": {"shift": 1.0, "multiplier": 1.0}}
    save_flow_weights(path, twin, load_text_encoder(), conf, {})
    return path


@pytest.fixture(scope="module", params=["random-2x2", "random-1x3-64", "shipped"])
def pair(request, tmp_path_factory):
    """(twin model, ComfyUI MODEL, CLIP) of one weights file."""
    if request.param == "shipped":
        if not DEFAULT_FLOW_WEIGHTS.is_file():
            pytest.skip("no shipped ShapesWorld-Flow weights")
        path = DEFAULT_FLOW_WEIGHTS
    elif request.param == "random-2x2":
        path = random_weights(tmp_path_factory.mktemp("w") / "r.safetensors", 0)
    else:
        path = random_weights(tmp_path_factory.mktemp("w") / "r.safetensors", 1, hidden_size=64, num_heads=2,
                              depth=1, depth_single_blocks=3, axes_dim=(4, 14, 14))
    model, clip, _ = load_shapesworld_flow(path)
    return ShapesWorldFlowModel(path), model, clip


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
def test_twin_and_comfy_flux_give_the_same_velocity(pair, size):
    twin, model, clip = pair
    flux = model.model.diffusion_model
    assert type(flux).__module__ == "comfy.ldm.flux.model" and type(flux).__name__ == "Flux"
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, *size, generator=g)
    sigma = torch.tensor([0.3, 0.85])
    ctx, pooled = twin.encode(PROMPTS)
    with torch.no_grad():
        ours = twin.velocity(x, sigma, (ctx, pooled), {})
        theirs = flux(x, sigma, ctx, y=pooled, transformer_options={})
    r = rel(ours, theirs)
    print(f"velocity {size}: relative difference {r:.2e}, max abs {float((ours - theirs).abs().max()):.2e}")
    assert ours.shape == (2, 3, *size) and r < 1e-5


def test_clip_gives_the_twins_context_and_pooled_vector(pair):
    twin, _, clip = pair
    (cond, extra), = encode(clip, PROMPTS[0])
    ctx, pooled = twin.encode(PROMPTS[:1])
    assert torch.allclose(cond, ctx, atol=1e-6) and torch.allclose(extra["pooled_output"], pooled, atol=1e-6)


def test_model_sampling_is_const_flow_with_the_files_shift(pair):
    twin, model, _ = pair
    ms = model.get_model_object("model_sampling")
    assert float(ms.shift) == twin.shift and float(ms.multiplier) == 1.0
    for steps in (4, 20, 33):
        assert torch.allclose(comfy.samplers.calculate_sigmas(ms, "simple", steps), flow_sigmas(steps, twin.shift))
    g = torch.Generator().manual_seed(6)
    x, sigma = torch.randn(1, 3, 32, 32, generator=g), torch.tensor([0.6])
    ctx, pooled = twin.encode(PROMPTS[1:])
    with torch.no_grad():
        x0 = model.model.apply_model(x, sigma, c_crossattn=ctx, y=pooled)
        v = twin.velocity(x, sigma, (ctx, pooled), {})
    assert rel(x0, x - 0.6 * v) < 1e-5


class Recorder:
    """An optimized_attention_override that records each call and runs the attention unchanged."""

    def __init__(self):
        self.calls = []

    def __call__(self, func, q, k, v, heads, *args, **kwargs):
        to = kwargs["transformer_options"]
        self.calls.append({"where": (to["block_type"], to["block_index"], to["total_blocks"]), "heads": heads,
                           "args": args, "kwargs": sorted(kwargs), "skip_reshape": kwargs.get("skip_reshape"),
                           "mask": kwargs.get("mask"), "qkv": (q.clone(), k.clone(), v.clone())})
        return func(q, k, v, heads, *args, **kwargs)


def test_the_override_sees_the_same_calls_on_both(pair):
    twin, model, _ = pair
    g = torch.Generator().manual_seed(7)
    x, sigma = torch.randn(1, 3, 32, 32, generator=g), torch.tensor([0.5])
    ctx, pooled = twin.encode(PROMPTS[:1])
    ours, theirs = Recorder(), Recorder()
    with torch.no_grad():
        plain = twin.velocity(x, sigma, (ctx, pooled), {})
        hooked = twin.velocity(x, sigma, (ctx, pooled), {"optimized_attention_override": ours})
        model.model.diffusion_model(x, sigma, ctx, y=pooled,
                                    transformer_options={"optimized_attention_override": theirs})
    assert torch.equal(plain, hooked)
    c = twin.flow_config
    assert [a["where"] for a in ours.calls] == [("double", i, c.depth) for i in range(c.depth)] + [
        ("single", i, c.depth_single_blocks) for i in range(c.depth_single_blocks)]
    assert len(ours.calls) == len(theirs.calls)
    tokens = ctx.shape[1] + (32 // c.patch_size) ** 2
    for a, b in zip(ours.calls, theirs.calls):
        assert (a["where"], a["heads"], a["args"], a["kwargs"], a["skip_reshape"]) == (
            b["where"], b["heads"], b["args"], b["kwargs"], b["skip_reshape"])
        assert a["mask"] is None and b["mask"] is None
        assert a["qkv"][0].shape == (1, c.num_heads, tokens, c.hidden_size // c.num_heads)
        for p, q in zip(a["qkv"], b["qkv"]):
            assert rel(p, q) < 1e-5


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_ksampler_euler_gives_the_twins_image(pair, cfg):
    twin, model, clip = pair
    latent = torch.zeros(2, 3, 32, 32)
    noise = comfy.sample.prepare_noise(latent, 11)
    pos = encode(clip, PROMPTS[0])
    neg = encode(clip, "")
    steps = 8
    theirs = comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", pos, neg, latent, disable_pbar=True,
                                 seed=11)
    sig = twin.sigmas(steps)
    cond, uncond = twin.encode([PROMPTS[0]] * 2), twin.encode([""] * 2)
    ours = sample_euler_flow(twin.denoiser(cond, uncond, cfg, sample_sigmas=sig), noise * sig[0], sig)
    diff = float((ours - theirs).abs().max())
    print(f"KSampler euler, cfg {cfg}, {steps} steps: max abs difference {diff:.2e} "
          f"(range {float(theirs.abs().max()):.2f})")
    assert diff < 1e-4


# ----------------------------------------------------------------------------------------------- graphs
@pytest.fixture(scope="module")
def comfy_nodes(tmp_path_factory):
    out = tmp_path_factory.mktemp("comfy_out")
    register_pack(out)
    assert "ShapesWorldFlowLoader" in nodes.NODE_CLASS_MAPPINGS
    return out


def graph(prompt: str, sampler_node: str, seed: int = 3) -> dict:
    g = {"1": {"class_type": "ShapesWorldFlowLoader", "inputs": {"weights": ""}},
         "2": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["1", 1]}},
         "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
         "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 2}},
         "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
         "8": {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}}}
    if sampler_node == "KSampler":
        g["6"] = {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": seed, "steps": 20, "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["5", 0], "denoise": 1.0}}
    else:
        g.update({
            "11": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
            "12": {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["2", 0],
                                                         "negative": ["3", 0], "cfg": 4.0}},
            "13": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "dpmpp_2m"}},
            "14": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "simple",
                                                              "steps": 16, "denoise": 1.0}},
            "6": {"class_type": "SamplerCustomAdvanced", "inputs": {
                "noise": ["11", 0], "guider": ["12", 0], "sampler": ["13", 0], "sigmas": ["14", 0],
                "latent_image": ["5", 0]}}})
    return g


def run(prompt: dict) -> dict:
    ex = execution.PromptExecutor(StubServer(), cache_type=execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0})
    pid = str(uuid.uuid4())
    ok, err, outputs, node_errors = asyncio.run(execution.validate_prompt(pid, prompt, None))
    assert ok, (err, node_errors)
    ex.execute(prompt, pid, {}, outputs)
    errors = [d for ev, d in ex.status_messages if ev == "execution_error"]
    assert ex.success, errors[0]["exception_message"] if errors else ex.status_messages
    return ex.history_result["outputs"]


@SHIPPED
@pytest.mark.parametrize("sampler_node", ["KSampler", "SamplerCustomAdvanced"])
def test_loader_samples_with_the_stock_samplers(comfy_nodes, sampler_node):
    import numpy as np
    from PIL import Image
    out = run(graph("a red circle and a blue square on a white background", sampler_node))
    entries = out["8"]["images"]
    assert len(entries) == 2
    for e in entries:
        img = np.array(Image.open(comfy_nodes / "temp" / e["subfolder"] / e["filename"]))
        assert img.shape[:2] == (32, 32)
        picture = torch.from_numpy(img).permute(2, 0, 1).float() / 255
        assert colour_blobs(picture, "red") and colour_blobs(picture, "blue"), "the graph drew no named shapes"


@SHIPPED
def test_the_flow_workflow_runs_and_draws_the_named_shapes(comfy_nodes):
    """workflows/api/flow_txt2img_shapesworld_api.json as saved (stock nodes after the loader), through the executor."""
    import json

    import numpy as np
    from PIL import Image
    saved = json.loads((ROOT / "workflows" / "api" / "flow_txt2img_shapesworld_api.json").read_text())
    prompt = {k: {kk: vv for kk, vv in v.items() if kk != "_meta"} for k, v in saved.items()}
    assert [prompt[k]["class_type"] for k in sorted(prompt)] == [
        "ShapesWorldFlowLoader", "CLIPTextEncode", "CLIPTextEncode", "EmptyLatentImage", "KSampler", "VAEDecode",
        "SaveImage"]
    entries = run(prompt)["7"]["images"]
    assert len(entries) == 4
    drawn = 0
    for e in entries:
        img = np.array(Image.open(comfy_nodes / "output" / e["subfolder"] / e["filename"]))
        assert img.shape[:2] == (32, 32)
        picture = torch.from_numpy(img).permute(2, 0, 1).float() / 255
        drawn += bool(colour_blobs(picture, "red")) and bool(colour_blobs(picture, "blue"))
    assert drawn >= 3, f"only {drawn} of 4 images show a red and a blue shape"


def test_loader_refuses_missing_and_foreign_weights(tmp_path):
    with pytest.raises(Exception, match=r"nope\.safetensors is missing: give a file written by"):
        ShapesWorldFlowLoader.execute(str(tmp_path / "nope.safetensors"))
    with pytest.raises(Exception, match="is not a ShapesWorld-Flow weights file"):
        ShapesWorldFlowLoader.execute(str(ROOT / "assets" / "shapesworld.safetensors"))
