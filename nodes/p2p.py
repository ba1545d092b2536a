"""P2PEditSampler: Prompt-to-Prompt edits of a generated image (seed) or an inverted one, on UNets and on DiT
models (Flux, SD3/3.5, ShapesWorld-Flow: ``attention/p2p_joint.py`` edits their joint attention; docs/dit-editing.md).

Glue only: controllers, mappers and LocalBlend are in ``attention/p2p.py`` (ported from
google/prompt-to-prompt, Apache-2.0; see its header). The source and every edit are sampled in one
batch inside ComfyUI's sampler: from a seed with a SAMPLER (our DDIM by default,
``comfy_sampling.sample_rows``), from an inversion by retracing its DDIM steps with its per-step null
embeddings (``inversion.sample_from_inversion``).
"""

from __future__ import annotations

import comfy.sample
import comfy.samplers
import torch
from comfy_api.latest import io, ui

from ..attention import logger
from ..attention.chunks import ChunkFilter
from ..attention.inversion import Inversion
from ..attention.p2p import (
    EDITS,
    LocalBlend,
    blend_positions,
    build_plan,
    parse_pairs,
    self_replace_limit,
)
from ..attention.p2p_joint import JointP2PController
from ..attention.store import AttentionStore, StoreConfig
from ..attention.words import split_word_list
from . import comfy_sampling
from .common import CATEGORY, InversionType, encode_prompt, install_controller, model_layer_ids, prompt_words
from .dit import dit_info
from .guided import add_chunk_wrapper, rows_conditioning
from .inversion import sample_from_inversion
from .learnable_tokens import encode_with_learned
from .model_identity import check_inversion_model


def words_fn(clip):
    """prompt -> its words (the pack's word rule), as attention/p2p.py wants them; cached per prompt."""
    cache: dict = {}

    def words_of(prompt: str):
        if prompt not in cache:
            cache[prompt] = prompt_words(clip, prompt)
        return cache[prompt]
    return words_of


class P2PEditSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="P2PEditSampler",
            display_name="P2P Edit Sampler (Prompt-to-Prompt)",
            category=CATEGORY,
            description=(
                "Prompt-to-Prompt editing (Hertz et al. 2022): samples the source prompt and each target prompt "
                "in one batch, the edits taking the source's cross-attention (word swap 'replace', added words "
                "'refine', 'reweight' factors) and self-attention for the first steps; LocalBlend keeps changes "
                "where the blend words are. From a seed, or from a Null-Text Inversion of a real image. Runs inside "
                "ComfyUI's sampler: the MODEL's patches, wrappers and CFG functions, every conditioning entry "
                "(ControlNet, areas, timestep ranges) and the latent's noise mask (edits only inside it) apply as in "
                "KSampler. DDIM (eta 0) by default; connect a SAMPLER and SIGMAS (as for SamplerCustomAdvanced) to "
                "edit a generated source with any ComfyUI sampler: the rows share one initial noise and, for "
                "ancestral/SDE samplers, each step's noise. An inversion always retraces its own steps (DDIM; Euler or "
                "FireFlow for a rectified-flow inversion). On Flux and SD3 (DiT joint attention) the edit works on "
                "the image-query rows of each block's joint softmax: the image->text block is replaced/refined/"
                "reweighted, the source's image->image block is injected during the self-replace window on every "
                "block, and each edited row is scaled back to sum 1; guidance-distilled Flux samples at cfg 1."),
            inputs=[
                io.Model.Input("model", tooltip=(
                    "SD1.x/SD2.x/SDXL, Flux, SD3/3.5, ShapesWorld or ShapesWorld-Flow model. Cloned; the input "
                    "stays unpatched.")),
                io.Clip.Input("clip", tooltip="The model's CLIP."),
                io.String.Input("source_prompt", multiline=True,
                                default="a red circle and a blue square on a gray background",
                                tooltip="The source prompt (with an inversion: the prompt it was inverted with)."),
                io.String.Input("target_prompts", multiline=True,
                                default="a red triangle and a blue square on a gray background",
                                tooltip="One edited prompt per line; each becomes one output image."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning when no inversion is given."),
                io.Latent.Input("latent_image", tooltip=(
                    "Size of a generated source; with a noise mask (SetLatentNoiseMask) the edits change only inside "
                    "it, as KSampler inpaints (with an inversion only its noise mask is used: outside it every row "
                    "is the inverted image).")),
                io.Combo.Input("edit", options=list(EDITS), default="auto", tooltip=(
                    "auto: replace when the word counts match, else refine. replace: word swap (same word count). "
                    "refine: words added or removed, aligned token by token.")),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed of the generated source (ignored with an inversion)."),
                io.Int.Input("steps", default=50, min=2, max=1000,
                             tooltip="DDIM steps (with an inversion: its steps; unused when 'sigmas' is connected)."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1,
                               tooltip=("Guidance scale (0-100; with an inversion: its guidance). Guidance-distilled "
                                        "Flux: 1 (its guidance comes from FluxGuidance on the conditioning).")),
                io.Combo.Input("scheduler", options=list(comfy.samplers.SCHEDULER_NAMES), default="ddim_uniform",
                               tooltip=("Sigma schedule (with an inversion: its sigmas; unused when 'sigmas' is "
                                        "connected).")),
                io.Float.Input("cross_replace_steps", default=0.8, min=0.0, max=1.0, step=0.01, tooltip=(
                    "Fraction of the steps in which edits take the source's cross-attention (0-1; official "
                    "examples 0.8). On Flux/SD3: the image->text block of the joint attention.")),
                io.String.Input("cross_replace_words", default="", tooltip=(
                    "Per-word overrides 'word:fraction' for words of the target prompts, e.g. 'lasagne:0.2' "
                    "(comma separated; empty = none). Case and (word:1.2) emphasis are ignored; a word in no "
                    "target prompt is an error.")),
                io.Float.Input("self_replace_steps", default=0.4, min=0.0, max=1.0, step=0.01, tooltip=(
                    "Fraction of the steps in which edits take the source's self-attention (0-1; official 0.4). "
                    "Only on layers up to a quarter of the latent's size from a seed (upstream's 16x16 at 512 "
                    "px) and up to half of it with an inversion (the null-text notebook's 32x32). On Flux/SD3: "
                    "the image->image block of the joint attention, on every block (one token grid).")),
                io.String.Input("reweight", default="", tooltip=(
                    "Attention reweighting 'word:factor' for words of the target prompts, e.g. 'smiling:5' or "
                    "'pink:-2' (comma separated; negative allowed; empty = none). Combines with replace/refine. A word "
                    "in no target prompt is an error.")),
                io.String.Input("blend_words", default="", tooltip=(
                    "LocalBlend: words (of the source or a target) where changes are allowed, e.g. 'circle, "
                    "triangle'; empty = no blend. A word in none of the prompts is an error. On Flux/SD3 the map "
                    "is the words' image->text attention averaged over all blocks, at the token grid.")),
                io.Float.Input("blend_threshold", default=0.3, min=0.0, max=1.0, step=0.01,
                               tooltip="LocalBlend mask threshold on the max-normalized map (official 0.3; 0-1)."),
                io.Float.Input("blend_start", default=0.2, min=0.0, max=1.0, step=0.01,
                               tooltip="LocalBlend starts after this fraction of the steps (official 0.2; 0-1)."),
                InversionType.Input("inversion", optional=True, tooltip=(
                    "From Null-Text Inversion or DPL Token Optimizer: edit a real image (with DPL, the learned noun "
                    "tokens of each step are used in the source and in every target that keeps the noun). On Flux/"
                    "SD3: modes rf-euler, fireflow (retraced with the same solver) or null-text (SD3).")),
                io.Sampler.Input("sampler", optional=True, tooltip=(
                    "Optional, with 'sigmas' (generated sources only): any ComfyUI sampler (KSamplerSelect, "
                    "SamplerEulerAncestral...) instead of DDIM; steps and scheduler are then unused. Ancestral/SDE "
                    "samplers give every row the same per-step noise. Not with an inversion.")),
                io.Sigmas.Input("sigmas", optional=True, tooltip=(
                    "Optional, with 'sampler': the sigma schedule (BasicScheduler, KarrasScheduler...; steps + 1 "
                    "descending values).")),
                io.Conditioning.Input("positive", optional=True, tooltip=(
                    "Optional: the source prompt's CONDITIONING with what is attached to it (ControlNet, area, "
                    "timestep range...). Its entries that encode source_prompt (with this CLIP) take each target "
                    "prompt's text on the edit rows; the others apply to every row. Default: source_prompt encoded "
                    "(with an inversion: the inversion's).")),
            ],
            outputs=[
                io.Latent.Output(display_name="latents", tooltip=(
                    "Batch: the source (reconstruction), then each edit; from an inversion of several images, "
                    "that group for each image in turn.")),
                io.Mask.Output(display_name="blend_mask", tooltip=(
                    "The last LocalBlend mask per edit (latent size); from an inversion of several images, "
                    "every image's masks in turn.")),
            ],
        )

    @classmethod
    def execute(cls, model, clip, source_prompt, target_prompts, negative, latent_image, edit, seed, steps, cfg,
                scheduler, cross_replace_steps, cross_replace_words, self_replace_steps, reweight, blend_words,
                blend_threshold, blend_start, inversion=None, sampler=None, sigmas=None,
                positive=None) -> io.NodeOutput:
        targets = [t.strip() for t in target_prompts.splitlines() if t.strip()]
        if not targets:
            raise ValueError("target_prompts is empty: write one edited prompt per line")
        inv: Inversion | None = inversion
        custom_sigmas = comfy_sampling.check_pair("P2PEditSampler", sampler, sigmas, inv)
        if inv is not None:
            if inv.prompt.strip() != source_prompt.strip():
                what = "DPL tokens were optimized for" if inv.mode == "dpl" else "inversion was made with"
                raise ValueError(f"the {what} the prompt {inv.prompt!r}, not {source_prompt!r}; "
                                 f"use the same source prompt on both nodes")
            if steps != len(inv.sigmas) - 1:
                raise ValueError(f"the inversion was made with {len(inv.sigmas) - 1} steps but steps is {steps}; set "
                                 f"steps to {len(inv.sigmas) - 1} (the edit retraces the inversion step by step)")
            check_inversion_model(inv, model, "P2PEditSampler")    # object, weight patches, options (by name)
            if cfg != inv.guidance:
                logger.info("P2PEditSampler: using the inversion's guidance %.2f instead of cfg %.2f",
                            inv.guidance, cfg)
            sigmas = inv.sigmas
        elif custom_sigmas is not None:
            sigmas = custom_sigmas
        else:
            sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu()
        steps = len(sigmas) - 1
        prompts = [source_prompt] + targets
        encoded = [encode_prompt(clip, p) for p in prompts]
        conds = [c[0][0] for c in encoded]
        bad = [(p, tuple(c.shape)) for p, c in zip(prompts, conds) if c.shape != conds[0].shape]
        if bad:
            raise ValueError(f"prompts encode to different lengths {bad} vs {tuple(conds[0].shape)}; keep every "
                             f"prompt within the source's 77-token chunks")
        length = conds[0].shape[1]
        k = len(targets)
        latent_hw = tuple((inv.x_T if inv is not None else comfy.sample.fix_empty_latent_channels(
            model, latent_image["samples"][:1])).shape[-2:])
        dit = dit_info(model.get_model_object("diffusion_model"))
        if dit is not None:     # one token grid on every block: self-injection and LocalBlend maps on all of them
            grid = dit.grid(latent_hw)
            self_limit, blend_size = grid[0] * grid[1], grid
        else:
            self_limit = self_replace_limit(latent_hw, inv is not None)
            blend_size = (max(latent_hw[0] // 4, 1), max(latent_hw[1] // 4, 1))

        words_of = words_fn(clip)
        plan = build_plan(source_prompt, targets, edit, steps, cross_replace_steps,
                          parse_pairs(cross_replace_words, "cross_replace_words", "lasagne:0.2"),
                          self_replace_steps, parse_pairs(reweight, "reweight", "smiling:5"), length,
                          self_limit, words_of)
        m = model.clone()
        add_chunk_wrapper(m)
        ids = model_layer_ids(model, dit=True)
        install_controller(m, ChunkFilter(JointP2PController(plan, steps)), ids)   # the rows of the prompts' entries
        blend = None
        names = split_word_list(blend_words)
        if names:
            store = AttentionStore(StoreConfig(capture_self=False))
            install_controller(m, store, ids, self_attn=False, cross_attn=True)
            blend = LocalBlend(store, blend_positions(prompts, names, words_of), blend_size, blend_threshold,
                               int(blend_start * steps))
        base = positive if positive is not None else inv.extra["positive"] if inv is not None else encoded[0]
        rows = rows_conditioning("P2PEditSampler", base, encoded[0], encoded)
        if inv is None:
            out = comfy_sampling.sample_rows(m, sampler, sigmas, rows, negative, cfg, latent_image, seed, 1 + k,
                                             blend, "P2PEditSampler")
        else:
            texts = torch.cat(conds)
            if inv.mode == "dpl":   # per-step learned noun tokens, in the targets too; each image its own
                def texts(item: Inversion) -> list[torch.Tensor]:
                    learned = item.extra["dpl"]
                    return [torch.cat([item.extra["conds"][i]] + [encode_with_learned(clip, t, learned, i)
                                                                  for t in targets]) for i in range(steps)]
            out = sample_from_inversion(m, inv, rows, negative, texts, 1 + k, blend, latent_image, "P2PEditSampler",
                                        batch=True)   # an inversion of b images: each edited from its own
        images = 1 if inv is None else inv.items
        mask = blend.last_mask.unflatten(0, (images, 1 + k))[:, 1:, 0].flatten(0, 1).cpu() \
            if blend is not None and blend.last_mask is not None else torch.ones(images * k, *latent_hw)
        logger.info("P2PEditSampler: %d edits (%s) of %r, %d steps%s", k, ", ".join(plan.kind), source_prompt, steps,
                    " from an inversion" if inv is not None else "")
        return io.NodeOutput({"samples": out}, mask, ui=ui.PreviewMask(mask, cls=cls))
