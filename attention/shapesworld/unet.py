"""The ShapesWorld UNet: an SD-layout UNet small enough to train on a CPU.

Its attention honours ComfyUI's patch contract exactly, so every controller of the
pack (``attention/hook.py``) and any other pack's attention patch runs on it unchanged: the
``attn1_patch`` / ``attn2_patch`` lists run before each attention; a replace function in
``transformer_options["patches_replace"]["attn1"|"attn2"][(kind, number, depth)]`` (or the 2-tuple key) is
called as ``fn(q, k, v, extra_options)`` with the same ``extra_options`` keys that ComfyUI's
``BasicTransformerBlock`` provides (block, block_index, n_heads, dim_head, activations_shape, original_shape,
cond_or_uncond, sigmas, sample_sigmas, ...); otherwise ``transformer_options["optimized_attention_override"]``,
when set, is called as ComfyUI's ``wrap_attn`` calls it (``hook.call_attention``), with the block's
``transformer_options`` (``block``, ``block_index``, ``activations_shape`` set in place as ComfyUI does).

UNet-level patches are called as ComfyUI 0.8's ``UNetModel._forward`` calls them (openaimodel.py
l.858-913): ``emb_patch(emb, model_channels, to)``, ``input_block_patch(h, to)`` after every input block,
``input_block_patch_after_skip(h, to)`` after its skip is stored, ``output_block_patch(h, hsp, to) -> (h, hsp)``
before every output block's concat, with ``to["block"]`` set to the block being run. ``out`` (GroupNorm-SiLU-
conv, as UNetModel.out) is a module of its own so a forward hook can see the last output block's output;
its weights stay registered as ``norm_out``/``conv_out`` (the committed checkpoint's keys).

Layout (32x32 input, pixel space, 3 channels):
    input.0 conv | input.1 res@32 | input.2 down | input.3 res+attn@16 | input.4 down
    input.5 res+attn@8 | middle res+attn+res@8 | output.0-1 res+attn@8 (+up)
    output.2-3 res+attn@16 (+up) | output.4-5 res@32 | out conv
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..explicit import sdpa_kernel
from ..hook import call_attention
from ..layers import LayerId


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(32, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(32, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    def __init__(self, dim: int, context_dim: int | None, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)


class TransformerBlock(nn.Module):
    """Self-attention, cross-attention and a feed-forward, as ComfyUI's BasicTransformerBlock."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = Attention(dim, None, heads)
        self.attn2 = Attention(dim, context_dim, heads)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def _attend(self, attn: Attention, name: str, n, context, value, opts, to):
        q, k, v = attn.to_q(n), attn.to_k(context), attn.to_v(value)
        replace = to.get("patches_replace", {}).get(name, {})
        block = opts["block"]
        fn = replace.get((block[0], block[1], opts["block_index"])) or replace.get(tuple(block))
        out = fn(q, k, v, opts) if fn is not None else call_attention(sdpa_kernel, q, k, v, attn.heads, to)
        return attn.to_out(out)

    def forward(self, x, context, to: dict, opts: dict):
        patches = to.get("patches", {})
        n = self.norm1(x)
        ctx1, val1 = n, n
        for p in patches.get("attn1_patch", []):
            n, ctx1, val1 = p(n, ctx1, val1, opts)
        x = x + self._attend(self.attn1, "attn1", n, ctx1, val1, opts, to)
        n = self.norm2(x)
        ctx2, val2 = context, context
        for p in patches.get("attn2_patch", []):
            n, ctx2, val2 = p(n, ctx2, val2, opts)
        x = x + self._attend(self.attn2, "attn2", n, ctx2, val2, opts, to)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, channels: int, context_dim: int, heads: int):
        super().__init__()
        self.norm = nn.GroupNorm(32, channels)
        self.proj_in = nn.Linear(channels, channels)
        self.block = TransformerBlock(channels, context_dim, heads)
        self.proj_out = nn.Linear(channels, channels)
        self.heads = heads

    def forward(self, x, context, to: dict):
        b, c, h, w = x.shape
        to["activations_shape"], to["block_index"] = list(x.shape), 0     # in place, as ComfyUI's SpatialTransformer
        opts = {k: v for k, v in to.items() if k not in ("patches", "patches_replace")}
        opts.update(n_heads=self.heads, dim_head=c // self.heads, attn_precision=None)
        t = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))
        t = self.block(t, context, to, opts)
        return x + self.proj_out(t).transpose(1, 2).reshape(b, c, h, w)


class Stage(nn.Module):
    """One UNet block: a res block, optionally attention, optionally a 2x nearest upsample."""

    def __init__(self, cin, cout, temb, context_dim=None, heads=0, resample=None):
        super().__init__()
        self.res = ResBlock(cin, cout, temb)
        self.attn = SpatialTransformer(cout, context_dim, heads) if heads else None
        self.resample = resample

    def forward(self, x, emb, context, to):
        x = self.res(x, emb)
        if self.attn is not None:
            x = self.attn(x, context, to)
        if self.resample == "up":
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return x


class OutputHead(nn.Module):
    """GroupNorm-SiLU-conv as ComfyUI's ``UNetModel.out``; holds its layers without registering them."""

    def __init__(self, norm: nn.GroupNorm, conv: nn.Conv2d):
        super().__init__()
        self._layers = (norm, conv)          # a tuple: the parent registers them (state-dict keys unchanged)

    def forward(self, h):
        norm, conv = self._layers
        return conv(F.silu(norm(h)))


class ShapesUNet(nn.Module):
    def __init__(self, in_channels: int = 3, channels: tuple[int, int, int] = (64, 128, 128),
                 context_dim: int = 128, heads: int = 4, temb: int = 256):
        super().__init__()
        c0, c1, c2 = channels
        self.channels, self.context_dim, self.in_channels = channels, context_dim, in_channels
        self.time_embed = nn.Sequential(nn.Linear(c0, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.conv_in = nn.Conv2d(in_channels, c0, 3, padding=1)
        self.down = nn.Conv2d(c0, c0, 3, stride=2, padding=1)
        self.down2 = nn.Conv2d(c1, c1, 3, stride=2, padding=1)
        # input blocks 1..5 (block 0 is conv_in, 2 and 4 are the strided convs)
        self.in1 = Stage(c0, c0, temb)
        self.in3 = Stage(c0, c1, temb, context_dim, heads)
        self.in5 = Stage(c1, c2, temb, context_dim, heads)
        self.mid_res1 = ResBlock(c2, c2, temb)
        self.mid_attn = SpatialTransformer(c2, context_dim, heads)
        self.mid_res2 = ResBlock(c2, c2, temb)
        skips = [c0, c0, c0, c1, c1, c2]  # channels of input blocks 0..5
        specs = [(c2, 8, True), (c2, 8, True), (c1, 16, True), (c1, 16, True), (c0, 32, False), (c0, 32, False)]
        self.out_blocks = nn.ModuleList()
        cur = c2
        for i, (cout, _, attn) in enumerate(specs):
            up = "up" if i in (1, 3) else None
            self.out_blocks.append(Stage(cur + skips.pop(), cout, temb, context_dim if attn else None,
                                         heads if attn else 0, up))
            cur = cout
        self.norm_out = nn.GroupNorm(32, c0)
        self.conv_out = nn.Conv2d(c0, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        self.out = OutputHead(self.norm_out, self.conv_out)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @staticmethod
    def attention_layer_ids() -> list[LayerId]:
        blocks = [("input", 3), ("input", 5), ("middle", 0)] + [("output", i) for i in range(4)]
        return [LayerId(kind, number, 0) for kind, number in blocks]

    def forward(self, x, timesteps, context=None, transformer_options=None, **kwargs):
        """eps prediction; ``timesteps`` are DDPM indices 0..999 as in ComfyUI's UNetModel."""
        to = dict(transformer_options or {})
        to["original_shape"] = list(x.shape)
        patches = to.get("patches", {})
        emb = self.time_embed(timestep_embedding(timesteps, self.channels[0]))
        for p in patches.get("emb_patch", []):
            emb = p(emb, self.channels[0], to)
        hs = []
        stages = [lambda h: self.conv_in(h), lambda h: self.in1(h, emb, context, to), lambda h: self.down(h),
                  lambda h: self.in3(h, emb, context, to), lambda h: self.down2(h),
                  lambda h: self.in5(h, emb, context, to)]
        h = x
        for number, stage in enumerate(stages):
            to["block"] = ("input", number)
            h = stage(h)
            for p in patches.get("input_block_patch", []):
                h = p(h, to)
            hs.append(h)
            for p in patches.get("input_block_patch_after_skip", []):
                h = p(h, to)
        to["block"] = ("middle", 0)
        h = self.mid_res2(self.mid_attn(self.mid_res1(h, emb), context, to), emb)
        for number, stage in enumerate(self.out_blocks):
            to["block"] = ("output", number)
            hsp = hs.pop()
            for p in patches.get("output_block_patch", []):
                h, hsp = p(h, hsp, to)
            h = stage(torch.cat([h, hsp], dim=1), emb, context, to)
        return self.out(h)
