"""Tier 1: ShapesWorld-Flow's Flux twin (pure torch): the official formulas, the hook contract, the sampler, the
trainer's command line and resumption. Equality with ComfyUI's own Flux is tier 2
(tests/test_nodes_shapesworld_flow.py)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from attention.shapesworld import flow_train
from attention.shapesworld.flow import FlowConfig, FluxTwin, apply_rope1, rope, timestep_embedding
from attention.shapesworld.flow_evaluate import JointAttentionObserver
from attention.shapesworld.flow_model import flow_sigmas, sample_euler_flow

SMALL = FlowConfig(hidden_size=64, num_heads=2, depth=2, depth_single_blocks=2)


def random_twin(cfg: FlowConfig = SMALL, seed: int = 0) -> FluxTwin:
    twin = FluxTwin(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in twin.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return twin.eval()


def inputs(b=2, h=32, w=32, t=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 3, h, w, generator=g), torch.rand(b, generator=g), torch.randn(b, t, 128, generator=g),
            torch.randn(b, 128, generator=g))


# ------------------------------------------------------------------ the official formulas (BFL flux, our words)
def official_timestep_embedding(t, dim):
    """src/flux/modules/layers.py: 1000 t times frequencies exp(-ln(10000) i / half), cos then sin."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = (1000 * t)[:, None].float() * freqs[None]
    return torch.cat([args.cos(), args.sin()], -1)


def official_rope(pos, dim, theta):
    """src/flux/math.py rope: angles pos * theta^(-2i/dim) as 2x2 rotation matrices [[cos, -sin], [sin, cos]]."""
    omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    ang = pos.double()[..., None] * omega
    return torch.stack([ang.cos(), -ang.sin(), ang.sin(), ang.cos()], -1).view(*ang.shape, 2, 2).float()


def official_apply_rope(x, freqs):
    """src/flux/math.py apply_rope: each adjacent pair (x0, x1) -> R @ (x0, x1)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)                      # (..., d/2, 2)
    return torch.einsum("...ij,...j->...i", freqs, pairs).reshape(x.shape)


def test_timestep_embedding_rope_and_its_application_are_the_official_formulas():
    t = torch.tensor([0.0, 0.013, 0.5, 1.0])
    assert torch.allclose(timestep_embedding(t, 256), official_timestep_embedding(t, 256), atol=1e-5)
    pos = torch.arange(16.0).view(1, 16)
    for dim in (4, 14, 56):
        assert torch.allclose(rope(pos, dim, 10000), official_rope(pos, dim, 10000), atol=1e-6)
    x = torch.randn(2, 3, 16, 14)
    freqs = rope(pos, 14, 10000)[:, None]                                   # (1, 1, 16, 7, 2, 2)
    assert torch.allclose(apply_rope1(x, freqs), official_apply_rope(x, freqs), atol=1e-6)


def test_double_block_is_the_official_joint_attention_block():
    """One double-stream block against src/flux/modules/layers.py DoubleStreamBlock written out: modulated
    LayerNorm, per-stream qkv + RMS q/k norms, one attention over cat(txt, img) with RoPE, gated residuals."""
    twin = random_twin()
    blk = twin.double_blocks[0]
    img, txt, vec = torch.randn(1, 64, 64), torch.randn(1, 5, 64), torch.randn(1, 64)
    ids = torch.cat([torch.zeros(1, 5, 3), twin.image_ids(1, 8, 8, "cpu")], 1)
    pe = twin.pe_embedder(ids)

    def stream(mod, x, attn):
        m = mod.lin(F.silu(vec)).chunk(6, -1)
        h = (1 + m[1]) * F.layer_norm(x, (64,), eps=1e-6) + m[0]
        q, k, v = attn.qkv(h).view(1, -1, 3, 2, 32).permute(2, 0, 3, 1, 4)
        rms = lambda z, s: z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + 1e-6) * s  # noqa: E731
        return m, rms(q, attn.norm.query_norm.scale), rms(k, attn.norm.key_norm.scale), v

    mi, qi, ki, vi = stream(blk.img_mod, img, blk.img_attn)
    mt, qt, kt, vt = stream(blk.txt_mod, txt, blk.txt_attn)
    q, k, v = (torch.cat(z, 2) for z in ((qt, qi), (kt, ki), (vt, vi)))
    q, k = official_apply_rope(q, pe), official_apply_rope(k, pe)
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(32), -1) @ v
    a = a.transpose(1, 2).reshape(1, -1, 64)

    def finish(x, out, m, attn, mlp):
        x = x + m[2] * attn.proj(out)
        return x + m[5] * mlp((1 + m[4]) * F.layer_norm(x, (64,), eps=1e-6) + m[3])

    want_img = finish(img, a[:, 5:], mi, blk.img_attn, blk.img_mlp)
    want_txt = finish(txt, a[:, :5], mt, blk.txt_attn, blk.txt_mlp)
    got_img, got_txt = blk(img, txt, vec, pe, None, {})
    assert torch.allclose(got_img, want_img, atol=1e-5) and torch.allclose(got_txt, want_txt, atol=1e-5)


# -------------------------------------------------------------------------------------- the hook contract
class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, func, q, k, v, heads, *args, **kwargs):
        to = kwargs["transformer_options"]
        self.calls.append(((to["block_type"], to["block_index"], to["total_blocks"]), q.shape, heads, sorted(kwargs)))
        return func(q, k, v, heads, *args, **kwargs)


def test_every_joint_attention_goes_through_the_override_with_its_block():
    twin = random_twin()
    x, t, ctx, y = inputs(h=24, w=40)
    rec = Recorder()
    with torch.no_grad():
        plain = twin(x, t, ctx, y)
        hooked = twin(x, t, ctx, y, transformer_options={"optimized_attention_override": rec})
    assert torch.equal(plain, hooked)
    tokens = 24 + 12 * 20
    keys = ["_inside_attn_wrapper", "mask", "skip_reshape", "transformer_options"]
    assert rec.calls == [((kind, i, 2), (2, 2, tokens, 32), 2, keys) for kind in ("double", "single") for i in range(2)]


def test_the_override_sees_text_tokens_first():
    """Changing only the last text token changes the keys at index T-1 of every double block, no image key."""
    twin = random_twin()
    x, t, ctx, y = inputs(b=1)
    seen = []

    def keep(func, q, k, v, heads, *args, **kwargs):
        to = kwargs["transformer_options"]
        if (to["block_type"], to["block_index"]) == ("double", 0):
            seen.append(k.clone())
        return func(q, k, v, heads, *args, **kwargs)

    ctx2 = ctx.clone()
    ctx2[:, -1] += 1.0
    with torch.no_grad():
        for c in (ctx, ctx2):
            twin(x, t, c, y, transformer_options={"optimized_attention_override": keep})
    changed = (seen[0] - seen[1]).abs().amax((0, 1, 3)) > 0                  # (L,)
    assert changed.nonzero().flatten().tolist() == [23]


def test_dit_block_replace_with_the_original_block_is_a_no_op():
    twin = random_twin()
    x, t, ctx, y = inputs()
    called = []

    def replace(args, extra):
        called.append(args["transformer_options"]["block_type"])
        return extra["original_block"](args)

    dit = {("double_block", 1): replace, ("single_block", 0): replace}
    with torch.no_grad():
        replaced = twin(x, t, ctx, y, transformer_options={"patches_replace": {"dit": dit}})
        assert torch.equal(twin(x, t, ctx, y), replaced)
    assert called == ["double", "single"]


def test_observer_leaves_the_output_and_chains_another_override():
    twin = random_twin()
    x, t, ctx, y = inputs(b=1)
    rec = Recorder()
    obs = JointAttentionObserver(24, chained=rec)
    with torch.no_grad():
        plain = twin(x, t, ctx, y)
        seen = twin(x, t, ctx, y, transformer_options={"optimized_attention_override": obs})
    assert torch.equal(plain, seen) and len(rec.calls) == 4
    assert set(obs.maps) == {("double", 0), ("double", 1), ("single", 0), ("single", 1)}
    m = obs.maps[("double", 0)]
    assert m["img2txt"].shape == m["txt2img"].shape == (1, 24, 256)
    assert (m["txt2img"].sum(-1) <= 1 + 1e-5).all() and (m["img2txt"].sum(1) <= 1 + 1e-5).all()
    assert obs.word_map((3, 4), "img2txt", "all", (16, 16)).shape == (16, 16)


# --------------------------------------------------------------------------------------------- sampling
def test_flow_sigmas_are_comfys_simple_scheduler_on_the_discrete_flow_table():
    """ComfyUI: ModelSamplingDiscreteFlow's table shift t / (1 + (shift - 1) t) at t = i/1000, i = 1..1000; the
    'simple' scheduler takes entry -(1 + floor(i * 1000 / steps)) for i < steps, then 0."""
    for shift in (1.0, 3.0):
        table = [shift * (i / 1000) / (1 + (shift - 1) * (i / 1000)) for i in range(1, 1001)]
        for steps in (1, 7, 20):
            want = [table[-(1 + int(i * 1000 / steps))] for i in range(steps)] + [0.0]
            assert torch.allclose(flow_sigmas(steps, shift), torch.tensor(want))
    assert float(flow_sigmas(20)[0]) == 1.0


def test_euler_with_an_exact_velocity_lands_on_the_image():
    """For x = (1 - s) x0 + s eps the velocity eps - x0 is constant: Euler reaches x0 in any number of steps."""
    x0, eps = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    denoiser = lambda x, s: x0  # noqa: E731  (CONST: x0 = x - s v)
    out = sample_euler_flow(denoiser, eps.clone(), flow_sigmas(5))
    assert torch.allclose(out, x0, atol=1e-5)


# --------------------------------------------------------------------------------------------- training
def test_training_resumes_to_the_same_weights(tmp_path):
    common = ["--steps", "4", "--batch", "2", "--warmup", "1", "--save-every", "2", "--hidden-size", "32",
              "--num-heads", "2", "--depth", "1", "--depth-single-blocks", "1"]
    flow_train.main(["--out", str(tmp_path / "a.safetensors"), "--stop-at", "3", *common])
    flow_train.main(["--out", str(tmp_path / "a.safetensors"), *common])
    flow_train.main(["--out", str(tmp_path / "b.safetensors"), *common])
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        meta, config = json.loads(f.metadata()["training"]), json.loads(f.metadata()["config"])
    assert meta["steps"] == 4 and config["flux"]["hidden_size"] == 32 and config["sampling"]["shift"] == 1.0
    assert all(v.dtype == torch.float16 for v in a.values())


def test_init_starts_model_and_ema_from_a_weights_file_and_refuses_another_config(tmp_path):
    common = ["--batch", "2", "--warmup", "0", "--hidden-size", "32", "--num-heads", "2", "--depth", "1",
              "--depth-single-blocks", "1"]
    flow_train.main(["--out", str(tmp_path / "a.safetensors"), "--steps", "2", *common])
    # a tiny learning rate: one step from the init leaves its fp16 weights as they were (a fresh start would not)
    flow_train.main(["--out", str(tmp_path / "b.safetensors"), "--steps", "1", "--lr", "1e-12",
                     "--init", str(tmp_path / "a.safetensors"), *common])
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with safe_open(str(tmp_path / "b.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["training"])["init"] == "a.safetensors"
    with pytest.raises(SystemExit, match="holds another model config"):
        flow_train.main(["--out", str(tmp_path / "c.safetensors"), "--steps", "1", *common, "--hidden-size", "64",
                         "--init", str(tmp_path / "a.safetensors")])


def test_resuming_with_other_training_options_is_refused(tmp_path):
    """A checkpoint resumes only under the options it was written with: a changed --lr (or teacher, loss weight,
    seed, ...) would otherwise mix two recipes into one file whose metadata names only the last."""
    common = ["--out", str(tmp_path / "a.safetensors"), "--batch", "2", "--warmup", "0", "--hidden-size", "32",
              "--num-heads", "2", "--depth", "1", "--depth-single-blocks", "1", "--steps", "3"]
    flow_train.main([*common, "--stop-at", "1"])
    with pytest.raises(SystemExit, match=r"other training options \(\{'lr': '0.0008 -> 0.0001'\}\).*--fresh"):
        flow_train.main([*common, "--lr", "1e-4"])
    flow_train.main(common)                                   # the same options resume and finish
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["training"])["steps"] == 3


def test_time_laws_give_the_rectified_flow_interpolation():
    x0 = torch.randn(4096, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    for law, std in (("uniform", 1 / math.sqrt(12)), ("logit-normal", 0.21)):
        xt, t, v = flow_train.flow_targets(x0, torch.Generator().manual_seed(1), 0.0, 1.0, law)
        eps = v + x0
        assert torch.allclose(xt, (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps, atol=1e-6)
        assert 0 < t.min() and t.max() < 1 and abs(t.mean() - 0.5) < 0.02 and abs(t.std() - std) < 0.02, law


def test_min_snr_weight_is_the_unet_recipes_x0_weighting_written_for_the_velocity():
    """Hang et al.'s min-SNR-gamma weights the x0-space MSE by min(SNR, gamma); for rectified flow SNR = ((1 - t) /
    t)^2 and x0 = x_t - t v, so the weighted velocity MSE must equal min(SNR, gamma) times the x0 MSE of the same
    prediction, sample by sample."""
    g = torch.Generator().manual_seed(2)
    x0, v_hat = torch.randn(64, 3, 4, 4, generator=g), torch.randn(64, 3, 4, 4, generator=g)
    xt, t, v = flow_train.flow_targets(x0, g, 0.0, 1.0, "uniform")
    tt = t.view(-1, 1, 1, 1)
    x0_hat = xt - tt * v_hat
    snr = ((1 - t) / t) ** 2
    for gamma in (5.0, 1.0):
        ours = flow_train.loss_weight(t, "min-snr", gamma) * (v_hat - v).pow(2).mean(dim=(1, 2, 3))
        official = torch.minimum(snr, torch.full_like(snr, gamma)) * (x0_hat - x0).pow(2).mean(dim=(1, 2, 3))
        assert torch.allclose(ours, official, rtol=1e-4, atol=1e-6)
    assert torch.equal(flow_train.loss_weight(t, "none", 5.0), torch.ones_like(t))


def test_teacher_target_is_the_unets_one_step_prediction_inside_the_window_and_the_data_target_outside():
    """Inside the window the target velocity is (x_t - x0) / t with x0 the UNet's one-step prediction at the same
    signal-to-noise ratio (as flow_trajectory.one_step_x0 asks it: x0 + k eps at k-diffusion sigma k = t / (1 - t));
    outside it the sampled data target is kept."""
    from attention.shapesworld.flow_trajectory import one_step_x0
    from attention.shapesworld.model import ShapesWorldModel
    teacher = ShapesWorldModel()
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    eps = torch.randn(4, 3, 32, 32, generator=g)
    t = torch.tensor([0.1, 0.3, 0.6, 0.95])
    tt = t.view(-1, 1, 1, 1)
    xt, data = (1 - tt) * x0 + tt * eps, eps - x0
    context = teacher.encode(["a red circle", "a blue star", "a green square and a cyan cross", ""])
    out = flow_train.teacher_velocity(teacher, xt, t, context, data, (0.25, 0.9))
    assert torch.equal(out[[0, 3]], data[[0, 3]])
    for i in (1, 2):
        official = one_step_x0(teacher, x0[i:i + 1], eps[i:i + 1], float(t[i]), context[i:i + 1])
        assert torch.allclose(out[i], (xt[i] - official[0]) / t[i], atol=1e-4)
        assert not torch.allclose(out[i], data[i], atol=1e-2)


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps: 0 is out of range"),
    (["--min-snr-gamma", "0"], "--min-snr-gamma: 0 is out of range"),
    (["--min-snr-gamma", "3"], "--min-snr-gamma: 3.0 has no effect with --loss-weight none"),
    (["--teacher", "assets/shapesworld_flow.safetensors"], "--teacher: assets/shapesworld_flow.safetensors is a "
                                                           "ShapesWorld-Flow weights file"),
    (["--teacher", "nope.safetensors"], "nope.safetensors does not exist: give a ShapesWorld UNet weights file as "
                                        "the teacher"),
    (["--init", "assets/shapesworld.safetensors"], "--init: assets/shapesworld.safetensors is not a ShapesWorld-Flow "
                                                   "weights file"),
    (["--num-heads", "3"], "--num-heads: 3 heads do not split --hidden-size 128"),
    (["--patch-size", "3"], "--patch-size: 3 does not divide"),
    (["--stop-at", "9", "--steps", "5", "--warmup", "1"], "--stop-at: 9 is out of range"),
    (["--lr", "-1"], "--lr: -1 is out of range"),
    (["--out", "assets/shapesworld_flow.safetensors"], "is the shipped file"),
    (["--text-weights", "nope.safetensors"], "nope.safetensors does not exist"),
])
def test_bad_values_are_refused_with_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        flow_train.main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
