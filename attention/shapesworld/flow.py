"""ShapesWorld-Flow's transformer: a pure-torch twin of ComfyUI's Flux MMDiT, state-dict compatible with it.

Ported from Black Forest Labs' Flux (https://github.com/black-forest-labs/flux, Apache-2.0; ``src/flux/math.py``,
``src/flux/model.py``, ``src/flux/modules/layers.py`` at commit 802fb4713906133fcbd0d8dc5351620ca4773036), in the
form ComfyUI 0.8.0 runs it (``comfy/ldm/flux/{model,layers,math}.py``, https://github.com/comfyanonymous/ComfyUI
at commit 618b803d314a525faca8f8163d85eaa9ebc1d774, GPL-3.0; its interface is described and followed here, its code
is not copied): the transformer_options hook contract below, RoPE frequencies computed in float64, patches padded
circularly to the patch size. Only the path Flux takes for a config without ComfyUI's newer options (no global
modulation, no SiLU/Yak MLP, no text norm, no reference latents, no ControlNet, no rope_options) is written out.
Parameter names and shapes are Flux's, so one state dict loads into both ``FluxTwin`` and
``comfy.ldm.flux.model.Flux``; tests/test_nodes_shapesworld_flow.py asserts they give the same velocity.

The forward honours Flux's ``transformer_options`` contract as ``Flux.forward_orig`` does:
``transformer_options["block_type"]`` ("double"/"single"), ``["block_index"]`` and ``["total_blocks"]`` are set
before each block, ``patches_replace["dit"][("double_block"|"single_block", i)]`` replaces a block with
``fn(args, {"original_block": wrap})``, and every joint attention call goes through
``transformer_options["optimized_attention_override"]`` when present, called as ComfyUI's ``wrap_attn``
(comfy/ldm/modules/attention.py l.125-141) calls it:
``override(func, q, k, v, heads, skip_reshape=True, mask=mask, transformer_options=to, _inside_attn_wrapper=True)``
with q, k, v of shape (B, heads, L, dim_head) after RoPE, text tokens first (L = txt + img), and ``func`` the
plain attention returning (B, L, heads * dim_head).

Shape legend: B batch, C channels, H W pixels, p patch size, N image tokens (H/p * W/p), T text tokens,
L = T + N joint tokens, D hidden size, h heads, d = D / h head dim.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class FlowConfig:
    """FluxParams of the twin (same names as comfy.ldm.flux.model.FluxParams)."""
    in_channels: int = 3
    out_channels: int = 3
    vec_in_dim: int = 128          # pooled text vector width
    context_in_dim: int = 128      # per-token text context width
    hidden_size: int = 128
    mlp_ratio: float = 4.0
    num_heads: int = 4
    depth: int = 2                 # double-stream blocks
    depth_single_blocks: int = 4
    axes_dim: tuple[int, ...] = (4, 14, 14)   # RoPE dims per id axis (index, row, column); sums to d
    theta: int = 10000
    patch_size: int = 2
    qkv_bias: bool = True
    guidance_embed: bool = False
    txt_ids_dims: tuple[int, ...] = ()

    def flux_params(self) -> dict:
        """Keyword arguments for ``comfy.ldm.flux.model.Flux`` (lists where Flux keeps lists)."""
        d = asdict(self)
        d["axes_dim"], d["txt_ids_dims"] = list(self.axes_dim), list(self.txt_ids_dims)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FlowConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for k in ("axes_dim", "txt_ids_dims"):
            if k in known:
                known[k] = tuple(known[k])
        return cls(**known)


# ----------------------------------------------------------------------------------------- math.py / layers.py
def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000, time_factor: float = 1000.0):
    """(B,) times in [0, 1] -> (B, dim) sinusoidal embedding of 1000 t (cos first), as Flux's."""
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return emb.to(t) if torch.is_floating_point(t) else emb


def rope(pos: torch.Tensor, dim: int, theta: int) -> torch.Tensor:
    """(B, L) positions -> (B, L, dim/2, 2, 2) rotation matrices."""
    scale = torch.linspace(0, (dim - 2) / dim, steps=dim // 2, dtype=torch.float64, device=pos.device)
    omega = 1.0 / (theta ** scale)
    out = torch.einsum("...n,d->...nd", pos.to(torch.float32), omega)
    out = torch.stack([torch.cos(out), -torch.sin(out), torch.sin(out), torch.cos(out)], dim=-1)
    return out.reshape(*out.shape[:-1], 2, 2).to(torch.float32)


def apply_rope1(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x (B, h, L, d) by freqs (B, 1, L, d/2, 2, 2)."""
    x_ = x.to(freqs.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    out = freqs[..., 0] * x_[..., 0] + freqs[..., 1] * x_[..., 1]
    return out.reshape(*x.shape).type_as(x)


def plain_attention(q, k, v, heads, mask=None, skip_reshape=True, skip_output_reshape=False, **kwargs):
    """The attention ``func`` handed to an override: (B, h, L, d) q, k, v -> (B, L, h d) (ComfyUI's
    attention_pytorch with skip_reshape=True)."""
    b, _, _, d = q.shape
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out if skip_output_reshape else out.transpose(1, 2).reshape(b, -1, heads * d)


def attention(q, k, v, pe, mask=None, transformer_options=None) -> torch.Tensor:
    """Flux's ``math.attention``: RoPE on q, k, then the (overridable) attention. -> (B, L, h d)."""
    if pe is not None:
        q, k = apply_rope1(q, pe), apply_rope1(k, pe)
    heads = q.shape[1]
    to = transformer_options or {}
    override = to.get("optimized_attention_override")
    if override is not None:
        return override(plain_attention, q, k, v, heads, skip_reshape=True, mask=mask, transformer_options=to,
                        _inside_attn_wrapper=True)
    return plain_attention(q, k, v, heads, skip_reshape=True, mask=mask)


class EmbedND(nn.Module):
    def __init__(self, dim: int, theta: int, axes_dim: tuple[int, ...]):
        super().__init__()
        self.dim, self.theta, self.axes_dim = dim, theta, axes_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:     # (B, L, axes) -> (B, 1, L, d/2, 2, 2)
        emb = torch.cat([rope(ids[..., i], self.axes_dim[i], self.theta) for i in range(ids.shape[-1])], dim=-3)
        return emb.unsqueeze(1)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x):
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, self.scale.shape, weight=self.scale.to(x.dtype), eps=1e-6)


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm, self.key_norm = RMSNorm(dim), RMSNorm(dim)

    def forward(self, q, k, v):
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    """Holds a stream's qkv, q/k norms and output projection (the attention runs jointly in the block)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)


class Modulation(nn.Module):
    """vec (B, D) -> (shift, scale, gate) chunks of (B, 1, D): one set, or two for a double block."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim)

    def forward(self, vec):
        out = self.lin(F.silu(vec[:, None, :])).chunk(self.multiplier, dim=-1)
        return out[:3], (out[3:] if self.multiplier == 6 else None)


def mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


def split_heads(qkv: torch.Tensor, heads: int):
    """(B, L, 3 D) -> three (B, h, L, d)."""
    return qkv.view(qkv.shape[0], qkv.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)


class DoubleStreamBlock(nn.Module):
    """Separate weights for text and image tokens, one joint attention over cat(txt, img)."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        self.num_heads = heads
        for s in ("img", "txt"):
            setattr(self, f"{s}_mod", Modulation(hidden, double=True))
            setattr(self, f"{s}_norm1", nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{s}_attn", SelfAttention(hidden, heads, qkv_bias))
            setattr(self, f"{s}_norm2", nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{s}_mlp", mlp(hidden, int(hidden * mlp_ratio)))

    def _qkv(self, stream: str, x, mod):
        shift, scale, _ = mod
        attn = getattr(self, f"{stream}_attn")
        q, k, v = split_heads(attn.qkv(torch.addcmul(shift, getattr(self, f"{stream}_norm1")(x), 1 + scale)),
                              self.num_heads)
        q, k = attn.norm(q, k, v)
        return q, k, v

    def _finish(self, stream: str, x, out, mod1, mod2):
        x = x + getattr(self, f"{stream}_attn").proj(out) * mod1[2]
        shift, scale, gate = mod2
        h = torch.addcmul(shift, getattr(self, f"{stream}_norm2")(x), 1 + scale)
        return x + getattr(self, f"{stream}_mlp")(h) * gate

    def forward(self, img, txt, vec, pe, attn_mask=None, transformer_options=None):
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)
        iq, ik, iv = self._qkv("img", img, img_mod1)
        tq, tk, tv = self._qkv("txt", txt, txt_mod1)
        out = attention(torch.cat((tq, iq), 2), torch.cat((tk, ik), 2), torch.cat((tv, iv), 2), pe,
                        attn_mask, transformer_options)
        t = txt.shape[1]
        return (self._finish("img", img, out[:, t:], img_mod1, img_mod2),
                self._finish("txt", txt, out[:, :t], txt_mod1, txt_mod2))


class SingleStreamBlock(nn.Module):
    """One stream over cat(txt, img): parallel attention and MLP from one linear layer (ViT-22B style)."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.num_heads, self.hidden_size = heads, hidden
        self.mlp_hidden_dim = int(hidden * mlp_ratio)
        self.linear1 = nn.Linear(hidden, hidden * 3 + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden + self.mlp_hidden_dim, hidden)
        self.norm = QKNorm(hidden // heads)
        self.pre_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden, double=False)

    def forward(self, x, vec, pe, attn_mask=None, transformer_options=None):
        (shift, scale, gate), _ = self.modulation(vec)
        qkv, h = torch.split(self.linear1(torch.addcmul(shift, self.pre_norm(x), 1 + scale)),
                             [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        q, k, v = split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        out = attention(q, k, v, pe, attn_mask, transformer_options)
        return x + self.linear2(torch.cat((out, self.mlp_act(h)), 2)) * gate


class LastLayer(nn.Module):
    def __init__(self, hidden: int, out: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec[:, None, :]).chunk(2, dim=-1)
        return self.linear(torch.addcmul(shift, self.norm_final(x), 1 + scale))


# ------------------------------------------------------------------------------------------------- model.py
class FluxTwin(nn.Module):
    """Flux's transformer for rectified-flow velocity prediction; ``forward`` takes what ComfyUI's Flux takes.

    forward(x (B, C, H, W), timestep (B,) = sigma in [0, 1], context (B, T, context_in_dim),
    y (B, vec_in_dim) pooled text, guidance (B,) only with ``guidance_embed``) -> velocity (B, C, H, W)
    (noise minus image; ComfyUI's CONST: x0 = x - sigma * v).
    """

    def __init__(self, config: FlowConfig = FlowConfig()):
        super().__init__()
        c = self.config = config
        if c.hidden_size % c.num_heads or sum(c.axes_dim) != c.hidden_size // c.num_heads:
            raise ValueError(f"hidden_size {c.hidden_size} must split into {c.num_heads} heads whose size equals "
                             f"sum(axes_dim) = {sum(c.axes_dim)}")
        self.patch_size = c.patch_size
        self.pe_embedder = EmbedND(c.hidden_size // c.num_heads, c.theta, c.axes_dim)
        self.img_in = nn.Linear(c.in_channels * c.patch_size ** 2, c.hidden_size)
        self.time_in = MLPEmbedder(256, c.hidden_size)
        self.vector_in = MLPEmbedder(c.vec_in_dim, c.hidden_size)
        self.guidance_in = MLPEmbedder(256, c.hidden_size) if c.guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(c.context_in_dim, c.hidden_size)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(c.hidden_size, c.num_heads, c.mlp_ratio, c.qkv_bias)
                                           for _ in range(c.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(c.hidden_size, c.num_heads, c.mlp_ratio)
                                           for _ in range(c.depth_single_blocks))
        self.final_layer = LastLayer(c.hidden_size, c.patch_size ** 2 * c.out_channels)

    def init_weights(self) -> "FluxTwin":
        """Training init: every modulation and the output layer at zero (adaLN-Zero, DiT), so each block starts
        as the identity and the model predicts zero velocity."""
        for m in self.modules():
            if isinstance(m, Modulation):
                nn.init.zeros_(m.lin.weight), nn.init.zeros_(m.lin.bias)
        for p in (*self.final_layer.adaLN_modulation[1].parameters(), *self.final_layer.linear.parameters()):
            nn.init.zeros_(p)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.img_in.weight.dtype

    def image_ids(self, b: int, h: int, w: int, device) -> torch.Tensor:
        """(B, h*w, 3) ids of the patch grid: (0, row, column), as Flux.process_img without rope_options."""
        ids = torch.zeros(h, w, len(self.config.axes_dim), device=device)
        ids[..., 1] += torch.linspace(0, h - 1, steps=h, device=device)[:, None]
        ids[..., 2] += torch.linspace(0, w - 1, steps=w, device=device)[None, :]
        return ids.reshape(1, h * w, -1).expand(b, -1, -1)

    def forward(self, x, timestep, context, y=None, guidance=None, transformer_options=None, attention_mask=None,
                **kwargs):
        if kwargs.get("ref_latents") is not None or kwargs.get("control") is not None:
            raise NotImplementedError("the Flux twin has no reference latents or ControlNet; use ComfyUI's Flux")
        to = transformer_options if transformer_options is not None else {}
        b, ch, h0, w0 = x.shape
        p = self.patch_size
        x = F.pad(x, (0, (-w0) % p, 0, (-h0) % p), mode="circular")           # comfy pad_to_patch_size
        hp, wp = x.shape[2] // p, x.shape[3] // p
        img = x.reshape(b, ch, hp, p, wp, p).permute(0, 2, 4, 1, 3, 5).reshape(b, hp * wp, ch * p * p)
        txt_ids = torch.zeros(b, context.shape[1], len(self.config.axes_dim), device=x.device)
        for i in self.config.txt_ids_dims:
            txt_ids[:, :, i] = torch.linspace(0, context.shape[1] - 1, steps=context.shape[1], device=x.device)
        out = self.forward_orig(img, self.image_ids(b, hp, wp, x.device), context, txt_ids, timestep, y, guidance,
                                to, attention_mask)
        out = out.reshape(b, hp, wp, ch, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, ch, hp * p, wp * p)
        return out[:, :, :h0, :w0]

    def forward_orig(self, img, img_ids, txt, txt_ids, timesteps, y, guidance, to: dict, attn_mask=None):
        """Token-level forward: img (B, N, C p p), txt (B, T, context_in_dim) -> (B, N, C p p)."""
        blocks_replace = to.get("patches_replace", {}).get("dit", {})
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps, 256).to(img.dtype))
        if self.config.guidance_embed and guidance is not None:
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(img.dtype))
        if y is None:
            y = torch.zeros(img.shape[0], self.config.vec_in_dim, device=img.device, dtype=img.dtype)
        vec = vec + self.vector_in(y[:, :self.config.vec_in_dim])
        txt = self.txt_in(txt)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        to["total_blocks"], to["block_type"] = len(self.double_blocks), "double"
        for i, block in enumerate(self.double_blocks):
            to["block_index"] = i
            if ("double_block", i) in blocks_replace:
                def wrap(args, block=block):
                    o = block(args["img"], args["txt"], args["vec"], args["pe"], args.get("attn_mask"),
                              args.get("transformer_options"))
                    return {"img": o[0], "txt": o[1]}
                out = blocks_replace[("double_block", i)](
                    {"img": img, "txt": txt, "vec": vec, "pe": pe, "attn_mask": attn_mask, "transformer_options": to},
                    {"original_block": wrap})
                img, txt = out["img"], out["txt"]
            else:
                img, txt = block(img, txt, vec, pe, attn_mask, to)
        img = torch.cat((txt, img), 1)
        to["total_blocks"], to["block_type"] = len(self.single_blocks), "single"
        for i, block in enumerate(self.single_blocks):
            to["block_index"] = i
            if ("single_block", i) in blocks_replace:
                def wrap(args, block=block):
                    return {"img": block(args["img"], args["vec"], args["pe"], args.get("attn_mask"),
                                         args.get("transformer_options"))}
                img = blocks_replace[("single_block", i)](
                    {"img": img, "vec": vec, "pe": pe, "attn_mask": attn_mask, "transformer_options": to},
                    {"original_block": wrap})["img"]
            else:
                img = block(img, vec, pe, attn_mask, to)
        return self.final_layer(img[:, txt.shape[1]:], vec)
