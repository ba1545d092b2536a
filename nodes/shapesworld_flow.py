"""ShapesWorldFlowLoader: the pack's embedded tiny rectified-flow MMDiT as ComfyUI MODEL, CLIP and VAE.

The MODEL is ComfyUI's own Flux (``comfy.ldm.flux.model.Flux`` through ``comfy.model_base.Flux``) built from the
weights file's config and loaded with its weights (strict), so every hook that works on ComfyUI's Flux (the
``optimized_attention_override``, ``patches_replace["dit"]``, wrappers) works on it unchanged. Its model sampling is
FluxSchnell's: ``ModelType.FLOW`` = CONST parameterization with ModelSamplingDiscreteFlow, multiplier 1 and the
file's shift (1.0 for the shipped weights, which were trained on uniform times in (0, 1) without a resolution
shift). Weights run in float32 on any device (the model has 1.8 M parameters). CLIP and VAE are the ShapesWorld
loader's: the same word tokenizer and text encoder (the pooled output is its end-token state, Flux's ``y``) and
ComfyUI's pixel-space VAE, so an EmptyLatentImage of 256x256 gives 32x32 images.
"""

from __future__ import annotations

from pathlib import Path

import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.supported_models
import torch
from comfy_api.latest import io

from ..attention.shapesworld.flow_model import (
    DEFAULT_FLOW_WEIGHTS,
    FLOW_PREFIX,
    TEXT_PREFIX,
    FlowWeightsError,
    read_flow_weights,
    split_state,
)
from .common import CATEGORY
from .shapesworld import ShapesWorldLatentFormat, shapesworld_clip_vae


class ShapesWorldFlowConfig(comfy.supported_models.FluxSchnell):
    """FluxSchnell's supported-model config with the ShapesWorld-Flow unet_config and the pixel-space latent."""
    unet_config = {"image_model": "flux", "guidance_embed": False}
    sampling_settings = {"multiplier": 1.0, "shift": 1.0}
    latent_format = ShapesWorldLatentFormat
    memory_usage_factor = 1.0
    supported_inference_dtypes = [torch.float32]


def flux_model_config(config: dict) -> ShapesWorldFlowConfig:
    """The supported-model config of a ShapesWorld-Flow weights file's ``config`` (float32, its sampling shift)."""
    mc = ShapesWorldFlowConfig({"image_model": "flux", **config["flux"]})
    mc.sampling_settings = {"multiplier": 1.0, "shift": float(config["sampling"]["shift"])}
    mc.set_inference_dtype(torch.float32, None)
    return mc


def load_shapesworld_flow(path: Path | str = DEFAULT_FLOW_WEIGHTS):
    """(MODEL, CLIP, VAE) of a ShapesWorld-Flow file: ComfyUI's Flux with the file's transformer weights."""
    sd, config, _ = read_flow_weights(path)
    model = flux_model_config(config).get_model({}, device=mm.unet_offload_device())
    try:
        model.diffusion_model.load_state_dict(split_state(sd, FLOW_PREFIX), strict=True)
    except RuntimeError as e:
        raise FlowWeightsError(f"{path}: its weights do not fit ComfyUI's Flux built from its config "
                               f"({str(e).splitlines()[0]})") from e
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    clip, vae = shapesworld_clip_vae(config, split_state(sd, TEXT_PREFIX))
    return patcher, clip, vae


class ShapesWorldFlowLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ShapesWorldFlowLoader",
            display_name="ShapesWorld-Flow Loader",
            category=CATEGORY,
            description=(
                "Loads Attention Lab's embedded tiny rectified-flow transformer of coloured shapes: ComfyUI's own "
                "Flux class (double- and single-stream blocks, 1.8 M parameters) with ShapesWorld's text encoder, "
                "32x32 RGB pixel space, velocity prediction with Flux Schnell's flow sampling (shift 1). Sample it "
                "with KSampler (euler, simple, CFG about 4) from an EmptyLatentImage of 256x256; prompts such as "
                "'a red circle and a blue square on a gray background'."),
            inputs=[
                io.String.Input("weights", default="", tooltip=(
                    "Path of a ShapesWorld-Flow .safetensors file (written by python -m "
                    "attention.shapesworld.flow_train); empty = the shipped assets/shapesworld_flow.safetensors.")),
            ],
            outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output()],
        )

    @classmethod
    def execute(cls, weights) -> io.NodeOutput:
        return io.NodeOutput(*load_shapesworld_flow(weights.strip() or DEFAULT_FLOW_WEIGHTS))
