"""Minimal stand-ins of other packs, for the tests of the attention hook (tier 1 and tier 2), and one UNet attention
call through the pack's hook as the nodes install it."""

import torch


def through_hook(controllers, is_cross: bool, q, k, v, extra_options: dict):
    """One attention call of the layer named by ``extra_options`` (``block``, ``block_index``, ``n_heads``) the way
    a sampling run makes it: the hook with ``controllers`` on that layer (the patch the nodes install), its slot
    marker, then the override around the kernel, as ComfyUI's ``BasicTransformerBlock`` and ``wrap_attn`` call them.
    q (b, n, heads * d), k and v (b, m, heads * d); returns the output (b, n, heads * d). Tier 1 only (it imports
    the library as ``attention``)."""
    from attention.explicit import sdpa_kernel
    from attention.hook import AttentionHook, Install
    from attention.layers import LayerId
    block = extra_options["block"]
    layer = LayerId(str(block[0]), int(block[1]), int(extra_options.get("block_index", 0)))
    hook = AttentionHook()
    for c in controllers:
        hook = hook.with_install(Install(c, frozenset([layer]), not is_cross, is_cross))
    hook.markers()["attn2_patch" if is_cross else "attn1_patch"](q, k, v, extra_options)
    return hook(sdpa_kernel, q, k, v, extra_options["n_heads"], transformer_options=extra_options,
                _inside_attn_wrapper=True)


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
