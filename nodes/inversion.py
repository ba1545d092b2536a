"""NullTextInvert: a real image (or any latent) to x_T plus per-step null embeddings.

Glue only: the procedure and its official defaults are in ``attention/inversion.py``.
"""

from __future__ import annotations

import time

import comfy.model_management as mm
import comfy.samplers
import comfy.utils
import torch
from comfy_api.latest import io

from ..attention import logger
from ..attention.inversion import Inversion, NullTextSettings, ddim_invert, null_text_optimize, reconstruct
from .common import CATEGORY, InversionType, encode_prompt
from .unet_calls import (
    UNetCalls,
    adm_of,
    autograd_safe,
    common_length,
    fit_context,
    model_key,
    run_with_pack_wrappers,
)

MODES = ["null-text", "ddim", "negative-prompt"]
KEEP_BEST_TOOLTIP = (
    "Null-text: per step, return the null embedding of the lowest loss evaluated instead of Adam's last one. Off = "
    "upstream (the last). Not upstream; meant for fp16/bf16 UNets, whose noisy gradients can leave the last Adam "
    "step worse than an earlier one. Measured in fp16 on ShapesWorld (2 images, 20 steps): 28.19 dB "
    "reconstruction PSNR either way, no gain (python -m attention.shapesworld.null_precision).")


def source_latent(model, latent, image, vae) -> torch.Tensor:
    """The first item of LATENT, or of the IMAGE encoded with the VAE, in model space."""
    if latent is not None:
        raw = latent["samples"][:1]
    elif image is not None and vae is not None:
        raw = vae.encode(_croppable(image[:1, :, :, :3], vae))
    else:
        raise ValueError("NullTextInvert needs an image to invert: connect 'latent' (a LATENT) or both 'image' "
                         "and 'vae' (e.g. LoadImage and the checkpoint's VAE)")
    return model.model.process_latent_in(raw.float())


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
                "prompt). Feed the result to P2P Edit Sampler; the reconstruction output shows how faithful it is."),
            inputs=[
                io.Model.Input("model", tooltip="SD1.x/SD2.x/SDXL or ShapesWorld model."),
                io.Clip.Input("clip", tooltip="The model's CLIP."),
                io.String.Input("prompt", multiline=True, default="a red circle and a blue square on a gray background",
                                tooltip="Source prompt describing the image (the edits start from it)."),
                io.Combo.Input("mode", options=MODES, default="null-text", tooltip=(
                    "null-text: official NTI (best reconstruction, about 10x the UNet calls of sampling at most, "
                    "early stopping saves much of it); ddim: plain DDIM inversion (1x, poor at high guidance); "
                    "negative-prompt: null = prompt (1x, no optimization).")),
                io.Int.Input("steps", default=50, min=2, max=1000, tooltip="DDIM steps (official 50)."),
                io.Float.Input("guidance", default=7.5, min=1.0, max=30.0, step=0.1,
                               tooltip="Guidance scale the edit will sample with (official 7.5; 1-30)."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.SCHEDULER_NAMES), default="ddim_uniform",
                               tooltip="Sigma schedule. ddim_uniform: t = 981, 961, ..., 1 then sigma 0, one "
                                       "step off the NTI notebook's t = 980, ..., 0 (which ends at sigma 0.0292); "
                                       "simple for ShapesWorld."),
                io.Int.Input("inner_steps", default=10, min=1, max=100,
                             tooltip="Null-text: most Adam steps per sampling step (official 10; 1-100)."),
                io.Float.Input("early_stop", default=1e-5, min=0.0, max=1.0, step=1e-6, tooltip=(
                    "Null-text: stop a step's optimization when the latent MSE falls under this + step * 2e-5 "
                    "(official 1e-5; 0 = always run inner_steps).")),
                io.Boolean.Input("keep_best_null", default=False, optional=True, tooltip=KEEP_BEST_TOOLTIP),
                io.Latent.Input("latent", optional=True, tooltip=(
                    "The image as a LATENT (first item). Or give image+vae.")),
                io.Image.Input("image", optional=True, tooltip="The image to invert (first item), with 'vae'."),
                io.Vae.Input("vae", optional=True, tooltip="Encodes 'image'."),
            ],
            outputs=[
                InversionType.Output(display_name="inversion", tooltip="x_T, trajectory, null embeddings, sigmas."),
                io.Latent.Output(display_name="reconstruction",
                                 tooltip="Guided DDIM from x_T with the learned nulls: should equal the input."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, prompt, mode, steps, guidance, scheduler, inner_steps, early_stop,
                keep_best_null=False, latent=None, image=None, vae=None) -> io.NodeOutput:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        t0 = time.time()
        x0 = source_latent(model, latent, image, vae)
        positive = encode_prompt(clip, prompt)
        cond = positive[0][0]
        empty = encode_prompt(clip, "")
        null0 = fit_context(empty[0][0], common_length([cond, empty[0][0]]))
        cond = fit_context(cond, null0.shape[1])
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu()
        calls = UNetCalls(model, sigmas)
        # SDXL: the prompt's rows and the null rows each get their own pooled output and the image's size
        null_dict = positive[0][1] if mode == "negative-prompt" else empty[0][1]   # negative-prompt: null = prompt
        y_c, y_n = adm_of(model, positive[0][1], x0.shape), adm_of(model, null_dict, x0.shape)
        eps_c = calls.bind(y_c)
        quiet_c, quiet_n = calls.bind(y_c, quiet=True), calls.bind(y_n, [1], quiet=True)
        dev = calls.device
        x0, cond, null0, sig_d = x0.to(dev), cond.to(dev), null0.to(dev), sigmas.to(dev)
        optimize = mode == "null-text"
        pbar = comfy.utils.ProgressBar(2 * steps)  # inversion, then optimization or reconstruction
        tick = lambda *_: pbar.update(1)  # noqa: E731  (also raises on interruption)
        trajectory = run_with_pack_wrappers(model, lambda: ddim_invert(eps_c, x0, sig_d, cond, on_step=tick))
        counts = {"forward": steps, "backward": 0}
        if optimize:
            settings = NullTextSettings(guidance=guidance, inner_steps=inner_steps, epsilon=early_stop,
                                        keep_best=keep_best_null)

            def on_inner(i, j, loss):
                mm.throw_exception_if_processing_interrupted()
                if j == 0:
                    pbar.update(1)
            with autograd_safe(model.model.diffusion_model):
                traj = [t.clone() for t in trajectory]
                nulls, c, rec = null_text_optimize(quiet_c, traj, sig_d.clone(), cond.clone(), null0.clone(),
                                                   settings, on_inner, eps_null=quiet_n)
            counts["forward"] += c["forward"]
            counts["backward"] += c["backward"]
        else:
            nulls = [cond] * steps if mode == "negative-prompt" else None
        inv = Inversion(sigmas=sigmas, trajectory=[t.detach().cpu() for t in trajectory], cond=cond.cpu(),
                        nulls=None if nulls is None else [n.detach().cpu() for n in nulls], prompt=prompt, mode=mode,
                        guidance=guidance, unet_forward=counts["forward"], unet_backward=counts["backward"])
        inv.extra["cond_dict"] = {k: v for k, v in positive[0][1].items()}
        inv.extra["null_dict"] = dict(null_dict)
        inv.extra["model_key"] = model_key(model)
        if not optimize:
            with torch.no_grad():
                rec = reconstruct(lambda x, s, c: (tick(), quiet_c(x, s, c))[1], inv, null0,
                                  eps_null=lambda x, s, c: quiet_n(x, s, c), device=dev)
            inv.unet_forward += 2 * steps
        mse = float(((rec.cpu() - x0.cpu()) ** 2).mean())
        logger.info("NullTextInvert (%s, %d steps): UNet forward %d, backward %d, reconstruction MSE %.2e, %.1f s",
                    mode, steps, inv.unet_forward, inv.unet_backward, mse, time.time() - t0)
        inv.extra["reconstruction_mse"] = mse
        out = model.model.process_latent_out(rec.detach().cpu())
        return io.NodeOutput(inv, {"samples": out})
