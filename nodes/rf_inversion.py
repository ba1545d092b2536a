"""NullTextInvert's rectified-flow modes (Flux, SD3, ShapesWorld-Flow): plain Euler inversion ('rf-euler') and
FireFlow ('fireflow'), with the reconstruction; and the model-family rules (which modes fit which MODEL).

Glue only: the solvers are ``attention/rf_inversion.py``. Every velocity is the MODEL's guided prediction inside
ComfyUI's sampler (``guided.run_loop`` -> ``Evaluator.guided_x0``), v = (x - x0) / sigma for CONST models, so the
MODEL's wrappers, CFG functions and every entry of ``positive`` (FluxGuidance's guidance, ControlNet...) shape the
inversion and the reconstruction alike.
"""

from __future__ import annotations

import math
import time

import comfy.model_management as mm
import comfy.model_sampling
import comfy.utils
import torch

from ..attention import logger
from ..attention.inversion import Inversion
from ..attention.rf_inversion import evaluations, rf_invert, rf_reconstruct, velocity_from_denoiser
from .guided import run_loop
from .model_identity import IDENTITY_KEY, identify

RF_MODES = {"rf-euler": "euler", "fireflow": "fireflow"}      # node mode -> solver
SOLVER_KEY = "rf_solver"          # Inversion.extra: the solver an edit must retrace the inversion with
FLOW_MODES_HINT = ("use mode 'fireflow' (FireFlow, Deng et al. 2024: second order, N + 1 model evaluations for N "
                   "steps) or 'rf-euler' (plain Euler inversion)")


def is_flow_model(model) -> bool:
    """Rectified-flow MODEL: its model_sampling predicts a velocity (CONST: ModelSamplingDiscreteFlow for SD3 and
    ShapesWorld-Flow, ModelSamplingFlux for Flux)."""
    return isinstance(model.get_model_object("model_sampling"), comfy.model_sampling.CONST)


def is_guidance_distilled(model) -> bool:
    """Flux dev-style guidance distillation: the transformer embeds the guidance value (FluxGuidance) and has no
    unconditional branch to run (sampled at cfg 1)."""
    params = getattr(model.get_model_object("diffusion_model"), "params", None)
    return bool(getattr(params, "guidance_embed", False))


def sampling_name(model) -> str:
    """The MODEL's model_sampling by its parts (ComfyUI builds it as a class 'ModelSampling' of a sampling table
    and a parameterization), e.g. 'ModelSamplingFlux + CONST'."""
    bases = type(model.get_model_object("model_sampling")).__bases__
    return " + ".join(b.__name__ for b in bases) or type(model.get_model_object("model_sampling")).__name__


def check_mode_fits(node: str, model, mode: str) -> None:
    """Refuse a mode that does not fit the MODEL's family, naming the fix."""
    sampling = sampling_name(model)
    if is_flow_model(model):
        if mode in RF_MODES:
            return
        if mode == "null-text" and not is_guidance_distilled(model):
            return                     # Euler inversion with the prompt, then the null optimization (docstring)
        if mode == "null-text":
            raise ValueError(
                f"{node}: mode 'null-text' optimizes the null (unconditional) embedding of classifier-free guidance, "
                f"but this MODEL is guidance-distilled (Flux dev: the guidance value is an input of the transformer, "
                f"set by FluxGuidance, and it samples at cfg 1 with no unconditional branch), so there is nothing to "
                f"optimize; {FLOW_MODES_HINT}")
        raise ValueError(f"{node}: mode {mode!r} is a DDIM method for noise-predicting (eps/v) models, but this MODEL "
                         f"is a rectified-flow model (model_sampling {sampling}); {FLOW_MODES_HINT}, or 'null-text' "
                         f"on a flow model with classifier-free guidance (SD3)")
    if mode in RF_MODES:
        raise ValueError(f"{node}: mode {mode!r} inverts rectified-flow models (Flux, SD3), but this MODEL's "
                         f"model_sampling is {sampling}; use 'null-text', 'ddim' or 'negative-prompt'")


def cond_euler_inversion(ev, x0: torch.Tensor, sigmas: torch.Tensor, floor: float, on_step=None) -> list:
    """Null-text's inversion on a CFG flow model (SD3, ShapesWorld-Flow): Euler up the sigmas with the prompt's
    velocity alone, as NTI's DDIM inversion uses the prompt alone (guidance 1); the null optimization and the
    reconstruction then step with Euler too (``ddim_step`` in sigma space is the Euler step of a CONST model, whose
    eps (x - x0) / sigma is the velocity). Not upstream (NTI has no flow version); its loss keeps the DDIM latent
    weighting 1 / (1 + sigma^2). Trajectory as ``rf_invert``'s."""
    v = velocity_from_denoiser(lambda x, s: ev.x0(x, s, ev.conds("positive"), None)[0], floor)
    return rf_invert(v, x0, sigmas, "euler", on_step=on_step)


def sigma_floor(model) -> float:
    """The smallest sigma of the MODEL's table, where the velocity at sigma 0 is read (attention/rf_inversion.py)."""
    return float(model.get_model_object("model_sampling").sigma_min)


def rf_inversion(model, mode: str, prompt: str, guidance: float, sigmas: torch.Tensor, raw: torch.Tensor,
                 cond: torch.Tensor, positive: list, negative: list) -> tuple[Inversion, torch.Tensor]:
    """Invert the raw LATENT samples ``raw`` (b, c, h, w), b images together, with ``mode``'s solver along
    ``sigmas`` (N+1,) at cfg ``guidance`` inside ComfyUI's sampler (``positive``: the marked rows conditioning,
    ``negative`` the marked negative; at cfg 1 the negative is not evaluated), then sample back with the same
    solver. Returns the Inversion (trajectory in model space, ``extra[SOLVER_KEY]`` the solver; the caller adds the
    CONDITIONING an edit reuses) and the reconstruction (raw LATENT)."""
    solver, steps = RF_MODES[mode], len(sigmas) - 1
    t0 = time.time()
    m = model.clone()
    x0 = m.model.process_latent_in(raw)
    floor = sigma_floor(m)
    b = raw.shape[0]                               # images, inverted together (the solvers are row-wise)
    pbar = comfy.utils.ProgressBar(2 * steps * b)  # image-steps: inversion, then reconstruction

    def tick(*_):
        mm.throw_exception_if_processing_interrupted()
        pbar.update(b)
    res: dict = {}

    def loop(ev):
        dev = ev.device
        sig = sigmas.to(dev)
        seen = velocity_from_denoiser(lambda x, s: ev.guided_x0(x, s), floor)          # what a capture records
        quiet = velocity_from_denoiser(lambda x, s: ev.guided_x0(x, s, quiet=True), floor)
        traj = rf_invert(seen, x0.to(dev), sig, solver, on_step=tick)
        rec = rf_reconstruct(quiet, traj[0], sig, solver, on_step=tick)
        res.update(trajectory=traj, rec=rec)
        return rec
    out = run_loop(m, positive, negative, guidance, sigmas, raw, loop)
    skip_uncond = math.isclose(guidance, 1.0) and not m.model_options.get("disable_cfg1_optimization", False)
    rows = 1 if skip_uncond else 2                      # ComfyUI skips the unconditional rows at cfg 1
    forward = 2 * evaluations(solver, steps) * rows * b
    inv = Inversion(sigmas=sigmas.cpu(), trajectory=[t.detach().cpu() for t in res["trajectory"]], cond=cond.cpu(),
                    nulls=None, prompt=prompt, mode=mode, guidance=guidance, unet_forward=forward)
    err = ((res["rec"].cpu() - x0.cpu()) ** 2).flatten(1).mean(1)                  # (b,) per image
    inv.extra[IDENTITY_KEY] = identify(model)
    inv.extra.update(reconstruction_mse=float(err.mean()), reconstruction_mse_items=[float(e) for e in err],
                     sigma_floor=floor, **{SOLVER_KEY: solver})
    logger.info("NullTextInvert (%s, %d steps, %d image(s), %s): model rows %d, reconstruction MSE %.2e, %.1f s",
                mode, steps, b, sampling_name(m), forward, float(err.mean()), time.time() - t0)
    return inv, out
