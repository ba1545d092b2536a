"""NullTextInvert: a real image (or any latent) to x_T plus per-step null embeddings; and the DDIM loop that
edits from an inversion (``sample_from_inversion``, used by P2P Edit Sampler and Prompt Mix Sampler).

Glue only: the procedure and its official defaults are in ``attention/inversion.py``. Every evaluation runs
inside ComfyUI's sampler (``guided.run_loop``): the MODEL's wrappers and CFG hooks, and every entry of an
optional ``positive`` (ControlNet, areas, timestep ranges), shape the inversion as they shape a sampler.
"""

from __future__ import annotations

import math
import time

import comfy.model_management as mm
import comfy.samplers
import comfy.utils
import torch
from comfy_api.latest import io

from ..attention import logger
from ..attention.direct_inversion import SourceCorrection, direct_offsets
from ..attention.inversion import Inversion, NullTextSettings, ddim_invert, null_text_optimize
from ..attention.p2p import p2p_sample
from . import rf_inversion as rf
from .common import CATEGORY, InversionType, encode_prompt
from .guided import add_full_load, mark_text, noise_mask_of, refuse_noise_mask, rows_conditioning, run_loop
from .model_identity import IDENTITY_KEY, identify
from .unet_calls import common_length, fit_context

MODES = ["null-text", "ddim", "negative-prompt", "direct"]
KEEP_BEST_TOOLTIP = (
    "Null-text: per step, return the null embedding of the lowest loss evaluated instead of Adam's last one. Off = "
    "upstream (the last). Not upstream; meant for fp16/bf16 UNets, whose noisy gradients can leave the last Adam "
    "step worse than an earlier one. Measured in fp16 on ShapesWorld (2 images, 20 steps): 28.19 dB "
    "reconstruction PSNR either way, no gain (python -m attention.shapesworld.null_precision).")
MODES += list(rf.RF_MODES)          # rectified-flow models (Flux, SD3): nodes/rf_inversion.py


def source_latent(latent, image, vae) -> torch.Tensor:
    """Every item of LATENT, or of the IMAGE encoded with the VAE: raw (b, c, h, w) latent samples."""
    if latent is not None:
        return latent["samples"].float()
    if image is not None and vae is not None:
        return vae.encode(_croppable(image[:, :, :, :3], vae)).float()
    raise ValueError("NullTextInvert needs an image to invert: connect 'latent' (a LATENT) or both 'image' "
                     "and 'vae' (e.g. LoadImage and the checkpoint's VAE)")


def check_guidance(node: str, model, guidance: float) -> None:
    """Null-text optimization needs the unconditional branch, which ComfyUI's samplers skip at cfg 1."""
    if math.isclose(guidance, 1.0) and not model.model_options.get("disable_cfg1_optimization", False):
        raise ValueError(f"{node}: guidance 1.0 makes ComfyUI's samplers skip the unconditional branch, so a null "
                         f"embedding has nothing to change; use guidance above 1 (official 7.5) or mode 'ddim', "
                         f"which is exact at guidance 1")


def sample_from_inversion(model, inv: Inversion, positive: list, negative: list, texts, rows: int,
                          after_step=None, latent: dict | None = None, label: str = "",
                          batch: bool = False) -> torch.Tensor:
    """DDIM (Euler on a flow model; FireFlow's midpoint steps for a 'fireflow' inversion) from the inversion's x_T
    retracing its steps, ``rows`` rows, inside ComfyUI's sampler: the marked
    text of ``positive`` per row (``texts`` (rows, m, d), or one such batch per step, or a function of the image's
    single-image inversion giving either: DPL's learned tokens, image by image), guidance and null
    per step from the inversion (without nulls: ``negative`` as given). A noise mask on ``latent`` is applied as
    KSampler applies it, the inversion's trajectory standing for the noised image outside it (so outside the
    mask every row is the inverted image). A Direct Inversion (``inv.offsets``) adds its per-step offsets to row 0
    (the source) after each step, before ``after_step`` (LocalBlend), as upstream; under a noise mask only inside
    it (upstream has no mask; outside it the inpainting keeps the image). Returns raw LATENT samples
    (rows, c, h, w).

    An inversion of b > 1 images (NullTextInvert on a LATENT batch) needs ``batch=True``, else ValueError naming
    the fix: each image is then edited from its own inversion (``inv.item(k)``) in a run of its own, an
    ``after_step`` that reads an attention store (LocalBlend's ``store``) starting empty for each, and the result
    is (b * rows, c, h, w), image by image; LocalBlend's ``last_mask`` becomes every image's masks
    (b * rows, 1, h, w). A noise mask of b items masks each image with its own, of 1 item all alike."""
    b = inv.items
    if b > 1 and not batch:
        raise ValueError(f"{label}: the inversion holds {b} images (NullTextInvert inverted a LATENT batch of {b}), "
                         f"and this node edits one image from one inversion; invert one image per NullTextInvert "
                         f"(put 'Latent From Batch' with length 1 before it), or edit the batch with P2P Edit "
                         f"Sampler, which edits every image from its own inversion")
    steps = len(inv.sigmas) - 1
    pbar = comfy.utils.ProgressBar(steps * b)          # image-steps
    if b == 1:
        return _sample_one(model, inv, positive, negative, texts, rows, after_step, latent, label, pbar)
    store = getattr(after_step, "store", None)
    full = None if latent is None else latent.get("noise_mask")
    outs, masks = [], []
    for k in range(b):
        logger.info("%s: image %d of %d", label, k + 1, b)
        if store is not None:
            store.reset()                               # LocalBlend: this image's attention only
        item_latent = None
        if full is not None:
            item_latent = {"noise_mask": full[k:k + 1] if full.shape[0] == b else full[:1]}
        outs.append(_sample_one(model, inv.item(k), positive, negative, texts, rows, after_step, item_latent, label,
                                pbar))
        masks.append(getattr(after_step, "last_mask", None))
    if masks[0] is not None and all(m is not None for m in masks):
        after_step.last_mask = torch.cat(masks)
    return torch.cat(outs)


def _sample_one(model, inv: Inversion, positive, negative, texts, rows, after_step, latent, label, pbar):
    """``sample_from_inversion`` of one image's inversion (b = 1), ticking ``pbar``."""
    steps = len(inv.sigmas) - 1
    texts = texts(inv) if callable(texts) else texts
    neg = mark_text(inv.extra["negative"], "negative") if inv.nulls is not None else negative
    mask = noise_mask_of(latent)
    clean = model.model.process_latent_out(inv.trajectory[-1]).expand(rows, -1, -1, -1).clone()
    logger.info("%s from an inversion (%d rows, %d steps%s)", label, rows, steps,
                ", noise mask" if mask is not None else "")

    def loop(ev):
        dev = ev.device
        sig = inv.sigmas.to(dev)
        traj = [t.to(dev) for t in inv.trajectory]

        def noised(sigma):
            return traj[int((sig - float(sigma.reshape(-1)[0])).abs().argmin())]

        def on_step(i):
            mm.throw_exception_if_processing_interrupted()
            pbar.update(1)
        conds = [t.to(dev) for t in texts] if isinstance(texts, list) else texts.to(dev)
        nulls = None if inv.nulls is None else [n.to(dev) for n in inv.nulls]
        after = after_step
        if inv.offsets is not None:
            offsets = [o.to(dev) for o in inv.offsets]
            if ev.denoise_mask is not None:     # outside a noise mask KSampler's rule keeps the image: offsets inside
                offsets = [o * ev.denoise_mask[:1].to(o) for o in offsets]
            after = SourceCorrection(offsets, after_step)
        return p2p_sample(None, inv.x_T.to(dev), sig, conds, nulls, inv.guidance, after, on_step,
                          guide=ev.batch_guide(noised), solver=inv.extra.get(rf.SOLVER_KEY, "euler"))
    return run_loop(model, positive, neg, inv.guidance, inv.sigmas, clean, loop, denoise_mask=mask)


def _croppable(image: torch.Tensor, vae) -> torch.Tensor:
    """Center-crop (1, H, W, 3) to multiples of 8 latent pixels, which every UNet's 3 downsamplings take."""
    ratio = vae.spacial_compression_encode() if hasattr(vae, "spacial_compression_encode") else 8
    m = int(ratio) * 8
    h, w = image.shape[1], image.shape[2]
    nh, nw = h // m * m, w // m * m
    if nh == 0 or nw == 0:
        raise ValueError(f"the image is {w}x{h} px; this VAE and UNet need at least {m}x{m} px (multiples of {m}: "
                         f"{ratio}x VAE downscale times the UNet's 8x)")
    if (nh, nw) != (h, w):
        logger.info("NullTextInvert: the image is %dx%d px; using the centred %dx%d crop (multiples of %d px: the "
                    "VAE's %dx downscale times the UNet's 3 halvings)", w, h, nw, nh, m, ratio)
        top, left = (h - nh) // 2, (w - nw) // 2
        image = image[:, top:top + nh, left:left + nw]
    return image


class NullTextInvert(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="NullTextInvert",
            display_name="Null-Text Inversion",
            category=CATEGORY,
            description=(
                "Inverts an image for editing (Mokady et al. 2022, official defaults): DDIM inversion with the "
                "source prompt, then per step a null (unconditional) embedding optimized so that guided DDIM "
                "retraces the inversion. Faster modes: plain DDIM inversion, negative-prompt inversion (null = "
                "prompt), Direct Inversion (Ju et al. 2024: per-step offsets that P2P Edit Sampler adds back to the "
                "source row, exact reconstruction without optimization). Rectified-flow models (Flux, SD3): Euler "
                "inversion or FireFlow (Deng et al. 2024), reconstructed with the same solver. Runs inside ComfyUI's "
                "sampler: the MODEL's patches, wrappers and CFG functions and every entry of 'positive' apply as in "
                "KSampler. A LATENT batch inverts every image (batched where the mode allows, one by one in "
                "null-text). Feed the result to P2P Edit Sampler; the reconstruction output shows how faithful it is."),
            inputs=[
                io.Model.Input("model", tooltip="SD1.x/SDXL or ShapesWorld model (modes null-text, ddim, "
                                                "negative-prompt, direct; SD2.x untested); Flux, SD3 or "
                                                "ShapesWorld-Flow (modes rf-euler, fireflow; null-text also on CFG "
                                                "flow models such as SD3, not on guidance-distilled Flux)."),
                io.Clip.Input("clip", tooltip="The model's CLIP."),
                io.String.Input("prompt", multiline=True, default="a red circle and a blue square on a gray background",
                                tooltip="Source prompt describing the image (the edits start from it)."),
                io.Combo.Input("mode", options=MODES, default="null-text", tooltip=(
                    "null-text: official NTI (best reconstruction, about 10x the UNet calls of sampling at most, "
                    "early stopping saves much of it; on SD3-like CFG flow models with Euler in place of DDIM, refused "
                    "on guidance-distilled Flux); ddim: plain DDIM inversion (1x, poor at high guidance); "
                    "negative-prompt: null = prompt (1x, no optimization); direct: Direct Inversion / PnP "
                    "Inversion (1x, no optimization): stores each step's offset between the guided source branch "
                    "and the inversion and adds it back to the edit's source row, so the source is the image "
                    "exactly while the target rows edit (they are not corrected: an identical target is not the "
                    "source). Rectified-flow models (Flux, SD3): rf-euler: plain Euler inversion (N model "
                    "evaluations for N steps); fireflow: FireFlow (Deng et al. 2024), second order at N + 1 "
                    "evaluations, far better reconstruction.")),
                io.Int.Input("steps", default=50, min=2, max=1000, tooltip="DDIM steps (official 50)."),
                io.Float.Input("guidance", default=7.5, min=1.0, max=30.0, step=0.1,
                               tooltip="Guidance scale the edit will sample with (official 7.5; 1-30). Flow modes: "
                                       "the cfg of both directions (Flux dev: 1, its guidance is "
                                       "FluxGuidance's on the conditioning)."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.SCHEDULER_NAMES), default="ddim_uniform",
                               tooltip="Sigma schedule. ddim_uniform: t = 981, 961, ..., 1 then sigma 0, one "
                                       "step off the NTI notebook's t = 980, ..., 0 (which ends at sigma 0.0292); "
                                       "simple for ShapesWorld and flow models."),
                io.Int.Input("inner_steps", default=10, min=1, max=100,
                             tooltip="Null-text: most Adam steps per sampling step (official 10; 1-100)."),
                io.Float.Input("early_stop", default=1e-5, min=0.0, max=1.0, step=1e-6, tooltip=(
                    "Null-text: stop a step's optimization when the latent MSE falls under this + step * 2e-5 "
                    "(official 1e-5; 0 = always run inner_steps).")),
                io.Boolean.Input("keep_best_null", default=False, optional=True, tooltip=KEEP_BEST_TOOLTIP),
                io.Latent.Input("latent", optional=True, tooltip=(
                    "The image(s) as a LATENT: every item of a batch is inverted, together through the model in "
                    "modes ddim, negative-prompt, direct, rf-euler and fireflow, one image after another in "
                    "null-text; P2P Edit Sampler then edits each from its own inversion. Or give image+vae. A noise "
                    "mask on it is refused: the whole image is inverted (give the mask to the editing node instead).")),
                io.Image.Input("image", optional=True,
                               tooltip="The image(s) to invert (every item, as 'latent'), with 'vae'."),
                io.Vae.Input("vae", optional=True, tooltip="Encodes 'image'."),
                io.Conditioning.Input("positive", optional=True, tooltip=(
                    "Optional: the prompt's CONDITIONING with what is attached to it (ControlNet, area, timestep "
                    "range...); it must contain 'prompt' encoded by this CLIP. The edit from this inversion uses "
                    "it too. Default: 'prompt' encoded.")),
            ],
            outputs=[
                InversionType.Output(display_name="inversion", tooltip=(
                    "x_T, trajectory, null embeddings, sigmas, of every image of the batch (P2P Edit Sampler edits "
                    "each from its own; Prompt Mix Sampler takes one image).")),
                io.Latent.Output(display_name="reconstruction",
                                 tooltip="Guided DDIM from x_T with the learned nulls, every image: should equal "
                                         "the input."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, prompt, mode, steps, guidance, scheduler, inner_steps, early_stop,
                keep_best_null=False, latent=None, image=None, vae=None, positive=None) -> io.NodeOutput:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        refuse_noise_mask("NullTextInvert", latent)
        rf.check_mode_fits("NullTextInvert", model, mode)
        optimize = mode == "null-text"
        if optimize:
            check_guidance("NullTextInvert", model, guidance)
        t0 = time.time()
        raw = source_latent(latent, image, vae)
        encoded = encode_prompt(clip, prompt)
        base = encoded if positive is None else positive
        empty = encode_prompt(clip, "")
        null_cond = encoded if mode == "negative-prompt" else empty          # negative-prompt: null = prompt
        null0 = fit_context(empty[0][0], common_length([encoded[0][0], empty[0][0]]))
        cond = fit_context(encoded[0][0], null0.shape[1])
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu()
        flow = rf.is_flow_model(model)
        if flow and mode in rf.RF_MODES:
            inv, out = rf.rf_inversion(model, mode, prompt, guidance, sigmas, raw, cond,
                                       rows_conditioning("NullTextInvert", base, encoded, [encoded]),
                                       mark_text(null_cond, "negative"))
            inv.extra.update(positive=base, negative=null_cond)
            return io.NodeOutput(inv, {"samples": out})
        m = model.clone()
        if optimize:
            add_full_load(m)
        b = raw.shape[0]
        pbar = comfy.utils.ProgressBar(2 * steps * b)  # image-steps: inversion, then optimization or reconstruction
        tick = lambda *_: pbar.update(b)  # noqa: E731  a step of the batch (also raises on interruption)
        x0 = m.model.process_latent_in(raw)
        res: dict = {}

        def invert(ev, x, sig, c, on_step):
            return (rf.cond_euler_inversion(ev, x, sig, rf.sigma_floor(m), on_step) if flow   # what a capture records
                    else ddim_invert(ev.eps("positive"), x, sig, c, on_step=on_step))

        def loop(ev):
            dev = ev.device
            x, c, n0, sig = x0.to(dev), cond.to(dev), null0.to(dev), sigmas.to(dev)
            eps_c, eps_n = ev.eps("positive", quiet=True), ev.eps("negative", quiet=True)
            counts = {"forward": steps * b, "backward": 0}
            if optimize:          # image by image (the optimization fits one image's null), its inversion too
                settings = NullTextSettings(guidance=guidance, inner_steps=inner_steps, epsilon=early_stop,
                                            keep_best=keep_best_null)

                def on_inner(i, j, loss):
                    mm.throw_exception_if_processing_interrupted()
                    if j == 0:
                        pbar.update(1)
                items = []
                for k in range(b):
                    if b > 1:
                        logger.info("NullTextInvert: image %d of %d", k + 1, b)
                    traj_k = invert(ev, x[k:k + 1], sig, c, lambda *_: pbar.update(1))
                    with ev.trainable():
                        nulls_k, cnt, rec_k = null_text_optimize(eps_c, [t.clone() for t in traj_k], sig.clone(),
                                                                 c.clone(), n0.clone(), settings, on_inner,
                                                                 eps_null=eps_n, guide=ev.guide())
                    items.append((traj_k, nulls_k, rec_k.detach(), (steps + cnt["forward"], cnt["backward"])))
                traj = [torch.cat([it[0][i] for it in items]) for i in range(steps + 1)]
                nulls = [torch.cat([it[1][i] for it in items]) for i in range(steps)]
                rec = torch.cat([it[2] for it in items])
                res["counts_items"] = [it[3] for it in items]
                counts["forward"] = sum(f for f, _ in res["counts_items"])
                counts["backward"] = sum(bw for _, bw in res["counts_items"])
            elif mode == "direct":      # Direct Inversion: the source branch's per-step offsets (attention/direct_...)
                traj = invert(ev, x, sig, c, tick)
                with torch.no_grad():
                    offsets, rec = direct_offsets(None, traj, sig, c, n0, guidance, on_step=tick,
                                                  guide=ev.batch_guide(quiet=True))
                nulls = [n0] * steps                     # the edit guides with the null the offsets were made with
                res["offsets"] = offsets
                counts["forward"] += 2 * steps * b
            else:
                traj = invert(ev, x, sig, c, tick)
                nulls = [c] * steps if mode == "negative-prompt" else None
                with torch.no_grad():   # guided DDIM from x_T, what an edit's source row runs: prompt and null rows
                    rec = p2p_sample(None, traj[0], sig, c.expand(b, -1, -1), nulls, guidance, None, tick,
                                     guide=ev.batch_guide(quiet=True))              # in one model call per step
                counts["forward"] += 2 * steps * b
            res.update(trajectory=traj, nulls=nulls, counts=counts, rec=rec.detach())
            return res["rec"]
        out = run_loop(m, rows_conditioning("NullTextInvert", base, encoded, [encoded]),
                       mark_text(null_cond, "negative"), guidance, sigmas, raw, loop)
        nulls, offsets = res["nulls"], res.get("offsets")
        inv = Inversion(sigmas=sigmas, trajectory=[t.detach().cpu() for t in res["trajectory"]], cond=cond.cpu(),
                        nulls=None if nulls is None else [n.detach().cpu() for n in nulls], prompt=prompt, mode=mode,
                        guidance=guidance, offsets=None if offsets is None else [o.detach().cpu() for o in offsets],
                        unet_forward=res["counts"]["forward"],
                        unet_backward=res["counts"]["backward"])
        err = ((res["rec"].cpu() - x0.cpu()) ** 2).flatten(1).mean(1)                  # (b,) per image
        inv.extra[IDENTITY_KEY] = identify(model)               # checked by the editors (model_identity.py)
        if flow:
            inv.extra[rf.SOLVER_KEY] = "euler"
        if "counts_items" in res:
            inv.extra["counts_items"] = res["counts_items"]
        inv.extra.update(positive=base, negative=null_cond, reconstruction_mse=float(err.mean()),
                         reconstruction_mse_items=[float(e) for e in err])
        logger.info("NullTextInvert (%s, %d steps, %d image(s)): UNet forward %d, backward %d, reconstruction MSE "
                    "%.2e, %.1f s", mode, steps, b, inv.unet_forward, inv.unet_backward, float(err.mean()),
                    time.time() - t0)
        return io.NodeOutput(inv, {"samples": out})
