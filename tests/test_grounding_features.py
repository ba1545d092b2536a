"""Tier 1: ShapesUNet's UNet-level patch contract and the grounding feature recorder."""

from __future__ import annotations

import pytest
import torch

from attention.grounding_features import FeatureRecorder, FeatureRecordError, GroundingFeatures
from attention.shapesworld.unet import ShapesUNet

# c0/c1/c2 = 32/64/128, the committed model's widths (the test builds random weights of that layout)
CH = (32, 64, 128)


@pytest.fixture(scope="module")
def unet():
    net = ShapesUNet(channels=CH, context_dim=16, heads=4).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return net


def _inputs(b: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, 32, 32, generator=g)
    t = torch.full((b,), 1, dtype=torch.long)
    ctx = torch.randn(b, 5, 16, generator=g)
    return x, t, ctx


def _run(unet, x, t, ctx, cou, rec=None, final=True, extra=None):
    """One call with rows = chunks of cond_or_uncond (each chunk the same images)."""
    n = len(cou)
    to = {"cond_or_uncond": list(cou)}
    if extra:
        to["patches"] = extra
    if rec is not None:
        to = rec.attach(to)
    args = (x.repeat(n, 1, 1, 1), t.repeat(n), ctx)
    with torch.no_grad():
        if rec is not None and final:
            with rec.hook_final_block(unet):
                return unet(*args, transformer_options=to)
        return unet(*args, transformer_options=to)


def test_identity_block_patches_leave_output_bit_identical(unet):
    x, t, _ = _inputs(2)
    ctx = torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(3))
    plain = _run(unet, x, t, ctx, [1, 0])
    ident = {"emb_patch": [lambda e, mc, to: e], "input_block_patch": [lambda h, to: h],
             "input_block_patch_after_skip": [lambda h, to: h], "output_block_patch": [lambda h, hsp, to: (h, hsp)]}
    assert torch.equal(_run(unet, x, t, ctx, [1, 0], extra=ident), plain)
    rec = FeatureRecorder()
    assert torch.equal(_run(unet, x, t, ctx, [1, 0], rec=rec), plain)
    assert len(rec.recorded_blocks) == 13


def test_patch_call_sequence_matches_comfy_unet(unet):
    """ComfyUI calls input_block_patch after each input block (block = ("input", k)), then output_block_patch
    before each output block with h = the previous block's output and hsp = the matching skip."""
    seen = []
    skips = []

    def inp(h, to):
        seen.append(("in", tuple(to["block"]), tuple(h.shape[1:])))
        skips.append(h)
        return h

    def out(h, hsp, to):
        seen.append(("out", tuple(to["block"]), tuple(h.shape[1:])))
        assert hsp is skips.pop()
        return h, hsp

    def emb(e, mc, to):
        assert mc == CH[0]
        seen.append(("emb",))
        return e
    x, t, ctx = _inputs(1)
    _run(unet, x, t, ctx, [0], extra={"input_block_patch": [inp], "output_block_patch": [out], "emb_patch": [emb]})
    assert seen[0] == ("emb",)
    assert [s[1] for s in seen[1:7]] == [("input", k) for k in range(6)]
    assert [s[1] for s in seen[7:]] == [("output", k) for k in range(6)]
    assert seen[7][2] == (CH[2], 8, 8)            # output 0 sees the middle block's output


def test_patches_that_change_h_change_the_output(unet):
    """The patch results are used (a test that identity patches are harmless needs this counterpart)."""
    x, t, ctx = _inputs(1)
    plain = _run(unet, x, t, ctx, [0])
    doubled = _run(unet, x, t, ctx, [0], extra={"output_block_patch": [lambda h, hsp, to: (h * 2, hsp)]})
    assert not torch.allclose(plain, doubled)


def test_feature_layout_batch_1_and_3(unet):
    for b in (1, 3):
        x, t, _ = _inputs(b)
        ctx = torch.randn(2 * b, 5, 16, generator=torch.Generator().manual_seed(4))
        rec = FeatureRecorder()
        _run(unet, x, t, ctx, [1, 0], rec=rec)
        f = rec.features(family="shapesworld", context_dim=16, timestep=1)
        assert f.sizes == ((8, 8), (16, 16), (32, 32))
        # 8x8: input 4, 5, middle, output 0; 16x16: input 2, 3, output 1 (upsampled), 2;
        # 32x32: input 0, 1, output 3 (upsampled), 4, 5 -- each block x2 rows (uncond | cond)
        assert f.channels == (2 * (64 + 128 + 128 + 128), 2 * (32 + 64 + 128 + 64), 2 * (32 + 32 + 64 + 32 + 32))
        assert f.blocks[0] == ("input.4", "input.5", "middle.0", "output.0")
        assert f.blocks[2][-1] == "output.5"
        assert f.batch == b and f.concat_uncond


def test_rows_pair_per_image_not_across_images(unet):
    """Upstream's (2B, C) -> (B, 2C) reshape pairs uncond_0 with uncond_1 for B > 1; ours keeps each image's
    features equal to that image evaluated alone."""
    x, t, _ = _inputs(3)
    g = torch.Generator().manual_seed(5)
    cond, uncond = torch.randn(3, 5, 16, generator=g), torch.randn(3, 5, 16, generator=g)
    rec = FeatureRecorder()
    _run(unet, x, t, torch.cat([uncond, cond]), [1, 0], rec=rec)
    whole = rec.features("shapesworld", 16, 1)
    for i in range(3):
        one = FeatureRecorder()
        _run(unet, x[i:i + 1], t[i:i + 1], torch.cat([uncond[i:i + 1], cond[i:i + 1]]), [1, 0], rec=one)
        alone = one.features("shapesworld", 16, 1)
        for a, w in zip(alone.levels, whole.select(i).levels):
            torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-6)


def test_batch_one_equals_upstream_reshape(unet):
    """For B = 1 (upstream's only correct case) our level equals upstream's formula: every block output of
    the [uncond, cond] batch reshaped (2, C, H, W) -> (1, 2C, H, W), concatenated per size in call order."""
    x, t, _ = _inputs(1)
    ctx = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(6))
    outputs = []                                              # (block id, h) in UNet call order
    to = {"cond_or_uncond": [1, 0], "patches": {
        "input_block_patch": [lambda h, o: outputs.append(h) or h],
        "output_block_patch": [lambda h, hsp, o: (outputs.append(h) or h, hsp)]}}
    rec = FeatureRecorder()
    with torch.no_grad(), rec.hook_final_block(unet):
        handle = unet.out.register_forward_pre_hook(lambda m, a: outputs.append(a[0]))
        unet(x.repeat(2, 1, 1, 1), t.repeat(2), ctx, transformer_options=rec.attach(to))
        handle.remove()
    by_size: dict = {}
    for h in outputs:
        by_size.setdefault(h.shape[-1], []).append(h.reshape(1, 2 * h.shape[1], *h.shape[2:]))
    ours = rec.features("shapesworld", 16, 1)
    for level, size in zip(ours.levels, (8, 16, 32)):
        assert torch.equal(level, torch.cat(by_size[size], dim=1))


def test_split_calls_equal_one_call_and_cfg1(unet):
    """ComfyUI's low-memory path evaluates uncond and cond in separate calls ([1] then [0])."""
    x, t, _ = _inputs(2)
    g = torch.Generator().manual_seed(7)
    cond, uncond = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    joint = FeatureRecorder()
    _run(unet, x, t, torch.cat([uncond, cond]), [1, 0], rec=joint)
    split = FeatureRecorder()
    _run(unet, x, t, uncond, [1], rec=split)
    _run(unet, x, t, cond, [0], rec=split)
    assert split.calls == 2
    for a, b in zip(joint.features("sw", 16, 1).levels, split.features("sw", 16, 1).levels):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # reversed row order [0, 1] gives the same features
    rev = FeatureRecorder()
    _run(unet, x, t, torch.cat([cond, uncond]), [0, 1], rec=rev)
    for a, b in zip(joint.features("sw", 16, 1).levels, rev.features("sw", 16, 1).levels):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # CFG 1: cond rows only -> cond-only features with half the channels; demanding uncond names the fix
    cfg1 = FeatureRecorder()
    _run(unet, x, t, cond, [0], rec=cfg1)
    f = cfg1.features("sw", 16, 1)
    assert not f.concat_uncond
    assert f.channels == tuple(c // 2 for c in joint.features("sw", 16, 1).channels)
    with pytest.raises(FeatureRecordError, match="uncond rows were not recorded"):
        cfg1.features("sw", 16, 1, concat_uncond=True)


def test_without_final_hook_last_block_absent_and_errors(unet):
    x, t, ctx = _inputs(1)
    rec = FeatureRecorder()
    _run(unet, x, t, ctx, [0], rec=rec, final=False)
    assert "output.5" not in rec.recorded_blocks and len(rec.recorded_blocks) == 12
    with pytest.raises(FeatureRecordError, match="no block outputs"):
        FeatureRecorder().features("sw", 16, 1)
    with pytest.raises(FeatureRecordError, match="cannot be split"):
        rec.input_block_patch(torch.zeros(3, 1, 2, 2), {"block": ("input", 0), "cond_or_uncond": [1, 0]})
    assert len(unet.out._forward_pre_hooks) == 0


def test_attach_chains_after_existing_patches_and_deepcopy_shares(unet):
    import copy
    order = []
    rec = FeatureRecorder()
    to = rec.attach({"patches": {"input_block_patch": [lambda h, o: order.append("theirs") or h]}})
    assert to["patches"]["input_block_patch"][1] == rec.input_block_patch
    x, t, ctx = _inputs(1)
    with torch.no_grad():
        unet(x, t, ctx, transformer_options=to)
    assert order == ["theirs"] * 6 and len(rec.recorded_blocks) == 12
    assert copy.deepcopy(to)["patches"]["input_block_patch"][1].__self__ is rec


def test_features_cat_and_select(unet):
    x, t, ctx = _inputs(2)
    rec = FeatureRecorder()
    _run(unet, x, t, ctx, [0], rec=rec)
    f = rec.features("sw", 16, 1)
    both = GroundingFeatures.cat([f.select(1), f.select(0)])
    assert both.batch == 2 and torch.equal(both.levels[0][0], f.levels[0][1])
