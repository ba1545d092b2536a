"""ComfyUI's own samplers for row-batched edits (P2PEditSampler, PromptMixSampler from a seed).

The source (or original) and every edit are the rows of one latent batch that starts from one
initial noise and runs through a SAMPLER and SIGMAS exactly as SamplerCustomAdvanced runs them
(``comfy.sample.sample_custom``: CFGGuider, KSAMPLER, the model's patches and wrappers, every conditioning
entry, the LATENT's noise mask). Without a SAMPLER the nodes use ``ddim_sampler``, our DDIM (eta 0) loop of
attention/sampling.py as a KSAMPLER, on the node's steps and scheduler: the same path, one loop to keep right.
Each row has its own prompt through the batched CONDITIONING of ``guided.rows_conditioning``; ComfyUI keeps a
conditioning whose batch equals the latent's row by row, and the negative is repeated to every row. The
attention controllers take the step from the sigma (``extra_options['sigmas']`` against ``sample_sigmas``).

Two things a stock sampler does not do for us, added by wrapping its sampler function:
* stochastic samplers (ancestral, SDE, DDPM, LCM...) draw fresh noise for every row at every step,
  which would pull an unedited row away from the source. Every sampler function that takes a
  ``noise_sampler`` gets one that draws the step's noise once, for row 0, exactly as the sampler would
  have drawn it for a batch of one (a seeded Gaussian, or a Brownian tree for the DPM++ SDE family),
  and gives that same noise to every row. So row 0 is the stock run of that sampler, and each edit
  sees the same noise. Samplers that draw noise another way (Euler with s_churn > 0 uses the global
  RNG) are refused by name;
* LocalBlend and the prompt-mixing background blend act between steps: ``StepBoundaryHook``
  (attention/sampling.py) runs them on the sampler's state when it reaches the next schedule sigma,
  and on the final sample.
"""

from __future__ import annotations

import inspect
import re

import comfy.k_diffusion.sampling as kds
import comfy.model_management as mm
import comfy.sample
import comfy.samplers
import latent_preview
import torch

from ..attention import logger
from ..attention.sampling import AfterStep, StepBoundaryHook, sample_euler

BROWNIAN = re.compile(r"^sample_dpmpp_(2m_sde|3m_sde|sde)")   # the samplers whose default noise is a Brownian tree


def sample_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Our DDIM (eta 0) loop (attention/sampling.py's ``sample_euler``) as a k-diffusion sampler function."""
    extra = extra_args or {}

    def step(i, x_, x0):
        mm.throw_exception_if_processing_interrupted()
        if callback is not None:
            callback({"x": x_, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": x0})
    return sample_euler(lambda x_, s_: model(x_, s_, **extra), x, sigmas, on_step=step)


def ddim_sampler() -> comfy.samplers.KSAMPLER:
    """The nodes' default SAMPLER: DDIM with eta 0 (equal to euler on the same sigmas, docs/samplers.md)."""
    return comfy.samplers.KSAMPLER(sample_ddim)


def sampler_name(sampler) -> str:
    fn = getattr(sampler, "sampler_function", None)
    return getattr(fn, "__name__", type(sampler).__name__).removeprefix("sample_")


def check_pair(node: str, sampler, sigmas, inversion=None) -> torch.Tensor | None:
    """The SIGMAS to sample with when a SAMPLER is given (None: our DDIM loop), or a specific error."""
    if sampler is None and sigmas is None:
        return None
    if inversion is not None:
        raise ValueError(
            f"{node}: an inversion is edited by retracing its own DDIM steps (its per-step null embeddings are "
            f"fitted to them), so the sampler/sigmas inputs cannot be used with it; disconnect 'sampler' and "
            f"'sigmas' (DDIM with the inversion's steps is used) or disconnect the inversion to edit a generated "
            f"image with {sampler_name(sampler) if sampler is not None else 'a sampler'}")
    if sampler is None or sigmas is None:
        missing, given = ("sampler", "sigmas") if sampler is None else ("sigmas", "sampler")
        raise ValueError(f"{node}: '{given}' is connected but '{missing}' is not; connect both (e.g. KSamplerSelect "
                         f"and BasicScheduler, as for SamplerCustomAdvanced) or neither (our DDIM loop)")
    if not isinstance(sampler, comfy.samplers.KSAMPLER):
        raise TypeError(f"{node}: the sampler is a {type(sampler).__name__}; only k-diffusion samplers (KSAMPLER, "
                        f"from KSamplerSelect or the Sampler* nodes) can run the edit rows; pick one there")
    s = sigmas.detach().float().flatten().cpu()
    if len(s) < 2 or bool((s[1:] > s[:-1]).any()):
        raise ValueError(f"{node}: sigmas {[round(float(v), 4) for v in s[:8]]}{'...' if len(s) > 8 else ''} must be "
                         f"a descending schedule of at least 2 values (steps + 1); use BasicScheduler or "
                         f"KarrasScheduler")
    opts = sampler.extra_options
    if float(opts.get("s_churn", 0) or 0) > 0:
        raise ValueError(f"{node}: sampler {sampler_name(sampler)} with s_churn {opts['s_churn']} adds noise from the "
                         f"global random generator, a different draw per row, so unedited rows would not match the "
                         f"source; set s_churn to 0")
    fn = sampler.sampler_function
    if float(opts.get("eta", 0) or 0) > 0 and "noise_sampler" not in inspect.signature(fn).parameters:
        raise ValueError(f"{node}: sampler {sampler_name(sampler)} with eta {opts['eta']} draws fresh noise per row "
                         f"that cannot be shared between the rows; set eta to 0 or pick another sampler")
    return s


def shared_noise_sampler(fn_name: str, x: torch.Tensor, sigmas: torch.Tensor, seed: int | None):
    """A noise_sampler giving every row of ``x`` the noise the sampler would draw for row 0 alone."""
    first = x[:1]
    if BROWNIAN.match(fn_name):
        positive = sigmas[sigmas > 0]
        base = kds.BrownianTreeNoiseSampler(first, positive.min(), sigmas.max(), seed=seed,
                                            cpu=not fn_name.endswith("_gpu"))
    else:
        base = kds.default_noise_sampler(first, seed=seed)
    return lambda sigma, sigma_next: base(sigma, sigma_next).expand_as(x)


def row_sampler(sampler, after_step: AfterStep | None = None):
    """``sampler`` (a KSAMPLER) with shared per-step noise across rows and ``after_step`` between steps."""
    fn = sampler.sampler_function
    takes_noise = "noise_sampler" in inspect.signature(fn).parameters

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        extra_args = {} if extra_args is None else extra_args
        if takes_noise and options.get("noise_sampler") is None:
            options["noise_sampler"] = shared_noise_sampler(fn.__name__, x, sigmas, extra_args.get("seed"))
        if after_step is None:
            return fn(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable, **options)
        hooked = StepBoundaryHook(model, sigmas, after_step)
        out = fn(hooked, x, sigmas, extra_args=extra_args, callback=callback, disable=disable, **options)
        return hooked.finish(out)
    sample.__name__ = fn.__name__
    return comfy.samplers.KSAMPLER(sample, dict(sampler.extra_options), dict(sampler.inpaint_options))


def sample_rows(model, sampler, sigmas: torch.Tensor, positive: list, negative: list, cfg: float,
                latent: dict, seed: int, rows: int, after_step: AfterStep | None = None,
                label: str = "") -> torch.Tensor:
    """``rows`` copies of the first item of the LATENT ``latent`` from one seeded noise through ``sampler`` (None:
    ``ddim_sampler``) and ``sigmas`` with CFG ``cfg``, its noise mask applied as KSampler applies it (the rows
    change only inside it); ``positive`` has one row per latent row (``guided.rows_conditioning``) or one for all.
    Returns the LATENT samples (rows, c, h, w), as SamplerCustomAdvanced would."""
    sampler = ddim_sampler() if sampler is None else sampler
    lat = comfy.sample.fix_empty_latent_channels(model, latent["samples"][:1])
    index = latent.get("batch_index")
    noise = comfy.sample.prepare_noise(lat, seed, None if index is None else list(index)[:1])
    noise = noise.expand(rows, -1, -1, -1).clone()
    lat = lat.expand(rows, -1, -1, -1).clone()
    mask = latent.get("noise_mask")
    steps = len(sigmas) - 1
    callback = latent_preview.prepare_callback(model, steps)
    logger.info("%s with sampler %s (%d rows, %d steps%s)", label, sampler_name(sampler), rows, steps,
                ", noise mask" if mask is not None else "")
    return comfy.sample.sample_custom(model, noise, cfg, row_sampler(sampler, after_step), sigmas, positive,
                                      negative, lat, noise_mask=None if mask is None else mask[:1], callback=callback,
                                      seed=seed)
