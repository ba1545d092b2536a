"""Tier 1: DiT joint attention through the hook (attention/joint.py) and ConceptAttention (attention/
concept_attention.py) on a pure-torch Flux-style double block, against the official formulas written out here.

The block below is a Flux double block in miniature (BFL's layout, as ComfyUI's ``DoubleStreamBlock``): its
joint attention goes through the override as ComfyUI's Flux calls it (q, k after RoPE, (b, h, L, d),
``skip_reshape``), and it is driven through ``DitBlockProxy`` as the nodes drive ComfyUI's blocks."""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from attention.concept_attention import ConceptStream
from attention.explicit import sdpa_kernel
from attention.hook import AttentionHook, Install, call_attention
from attention.joint import LAYOUT_KEY, DitInfo, JointLayout, dit_options
from attention.layers import LayerId
from attention.store import AttentionStore, StoreConfig

HID, HEADS = 32, 4
D = HID // HEADS


@dataclass
class Mod:
    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor


class Modulation(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(HID, 6 * HID)

    def forward(self, vec):
        out = self.lin(nn.functional.silu(vec))[:, None].chunk(6, dim=-1)
        return Mod(*out[:3]), Mod(*out[3:])


class QKNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k = nn.RMSNorm(D), nn.RMSNorm(D)

    def forward(self, q, k, v):
        return self.q(q).to(v), self.k(k).to(v)


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.norm, self.proj = nn.Linear(HID, 3 * HID), QKNorm(), nn.Linear(HID, HID)


def rope_table(ids: torch.Tensor, dims=(1, 1, 2)) -> torch.Tensor:
    """BFL's ``EmbedND``/``rope``: (b, 1, L, d/2, 2, 2) rotations of positions ``ids`` (b, L, 3); ``dims``: rotation
    pairs per axis (Flux: 8, 28, 28)."""
    out = []
    for i, dim in enumerate(dims):
        omega = 1.0 / 10000 ** (torch.arange(0, 2 * dim, 2, dtype=torch.float64) / (2 * dim))
        a = ids[..., i, None].double() * omega
        out.append(torch.stack([a.cos(), -a.sin(), a.sin(), a.cos()], -1).view(*a.shape, 2, 2))
    return torch.cat(out, dim=-3).unsqueeze(1).float()


def apply_rope(x, pe):
    x_ = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    return (pe[..., 0] * x_[..., 0] + pe[..., 1] * x_[..., 1]).reshape(*x.shape).type_as(x)


class DoubleBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.num_heads = HEADS
        for s in ("img", "txt"):
            setattr(self, f"{s}_mod", Modulation())
            setattr(self, f"{s}_norm1", nn.LayerNorm(HID, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{s}_attn", SelfAttention())
            setattr(self, f"{s}_norm2", nn.LayerNorm(HID, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{s}_mlp", nn.Sequential(nn.Linear(HID, 2 * HID), nn.GELU(approximate="tanh"),
                                                    nn.Linear(2 * HID, HID)))

    def qkv(self, stream, x, mod):
        qkv = getattr(self, f"{stream}_attn").qkv((1 + mod.scale) * getattr(self, f"{stream}_norm1")(x) + mod.shift)
        q, k, v = qkv.view(qkv.shape[0], qkv.shape[1], 3, HEADS, -1).permute(2, 0, 3, 1, 4)
        q, k = getattr(self, f"{stream}_attn").norm(q, k, v)
        return q, k, v

    def forward(self, img, txt, vec, pe, transformer_options):
        (im1, im2), (tm1, tm2) = self.img_mod(vec), self.txt_mod(vec)
        (iq, ik, iv), (tq, tk, tv) = self.qkv("img", img, im1), self.qkv("txt", txt, tm1)
        q, k = apply_rope(torch.cat([tq, iq], 2), pe), apply_rope(torch.cat([tk, ik], 2), pe)
        attn = call_attention(sdpa_kernel, q, k, torch.cat([tv, iv], 2), HEADS, transformer_options, skip_reshape=True)
        ta, ia = attn[:, :txt.shape[1]], attn[:, txt.shape[1]:]
        img = img + im1.gate * self.img_attn.proj(ia)
        img = img + im2.gate * self.img_mlp((1 + im2.scale) * self.img_norm2(img) + im2.shift)
        txt = txt + tm1.gate * self.txt_attn.proj(ta)
        txt = txt + tm2.gate * self.txt_mlp((1 + tm2.scale) * self.txt_norm2(txt) + tm2.shift)
        return img, txt


def official_concept_block(block, img, txt, vec, pe, concepts, concept_vec, concept_pe):
    """Upstream's ``ModifiedDoubleStreamBlock.forward`` (default path), written out: the text-image joint attention
    unchanged; concepts through the text stream's weights, attending over [concepts; image] with RoPE from
    ``concept_pe``; maps = softmax over concepts of concept-output . image-output; the concept residual update."""
    (im1, _), (tm1, _) = block.img_mod(vec), block.txt_mod(vec)
    cm1, cm2 = block.txt_mod(concept_vec)
    (iq, ik, iv), (tq, tk, tv) = block.qkv("img", img, im1), block.qkv("txt", txt, tm1)
    cq, ck, cv = block.qkv("txt", concepts, cm1)
    q, k = apply_rope(torch.cat([tq, iq], 2), pe), apply_rope(torch.cat([tk, ik], 2), pe)
    joint = nn.functional.scaled_dot_product_attention(q, k, torch.cat([tv, iv], 2))
    img_attn = joint[:, :, txt.shape[1]:].transpose(1, 2).flatten(2)
    ciq, cik = apply_rope(torch.cat([cq, iq], 2), concept_pe), apply_rope(torch.cat([ck, ik], 2), concept_pe)
    c_attn = nn.functional.scaled_dot_product_attention(ciq, cik, torch.cat([cv, iv], 2))[:, :, :concepts.shape[1]]
    c_attn = c_attn.transpose(1, 2).flatten(2)
    scores = torch.einsum("bcd,bnd->bcn", c_attn, img_attn).softmax(dim=1)
    concepts = concepts + cm1.gate * block.txt_attn.proj(c_attn)
    concepts = concepts + cm2.gate * block.txt_mlp((1 + cm2.scale) * block.txt_norm2(concepts) + cm2.shift)
    return scores, concepts


def ids_of(n_txt: int, gh: int, gw: int) -> torch.Tensor:
    ids = torch.zeros(1, n_txt + gh * gw, 3)
    ids[0, n_txt:, 1] = torch.arange(gh).repeat_interleave(gw).float()
    ids[0, n_txt:, 2] = torch.arange(gw).repeat(gh).float()
    return ids


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    block = DoubleBlock().eval()
    gh, gw, T, C = 3, 5, 6, 3      # a non-square grid
    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(2, gh * gw, HID, generator=g), torch.randn(2, T, HID, generator=g)
    vec, cvec = torch.randn(2, HID, generator=g), torch.randn(1, HID, generator=g)
    concepts = torch.randn(1, C, HID, generator=g)
    return block, gh, gw, T, C, img, txt, vec, cvec, concepts


def run_block(block, info, to, img, txt, vec, pe):
    """The block as ComfyUI's Flux runs it: through ``patches_replace["dit"][("double_block", 0)]``."""
    fn = to["patches_replace"]["dit"][("double_block", 0)]
    def original(args):
        i, t = block(args["img"], args["txt"], args["vec"], args["pe"], args["transformer_options"])
        return {"img": i, "txt": t}
    return fn({"img": img, "txt": txt, "vec": vec, "pe": pe, "transformer_options": to}, {"original_block": original})


def test_joint_views_and_concept_attention_equal_the_official_formulas(setup):
    block, gh, gw, T, C, img, txt, vec, cvec, concepts = setup
    info = DitInfo("flux", 1, 0, 2)
    store = AttentionStore(StoreConfig(capture_self=True, self_max_tokens=64, concepts=("a", "b", "c")))
    hook = AttentionHook().with_install(Install(store, frozenset(info.layer_ids())))
    layout = JointLayout(txt=T, grid=(gh, gw))
    stream = ConceptStream([block], concepts.expand(1, -1, -1), cvec, [1], [store])   # row 1 is the cond row
    to = {"cond_or_uncond": [1, 0], "block_type": "double", "block_index": 0,
          **dit_options(hook, info, layout, [stream])}
    pe = rope_table(ids_of(T, gh, gw))
    with torch.no_grad():
        plain = block(img, txt, vec, pe, {})
        got = run_block(block, info, to, img, txt, vec, pe)
        assert torch.equal(got["img"], plain[0]) and torch.equal(got["txt"], plain[1])     # image unchanged
        scores, new_concepts = official_concept_block(block, img[1:], txt[1:], vec[1:], pe, concepts, cvec,
                                                      rope_table(ids_of(C, gh, gw)))
    lid = LayerId("double", 0, 0)
    assert torch.allclose(store.layer_map(lid, "concept")[0].T, scores[0], atol=1e-5)
    assert torch.allclose(stream.tokens, new_concepts, atol=1e-5)
    # the raw views: the cond row's joint softmax, image-grid queries over text keys / over image keys
    (im1, _), (tm1, _) = block.img_mod(vec[1:]), block.txt_mod(vec[1:])
    (iq, ik, _), (tq, tk, _) = block.qkv("img", img[1:], im1), block.qkv("txt", txt[1:], tm1)
    q, k = apply_rope(torch.cat([tq, iq], 2), pe), apply_rope(torch.cat([tk, ik], 2), pe)
    probs = (q @ k.transpose(-1, -2) / D ** 0.5).softmax(-1)[:, :, T:].mean(1)           # (1, N, L)
    assert torch.allclose(store.layer_map(lid), probs[..., :T], atol=1e-5)
    assert torch.allclose(store.layer_map(lid, False), probs[..., T:], atol=1e-5)
    assert store.layers()[0].height == gh and store.layers()[0].width == gw


def test_layout_from_the_call_and_flipped_blocks(setup):
    """A pure-torch caller gives the layout with LAYOUT_KEY and Flux's block keys; a flipped block puts the image
    first and its views follow."""
    block, gh, gw, T, C, img, txt, vec, _, _ = setup
    store = AttentionStore(StoreConfig(capture_self=False))
    hook = AttentionHook().with_install(Install(store, frozenset([LayerId("double", 0, 0)])))
    pe = rope_table(ids_of(T, gh, gw))
    to = {"optimized_attention_override": hook, "block_type": "double", "block_index": 0,
          LAYOUT_KEY: JointLayout(txt=T, grid=(gh, gw)), "cond_or_uncond": [0, 0]}
    with torch.no_grad():
        plain = block(img, txt, vec, pe, {})
        out = block(img, txt, vec, pe, to)
    assert torch.equal(out[0], plain[0])
    a = store.layer_map(LayerId("double", 0, 0))
    assert a.shape == (1, gh * gw, T) and (a.sum(-1) < 1).all()    # text keys share the row with image keys
    flipped = JointLayout(txt=T, grid=(gh, gw), txt_first=False)
    assert flipped.text_keys() == slice(gh * gw, gh * gw + T) and flipped.grid_tokens() == slice(0, gh * gw)
    x = torch.arange(T + gh * gw)[None]
    t, i = flipped.split(x)
    assert t[0, 0] == gh * gw and i[0, -1] == gh * gw - 1


class JointIdentity:
    """A part-2 style editor that asks for the joint probabilities and changes nothing."""
    edits_probs = True

    def __init__(self, scale=1.0):
        self.scale, self.seen = scale, []

    def wants_probs(self, ctx):
        return True

    def probs_rows(self, ctx):
        return None

    def edit_qkv(self, q, k, v, ctx):
        self.seen.append((tuple(q.shape), ctx.joint.txt))
        return q, k, v

    def edit_probs(self, probs, ctx, query_slice):
        if self.scale == 1.0:
            return probs
        probs = probs.clone()
        probs[..., ctx.joint.text_keys()] *= self.scale           # every query's attention to the text
        return probs / probs.sum(-1, keepdim=True)

    def edit_output(self, out, ctx):
        return out


def test_joint_edits_for_part_two(setup):
    """Editors on a DiT layer get the joint q, k, v (b, h, L, d) and probabilities; the output follows the edit."""
    block, gh, gw, T, C, img, txt, vec, _, _ = setup
    pe = rope_table(ids_of(T, gh, gw))

    def run(*controllers):
        hook = AttentionHook()
        for c in controllers:
            hook = hook.with_install(Install(c, frozenset([LayerId("double", 0, 0)])))
        to = {"optimized_attention_override": hook, "block_type": "double", "block_index": 0,
              LAYOUT_KEY: JointLayout(txt=T, grid=(gh, gw)), "cond_or_uncond": [0, 0]}
        with torch.no_grad():
            return block(img, txt, vec, pe, to)
    plain = run()
    same, store = JointIdentity(), AttentionStore(StoreConfig(capture_self=False))
    out = run(same, store)
    assert torch.allclose(out[0], plain[0], atol=1e-5) and torch.allclose(out[1], plain[1], atol=1e-5)
    assert same.seen == [((2, HEADS, T + gh * gw, D), T)]
    lid = LayerId("double", 0, 0)
    assert store.layer_map(lid).shape == (1, gh * gw, T)
    seen = AttentionStore(StoreConfig(capture_self=False))
    edited = run(JointIdentity(scale=3.0), seen)
    assert not torch.allclose(edited[0], plain[0], atol=1e-4)
    assert bool((seen.layer_map(lid).sum(-1) > store.layer_map(lid).sum(-1)).all())   # readers see the edit
