"""ConceptAttention maps (Helbling et al., ICML 2025, "ConceptAttention: Diffusion Transformers Learn Highly
Interpretable Features"): concept tokens carried one way through a DiT's text stream, maps in the attention
output space.

Upstream: https://github.com/helblazer811/ConceptAttention (commit db30c4dcee01184c4d3f9fc9e46477eeb4e3eef3;
``concept_attention/flux/dit_block.py`` ``ModifiedDoubleStreamBlock``, ``flux/dit.py``, ``flux/pipeline.py``
``compute_heatmaps_from_vectors``, ``utils.py`` ``embed_concepts``). The repository states no licence, so nothing
is copied: this is our implementation of the published procedure and the official code's choices, checked
against the official formula written out in ``tests/test_concept_attention.py``.

Procedure, per Flux-style double block ``i`` (its text-stream layers: ``txt_mod``, ``txt_norm1``, ``txt_attn.qkv``,
``txt_attn.norm``, ``txt_attn.proj``, ``txt_norm2``, ``txt_mlp``):

1. Concept tokens: each concept encoded alone by the text encoder, one token each (upstream: T5's token 0, the
   concept's first piece), through ``txt_in``; their modulation vector is the time (+ guidance) embedding plus
   ``vector_in`` of a zero pooled vector (upstream zeroes the concepts' CLIP vector).
2. Concept q, k, v from the text stream's projection and QK norm; concept queries attend over
   [concept keys; image keys] (the image keys after RoPE, as the block uses them; the concepts sit at position
   zero, where RoPE is the identity). Image tokens never attend to the concepts: the image is unchanged.
3. The concepts' residual stream is updated with the text stream's out projection, MLP and gates.
4. The block's map: softmax over concepts of <concept attention output, image attention output>, both (h*d)
   vectors before the out projection (the "output space").
5. Maps are averaged over the recorded blocks and steps (upstream defaults: double blocks 15-18 of Flux's 19,
   every step of a 4-step schnell run; the grid is not hard-coded here, upstream's is 64x64).

Upstream choices kept and named: one token per concept (a multi-piece concept is its first piece); the softmax
runs over the concepts, so a single concept maps to 1 everywhere (give at least two).

Shape legend: r concept rows (the cond rows of the attention batch), C concepts, h heads, d head dim,
N image grid tokens, hid hidden width; tokens (r, C, hid), vec (r, hid), q/k/v (r, h, C, d).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


def modulate(x: torch.Tensor, mod) -> torch.Tensor:
    return (1 + mod.scale) * x + mod.shift


def concept_qkv(block, tokens: torch.Tensor, vec: torch.Tensor):
    """The text stream's q, k, v (r, h, C, d) of the concept tokens, with the two modulations (step 2)."""
    mod1, mod2 = block.txt_mod(vec)
    qkv = block.txt_attn.qkv(modulate(block.txt_norm1(tokens), mod1))
    q, k, v = qkv.view(qkv.shape[0], qkv.shape[1], 3, block.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = block.txt_attn.norm(q, k, v)
    return q, k, v, (mod1, mod2)


def concept_attention_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_img: torch.Tensor,
                             v_img: torch.Tensor) -> torch.Tensor:
    """Concept queries over [concept keys; image keys] (r, h, C + N, d): output (r, C, h*d), float32."""
    keys = torch.cat([k, k_img], dim=2).float()
    values = torch.cat([v, v_img], dim=2).float()
    probs = (q.float() @ keys.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(dim=-1)
    out = probs @ values                                           # (r, h, C, d)
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


def concept_update(block, tokens: torch.Tensor, attn_out: torch.Tensor, mods) -> torch.Tensor:
    """The concepts' residual stream after the block (step 3)."""
    mod1, mod2 = mods
    tokens = tokens + mod1.gate * block.txt_attn.proj(attn_out.to(tokens.dtype))
    return tokens + mod2.gate * block.txt_mlp(modulate(block.txt_norm2(tokens), mod2))


def concept_scores(concept_out: torch.Tensor, image_out: torch.Tensor) -> torch.Tensor:
    """A block's maps (step 4): softmax over concepts of (r, C, h*d) . (r, N, h*d) -> (r, C, N)."""
    return torch.einsum("rcd,rnd->rcn", concept_out.float(), image_out.float()).softmax(dim=1)


@dataclass
class ConceptCall:
    """One double block's concept attention in one model call; ``attend`` is called by the hook's override."""
    rows: list[int]                   # attention-batch rows the concepts follow (the cond rows)
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mods: tuple
    readers: Sequence                 # controllers with ``wants_concepts`` / ``observe_concepts`` (the stores)
    out: torch.Tensor | None = None   # (r, C, h*d) after ``attend``

    def attend(self, qh, kh, vh, out: torch.Tensor, layout, ctx) -> None:
        """``kh``, ``vh``: (b, h, L, d) of the joint call; ``out``: its (b, L, h*d) output; ``layout``: the block's
        ``JointLayout``; ``ctx``: its cross-view ``AttnContext`` (for the readers)."""
        idx = torch.tensor(self.rows, device=kh.device)
        g = layout.grid_tokens()
        k_img, v_img = kh.index_select(0, idx)[:, :, g], vh.index_select(0, idx)[:, :, g]
        with torch.no_grad():
            self.out = concept_attention_output(self.q, self.k, self.v, k_img, v_img)
            if out.dim() == 4:                                         # (b, h, L, d) output layout
                out = out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)
            readers = [r for r in self.readers if r.wants_concepts(ctx)]
            if readers:
                scores = concept_scores(self.out, out.index_select(0, idx)[:, g])
                for r in readers:
                    r.observe_concepts(scores, ctx, self.rows)


class ConceptStream:
    """The concepts' residual stream through the double blocks of one model call."""

    def __init__(self, blocks: Sequence, tokens: torch.Tensor, vec: torch.Tensor, rows: list[int],
                 readers: Sequence):
        self.blocks, self.tokens, self.vec, self.rows, self.readers = blocks, tokens, vec, rows, readers

    def prepare(self, index: int) -> ConceptCall:
        with torch.no_grad():
            q, k, v, mods = concept_qkv(self.blocks[index], self.tokens, self.vec)
        return ConceptCall(self.rows, q, k, v, mods, self.readers)

    def advance(self, index: int, call: ConceptCall) -> None:
        if call.out is None:     # the block's attention did not reach the override (another pack's replace)
            return
        with torch.no_grad():
            self.tokens = concept_update(self.blocks[index], self.tokens, call.out, call.mods)
