"""Tier 1: edges of ported functions that issue 26's mutation runs found untested (tools/mutation.py selects this
file for rf_inversion, direct_inversion and concept_attention): dtypes and batch shapes a node meets, the other
attention output layout, the step callback and the refusals."""

import pytest
import torch
from test_concept_attention import HEADS, HID, DoubleBlock

from attention.concept_attention import ConceptStream, concept_update
from attention.direct_inversion import OffsetRecorder, SourceCorrection
from attention.joint import JointLayout
from attention.rf_inversion import evaluations, rf_solve, velocity_from_denoiser


def test_velocity_reads_the_first_sigma_in_float32_and_keeps_the_states_shape_and_dtype():
    """ComfyUI passes sigma per batch row, (b,), and its sigmas are float32: the denoiser sees the first one as a
    (1,) float32 tensor, floored; v = (x - x0) / sigma in x's dtype and shape (upstream's ``denoise`` velocity)."""
    seen = []

    def denoiser(x, s):
        seen.append((s.dtype, tuple(s.shape)))
        return x * (1 - s.double().view(-1, 1, 1, 1))
    v = velocity_from_denoiser(denoiser, 0.05)
    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigma = torch.tensor([0.3, 0.3], dtype=torch.float64)
    got = v(x, sigma)
    s32 = torch.tensor(0.3, dtype=torch.float32).double()              # the float32 sigma, as the model reads it
    assert seen == [(torch.float32, (1,))] and got.shape == x.shape and got.dtype == torch.float64
    assert torch.allclose(got, (x - x * (1 - s32)) / s32, rtol=0, atol=1e-12)
    assert torch.allclose(v(x, torch.tensor([0.0, 0.0])), x, atol=1e-6)  # floored: (x - x (1 - 0.05)) / 0.05
    half = velocity_from_denoiser(lambda x_, s_: x_ * 0.5, 0.05)(x.half(), sigma)   # an fp16 model's states
    assert half.dtype == torch.float16 and torch.allclose(half.double(), x * 0.5 / s32, atol=1e-2)


def test_rf_solve_reports_each_step_and_refuses_unknown_solvers():
    steps = []
    out = rf_solve(lambda x, t: -x, torch.ones(1, 2), torch.tensor([0.0, 0.5, 1.0]), "euler",
                   on_step=lambda i, x: steps.append((i, x.clone())))
    assert [i for i, _ in steps] == [0, 1] and all(torch.equal(x, out[i + 1]) for i, x in steps)
    for bad in (lambda: evaluations("heun", 4), lambda: rf_solve(lambda x, t: x, torch.ones(1), torch.ones(2), "heun")):
        with pytest.raises(ValueError) as err:
            bad()
        assert str(err.value) == "solver 'heun' is not one of ('euler', 'fireflow')"


def test_direct_inversion_offsets_follow_the_samplers_dtype():
    """The trajectory may be kept in another dtype than the sampler's (float64 here): offsets and the corrected
    state stay in the sampler's dtype, as upstream's ``latent_prev - latents_prev_rec`` in one dtype."""
    g = torch.Generator().manual_seed(1)
    traj = [torch.randn(1, 2, 3, 3, generator=g, dtype=torch.float64) for _ in range(3)]
    rec = OffsetRecorder(traj)
    x = torch.randn(1, 2, 3, 3, generator=g)
    nxt = rec(0, x)
    assert rec.offsets[0].dtype == torch.float32 and nxt.dtype == torch.float32
    assert torch.equal(rec.offsets[0], traj[1].float() - x)
    batch = torch.randn(2, 2, 3, 3, generator=g)
    fixed = SourceCorrection([o.double() for o in rec.offsets])(0, batch)
    assert fixed.dtype == torch.float32 and torch.equal(fixed[1], batch[1])
    assert torch.equal(fixed[:1], batch[:1] + rec.offsets[0])


class _Reader:
    def __init__(self):
        self.scores = []

    def wants_concepts(self, ctx):
        return True

    def observe_concepts(self, scores, ctx, rows):
        self.scores.append(scores)


def test_concept_maps_read_either_attention_output_layout():
    """A DiT attention call may return (b, L, h*d) or (b, h, L, d) (``skip_output_reshape``): the maps are the
    same either way; and the concepts' residual update casts the float32 attention output to the stream's dtype
    (a float64 block here) as the text stream's ``proj`` needs."""
    torch.manual_seed(0)
    block = DoubleBlock().eval()
    g = torch.Generator().manual_seed(3)
    layout = JointLayout(txt=3, grid=(2, 3))
    L, b = 3 + 6, 2                                                  # L differs from the head width (8)
    qh, kh, vh = (torch.randn(b, HEADS, L, HID // HEADS, generator=g) for _ in range(3))
    out4 = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh)              # (b, h, L, d)
    out3 = out4.transpose(1, 2).reshape(b, L, HID)
    concepts, cvec = torch.randn(1, 3, HID, generator=g), torch.randn(1, HID, generator=g)
    got = []
    for out in (out3, out4):
        reader = _Reader()
        stream = ConceptStream([block], concepts, cvec, [1], [reader])
        call = stream.prepare(0)
        call.attend(qh, kh, vh, out, layout, None)
        got.append(reader.scores[0])
    assert got[0].shape == (1, 3, 6) and torch.equal(got[0], got[1])
    wide = DoubleBlock().double().eval()
    stream = ConceptStream([wide], concepts.double(), cvec.double(), [1], [])
    call = stream.prepare(0)
    call.attend(qh.double(), kh.double(), vh.double(), out3.double(), layout, None)
    assert call.out.dtype == torch.float32
    with torch.no_grad():
        new = concept_update(wide, stream.tokens, call.out, call.mods)
        mod1, mod2 = call.mods
        want = stream.tokens + mod1.gate * wide.txt_attn.proj(call.out.double())
        want = want + mod2.gate * wide.txt_mlp((1 + mod2.scale) * wide.txt_norm2(want) + mod2.shift)
    assert new.dtype == torch.float64 and torch.allclose(new, want, atol=1e-12)


# ----------------------------------------------------------------------------- grounding head layout
def _head(**kw):
    from attention.grounding import HeadConfig, build_head
    cfg = dict(channels=(8, 4), context_dim=16, dim=32, heads=4, layers=1, ffn=48)
    cfg.update(kw)
    return build_head(HeadConfig(**cfg), seed=0).eval()


def test_grounding_head_layout_is_upstreams():
    """seg_module.py's layout: every fusion block maps its concatenated input to the same width, so its shortcut is
    the identity (a 1x1 conv only where a block changes width); its 3x3 convs are spectrally normalized unless
    switched off; the decoder layer is pre-norm, ReLU, dropout 0, with the configured FFN width."""
    from torch import nn

    from attention.grounding import ResidualBlock
    is_sn = nn.utils.parametrize.is_parametrized
    head = _head()
    for block in head.fuse:
        assert isinstance(block.shortcut, nn.Identity) and is_sn(block.conv1) and is_sn(block.conv2)
    assert not any(is_sn(b.conv1) or is_sn(b.conv2) for b in _head(spectral_norm=False).fuse)
    assert is_sn(_head(channels=(4,)).fuse[0].conv1)                # a one-level head's single block too
    wide = ResidualBlock(4, 6, True)
    assert isinstance(wide.shortcut, nn.Conv2d) and wide.shortcut.kernel_size == (1, 1) and is_sn(wide.shortcut)
    assert (wide.shortcut.in_channels, wide.shortcut.out_channels) == (4, 6)
    assert not is_sn(ResidualBlock(4, 6, False).shortcut)
    layer = head.decoder.layers[0]
    assert layer.norm_first and layer.linear1.out_features == 48 and layer.dropout.p == 0.0
    assert layer.activation is nn.functional.relu or isinstance(layer.activation, nn.ReLU)


def test_grounding_one_level_tokens_at_odd_sizes_and_empty_rows():
    """One feature level: its projection through the one fusion block. Patch tokens of an odd-sized embedding:
    zero padding at the far edges to a multiple of P, then P x P patches row by row (upstream's rearrange).
    A batch row without any word yields finite logits for the others (no NaN)."""
    g = torch.Generator().manual_seed(5)
    one = _head(channels=(4,))
    x = torch.randn(1, 4, 6, 6, generator=g)
    with torch.no_grad():
        assert torch.allclose(one.pixel_embedding([x]), one.fuse[0](one.project[0](x)), atol=1e-6)
        head = _head()
        pixels = torch.randn(1, head.config.embed_dim, 9, 5, generator=g)
        padded = torch.zeros(1, head.config.embed_dim, 12, 8)
        padded[..., :9, :5] = pixels
        p = head.config.patch
        patches = padded.reshape(1, -1, 3, p, 2, p).permute(0, 2, 4, 1, 3, 5).reshape(1, 6, -1)
        assert torch.allclose(head.tokens(pixels), head.to_k(patches), atol=1e-6)
        levels = [torch.randn(2, 8, 4, 4, generator=g), torch.randn(2, 4, 8, 8, generator=g)]
        queries = torch.randn(2, 3, 16, generator=g)
        mask = torch.tensor([[True, True, False], [False, False, False]])
        logits = head(levels, queries, mask)
        assert torch.isfinite(logits).all()
        alone = head([lv[:1] for lv in levels], queries[:1], mask[:1])
        assert torch.allclose(logits[:1], alone, atol=1e-5)


def test_grounding_refusals_name_the_counts():
    from attention.grounding import word_query
    head = _head()
    levels = [torch.randn(1, 8, 4, 4), torch.randn(1, 4, 8, 8)]
    with pytest.raises(ValueError) as err:
        head(levels, torch.randn(2, 3, 16))
    assert str(err.value) == "2 query rows for 1 feature images; give one row of queries per image"
    with pytest.raises(ValueError) as err:
        word_query(torch.randn(5, 16), [])
    assert str(err.value) == ("the word has no token positions (the tokenizer dropped it); give a word the text "
                              "encoder knows")
