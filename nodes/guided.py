"""Our loops inside ComfyUI's sampler: the one path by which the pack evaluates a MODEL.

Every loop of the pack runs inside ``comfy.samplers.CFGGuider.sample``, exactly where KSampler and
SamplerCustomAdvanced run theirs: the conds are prepared by ``process_conds`` (areas, masks, strengths,
timestep ranges, ControlNet / T2I hints, GLIGEN, SDXL sizes and pooled outputs), the models load with their
wrappers (OUTER_SAMPLE, SAMPLER_SAMPLE, ...) and every evaluation is ``calc_cond_batch`` with the run's
model_options (unet function wrapper, patches, the MODEL's own calc function), guided where a loop guides by
the pre-CFG functions and ``cfg_function`` (``sampler_cfg_function`` such as RescaleCFG, post-CFG functions
such as PAG). Generation from a seed is a k-diffusion sampler (``comfy_sampling.sample_rows``; our DDIM by
default). A loop that is not a sampler (an inversion, an optimization, an edit retracing an inversion) runs as a
``LoopSampler`` (the way ``comfy_extras/nodes_train.py``'s TrainSampler runs its training) and evaluates
through an ``Evaluator``.

Texts that change inside a loop (an inversion's per-step null embeddings, DPL's per-step tokens, per-row
prompts) replace the ``c_crossattn`` of the entries the node marked (``mark_text``) on copies of the prepared
entries: everything else attached to those entries still applies, and gradients reach the new text.
Noise masks are applied as ``KSamplerX0Inpaint`` applies them (``Evaluator.inpainted``).
"""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager

import comfy.conds
import comfy.model_management as mm
import comfy.model_patcher
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import torch

from ..attention.chunks import CHUNKS_KEY, HIDDEN, ChunkTable, is_crop, relabel
from ..attention.store import QUIET_KEY
from .unet_calls import autograd_safe

TEXT_KEY = "attention_lab_text"          # conditioning key: the entry carries the node's text ("positive"/"negative")


# --------------------------------------------------------------------------------------------- conditioning

def mark_text(conditioning: list, name: str) -> list:
    """A copy of CONDITIONING whose entries are marked as carrying the node's own text for cond ``name``
    ("positive" or "negative"): a loop may swap their text (``Evaluator.conds``), and attention controllers
    of the node edit only their chunks (``attention/chunks.py``)."""
    return [[t, dict(d, **{TEXT_KEY: name})] for t, d in conditioning]


def _same_text(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    if a is None or a.shape != b.shape:
        return False
    a, b = a.float().cpu(), b.float().cpu()
    return bool(torch.equal(a, b) or (a - b).abs().max() <= 1e-5 * b.abs().max().clamp(min=1e-6))


def rows_conditioning(node: str, positive: list, source: list, rows: list[list]) -> list:
    """The positive CONDITIONING of a row batch: every entry of ``positive`` whose text is the ``source``
    prompt's encoding takes, row by row, the text (and SDXL pooled output) of ``rows`` (one CONDITIONING per
    row, row 0 the source) and is marked; the other entries (an area prompt, ...) stay as they are and apply
    to every row. ComfyUI keeps a conditioning whose batch equals the latent's row by row."""
    src = source[0][0]
    shapes = {tuple(r[0][0].shape[1:]) for r in rows}
    if len(shapes) > 1:
        raise ValueError(f"{node}: the prompts encode to different shapes {sorted(shapes)}; keep every prompt "
                         f"within the source's 77-token chunks")
    out, hits = [], 0
    for t, d in positive:
        if not _same_text(t, src):
            out.append([t, dict(d)])
            continue
        hits += 1
        meta = dict(d, **{TEXT_KEY: "positive"})
        pooled = [r[0][1].get("pooled_output") for r in rows]
        if d.get("pooled_output") is not None and all(p is not None for p in pooled):
            meta["pooled_output"] = torch.cat([p.reshape(1, -1) for p in pooled])
        out.append([torch.cat([r[0][0] for r in rows]), meta])
    if not hits:
        raise ValueError(f"{node}: no entry of 'positive' encodes the source prompt (its {len(positive)} entries "
                         f"have other texts); connect the CONDITIONING of that prompt made with this node's CLIP "
                         f"(e.g. CLIPTextEncode -> ControlNet Apply -> positive), or disconnect 'positive'")
    return out


def noise_mask_of(latent: dict | None) -> torch.Tensor | None:
    """The LATENT's noise_mask (SetLatentNoiseMask, VAE Encode for Inpainting), first item, or None."""
    mask = None if latent is None else latent.get("noise_mask")
    return None if mask is None else mask[:1]


def refuse_noise_mask(node: str, latent: dict | None) -> None:
    if noise_mask_of(latent) is not None:
        raise ValueError(f"{node}: the LATENT carries a noise_mask (SetLatentNoiseMask or VAE Encode for "
                         f"Inpainting), which an inversion cannot honour: it inverts the whole image. Invert the "
                         f"LATENT without the mask, and give the mask to P2P Edit Sampler / Prompt Mix Sampler "
                         f"(its latent_image), which then edits only inside it")


# --------------------------------------------------------------------------------------------- wrappers

def _publish_chunks(executor, guider, sigmas, extra_args, callback, noise, *args, **kwargs):
    """SAMPLER_SAMPLE wrapper: the run's ChunkTable (which entries run on a crop, which carry the node's
    prompt) into transformer_options, for the attention stores and controllers."""
    frame = tuple(int(s) for s in noise.shape[2:])
    crops, text = set(), set()
    for entries in guider.conds.values():
        for e in entries:
            if is_crop(e.get("area"), frame):
                crops.add(e.get("uuid"))
            if e.get(TEXT_KEY) == "positive":
                text.add(e.get("uuid"))
    table = ChunkTable(frame, frozenset(crops), frozenset(text) if text else None)
    extra_args["model_options"].setdefault("transformer_options", {})[CHUNKS_KEY] = table
    return executor(guider, sigmas, extra_args, callback, noise, *args, **kwargs)


def add_chunk_wrapper(m) -> None:
    """Publish each sampling run's ChunkTable on the (cloned) ModelPatcher ``m``; put it on every MODEL whose
    attention the pack records or edits."""
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, CHUNKS_KEY, _publish_chunks)


def full_frame_only(patch):
    """A block patch ``patch(h, [hsp,] transformer_options)`` that runs only on UNet calls of the full frame: a
    call of area entries (evaluated on a crop of the latent, ``add_chunk_wrapper``) passes its inputs on
    untouched (for feature recorders such as GroundingFeatures')."""
    def fn(*args):
        to = args[-1]
        kinds = list(to.get("cond_or_uncond") or [0])
        if all(k == HIDDEN for k in relabel(kinds, to, full_frame=True, text_only=False)):
            return args[0] if len(args) == 2 else tuple(args[:-1])
        return patch(*args)
    return fn


def _full_load(executor, *args, **kwargs):
    kwargs["force_full_load"] = True
    return executor(*args, **kwargs)


def add_full_load(m) -> None:
    """Load ``m`` fully for its runs (optimization loops: lowvram partial loading and autograd do not mix)."""
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, "attention_lab_full_load",
                           _full_load)


# --------------------------------------------------------------------------------------------- the loop path

class Evaluator:
    """What a loop evaluates the MODEL with, inside a ``CFGGuider.sample`` run (``LoopSampler``).

    ``eps(name)`` evaluates one cond, ``guided_x0`` guides as ``comfy.samplers.sampling_function`` does,
    ``guide()`` / ``batch_guide()`` are the ``GuideFn`` / ``BatchGuide`` of attention/'s loops. Sigmas are
    k-diffusion sigmas; x is the sampler state x0 + sigma * eps in model space. ``quiet`` evaluations are hidden
    from attention stores (optimization steps). ``latent``: the run's LATENT in model space; ``denoise_mask``:
    the prepared noise mask or None."""

    def __init__(self, guider, sigmas, extra_args, latent, denoise_mask, callback):
        self.guider, self.model, self.cfg = guider, guider.inner_model, float(guider.cfg)
        self.sigmas, self.latent, self.denoise_mask, self.callback = sigmas, latent, denoise_mask, callback
        self.options = extra_args["model_options"]
        self.seed = extra_args.get("seed")
        self.quiet_options = comfy.model_patcher.create_model_options_clone(self.options)
        self.quiet_options.setdefault("transformer_options", {})[QUIET_KEY] = True
        self.device = guider.model_patcher.load_device
        self._texts = {name: [e["model_conds"]["c_crossattn"] for e in entries
                              if e.get(TEXT_KEY) == name and "c_crossattn" in e.get("model_conds", {})]
                       for name, entries in guider.conds.items()}

    # ---- conds
    def conds(self, name: str, text: torch.Tensor | None = None) -> list | None:
        """The prepared entries of cond ``name``; with ``text`` (rows or 1, m, d), copies whose marked text is
        replaced (also the copies ComfyUI made of a marked entry for an opposite area)."""
        entries = self.guider.conds.get(name)
        if entries is None or text is None:
            return entries
        marked = self._texts.get(name) or []
        if not marked:
            raise RuntimeError(f"no entry of {name!r} is marked for a text swap (mark_text)")
        out = []
        for e in entries:
            c = e.get("model_conds", {}).get("c_crossattn")
            if c is not None and any(c is m for m in marked):
                e = dict(e, model_conds=dict(e["model_conds"], c_crossattn=comfy.conds.CONDCrossAttn(text)))
            out.append(e)
        return out

    def sigma_rows(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """(rows,) sigma of every row of ``x`` (a fresh normal tensor: autograd may save it)."""
        s = sigma if isinstance(sigma, torch.Tensor) else torch.tensor(float(sigma))
        return s.reshape(-1)[:1].to(x.device, torch.float32).expand(x.shape[0]).clone()

    def _options(self, quiet: bool) -> dict:
        return self.quiet_options if quiet else self.options

    def x0(self, x, sigma, cond=None, uncond=None, quiet=False) -> list:
        """[cond x0, uncond x0] of prepared entry lists (None: not evaluated, zeros), batched by calc_cond_batch
        or the MODEL's own calc function (SkipLayerGuidance...)."""
        mo, sig = self._options(quiet), self.sigma_rows(x, sigma)
        fn = mo.get("sampler_calc_cond_batch_function")
        if fn is not None:
            return fn({"conds": [cond, uncond], "input": x, "sigma": sig, "model": self.model, "model_options": mo})
        return comfy.samplers.calc_cond_batch(self.model, [cond, uncond], x, sig, mo)

    def eps(self, name: str, quiet: bool = False):
        """``eps(x, sigma, text=None)`` of cond ``name`` alone (its marked text replaced by ``text``)."""
        slot = 0 if name == "positive" else 1

        def fn(x, sigma, text=None):
            pair = [None, None]
            pair[slot] = self.conds(name, text)
            x0 = self.x0(x, sigma, *pair, quiet=quiet)[slot]
            return (x - x0) / self.sigma_rows(x, sigma).view(-1, *[1] * (x.ndim - 1))
        return fn

    def guided_x0(self, x, sigma, text=None, null=None, cond_x0=None, quiet=False) -> torch.Tensor:
        """The denoised of ``comfy.samplers.sampling_function``: positive (marked text ``text``) against negative
        (marked text ``null``) with cfg, the cfg-1 shortcut, pre-CFG functions and ``cfg_function``.
        ``cond_x0``: the positive's prediction already made at (x, sigma), reused unless the MODEL has its own
        calc function."""
        mo, sig = self._options(quiet), self.sigma_rows(x, sigma)
        cond, uncond = self.conds("positive", text), self.conds("negative", null)
        if math.isclose(self.cfg, 1.0) and not mo.get("disable_cfg1_optimization", False):
            uncond = None
        if cond_x0 is not None and "sampler_calc_cond_batch_function" not in mo:
            out = [cond_x0, self.x0(x, sig, None, uncond, quiet)[1]]
        else:
            out = self.x0(x, sig, cond, uncond, quiet)
        for fn in mo.get("sampler_pre_cfg_function", []):
            out = fn({"conds": [cond, uncond], "conds_out": out, "cond_scale": self.cfg, "timestep": sig,
                      "input": x, "sigma": sig, "model": self.model, "model_options": mo})
        return comfy.samplers.cfg_function(self.model, out[0], out[1], self.cfg, x, sig, model_options=mo,
                                           cond=cond, uncond=uncond)

    def inpainted(self, x, sigma, noised: torch.Tensor, predict) -> torch.Tensor:
        """``predict(x)`` -> x0 under the run's noise mask as ``KSamplerX0Inpaint``: outside the mask the model
        sees ``noised`` (the latent at this sigma) and the prediction is the latent."""
        mask = self.denoise_mask
        if mask is None:
            return predict(x)
        if "denoise_mask_function" in self.options:
            mask = self.options["denoise_mask_function"](self.sigma_rows(x, sigma), mask,
                                                         extra_options={"model": self.guider, "sigmas": self.sigmas})
        keep = 1.0 - mask
        return predict(x * mask + noised * keep) * mask + self.latent * keep

    def guide(self, quiet: bool = True):
        """A ``GuideFn`` (attention/inversion.py) through ``guided_x0``, reusing the loop's cond eps."""
        def fn(x, sigma, cond, e_cond, null):
            s = self.sigma_rows(x, sigma).view(-1, *[1] * (x.ndim - 1))
            x0 = self.guided_x0(x, sigma, text=cond, null=null, cond_x0=x - e_cond * s, quiet=quiet)
            return (x - x0) / s
        return fn

    def batch_guide(self, noised=None, quiet: bool = False):
        """A ``BatchGuide`` (attention/p2p.py): the rows' texts and the null (None: the negative as given)
        swapped in, under the noise mask; ``noised(sigma)`` gives the latent at that sigma outside the mask (an
        inversion's trajectory)."""
        def fn(x, sigma, conds, null):
            def predict(xi):
                return self.guided_x0(xi, sigma, text=conds, null=None if null is None else null[:1], quiet=quiet)
            x0 = predict(x) if self.denoise_mask is None else self.inpainted(x, sigma, noised(sigma), predict)
            return (x - x0) / self.sigma_rows(x, sigma).view(-1, *[1] * (x.ndim - 1))
        return fn

    # ---- gradients
    @contextmanager
    def trainable(self):
        """Gradients flow through the diffusion model and every model loaded with it (ControlNets...); their
        weights stay frozen and are restored on exit (``autograd_safe``)."""
        modules = [self.model.diffusion_model] + [getattr(p, "model", None) for p in self.guider.loaded_models]
        seen: list = []
        with ExitStack() as stack:
            for mod in modules:
                if isinstance(mod, torch.nn.Module) and not any(mod is s for s in seen):
                    seen.append(mod)
                    stack.enter_context(autograd_safe(mod))
            with torch.inference_mode(False), torch.enable_grad():
                yield


class LoopSampler(comfy.samplers.Sampler):
    """A SAMPLER that runs ``loop(evaluator)`` instead of a k-diffusion sampler; the loop returns the samples in
    model space (any batch of the latent's shape)."""

    def __init__(self, loop):
        self.loop = loop

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        return self.loop(Evaluator(model_wrap, sigmas, extra_args, latent_image, denoise_mask, callback))


def run_loop(model, positive: list, negative: list, cfg: float, sigmas: torch.Tensor, latent: torch.Tensor, loop,
             denoise_mask: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
    """``loop(ev)`` inside ``CFGGuider.sample`` of ``model`` with these conds, as SamplerCustomAdvanced runs a
    sampler. ``latent``: raw LATENT samples (B, c, h, w), the run's size; nonzero, it is ``ev.latent`` (model
    space). Returns the loop's samples as a raw LATENT (process_latent_out)."""
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    out = guider.sample(torch.zeros_like(latent), latent, LoopSampler(loop), sigmas.cpu(), denoise_mask=denoise_mask,
                        disable_pbar=True, seed=seed)
    return out.to(mm.intermediate_device())
