"""SpaTextGuider: a region map with free text per region, training-free (after Avrahami et al. 2023).

Glue only: the regional cross-attention and the two-condition guidance live in ``attention/spatext.py`` (see its
header for what is the paper's and what replaces its fine-tuning). The guider evaluates per step the negative
and the global prompt as usual (one batch), then the spatial pass, the global prompt again with the region
patches added to the model options of that call only: nothing stays on the model.
"""

from __future__ import annotations

import comfy.samplers
import torch
from comfy_api.latest import io, ui

from ..attention import logger
from ..attention.masks import check_aspect, mask_batch
from ..attention.render import grid, upsample
from ..attention.spatext import ExpandContext, RegionalAttention, region_weights
from .common import CATEGORY, comfy_attention, model_layer_ids

SLOTS = 4
PALETTE = torch.tensor([[0.9, 0.2, 0.2], [0.2, 0.4, 0.95], [0.2, 0.8, 0.3], [0.95, 0.8, 0.1]])


def spatial_options(model_options: dict, expand: ExpandContext, masks: torch.Tensor, layers,
                    weight_cache: dict | None = None) -> dict:
    """A copy of ``model_options`` whose transformer options add the spatial pass's patches on every layer,
    each regional patch calling the attention the layer had (another pack's patch, or ComfyUI's)."""
    mo = dict(model_options)
    to = dict(mo.get("transformer_options", {}))
    patches = {k: list(v) for k, v in to.get("patches", {}).items()}
    patches["attn2_patch"] = patches.get("attn2_patch", []) + [expand]
    replace = {k: dict(v) for k, v in to.get("patches_replace", {}).items()}
    attn2 = replace.setdefault("attn2", {})
    for lid in layers:
        prev = attn2.get((lid.kind, lid.number, lid.depth)) or attn2.get((lid.kind, lid.number))
        attn2[(lid.kind, lid.number, lid.depth)] = RegionalAttention(masks, expand.lengths, prev, comfy_attention,
                                                                     weight_cache)
    to["patches"], to["patches_replace"] = patches, replace
    mo["transformer_options"] = to
    return mo


class SpaTextCFGGuider(comfy.samplers.CFGGuider):
    def set_spatial(self, expand: ExpandContext, masks: torch.Tensor, s_local: float):
        """The region prompts, their masks and cfg_local (cfg_global is the guider's ``cfg``)."""
        self.expand, self.masks, self.s_local = expand, masks, s_local
        self.layers = model_layer_ids(self.model_patcher)
        self.checked_shape = None
        self.weight_cache: dict = {}        # masks resized per layer size, kept across steps

    def check_aspect(self, x: torch.Tensor) -> None:
        """The pack's size rule (``attention/masks.py``), once per latent size: masks within the aspect tolerance
        are resized to each layer; beyond it they would be stretched over other objects, so sampling stops."""
        shape = tuple(x.shape[-2:])
        if shape == self.checked_shape:
            return
        check_aspect(tuple(self.masks.shape[-2:]), shape, "SpaTextGuider", "region masks", "latent (latent pixels)")
        self.checked_shape = shape

    def set_conds(self, positive, negative):
        self.inner_set_conds({"positive": positive, "negative": negative})

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 - ComfyUI's signature
        negative, positive = self.conds.get("negative"), self.conds.get("positive")
        out = comfy.samplers.calc_cond_batch(self.inner_model, [negative, positive], x, timestep, model_options)
        guided = comfy.samplers.cfg_function(self.inner_model, out[1], out[0], self.cfg, x, timestep,
                                             model_options=model_options, cond=positive, uncond=negative)
        if self.s_local == 0:
            return guided
        self.check_aspect(x)
        opts = spatial_options(model_options, self.expand, self.masks, self.layers, self.weight_cache)
        spatial = comfy.samplers.calc_cond_batch(self.inner_model, [positive], x, timestep, opts)[0]
        return guided + (spatial - out[1]) * self.s_local


class SpaTextGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        regions = []
        for k in range(1, SLOTS + 1):
            regions += [
                io.Mask.Input(f"mask_{k}", optional=True, tooltip=(
                    f"Region {k}: where its prompt applies (any size whose aspect ratio is within 2 % of the "
                    f"image's; resized to each attention layer by area; values 0-1). Leave unconnected to skip "
                    f"the slot.")),
                io.String.Input(f"prompt_{k}", multiline=True, default="", tooltip=(
                    f"Region {k}'s free text, e.g. 'a black horse'. Needed when mask_{k} is connected.")),
            ]
        return io.Schema(
            node_id="SpaTextGuider",
            display_name="SpaText Guider (Region Prompts)",
            category=CATEGORY,
            description=(
                "SpaText-style scene control without fine-tuning (after Avrahami et al. 2023): a global prompt plus "
                "up to four regions, each a MASK with its own free text. Pixels of a region attend to its text in "
                "the cross-attention, other pixels to the global prompt; guidance keeps the paper's two conditions "
                "(global prompt, spatial map) with a scale each. Outputs a GUIDER for SamplerCustomAdvanced."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (SD1.x, SD2.x, SDXL or ShapesWorld); unchanged."),
                io.Clip.Input("clip", tooltip="The CLIP that encodes the region prompts (the same as the positive's)."),
                io.Conditioning.Input("positive", tooltip="The global prompt, describing the whole scene."),
                io.Conditioning.Input("negative", tooltip="The negative prompt (empty for none)."),
                io.Float.Input("cfg_global", default=7.5, min=0.0, max=100.0, step=0.1, tooltip=(
                    "Guidance scale of the global prompt against the negative (0-100; like KSampler's cfg).")),
                io.Float.Input("cfg_local", default=7.5, min=0.0, max=100.0, step=0.1, tooltip=(
                    "Guidance scale of the region map on top of the global prompt (0-100). Equal to cfg_global: "
                    "plain CFG on the regional pass; 0: the regions are ignored (saves one model call a step).")),
                *regions,
            ],
            outputs=[io.Guider.Output(display_name="GUIDER", tooltip="For SamplerCustomAdvanced."),
                     io.Image.Output(display_name="region_map", tooltip="The regions in colours over black.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, positive, negative, cfg_global, cfg_local, **regions) -> io.NodeOutput:
        masks, prompts = [], []
        for k in range(1, SLOTS + 1):
            mask, text = regions.get(f"mask_{k}"), (regions.get(f"prompt_{k}") or "").strip()
            if mask is None:
                if text:
                    logger.warning("SpaTextGuider: prompt_%d %r has no mask_%d connected; it is ignored", k, text, k)
                continue
            if not text:
                raise ValueError(f"mask_{k} is connected but prompt_{k} is empty: write what region {k} shows "
                                 f"(e.g. 'a black horse') or disconnect mask_{k}")
            mask = mask_batch(mask, "SpaTextGuider", f"mask_{k}")              # (B, H, W), any MASK layout
            if mask.shape[0] != 1:
                raise ValueError(f"mask_{k} is a batch of {mask.shape[0]} masks; give one mask per region slot")
            masks.append(mask)
            prompts.append(text)
        if not masks:
            raise ValueError("no region: connect at least mask_1 with prompt_1 (use a plain sampler for the "
                             "global prompt alone)")
        sizes = {tuple(m.shape[-2:]) for m in masks}
        if len(sizes) > 1:
            raise ValueError(f"the region masks have different sizes {sorted(sizes)}; make them one size (the "
                             f"image's)")
        stacked = torch.cat(masks)                                             # (R, H, W)
        contexts = [clip.encode_from_tokens(clip.tokenize(p))[0] for p in prompts]   # each (m, c)
        lengths = [c.shape[0] for c in contexts]
        if len(set(lengths)) > 1:
            raise ValueError(f"region prompts encode to {lengths} tokens; keep each under 75 tokens so they "
                             f"encode to one chunk")
        expand = ExpandContext(torch.stack(contexts))                          # (R, m, c)
        guider = SpaTextCFGGuider(model)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg_global)
        guider.set_spatial(expand, stacked, cfg_local)
        weights = region_weights(stacked, *stacked.shape[-2:])[0]             # (R + 1, H*W)
        colours = PALETTE[: len(prompts)]
        picture = (weights[1:].T @ colours).view(*stacked.shape[-2:], 3)
        logger.info("SpaTextGuider: %d region(s): %s; cfg global %.2f, local %.2f", len(prompts),
                    " | ".join(prompts), cfg_global, cfg_local)
        preview = grid(upsample(picture.permute(2, 0, 1), (256, 256), "nearest").permute(1, 2, 0)[None], cols=1)
        return io.NodeOutput(guider, picture[None], ui=ui.PreviewImage(preview, cls=cls))
