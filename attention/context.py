"""What a controller knows about the attention call it is looking at.

Built from ComfyUI's ``extra_options`` (or the same keys filled by the ShapesWorld
UNet), so controllers never touch ComfyUI objects.

Batch layout: the attention batch is ``len(cond_or_uncond) * items`` rows; chunk ``i``
(rows ``i*items .. (i+1)*items``) belongs to ``cond_or_uncond[i]`` (0 = positive,
1 = negative). Cond and uncond may arrive in separate calls (low-memory splitting)
or uncond may be absent (cfg = 1), so nothing here assumes both are present.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy
import torch

from .layers import LayerId


@dataclass
class AttnContext:
    layer: LayerId
    is_cross: bool
    height: int                 # query feature-map rows
    width: int                  # query feature-map columns
    heads: int
    cond_or_uncond: list[int]   # one entry per batch chunk: 0 positive, 1 negative
    items: int                  # latent batch size (rows per chunk)
    sigma: float | None         # current sigma (k-diffusion convention)
    step: int | None            # index into the sampling schedule, from the sigma
    n_steps: int | None         # number of steps of the schedule
    extra: dict = field(default_factory=dict, repr=False)  # the raw extra_options
    joint: object | None = None  # DiT joint attention: the call's ``joint.JointLayout`` (None on UNet layers)

    def rows(self, kind: int) -> list[tuple[int, int]]:
        """(row in the attention batch, batch item) for every row of ``kind`` (0 cond, 1 uncond)."""
        out = []
        for chunk, c in enumerate(self.cond_or_uncond):
            if c == kind:
                out.extend((chunk * self.items + b, b) for b in range(self.items))
        return out

    @property
    def progress(self) -> float | None:
        """Fraction of the schedule done at this call, in [0, 1)."""
        if self.step is None or not self.n_steps:
            return None
        return self.step / self.n_steps


def step_from_sigma(sigma: float, sample_sigmas: torch.Tensor | None) -> tuple[int | None, int | None]:
    """Index ``i`` of the schedule with sigmas[i] >= sigma > sigmas[i+1] (nearest for exact hits).

    Multi-evaluation samplers (Heun, DPM++ SDE) evaluate between two schedule points; they get
    the index of the step they belong to. Returns (None, None) when no schedule is known.
    """
    if sample_sigmas is None or len(sample_sigmas) < 2:
        return None, None
    # a plain-Python search over the schedule's float32 values: every attention call of every step asks, and a
    # handful of tensor operations per call cost more than the whole search
    s = sample_sigmas.detach().float().cpu().tolist()
    n = len(s) - 1
    sigma = float(numpy.float32(sigma))
    rel = 1e-4 * max(sigma, 1e-8)
    exact = [i for i, v in enumerate(s) if abs(v - sigma) <= rel]
    if exact:
        return min(exact[0], n - 1), n
    above = [i for i, v in enumerate(s) if v >= sigma]
    return min(above[-1] if above else 0, n - 1), n


def batch_and_step(extra_options: dict, rows: int) -> tuple[list[int], int, float | None, int | None, int | None]:
    """(cond_or_uncond, items, sigma, step, n_steps) of a call of ``rows`` attention-batch rows."""
    cou = list(extra_options.get("cond_or_uncond") or [0])
    items = max(rows // max(len(cou), 1), 1)
    if items * len(cou) != rows:  # a caller that did not describe its batch: treat all rows as cond
        cou, items = [0], rows
    sig = extra_options.get("sigmas")
    sigma = float(sig.flatten()[0]) if isinstance(sig, torch.Tensor) and sig.numel() else None
    step, n_steps = (None, None)
    if sigma is not None:
        step, n_steps = step_from_sigma(sigma, extra_options.get("sample_sigmas"))
    return cou, items, sigma, step, n_steps


def context_from_extra_options(extra_options: dict, is_cross: bool, q: torch.Tensor,
                               heads: int | None = None) -> AttnContext:
    """Translate ComfyUI's per-block ``extra_options`` (or the ``transformer_options`` an attention override gets,
    with ``heads``) into an ``AttnContext``."""
    layer = LayerId.from_extra_options(extra_options)
    cou, items, sigma, step, n_steps = batch_and_step(extra_options, q.shape[0])
    nq = q.shape[1]
    h = w = None
    act = extra_options.get("activations_shape")
    if act is not None and int(act[-2]) * int(act[-1]) == nq:
        h, w = int(act[-2]), int(act[-1])
    else:
        orig = extra_options.get("original_shape")
        if orig is not None:
            oh, ow = int(orig[-2]), int(orig[-1])
            scale = (oh * ow / nq) ** 0.5
            h, w = round(oh / scale), round(ow / scale)
        if h is None or h * w != nq:
            h = w = int(round(nq ** 0.5))
            if h * w != nq:
                h, w = 1, nq
    heads = int(extra_options["n_heads"] if heads is None else heads)
    return AttnContext(layer=layer, is_cross=is_cross, height=h, width=w, heads=heads, cond_or_uncond=cou,
                       items=items, sigma=sigma, step=step, n_steps=n_steps, extra=extra_options)
