"""Direct UNet evaluations for our own loops (inversion, null-text optimization, P2P batches).

ComfyUI runs every node under ``torch.inference_mode`` with inference-tensor weights; the
null-text and DPL optimizations need gradients with respect to the text context, so
``autograd_safe`` temporarily swaps the diffusion model's inference tensors for normal copies
(../shared/comfyui-notes.md section 6, fix 1) and always restores them.
"""

from __future__ import annotations

import math
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


def adm_of(model, cond_dict: dict | None, latent_shape) -> torch.Tensor | None:
    """The ADM vector ``y`` (1, d) ComfyUI's samplers give one conditioning entry (``encode_model_conds``): the
    entry's own pooled output and the image's real size (latent width/height x 8) unless the entry sets
    width/height itself. None for models without one (SD1.x) or an entry without a pooled output."""
    params = dict(cond_dict or {})
    pooled = params.get("pooled_output")
    if pooled is None:
        return None
    dev = model.load_device
    params.update(device=dev, noise=torch.zeros(tuple(latent_shape)), pooled_output=pooled.to(dev))
    params["width"] = params.get("width", int(latent_shape[-1]) * 8)
    params["height"] = params.get("height", int(latent_shape[-2]) * 8)
    adm = model.model.encode_adm(**params)
    return None if adm is None else adm.to(dev)


def stack_adm(ys: list) -> torch.Tensor | None:
    """One (rows, d) ``y`` from per-row (1, d) vectors (None when the model takes none)."""
    if any(y is None for y in ys):
        return None
    return torch.cat(ys)


class UNetCalls:
    """eps(x, sigma, context) of a ModelPatcher's model, with its patches, outside a sampler."""

    def __init__(self, model, sample_sigmas: torch.Tensor):
        mm.load_models_gpu([model], force_full_load=True)
        self.model = model
        self.bm = model.model
        self.device = model.load_device
        self.sample_sigmas = sample_sigmas.to(self.device)
        self.options = comfy.model_patcher.create_model_options_clone(model.model_options)

    def bind(self, y: torch.Tensor | None = None, cond_or_uncond: list[int] | None = None, quiet: bool = False):
        """eps(x, sigma, context) with the rows' ADM ``y`` ((rows, d) or (1, d); SDXL) fixed."""
        return lambda x, sigma, context: self.eps(x, sigma, context, cond_or_uncond, quiet, y)

    def eps(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
            cond_or_uncond: list[int] | None = None, quiet: bool = False,
            y: torch.Tensor | None = None) -> torch.Tensor:
        """x (b, c, h, w) at one ``sigma``; context (b, m, d); ``y`` (b or 1, d) each row's ADM vector (SDXL:
        ``adm_of`` its conditioning). Rows are cond unless told otherwise; ``quiet`` hides the call from
        attention stores (helper evaluations such as optimization)."""
        b = x.shape[0]
        sig = sigma.reshape(1).to(self.device, torch.float32).expand(b).clone()
        to = dict(self.options.get("transformer_options", {}))
        to.update(sigmas=sig, sample_sigmas=self.sample_sigmas, cond_or_uncond=cond_or_uncond or [0])
        if quiet:
            to[QUIET_KEY] = True
        kwargs = {}
        if y is not None:
            kwargs["y"] = (y.expand(b, -1) if y.shape[0] == 1 else y).to(self.device)
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


def low_precision(model) -> bool:
    """Whether the UNet computes in bf16/fp16 (its gradients are noisy: NullTextSettings.keep_best)."""
    bm = model.model
    dtype = getattr(bm, "manual_cast_dtype", None) or bm.get_dtype()
    return dtype not in (torch.float32, torch.float64)


def model_key(model) -> tuple:
    """What an inversion must share with the model that edits it: the diffusion model and latent format."""
    return (id(model.model.diffusion_model), type(model.model.latent_format).__name__)


def fit_context(context: torch.Tensor, length: int) -> torch.Tensor:
    """A (1, m, d) text context repeated to ``length`` tokens, a multiple of m (an empty prompt next to a long
    one). Repeating a whole context leaves attention unchanged, which is how ComfyUI batches contexts of
    different lengths; cutting would not, so a length that is not a multiple is refused."""
    if context.shape[1] == length:
        return context
    if length % context.shape[1]:
        raise ValueError(f"cannot repeat a {context.shape[1]}-token context to {length} tokens")
    return context.repeat(1, length // context.shape[1], 1)


def common_length(contexts: list[torch.Tensor]) -> int:
    """The token count every context repeats to when batched together (their least common multiple, as
    ComfyUI's CONDCrossAttn.concat): a negative longer than the prompts keeps all its chunks."""
    return math.lcm(*(int(c.shape[1]) for c in contexts))


def sample_batch(model, x_T: torch.Tensor, sigmas: torch.Tensor, conds, nulls, cfg: float,
                 y_conds: torch.Tensor | None = None, y_null: torch.Tensor | None = None,
                 after_step=None) -> torch.Tensor:
    """DDIM on the batch ``conds`` (rows, m, d), or one such batch per step (a list, a DPL inversion's), from
    one x_T with per-step nulls (a list, e.g. an inversion's) or one negative context, through the model's
    patches, with progress and interruption. Contexts of different lengths repeat to their common length
    (``common_length``). ``y_conds`` (rows, d) / ``y_null`` (1, d): the rows' ADM vectors (``adm_of``; SDXL).
    Returns the LATENT samples (process_latent_out)."""
    calls = UNetCalls(model, sigmas)
    dev = calls.device
    pbar = comfy.utils.ProgressBar(len(sigmas) - 1)
    as_list = lambda t: t if isinstance(t, list) else [t]  # noqa: E731
    length = common_length(as_list(conds) + as_list(nulls))

    def prep(t):
        return [fit_context(c, length).to(dev) for c in t] if isinstance(t, list) else fit_context(t, length).to(dev)
    conds, nulls = prep(conds), prep(nulls)
    rows = (conds[0] if isinstance(conds, list) else conds).shape[0]
    y = None
    if y_conds is not None and y_null is not None:
        y = torch.cat([y_conds.to(dev), y_null.to(dev).expand(rows, -1)])

    def on_step(i):
        mm.throw_exception_if_processing_interrupted()
        pbar.update(1)
    eps = lambda x, s, c, cou: calls.eps(x, s, c, cou, y=y)  # noqa: E731
    x = run_with_pack_wrappers(model, lambda: model.model.process_latent_out(
        p2p_sample(eps, x_T.to(dev), sigmas.to(dev), conds, nulls, cfg, after_step, on_step).cpu()))
    return x
