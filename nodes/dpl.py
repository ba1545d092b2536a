"""DPLTokenOptimizer: Dynamic Prompt Learning inversion (Wang et al. 2023) of an image for P2P editing.

Glue only: the procedure and the official recipe are in ``attention/dpl.py`` and ``attention/dpl_losses.py``
(ported from wangkai930418/DPL, see their headers); learnable tokens through ComfyUI's CLIP in
``learnable_tokens.py``; DDIM inversion as in NullTextInvert, inside ComfyUI's sampler (``guided.run_loop``): the
MODEL's patches, wrappers and CFG functions shape the inversion as they shape a sampler.
"""

from __future__ import annotations

import time

import comfy.model_management as mm
import comfy.samplers
import comfy.utils
import torch
from comfy_api.latest import io, ui

from ..attention import logger
from ..attention.dpl import DPL_SH, CrossMapRecorder, DPLSettings, background_at_size, dpl_invert
from ..attention.inversion import Inversion, NullTextSettings, ddim_invert
from ..attention.masks import check_aspect, mask_batch
from ..attention.render import colorize, grid, normalize, upsample
from .common import CATEGORY, InversionType, encode_prompt, install_controller, model_layer_ids
from .guided import add_full_load, mark_text, refuse_noise_mask, run_loop
from .inversion import KEEP_BEST_TOOLTIP, check_guidance
from .learnable_tokens import TOKEN_INITS, DPLTokens, autograd_safe_clip, encode, initial_values, locate, splice
from .model_identity import IDENTITY_KEY, identify
from .unet_calls import fit_context

S = DPL_SH   # the official recipe: the schema's defaults
NULL_STARTS = ("empty prompt each step (official DPL)", "previous step (NTI)")


def background_at(mask: torch.Tensor, size: tuple[int, int], latent_hw: tuple[int, int]) -> torch.Tensor:
    """One image's MASK (its first item) as {0, 1} at the attention map ``size``, by upstream's rule (Pillow bicubic
    from the mask's own size to the map size, nonzero = background; ``attention/dpl.background_at_size``). Upstream
    resizes a mask at the image's pixel size (512 px), so a mask at the image size reproduces it exactly."""
    m = mask_batch(mask, "DPLTokenOptimizer", "background")[0]           # the pack's one MASK rule
    h, w = m.shape
    check_aspect((h, w), latent_hw, "DPLTokenOptimizer", "background", "image latent")
    if (h, w) != tuple(size):
        logger.info("DPLTokenOptimizer: background mask %dx%d resized to the %dx%d attention maps", w, h,
                    size[1], size[0])
    out = background_at_size(m, size)      # from the mask's own size: give it at the image's pixel size, as upstream
    if out.sum() == 0:
        logger.warning("DPLTokenOptimizer: the background mask is empty at %dx%d; the background loss does "
                       "nothing", *size)
    return out


def maps_preview(maps: list, positions: list[tuple[int, ...]], hw: tuple[int, int]) -> torch.Tensor:
    """(1, H, W * nouns, 3): each noun's map averaged over the steps where tokens were optimized."""
    used = [m for m in maps if m is not None]
    if not used:
        return torch.zeros(1, *hw, 3)
    mean = torch.stack(used).mean(0)                                       # (mh, mw, m)
    pics = normalize(torch.stack([mean[..., list(p)].mean(-1) for p in positions]))
    return grid(colorize(upsample(pics, hw)), cols=len(positions))


class DPLTokenOptimizer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DPLTokenOptimizer",
            display_name="DPL Token Optimizer (Dynamic Prompt Learning)",
            category=CATEGORY,
            description=(
                "Dynamic Prompt Learning (Wang et al. 2023, official DPL.sh recipe): inverts an image like Null-Text "
                "Inversion, but first learns, for every timestep, new input embeddings of the nouns so that each "
                "noun's cross-attention stays on its own object (attention balancing, disjoint-object and "
                "background-leakage losses with gradual thresholds). Feed the result to P2P Edit Sampler; edits "
                "then change only what was asked. Get the background mask from Self-Attention Cluster "
                "(threshold 0.2) on a DDIM inversion captured with Attention Capture. Runs inside ComfyUI's sampler: "
                "the MODEL's patches, wrappers and CFG functions apply as in KSampler."),
            inputs=[
                io.Model.Input("model", tooltip="SD1.x/SD2.x/SDXL or ShapesWorld model. Cloned; the input stays "
                                                "unpatched."),
                io.Clip.Input("clip", tooltip="The model's CLIP; its text transformer is differentiated through."),
                io.Latent.Input("latent", tooltip=(
                    "The image as a LATENT, e.g. from VAE Encode; every item of a batch is optimized, one after "
                    "another, each as alone. A noise mask on it is refused: the whole image is inverted (give the "
                    "mask to P2P Edit Sampler instead).")),
                io.String.Input("prompt", multiline=True, default="a red circle and a blue square on a gray background",
                                tooltip="Source prompt describing the image, without (word:weight) emphasis."),
                io.String.Input("nouns", default="circle, square", tooltip=(
                    "Nouns of the prompt to learn, comma separated (phrases such as 'red circle' tell two "
                    "circles apart). With one noun only the background loss applies.")),
                io.Int.Input("steps", default=50, min=2, max=1000, tooltip="DDIM steps (official 50)."),
                io.Float.Input("guidance", default=S.null.guidance, min=1.0, max=30.0, step=0.1,
                               tooltip="Guidance scale the edit will sample with (official 7.5; 1-30)."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.SCHEDULER_NAMES), default="ddim_uniform",
                               tooltip=("Sigma schedule. ddim_uniform: t = 981, 961, ..., 1 then sigma 0; DPL's "
                                        "SD 1.4 scheduler uses the same t but ends at sigma 0.0292.")),
                io.Float.Input("lam_at", default=S.lam_at, min=0.0, max=100.0, step=0.01,
                               tooltip="Weight of the attention-balancing loss L_at (official 1.0; 0 = off)."),
                io.Float.Input("lam_bg", default=S.lam_bg, min=0.0, max=100.0, step=0.01,
                               tooltip="Weight of the background-leakage loss L_bg (official 0.05; 0 = off)."),
                io.Float.Input("lam_dj", default=S.lam_dj, min=0.0, max=100.0, step=0.01,
                               tooltip="Weight of the disjoint-object loss L_dj (official 0.05; 0 = off)."),
                io.String.Input("alphas", default=f"{S.alpha_at:g}, {S.alpha_bg:g}, {S.alpha_dj:g}", tooltip=(
                    "Threshold decay alpha for at, bg, dj in steps: threshold = beta * exp(-step / alpha) "
                    "(official 25, 50, 25; each > 0).")),
                io.String.Input("betas", default=f"{S.beta_at:g}, {S.beta_bg:g}, {S.beta_dj:g}", tooltip=(
                    "Thresholds at the first step beta for at, bg, dj; a step stops updating tokens when every "
                    "loss is under its threshold (official 0.3, 0.7, 0.9; each 0-1).")),
                io.Int.Input("attn_iters", default=S.attn_iters, min=0, max=200,
                             tooltip=("Most token updates per step (official 21; 0 or 1 = plain null-text "
                                      "inversion: upstream's token loop runs only when this is above 1).")),
                io.Float.Input("lr", default=S.lr, min=1e-6, max=1.0, step=1e-4,
                               tooltip="AdamW learning rate of the tokens (official 1e-3)."),
                io.Int.Input("null_iters", default=S.null.inner_steps, min=1, max=200,
                             tooltip="Null-text Adam iterations per step (official DPL 51; NTI uses 10)."),
                io.Float.Input("null_early_stop", default=0.0, min=0.0, max=1.0, step=1e-6, tooltip=(
                    "Stop a step's null-text loop under this latent MSE + step * 2e-5 (0 = never, as official DPL). "
                    "With null_start = previous step NTI's 1e-5 saves much of the cost; after a restart from the "
                    "empty prompt the loss rarely gets that low.")),
                io.Int.Input("map_size", default=0, min=0, max=256, tooltip=(
                    "Cross-attention map size of the losses in feature pixels (0 = latent / 4: 16 at 512 px as "
                    "official; the nearest size the model has is used).")),
                io.Combo.Input("null_start", options=list(NULL_STARTS), default=NULL_STARTS[0], optional=True,
                               tooltip=("Where each step's null-text optimization starts: the empty prompt's "
                                        "encoding every step (official DPL) or the previous step's result "
                                        "(Null-Text Inversion's rule). If 'reconstruction' drifts from the "
                                        "input, the loop did not undo the restart: try the previous step.")),
                io.Combo.Input("token_init", options=list(TOKEN_INITS), default=TOKEN_INITS[0], optional=True,
                               tooltip=("Start of the learned noun vectors: the official code's word-internal BPE "
                                        "piece of each noun (e.g. 'cat', not the prompt's end-of-word 'cat</w>'),"
                                        " or the prompt's own tokens (step 0 then equals the plain prompt).")),
                io.Boolean.Input("keep_best_null", default=False, optional=True, tooltip=KEEP_BEST_TOOLTIP),
                io.Mask.Input("background", optional=True, tooltip=(
                    "Background MASK of the image (any size within 2 % of the image's aspect; resized to the maps "
                    "as upstream: bicubic, any nonzero cell is background, so give it at the image's pixel size, e.g. "
                    "Self-Attention Cluster with its image input). One mask per image of a LATENT batch, or one for "
                    "all. Without it L_bg is off.")),
            ],
            outputs=[
                InversionType.Output(display_name="inversion", tooltip=(
                    "x_T, trajectory, per-step nulls and learned noun tokens; P2P Edit Sampler accepts it.")),
                io.Latent.Output(display_name="reconstruction",
                                 tooltip="Guided DDIM with the learned tokens and nulls: should equal the input."),
                io.Image.Output(display_name="noun_maps", tooltip="Each noun's optimized cross-attention, mean "
                                                                  "over the steps."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, latent, prompt, nouns, steps, guidance, scheduler, lam_at, lam_bg, lam_dj,
                alphas, betas, attn_iters, lr, null_iters, null_early_stop, map_size, null_start=None,
                token_init=TOKEN_INITS[0], keep_best_null=False, background=None) -> io.NodeOutput:
        refuse_noise_mask("DPLTokenOptimizer", latent)
        check_guidance("DPLTokenOptimizer", model, guidance)
        t0 = time.time()
        alpha3, beta3 = _triple(alphas, "alphas", positive=True), _triple(betas, "betas")
        settings = DPLSettings(lam_at, lam_bg, lam_dj, *alpha3, *beta3, attn_iters, lr,
                               NullTextSettings(guidance=guidance, inner_steps=null_iters, lr=S.null.lr,
                                               epsilon=null_early_stop or None, keep_best=keep_best_null),
                               null_carry_over=(null_start or NULL_STARTS[0]) == NULL_STARTS[1])
        nt = locate(clip, prompt, nouns)
        raw = latent["samples"].float()                                    # (b, c, h, w): each image in turn
        b = raw.shape[0]
        positive = encode_prompt(clip, prompt)
        empty = encode_prompt(clip, "")
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu()
        backgrounds = None if background is None else mask_batch(background, "DPLTokenOptimizer", "background")
        if backgrounds is not None and backgrounds.shape[0] not in (1, b):
            raise ValueError(f"DPLTokenOptimizer: 'background' holds {backgrounds.shape[0]} masks for a LATENT of {b} "
                             f"images; give one mask per image ({b}) or one for all")
        pbar = comfy.utils.ProgressBar(2 * steps * b)  # per image: DDIM inversion, then one tick per optimized step
        items = []
        for k in range(b):
            if b > 1:
                logger.info("DPLTokenOptimizer: image %d of %d", k + 1, b)
            bg = None if backgrounds is None else backgrounds[k if backgrounds.shape[0] == b else 0]
            items.append(_optimize_image(model, clip, raw[k:k + 1], prompt, nt, steps, guidance, map_size,
                                         token_init, settings, positive, empty, sigmas, bg, pbar, 2 * steps * k))
        logger.info("DPLTokenOptimizer (%s): %d image(s), %.1f s", ", ".join(nt.nouns), b, time.time() - t0)
        if b == 1:
            inv, rec, preview = items[0]
        else:
            inv = batch_inversion([it[0] for it in items])
            rec, preview = torch.cat([it[1] for it in items]), torch.cat([it[2] for it in items])
        return io.NodeOutput(inv, {"samples": rec}, preview, ui=ui.PreviewImage(preview, cls=cls))


def _optimize_image(model, clip, raw, prompt, nt, steps, guidance, map_size, token_init, settings, positive, empty,
                    sigmas, background, pbar, tick0):
    """DPL on one image (raw LATENT (1, c, h, w)), its own recorder and model clone: (Inversion, reconstruction
    (1, c, h, w) raw, noun-map preview (1, H, W * nouns, 3)). ``tick0``: where this image's ticks start."""
    t0 = time.time()
    x0 = model.model.process_latent_in(raw)
    latent_hw = tuple(x0.shape[-2:])
    cond0 = positive[0][0]
    null0 = fit_context(empty[0][0], cond0.shape[1])
    wanted = (map_size, map_size) if map_size else (max(latent_hw[0] // 4, 1), max(latent_hw[1] // 4, 1))
    recorder = CrossMapRecorder(wanted)
    m = model.clone()
    add_full_load(m)
    install_controller(m, recorder, model_layer_ids(model), self_attn=False, cross_attn=True)
    mm.load_models_gpu([clip.patcher], force_full_load=True)

    def on_inner(i, phase, j):
        mm.throw_exception_if_processing_interrupted()

    bg = None if background is None else (lambda size: background_at(background, size, latent_hw))
    out: dict = {}

    def loop(ev):
        dev = ev.device
        eps_c, eps_n = ev.eps("positive", quiet=True), ev.eps("negative", quiet=True)
        x, c0, n0, sig = x0.to(dev), cond0.to(dev), null0.to(dev), sigmas.to(dev)
        out["trajectory"] = trajectory = ddim_invert(eps_c, x, sig, c0,
                                                     on_step=lambda i: pbar.update_absolute(tick0 + i + 1))
        with ev.trainable(), autograd_safe_clip(clip):
            params0 = [v.to(dev) for v in initial_values(clip, prompt, nt, token_init)]

            def encode_tokens(params):
                return encode(clip, splice(clip, prompt, nt.positions, nt.keys, params)).to(dev)
            out["res"] = res = dpl_invert(eps_c, encode_tokens, params0, recorder, [t.clone() for t in trajectory],
                                          sig.clone(), nt.positions, bg, n0.clone(), settings,
                                          on_step=lambda i: pbar.update_absolute(tick0 + steps + i + 1),
                                          on_inner=on_inner, eps_null=eps_n, guide=ev.guide())
        return res.reconstruction.detach()
    rec = run_loop(m, mark_text(positive, "positive"), mark_text(empty, "negative"), guidance, sigmas, raw, loop)
    trajectory, res = out["trajectory"], out["res"]
    learned = DPLTokens(nouns=nt.nouns, counts=[len(p) for p in nt.positions], keys=nt.keys,
                        values=[[v.cpu() for v in step] for step in res.params])
    counts = {"forward": steps + res.counts["forward"], "backward": res.counts["backward"]}
    inv = Inversion(sigmas=sigmas, trajectory=[t.detach().cpu() for t in trajectory], cond=res.conds[0].cpu(),
                    nulls=[n.cpu() for n in res.nulls], prompt=prompt, mode="dpl", guidance=guidance,
                    unet_forward=counts["forward"], unet_backward=counts["backward"])
    mse = float(((res.reconstruction.cpu() - x0.cpu()) ** 2).mean())
    inv.extra[IDENTITY_KEY] = identify(model)               # checked by the editors (model_identity.py)
    inv.extra.update(positive=positive, negative=empty,
                     reconstruction_mse=mse,
                     dpl=learned, conds=[c.cpu() for c in res.conds], dpl_losses=res.losses,
                     map_size=res.map_size, token_updates=res.counts["token_updates"])
    logger.info("DPLTokenOptimizer (%s; maps %s): %d token updates, %d null iterations, UNet forward %d, "
                "backward %d, reconstruction MSE %.2e, %.1f s", ", ".join(nt.nouns), res.map_size,
                res.counts["token_updates"], res.counts["null_iters"], counts["forward"], counts["backward"],
                mse, time.time() - t0)
    preview = maps_preview(res.maps, nt.positions, (latent_hw[0] * 8, latent_hw[1] * 8))
    return inv, rec, preview


PER_IMAGE = ("reconstruction_mse", "dpl", "conds", "dpl_losses", "map_size", "token_updates")   # extra, per image


def batch_inversion(invs: list[Inversion]) -> Inversion:
    """One Inversion of b images from b single-image DPL inversions: trajectories, nulls and the step-0 contexts
    stacked on the batch axis, each image's learned tokens and contexts in ``extra["items"]`` (``item(k)`` gives
    image k's inversion back, the one DPL made for it alone), evaluation counts summed and kept per image."""
    first = invs[0]
    inv = Inversion(sigmas=first.sigmas, trajectory=[torch.cat(ts) for ts in zip(*(i.trajectory for i in invs))],
                    cond=torch.cat([i.cond for i in invs]),
                    nulls=[torch.cat(ns) for ns in zip(*(i.nulls for i in invs))], prompt=first.prompt, mode="dpl",
                    guidance=first.guidance, unet_forward=sum(i.unet_forward for i in invs),
                    unet_backward=sum(i.unet_backward for i in invs))
    inv.extra = {k: v for k, v in first.extra.items() if k not in PER_IMAGE}
    inv.extra.update(items=[{k: i.extra[k] for k in PER_IMAGE} for i in invs],
                     counts_items=[(i.unet_forward, i.unet_backward) for i in invs],
                     reconstruction_mse_items=[i.extra["reconstruction_mse"] for i in invs])
    return inv


def _triple(text: str, name: str, positive: bool = False) -> tuple[float, float, float]:
    """Three numbers for at, bg, dj from 'a, b, c'."""
    try:
        vals = tuple(float(v) for v in text.replace(";", ",").split(","))
    except ValueError:
        vals = ()
    if len(vals) == 3 and all((v > 0) if positive else (0 <= v <= 10) for v in vals):
        return vals
    example = (S.alpha_at, S.alpha_bg, S.alpha_dj) if positive else (S.beta_at, S.beta_bg, S.beta_dj)
    raise ValueError(f"{name} {text!r} must be three numbers for at, bg, dj ({'each > 0' if positive else 'each 0-10'})"
                     f", e.g. '{', '.join(f'{v:g}' for v in example)}' (the official values)")
