"""PromptMixSampler: shape variations of one object by prompt mixing (MnM), localized; UNets and DiTs (Flux, SD3).

Glue only: the controllers, the blend and the proxy suggestion live in
``attention/prompt_mixing.py`` (procedure and defaults of orpatashnik/local-prompt-mixing, see its
header). Two passes inside ComfyUI's sampler (a SAMPLER, our DDIM by default, ``comfy_sampling.sample_rows``;
from an inversion its DDIM steps, ``inversion.sample_from_inversion``):
1. the original prompt alone, capturing its attention (injection masks, background clusters);
2. the batch [original, variation per proxy] from the same noise, with proxy values in the window,
   the original's self-attention injected on preserved objects and one background blend.
On a DiT the variation rows carry their proxy prompts and ``JointProxyValues`` / ``JointSelfAttentionInjection``
edit the joint attention through the DiT hook (``attention/joint.py``'s ``edit_qkv`` / ``edit_probs``).
"""

from __future__ import annotations

import comfy.samplers
import comfy.utils
import torch
from comfy_api.latest import io, ui

from ..attention import logger
from ..attention.chunks import ChunkFilter
from ..attention.prompt_mixing import (
    BackgroundBlend,
    JointProxyValues,
    JointSelfAttentionInjection,
    MixSettings,
    ProxyValuePatch,
    SelfAttentionInjection,
    blend_labels,
    foreground,
    injection_masks,
    proxy_prompt,
)
from ..attention.render import upsample
from ..attention.store import AttentionStore, StoreConfig
from ..attention.words import locate_words, split_word_list, text_words
from . import comfy_sampling, proxy_search
from .common import (
    CATEGORY,
    PROXY_CANDIDATES,
    InversionType,
    encode_prompt,
    install_controller,
    model_layer_ids,
    prompt_words,
    token_key,
    word_ids,
)
from .dit import dit_info
from .guided import add_chunk_wrapper, rows_conditioning
from .inversion import sample_from_inversion
from .model_identity import check_inversion_model

SELF_MAX = 32 * 32          # official: self-attention of layers up to 32x32 (SD at 512 px)


def _sample(model, rows, positive, negative, cfg, sigmas, latent, seed, inv, text, after_step=None, label="",
            sampler=None):
    """``rows`` rows of the prompt from a seed through ``sampler`` (None: our DDIM; rows share each step's noise),
    or from the inversion ``inv`` retracing its DDIM steps; ``text``: the prompt's encoding."""
    label = f"PromptMixSampler: {label}"
    if inv is None:
        return comfy_sampling.sample_rows(model, sampler, sigmas, positive, negative, cfg, latent, seed, rows,
                                          after_step, label)
    return sample_from_inversion(model, inv, positive, negative, text.expand(rows, -1, -1), rows, after_step,
                                 latent, label)


def _check_proxy(clip, key: str, word: str, proxy: str):
    a, b = word_ids(clip, word, key), word_ids(clip, proxy, key)
    if len(a) != len(b):
        raise ValueError(
            f"proxy word {proxy!r} is {len(b)} token(s) for this CLIP but the object word {word!r} is {len(a)}; "
            f"values are swapped token by token, so a proxy must have the same token count. Pick another proxy "
            f"(single words of common nouns are usually one token).")


def _check_dit(info, latent_image: dict, inversion) -> None:
    if inversion is not None:
        raise ValueError("PromptMixSampler: varying an inversion is not supported on Flux/SD3 (DiT) models yet; "
                         "disconnect 'inversion' and vary a generated image (seed + latent_image)")
    gh, gw = info.grid(tuple(latent_image["samples"].shape[-2:]))
    if gh * gw > SELF_MAX:
        raise ValueError(f"PromptMixSampler on Flux/SD3: the image is {gh}x{gw} = {gh * gw} tokens, above the "
                         f"{SELF_MAX} whose image-to-image attention the clusters and injection masks keep (32x32 "
                         f"tokens: 512x512 px); lower the latent's size to at most 512x512 px (or the same area)")


class PromptMixSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PromptMixSampler",
            display_name="Prompt Mix Sampler (MnM)",
            category=CATEGORY,
            description=(
                "Shape variations of one object while the rest of the image stays (Patashnik et al. 2023, "
                "'Localizing Object-level Shape Variations'). Samples the prompt, then one variation per proxy "
                "word: inside the mixing window the cross-attention takes its values from the proxy prompt (keys "
                "stay), the original's self-attention is injected on preserved objects, and the background is "
                "blended back from the original. From a seed, or from a Null-Text Inversion of a real image. Runs "
                "inside ComfyUI's sampler: the MODEL's patches, wrappers and CFG functions, every conditioning entry "
                "and the latent's noise mask (variations only inside it) apply as in KSampler. DDIM (eta 0) by "
                "default; connect a SAMPLER and SIGMAS (as for SamplerCustomAdvanced) to use any ComfyUI sampler for "
                "a generated image (ancestral/SDE samplers share each step's noise across the rows). On Flux/SD3 the "
                "variations carry their proxy prompts and see the original's text keys (and its values outside the "
                "window) in the joint attention. Output batch: original first, then variations."),
            inputs=[
                io.Model.Input("model", tooltip=(
                    "SD1.x/SD2.x/SDXL, Flux, SD3/3.5, ShapesWorld or ShapesWorld-Flow model (Flux/SD3: images up "
                    "to 512x512 px). Cloned; the input stays unpatched.")),
                io.Clip.Input("clip", tooltip="The model's CLIP; encodes the prompt and the proxy prompts."),
                io.String.Input("prompt", multiline=True, default="a red circle and a blue square on a gray background",
                                tooltip="The positive prompt, containing the object word."),
                io.Conditioning.Input("negative",
                                      tooltip="Negative conditioning (an empty CLIPTextEncode as officially)."),
                io.Latent.Input("latent_image", tooltip=(
                    "Sets the size (EmptyLatentImage); its first item is used. With a noise mask (SetLatentNoiseMask) "
                    "the images change only inside it, as KSampler inpaints (with an inversion only the mask is "
                    "used).")),
                io.String.Input("object_word", default="circle",
                                tooltip="The word of the prompt whose shape varies (object of interest)."),
                io.String.Input("proxy_words", default="triangle, star, diamond, cross", tooltip=(
                    "Comma-separated proxies, one variation each; empty = suggest 'suggestions' words from the "
                    "tokenizer vocabulary entries of the object word's token count by text-encoder similarity "
                    "(official prompt_utils ranking; the first search per text encoder takes a minute or two on a "
                    "CPU for SD's CLIP, then it is cached on disk in models/attention_lab_cache: seconds).")),
                io.Int.Input("suggestions", default=4, min=1, max=16,
                             tooltip="How many proxies to suggest when proxy_words is empty (1-16)."),
                io.String.Input("preserve_words", default="square", tooltip=(
                    "Other objects to keep exactly (comma separated, may be empty): their pixels take the "
                    "original's self-attention.")),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed shared by the original and every variation."),
                io.Int.Input("steps", default=50, min=2, max=1000,
                             tooltip="DDIM steps (official 50; unused when 'sigmas' is connected)."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1,
                               tooltip="Classifier-free guidance scale (official 7.5; 5 for ShapesWorld)."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.SCHEDULER_NAMES), default="simple",
                               tooltip="Sigma schedule of the DDIM loop (unused when 'sigmas' is connected)."),
                io.Float.Input("mix_start", default=0.14, min=0.0, max=1.0, step=0.01, tooltip=(
                    "Start of the mixing window as a fraction of the steps (official 7/50 = 0.14). Earlier = "
                    "larger changes (also position), later = finer ones. Range 0-1.")),
                io.Float.Input("mix_end", default=0.34, min=0.0, max=1.0, step=0.01, tooltip=(
                    "End of the mixing window, exclusive (official 17/50 = 0.34). Range 0-1, at least mix_start.")),
                io.Float.Input("self_injection_end", default=0.8, min=0.0, max=1.0, step=0.01, tooltip=(
                    "Preserved objects take the original's self-attention until this fraction of the steps "
                    "(official 40/50 = 0.8; 0 = off). Range 0-1.")),
                io.Float.Input("injection_threshold", default=0.05, min=0.0, max=1.0, step=0.01, tooltip=(
                    "A pixel belongs to a preserved object when its normalized cross-attention exceeds this "
                    "(official 0.05). Range 0-1.")),
                io.Float.Input("blend_at", default=0.7, min=0.0, max=1.0, step=0.01, tooltip=(
                    "After this fraction of the steps the background is copied from the original once "
                    "(official 35/50 = 0.7). 1 = no blend. Range 0-1.")),
                io.Int.Input("clusters", default=5, min=1, max=64,
                             tooltip="KMeans clusters of the background segmentation (official 5; 1-64)."),
                io.Float.Input("cluster_threshold", default=0.3, min=0.0, max=1.0, step=0.01, tooltip=(
                    "A cluster is foreground when a noun's normalized cross-attention covers it above this "
                    "(official 0.3). Range 0-1.")),
                io.String.Input("nouns", default="", optional=True, tooltip=(
                    "The nouns that label the background clusters, comma separated, e.g. 'hamburger, cup, coffee, "
                    "table'; clusters of any of them stay the variation's at the blend. Empty (default) = every "
                    "noun of the prompt, as upstream (which tags them with NLTK; here the head word of each noun "
                    "phrase, the StructureDiffusion chunker's): list them when a noun modifies another, e.g. "
                    "'coffee cup'. The object word and background_nouns always label.")),
                io.String.Input("background_nouns", default="", optional=True, tooltip=(
                    "Nouns whose clusters are taken from the original at the blend, like the background "
                    "(upstream's background_nouns, default none), e.g. 'background' when the prompt names it.")),
                io.Combo.Input("proxy_candidates", options=list(PROXY_CANDIDATES), default=PROXY_CANDIDATES[0],
                               optional=True, tooltip=(
                    "Vocabulary entries the suggestion ranks: the official code's alphabetic entries, which are "
                    "word-internal BPE pieces (14,071 for SD's CLIP), or the whole-word entries (33,244); they "
                    "share 7,858. Word-level tokenizers give the same list.")),
                InversionType.Input("inversion", optional=True, tooltip=(
                    "From Null-Text Inversion (made with this prompt): vary a real image. Its steps, sigmas and "
                    "guidance replace steps, scheduler and cfg; seed and latent_image are then unused.")),
                io.Sampler.Input("sampler", optional=True, tooltip=(
                    "Optional, with 'sigmas' (generated images only): any ComfyUI sampler (KSamplerSelect, "
                    "SamplerEulerAncestral...) instead of DDIM for both passes; steps and scheduler are then unused. "
                    "Ancestral/SDE samplers give every row the same per-step noise. Not with an inversion.")),
                io.Sigmas.Input("sigmas", optional=True, tooltip=(
                    "Optional, with 'sampler': the sigma schedule (BasicScheduler, KarrasScheduler...; steps + 1 "
                    "descending values).")),
                io.Conditioning.Input("positive", optional=True, tooltip=(
                    "Optional: the prompt's CONDITIONING with what is attached to it (ControlNet, area, timestep "
                    "range...); it must contain 'prompt' encoded by this CLIP, and only those entries are mixed. "
                    "Default: 'prompt' encoded (with an inversion: the inversion's).")),
            ],
            outputs=[
                io.Latent.Output(display_name="latents", tooltip="Batch: the original, then one variation per proxy."),
                io.Mask.Output(display_name="blend_masks", tooltip=(
                    "Per variation, the foreground kept from the variation at the blend "
                    "(latent size; 1 = variation).")),
                io.String.Output(display_name="proxies", tooltip="The proxy words used, in batch order."),
            ],
        )

    @classmethod
    def validate_inputs(cls, mix_start, mix_end, **kwargs):
        if mix_start > mix_end:
            return (f"mix_start ({mix_start}) is above mix_end ({mix_end}); the window is [mix_start, mix_end) in "
                    f"fractions of the steps, official [0.14, 0.34)")
        return True

    @classmethod
    def execute(cls, model, clip, prompt, negative, latent_image, object_word, proxy_words, suggestions,
                preserve_words, seed, steps, cfg, scheduler, mix_start, mix_end, self_injection_end,
                injection_threshold, blend_at, clusters, cluster_threshold, nouns="", background_nouns="",
                proxy_candidates=PROXY_CANDIDATES[0], inversion=None, sampler=None, sigmas=None,
                positive=None) -> io.NodeOutput:
        s = MixSettings(window=(mix_start, mix_end), self_injection_end=self_injection_end,
                        injection_threshold=injection_threshold, blend_at=None if blend_at >= 1 else blend_at,
                        clusters=clusters, cluster_threshold=cluster_threshold).validate()
        objects = split_word_list(object_word)
        if len(objects) != 1:
            raise ValueError(f"object_word takes one word or phrase of the prompt (the object whose shape varies), "
                             f"got {len(objects)}: {objects}. Vary one object per node (chain a second node for "
                             f"another), or list the others in preserve_words to keep them")
        word = " ".join(text_words(objects[0])) or objects[0]     # '(cat:1.2)' -> 'cat', as matched
        pw = prompt_words(clip, prompt)
        obj = pw.positions(word, "object word")
        keep_names = split_word_list(preserve_words)
        keep = locate_words(pw, preserve_words, "preserve word")[1] if keep_names else []
        labels = blend_labels(pw, word, nouns, background_nouns)
        proxies = proxy_search.proxies(clip, prompt, word, proxy_words, suggestions, proxy_candidates)
        key = token_key(clip)
        for p in proxies:
            _check_proxy(clip, key, word, p)
        encoded = encode_prompt(clip, prompt)
        proxy_ctx = torch.cat([encode_prompt(clip, proxy_prompt(prompt, word, p))[0][0] for p in proxies])
        if proxy_ctx.shape[1:] != encoded[0][0].shape[1:]:
            raise ValueError(f"proxy prompts encode to {tuple(proxy_ctx.shape[1:])} but the prompt to "
                             f"{tuple(encoded[0][0].shape[1:])}; keep the prompts within the same 77-token chunks")
        info = dit_info(model.get_model_object("diffusion_model"))
        dit = info is not None
        if dit:
            _check_dit(info, latent_image, inversion)

        inv = inversion
        custom_sigmas = comfy_sampling.check_pair("PromptMixSampler", sampler, sigmas, inv)
        if inv is not None:
            if inv.mode == "dpl":
                raise ValueError("PromptMixSampler takes a Null-Text Inversion (any mode); a DPL inversion's "
                                 "per-step noun tokens are for P2P Edit Sampler. Connect NullTextInvert here")
            if inv.prompt.strip() != prompt.strip():
                raise ValueError(f"the inversion was made with the prompt {inv.prompt!r}, not {prompt!r}; use the "
                                 f"same prompt on both nodes")
            check_inversion_model(inv, model, "PromptMixSampler")   # object, weight patches, options (by name)
            steps = len(inv.sigmas) - 1
        base = positive if positive is not None else inv.extra["positive"] if inv is not None else encoded
        # DiT: the variation rows carry their proxy prompts (text streams) with the original's pooled vector
        rows = [encoded] + [[[c[None], dict(encoded[0][1])]] for c in proxy_ctx]
        positive, positive_rows = (rows_conditioning("PromptMixSampler", base, encoded, r) for r in
                                   ([encoded], rows if dit else [encoded]))
        if custom_sigmas is not None:
            sigmas, steps = custom_sigmas, len(custom_sigmas) - 1
        else:
            sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu()
        ids = model_layer_ids(model, dit=True)
        k = len(proxies)

        # 1. the original, with its attention
        orig_store = AttentionStore(StoreConfig(self_max_tokens=SELF_MAX, keep_heads=True))
        m1 = model.clone()
        add_chunk_wrapper(m1)
        install_controller(m1, orig_store, ids)
        orig_store.reset()
        run = (positive, negative, cfg, sigmas, latent_image, seed, inv, encoded[0][0])
        _sample(m1, 1, *run, label="original", sampler=sampler)
        orig_store.finish()
        orig_fg = foreground(orig_store, 0, labels.positions, s, labels.background, labels.obj)

        # 2. [original, variations] from the same noise
        step = s.blend_step(steps)
        m2 = model.clone()
        add_chunk_wrapper(m2)
        if dit:
            install_controller(m2, ChunkFilter(JointProxyValues(*s.window)), ids)
        else:
            m2.set_model_attn2_patch(ProxyValuePatch(proxy_ctx, *s.window))
        masks = injection_masks(orig_store, keep, obj, s.injection_threshold, SELF_MAX)
        if keep and s.self_injection_end > 0:
            injection = (JointSelfAttentionInjection if dit else SelfAttentionInjection)(masks, s.self_injection_end)
            install_controller(m2, ChunkFilter(injection, full_frame=True), [lid for lid in ids if lid in masks],
                               self_attn=True, cross_attn=False)
        var_store = AttentionStore(StoreConfig(self_max_tokens=SELF_MAX, step_end=((step or steps) + 1) / steps))
        blend = BackgroundBlend(var_store, orig_fg, labels.positions, s, step, labels.background, labels.obj)
        if step is not None:
            install_controller(m2, var_store, ids)
        var_store.reset()
        run = (positive_rows,) + run[1:]
        out = _sample(m2, 1 + k, *run, after_step=blend, label="variations", sampler=sampler)
        var_store.finish()
        hw = tuple(out.shape[-2:])
        blend_masks = torch.stack(blend.masks) if blend.masks else torch.ones(k, *hw)
        preview = torch.cat([upsample(orig_fg, hw, "nearest")[None], blend_masks.float()])
        logger.info("PromptMixSampler: %d variations of %r: %s", k, word, proxies)
        return io.NodeOutput({"samples": out}, blend_masks, ", ".join(proxies),
                             ui=ui.PreviewMask(preview, cls=cls))
