"""Direct UNet evaluations for our own loops (inversion, null-text optimization, P2P batches).

ComfyUI runs every node under ``torch.inference_mode`` with inference-tensor weights; the
null-text and DPL optimizations need gradients with respect to the text context, so
``autograd_safe`` temporarily swaps the diffusion model's inference tensors for normal copies
(../shared/comfyui-notes.md section 6, fix 1) and always restores them.
"""

from __future__ import annotations

from contextlib import contextmanager

import comfy.model_management as mm
import comfy.model_patcher
import comfy.patcher_extension
import comfy.utils
import torch

from ..attention.p2p import p2p_sample
from ..attention.store import QUIET_KEY


@contextmanager
def autograd_safe(module: torch.nn.Module):
    """Inside: gradients flow through ``module`` (its weights stay frozen). Restored on exit."""
    swapped = []
    with torch.inference_mode(False):
        try:
            for mod in module.modules():
                for store in ("_parameters", "_buffers"):
                    table = getattr(mod, store)
                    for name, t in list(table.items()):
                        if t is not None and t.is_inference():
                            copy = t.clone()
                            table[name] = torch.nn.Parameter(copy, requires_grad=False) if store == "_parameters" \
                                else copy
                            swapped.append((table, name, t))
            with torch.enable_grad():
                yield
        finally:
            for table, name, t in reversed(swapped):
                table[name] = t


class UNetCalls:
    """eps(x, sigma, context) of a ModelPatcher's model, with its patches, outside a sampler."""

    def __init__(self, model, sample_sigmas: torch.Tensor, cond_dict: dict | None = None):
        mm.load_models_gpu([model], force_full_load=True)
        self.model = model
        self.bm = model.model
        self.device = model.load_device
        self.sample_sigmas = sample_sigmas.to(self.device)
        self.options = comfy.model_patcher.create_model_options_clone(model.model_options)
        extra = dict(cond_dict or {})
        pooled = extra.pop("pooled_output", None)
        self.adm = None
        if pooled is not None:
            adm = self.bm.encode_adm(pooled_output=pooled.to(self.device), device=self.device, **extra)
            self.adm = adm.to(self.device) if adm is not None else None

    def quiet_eps(self, x, sigma, context):
        return self.eps(x, sigma, context, quiet=True)

    def eps(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
            cond_or_uncond: list[int] | None = None, quiet: bool = False) -> torch.Tensor:
        """x (b, c, h, w) at one ``sigma``; context (b, m, d). Rows are cond unless told otherwise;
        ``quiet`` hides the call from attention stores (helper evaluations such as optimization)."""
        b = x.shape[0]
        sig = sigma.reshape(1).to(self.device, torch.float32).expand(b).clone()
        to = dict(self.options.get("transformer_options", {}))
        to.update(sigmas=sig, sample_sigmas=self.sample_sigmas, cond_or_uncond=cond_or_uncond or [0])
        if quiet:
            to[QUIET_KEY] = True
        kwargs = {}
        if self.adm is not None:
            kwargs["y"] = self.adm.expand(b, -1)
        x = x.to(self.device)
        x0 = self.bm.apply_model(x, sig, c_crossattn=context.to(self.device), transformer_options=to, **kwargs)
        return (x - x0) / sig.view(-1, 1, 1, 1)


def run_with_pack_wrappers(model, fn):
    """Run ``fn()`` inside this pack's OUTER_SAMPLE wrappers on ``model`` (Attention Capture's store
    reset/finish), so our own loops fill a capture store exactly as a stock sampler does. Other
    packs' wrappers expect a sampler's arguments and are not called."""
    kind = comfy.patcher_extension.WrappersMP.OUTER_SAMPLE
    tables = [getattr(model, "wrappers", {}), model.model_options.get("transformer_options", {}).get("wrappers", {})]
    ours = [w for table in tables for key, ws in table.get(kind, {}).items()
            if key.startswith("attention_lab") for w in ws]
    if not ours:
        return fn()
    return comfy.patcher_extension.WrapperExecutor.new_executor(lambda *a, **k: fn(), ours).execute()


def model_key(model) -> tuple:
    """What an inversion must share with the model that edits it: the diffusion model and latent format."""
    return (id(model.model.diffusion_model), type(model.model.latent_format).__name__)


def fit_context(context: torch.Tensor, length: int) -> torch.Tensor:
    """A (1, m, d) text context repeated/cut to ``length`` tokens (an empty prompt next to a long one)."""
    if context.shape[1] == length:
        return context
    return context.repeat(1, -(-length // context.shape[1]), 1)[:, :length]


def sample_batch(model, x_T: torch.Tensor, sigmas: torch.Tensor, conds, nulls, cfg: float,
                 cond_dict: dict | None = None, after_step=None) -> torch.Tensor:
    """DDIM on the batch ``conds`` (rows, m, d), or one such batch per step (a list, a DPL inversion's), from
    one x_T with per-step nulls (a list, e.g. an inversion's)
    or one negative context, through the model's patches, with progress and interruption. Returns the
    LATENT samples (process_latent_out)."""
    calls = UNetCalls(model, sigmas, cond_dict)
    dev = calls.device
    pbar = comfy.utils.ProgressBar(len(sigmas) - 1)

    def on_step(i):
        mm.throw_exception_if_processing_interrupted()
        pbar.update(1)
    nulls = [n.to(dev) for n in nulls] if isinstance(nulls, list) else nulls.to(dev)
    conds = [c.to(dev) for c in conds] if isinstance(conds, list) else conds.to(dev)
    x = run_with_pack_wrappers(model, lambda: p2p_sample(calls.eps, x_T.to(dev), sigmas.to(dev), conds,
                                                         nulls, cfg, after_step, on_step))
    return model.model.process_latent_out(x.cpu())
