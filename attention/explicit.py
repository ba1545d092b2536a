"""Explicit attention that exposes its probabilities, chunked over queries.

Shape legend (einops style):
    b  attention batch (chunks x items)     h  heads          d  head dim
    n  query tokens (h*w pixels)            m  key tokens (77*k text tokens or h*w pixels)
    q: (b, n, h*d)   k, v: (b, m, h*d)   probs: (b, h, n_chunk, m)   out: (b, n, h*d)

Heads are split exactly as ComfyUI does (``view(b, -1, h, d).transpose(1, 2)``) and the
scores are computed in float32, so the output equals ComfyUI's optimized attention to
float rounding.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

# Probability chunks are kept under this many float32 elements (256 MiB).
DEFAULT_CHUNK_ELEMENTS = 64 * 1024 * 1024

ProbsHook = Callable[[torch.Tensor, slice], torch.Tensor]


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, inner = t.shape
    return t.view(b, n, heads, inner // heads).transpose(1, 2)  # (b, h, n, d)


def query_chunks(b: int, heads: int, n: int, m: int, max_elements: int) -> Iterator[slice]:
    per_query = max(b * heads * m, 1)
    size = max(1, min(n, max_elements // per_query))
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def attention_with_probs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                         probs_hook: ProbsHook | None = None,
                         max_elements: int = DEFAULT_CHUNK_ELEMENTS) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v, calling ``probs_hook(probs, query_slice)`` on each chunk.

    The hook may return modified probabilities (an edit) or the same tensor (a capture).
    """
    b, n, inner = q.shape
    d = inner // heads
    qh, kh, vh = split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)
    scale = d ** -0.5
    out = torch.empty(b, heads, n, vh.shape[-1], dtype=q.dtype, device=q.device)
    kt = kh.float().transpose(-1, -2)
    for sl in query_chunks(b, heads, n, kh.shape[2], max_elements):
        probs = (qh[:, :, sl].float() @ kt).mul_(scale).softmax(dim=-1)  # (b, h, n_chunk, m)
        if probs_hook is not None:
            probs = probs_hook(probs, sl)
        out[:, :, sl] = (probs.to(vh.dtype) @ vh)
    return out.transpose(1, 2).reshape(b, n, heads * vh.shape[-1])


def probs_chunks(q: torch.Tensor, k: torch.Tensor, heads: int,
                 max_elements: int = DEFAULT_CHUNK_ELEMENTS) -> Iterator[tuple[slice, torch.Tensor]]:
    """Only the probabilities, (b, h, n_chunk, m) per query chunk, for read-only observers."""
    b, n, inner = q.shape
    d = inner // heads
    qh = split_heads(q.float() * d ** -0.5, heads)           # scale the smaller operand once
    kt = split_heads(k.float(), heads).transpose(-1, -2)
    for sl in query_chunks(b, heads, n, kt.shape[-1], max_elements):
        yield sl, torch.matmul(qh[:, :, sl], kt).softmax(dim=-1)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Plain torch attention with ComfyUI's layout; the default fast path outside ComfyUI."""
    b, n, _ = q.shape
    out = torch.nn.functional.scaled_dot_product_attention(
        split_heads(q, heads), split_heads(k, heads), split_heads(v, heads))
    return out.transpose(1, 2).reshape(b, n, -1)


def sdpa_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor | None = None,
                attn_precision=None, skip_reshape: bool = False, skip_output_reshape: bool = False,
                **kwargs) -> torch.Tensor:
    """ComfyUI's attention-function signature (``attention_pytorch``) on SDPA, for pure-torch models: q, k, v
    (b, n, h*d), or (b, h, n, d) with ``skip_reshape``; output (b, n, h*d), or (b, h, n, d) with
    ``skip_output_reshape``; ``mask`` bool (True = attend) or additive, broadcastable to (b, h, n, m)."""
    if not skip_reshape:
        q, k, v = split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)
    if mask is not None:
        while mask.dim() < 4:
            mask = mask.unsqueeze(0 if mask.dim() == 2 else 1)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if skip_output_reshape:
        return out
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)
