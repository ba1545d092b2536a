"""Grounding Features node (Li et al. 2023): the UNet features a grounding head reads.

Glue only: the recorder and feature container are ``attention/grounding_features.py``. The other grounding
nodes: ``grounding_dataset.py`` (fill and open a dataset), ``grounding_head.py`` (train and load a head),
``grounding_segment.py`` (word masks), ``grounding_words.py`` (their shared word handling).

Features are computed by evaluating the UNet **once** on the LATENT re-noised to the chosen timestep
(upstream: the last DDIM step, t = 1), with the positive and negative conditionings batched by ComfyUI
itself (``calc_cond_batch``: any batch size, SDXL's extra conds, low-memory splitting), through a clone of
the MODEL carrying the recorder's block patches. Works for generated and VAE-encoded real images alike.
"""

from __future__ import annotations

import comfy.sample
import comfy.samplers
import torch
from comfy_api.latest import io, ui

from ..attention import logger
from ..attention.grounding_features import FeatureRecorder, FeatureRecordError, GroundingFeatures
from .common import CATEGORY
from .guided import add_chunk_wrapper, full_frame_only

GroundingFeaturesType = io.Custom("GROUNDING_FEATURES")

ROWS = ("uncond + cond", "cond only")
_FAMILIES = {"SD15": "sd1", "SD20": "sd2", "SD21UnclipL": "sd2", "SD21UnclipH": "sd2", "SDXL": "sdxl",
             "SDXLRefiner": "sdxl_refiner", "SSD1B": "sdxl", "Segmind_Vega": "sdxl", "KOALA_700M": "sdxl",
             "KOALA_1B": "sdxl", "ShapesWorldConfig": "shapesworld"}


def model_family(model) -> str:
    name = type(model.model.model_config).__name__
    return _FAMILIES.get(name, name.lower())


class _BothRowsGuider(comfy.samplers.CFGGuider):
    """Evaluates the positive (and negative) conditioning in one batched call; returns the positive's x0."""

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 - ComfyUI's signature
        conds = [self.conds["positive"]] + ([self.conds["negative"]] if "negative" in self.conds else [])
        return comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, model_options)[0]


def _one_evaluation(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """A k-diffusion 'sampler' that calls the denoiser once at sigmas[0] (features only)."""
    return model(x, sigmas[0] * x.new_ones([x.shape[0]]), **(extra_args or {}))


def compute_features(model, positive, negative, samples: torch.Tensor, timestep: int, seed: int,
                     rows: str = ROWS[0]) -> GroundingFeatures:
    """GroundingFeatures of a raw LATENT batch ``samples`` (B, C, h, w) noised to DDPM index ``timestep``
    (x_t = x_0 + sigma_t * noise, noise from ``seed``) and evaluated once; ``model`` is left untouched."""
    if rows == ROWS[0] and negative is None:
        raise ValueError("rows 'uncond + cond' needs the negative conditioning (upstream's uncond is the empty "
                         "prompt: a CLIPTextEncode with empty text); connect one, or set rows to 'cond only'")
    m = model.clone()
    rec = FeatureRecorder()
    m.set_model_input_block_patch(full_frame_only(rec.input_block_patch))    # area entries run on a crop:
    m.set_model_output_block_patch(full_frame_only(rec.output_block_patch))  # record the full frame only
    add_chunk_wrapper(m)
    sigma = float(m.get_model_object("model_sampling").sigma(torch.tensor(float(timestep))))
    samples = comfy.sample.fix_empty_latent_channels(m, samples)
    noise = comfy.sample.prepare_noise(samples, seed)
    guider = _BothRowsGuider(m)
    conds = {"positive": positive}
    if rows == ROWS[0]:
        conds["negative"] = negative
    guider.inner_set_conds(conds)
    sampler = comfy.samplers.KSAMPLER(_one_evaluation)
    sigmas = torch.tensor([sigma, 0.0])
    dm = m.get_model_object("diffusion_model")
    try:
        hook = rec.hook_final_block(dm)
    except FeatureRecordError:
        logger.warning("grounding: %s has no `out` module; the last output block is not recorded",
                       type(dm).__name__)
        hook = None
    with torch.no_grad():          # also when called from a training loop that enables gradients
        if hook is not None:
            with hook:
                guider.sample(noise, samples, sampler, sigmas, seed=seed, disable_pbar=True)
        else:
            guider.sample(noise, samples, sampler, sigmas, seed=seed, disable_pbar=True)
    context_dim = int(positive[0][0].shape[-1])
    feats = rec.features(model_family(m), context_dim, int(timestep), sigma, concat_uncond=rows == ROWS[0])
    feats.extra["latent_size"] = tuple(samples.shape[-2:])
    return feats


class GroundingFeaturesNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GroundingFeatures",
            display_name="Grounding Features",
            category=CATEGORY,
            description=(
                "UNet features of a LATENT for a grounding head (Li et al. 2023): the latent is noised to the chosen "
                "timestep and the MODEL is evaluated once with the positive and negative prompts; the output of "
                "every input, middle and output block is recorded and grouped by feature size, the uncond and cond "
                "rows concatenated on channels as in the paper. Use the sampler's output for a generated image or "
                "VAE Encode for a real one. The MODEL is not modified."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model that made (or will segment) the image."),
                io.Conditioning.Input("positive", tooltip=(
                    "The image's prompt (CLIPTextEncode). One conditioning for the whole batch.")),
                io.Latent.Input("latent", tooltip="Raw LATENT (sampler output or VAE Encode of a real image)."),
                io.Int.Input("timestep", default=1, min=0, max=999, tooltip=(
                    "DDPM timestep index 0-999 at which the UNet is evaluated; 1 = the paper's last DDIM step "
                    "(almost no noise). Larger values add more noise.")),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=False,
                             tooltip="Seed of the noise added to reach the timestep (0 to 2^64-1)."),
                io.Combo.Input("rows", options=list(ROWS), default=ROWS[0], tooltip=(
                    "'uncond + cond' (paper): both rows, concatenated on channels; needs 'negative'. "
                    "'cond only': the prompt's row only (what a CFG-1 evaluation has); a head must be trained "
                    "on the same choice.")),
                io.Conditioning.Input("negative", optional=True, tooltip=(
                    "The unconditional prompt; the paper uses the empty prompt. Required for 'uncond + cond'.")),
            ],
            outputs=[GroundingFeaturesType.Output(display_name="features", tooltip=(
                "Per feature size (coarse to fine) a (batch, channels, h, w) tensor, with model family, "
                "context width and timestep."))],
        )

    @classmethod
    def execute(cls, model, positive, latent, timestep, seed, rows, negative=None) -> io.NodeOutput:
        feats = compute_features(model, positive, negative, latent["samples"], timestep, seed, rows)
        logger.info("GroundingFeatures: %s", feats.describe())
        return io.NodeOutput(feats, ui=ui.PreviewText(feats.describe()))
