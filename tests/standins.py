"""Minimal stand-ins of other packs, for the tests of the attention hook (tier 1 and tier 2)."""

import torch


class CrossAttentionPatchStandIn:
    """IPAdapter's ``CrossAttentionPatch`` / ``Attn2Replace`` in miniature (InstantID's and PuLID's are alike): one
    replace object per attn2 slot that calls plain attention itself, without transformer_options (so no override),
    and adds one "image prompt" term per ``add``: attention of q over a fixed random key set of its own.
    ``attention(q, k, v, heads)``: ComfyUI's ``optimized_attention`` in tier 2, SDPA in tier 1."""

    def __init__(self, weight: float, attention):
        self.weights, self.attention = [weight], attention

    def add(self, weight: float):
        self.weights.append(weight)

    def set_new_condition(self, weight: float):
        self.weights[-1] = weight

    def __call__(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        out = self.attention(q, k, v, heads)
        for i, w in enumerate(self.weights):
            kv = torch.randn(1, 4, q.shape[-1], generator=torch.Generator().manual_seed(i)).to(q)
            kv = kv.expand(q.shape[0], -1, -1)
            out = out + w * self.attention(q, kv, kv, heads)
        return out
