"""DiT glue for the attention hook: ComfyUI's Flux and MMDiT (SD3/3.5) block tables, the per-call preparation
(token layout, block proxies, ConceptAttention's concept stream); concept tokens are encoded in ``capture.py``.

The pure parts are ``attention/joint.py`` (layout, views, block proxies) and ``attention/concept_attention.py``.
"""

from __future__ import annotations

import comfy.ldm.flux.layers
import comfy.ldm.flux.model
import comfy.ldm.modules.diffusionmodules.mmdit as mmdit
import torch

from ..attention.chunks import visible
from ..attention.concept_attention import ConceptStream
from ..attention.joint import LAYOUT_KEY, DitCall, DitInfo, JointLayout, dit_context, with_dit_blocks
from ..attention.layers import LayerId


def dit_info(dm) -> DitInfo | None:
    """The block table of a Flux or MMDiT diffusion model (None for any other model)."""
    if isinstance(dm, comfy.ldm.flux.model.Flux):
        flipped = tuple(bool(getattr(b, "flipped_img_txt", False)) for b in dm.double_blocks)
        return DitInfo("flux", len(dm.double_blocks), len(dm.single_blocks), int(dm.patch_size), flipped)
    if isinstance(dm, mmdit.MMDiT):
        return DitInfo("mmdit", len(dm.joint_blocks), 0, int(dm.x_embedder.patch_size[0]),
                       prefix=int(getattr(dm, "register_length", 0) or 0))
    return None


def concept_support(dm) -> str | None:
    """Why ConceptAttention maps cannot be made on ``dm`` (None: they can)."""
    if not isinstance(dm, comfy.ldm.flux.model.Flux):
        return (f"ConceptAttention maps need a Flux-style model (double blocks with a text stream); this is a "
                f"{type(dm).__name__}")
    if dm.params.global_modulation:
        return "ConceptAttention maps need per-block modulation; this Flux variant modulates globally"
    return None


def concept_readers(hook) -> list:
    return [i.controller for i in hook.installs if getattr(i.controller, "wants_concepts", None) is not None
            and getattr(getattr(i.controller, "config", None), "concepts", ())]


def _concept_streams(hook, to: dict, layout: JointLayout, x, t, kwargs, bm) -> list[ConceptStream]:
    readers = concept_readers(hook)
    if not readers:
        return []
    ctx = visible(dit_context(LayerId("double", 0, 0), True, layout, 1, x.shape[0], to))   # full-frame cond rows
    readers = [r for r in readers if r.records(ctx)]
    if not readers:
        return []
    dm = bm.diffusion_model
    rows = [r for r, _ in ctx.rows(0)]
    dtype = bm.manual_cast_dtype or bm.get_dtype()
    idx = torch.tensor(rows, device=x.device)
    with torch.no_grad():
        timestep = bm.model_sampling.timestep(t.index_select(0, idx)).float()
        vec = dm.time_in(comfy.ldm.flux.layers.timestep_embedding(timestep, 256).to(dtype))
        guidance = kwargs.get("guidance")
        if dm.params.guidance_embed and guidance is not None:
            g = guidance.to(x.device).float().index_select(0, idx)
            vec = vec + dm.guidance_in(comfy.ldm.flux.layers.timestep_embedding(g, 256).to(dtype))
        if dm.vector_in is not None:          # upstream zeroes the concepts' pooled vector
            vec = vec + dm.vector_in(torch.zeros(len(rows), dm.params.vec_in_dim, device=x.device, dtype=dtype))
        streams = []
        for r in readers:
            emb = r.config.concept_embeddings.to(x.device, dtype)[None].expand(len(rows), -1, -1)
            if dm.txt_norm is not None:
                emb = dm.txt_norm(emb)
            streams.append(ConceptStream(dm.double_blocks, dm.txt_in(emb), vec, rows, [r]))
    return streams


def prepare_dit_call(hook, to: dict, x, t, context, kwargs, bm) -> dict:
    """This call's transformer_options with the DiT hook's keys: the call's layout (``LAYOUT_KEY``) and a block
    proxy on every block (``joint.with_dit_blocks``), carrying the concept streams when concept maps are due."""
    info = hook.dit
    txt = (int(context.shape[1]) if context is not None else 0) + info.prefix
    layout = JointLayout(txt=txt, grid=info.grid(tuple(x.shape[-2:])), prefix=info.prefix)
    streams = _concept_streams(hook, to, layout, x, t, kwargs, bm) if info.family == "flux" else []
    call = DitCall(info, layout, streams)
    return {**with_dit_blocks(to, info, call), LAYOUT_KEY: layout}
