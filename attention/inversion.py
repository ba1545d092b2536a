"""DDIM inversion and Null-Text Inversion (Mokady et al. 2022) in k-diffusion sigma space.

Procedure and defaults ported from the official notebook ``null_text_w_ptp.ipynb`` of
https://github.com/google/prompt-to-prompt (main-branch commit 9c472e44aa1b607da59fea94820f7be9480ec545,
Apache-2.0): DDIM inversion with the conditional prompt only; then, from the noisiest step down,
a fresh Adam per step on the null (unconditional) embedding with lr 1e-2 * (1 - i / 100), at most
10 inner steps, early stop when the loss falls under 1e-5 + i * 2e-5, the embedding carried to the
next step. The loss is the MSE between the guided DDIM step and the inverted trajectory, in the
model's latent space (z = x / sqrt(1 + sigma^2)), as upstream.

Sigma space (ComfyUI's convention, see ``sampling.py``): x = z / sqrt(acp) = x0 + sigma * eps.
Sampling sigmas descend s_0 > ... > s_{N-1} > s_N = 0; sampling step i goes s_i -> s_{i+1}.
Inversion runs the steps backwards (upstream's ``ddim_loop``/``next_step``): the UNet sees the *current*
latent z_{i+1} unscaled, at the *next* timestep, and x_i = x_{i+1} + eps * (s_i - s_{i+1}). An eps callable in
ComfyUI's convention divides its input by sqrt(1 + s^2) of the sigma it is given, so evaluating it on x_{i+1}
at s_i would show the UNet z_{i+1} * sqrt(acp_i / acp_{i+1}) (0.89 at t = 981); ``ddim_invert`` compensates
by handing it x_{i+1} * sqrt(1 + s_i^2) / sqrt(1 + s_{i+1}^2), whose input scaling at s_i gives z_{i+1} exactly.

Time grid: the pack's default (ComfyUI's ``ddim_uniform``) is t = 981, 961, ..., 1 with a last sigma of 0.
The NTI notebook's DDIMScheduler (steps_offset 0) uses t = 980, ..., 0 and ends at alphabar_0 (sigma 0.0292);
DPL's SD 1.4 scheduler config (steps_offset 1) uses t = 981, ..., 1 and also ends at sigma 0.0292 instead of 0.
Both are documented departures of the grid (docs/faithful-ports.md), not of the step math.

Guidance: every loop combines the conditional eps and a null context through a ``GuideFn``. ``cfg_guide`` is the
papers' classifier-free guidance e_u + g (e_c - e_u) (the default, exactly as before); ComfyUI's nodes pass one
that runs the MODEL's own CFG hooks (``nodes/guided.py``), so a RescaleCFG or a post-CFG function shapes the
inversion as it shapes the sampler.

Shapes: x (b, c, h, w), b images inverted together (the loops are row-wise; null-text optimizes one image at a
time, b = 1); embeddings (1, m, d); trajectory[i] is the state at s_i (trajectory[N] = x_0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

EpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]   # (x, sigma, context) -> eps
# (x, sigma, cond context, its eps e_cond, null context) -> the guided eps of one sampling step
GuideFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def cfg_guide(eps_null: EpsFn, guidance: float) -> GuideFn:
    """Classifier-free guidance on eps, the papers' formula: e_u + guidance * (e_cond - e_u), e_u of the null."""
    def guide(x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor, e_cond: torch.Tensor,
              null: torch.Tensor) -> torch.Tensor:
        e_u = eps_null(x, sigma, null)
        return e_u + guidance * (e_cond - e_u)
    return guide


@dataclass
class NullTextSettings:
    guidance: float = 7.5
    inner_steps: int = 10
    lr: float = 1e-2
    epsilon: float | None = 1e-5           # early stop base; None = always run inner_steps
    keep_best: bool = False                # not upstream (an option, the nodes' keep_best_null): return each
                                           # step's best evaluated null instead of Adam's last one


@dataclass
class Inversion:
    """What an inversion hands to the editors: one image (b = 1) or a batch of b images inverted with one prompt
    (``item(k)`` is image k's own inversion, what an editor retraces for it)."""

    sigmas: torch.Tensor                     # (N+1,) descending, last 0
    trajectory: list[torch.Tensor]           # N+1 states (b, c, h, w); [0] is x_T, [N] the clean latent
    cond: torch.Tensor                       # (1, m, d) the source prompt's context
    nulls: list[torch.Tensor] | None         # per step (1 or b, m, d) null embeddings (b: one per image, null-text),
                                             # or None (use the negative)
    prompt: str
    mode: str
    guidance: float
    offsets: list[torch.Tensor] | None = None  # Direct Inversion: per step (b, c, h, w) added to the source row
                                             # after each DDIM step of an edit (direct_inversion.py); else None
    unet_forward: int = 0                    # UNet evaluations (one per batch row), all images together
    unet_backward: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def x_T(self) -> torch.Tensor:
        return self.trajectory[0]

    @property
    def items(self) -> int:
        """b, the number of images inverted."""
        return int(self.trajectory[0].shape[0])

    def item(self, k: int) -> "Inversion":
        """Image ``k``'s inversion (b = 1): its trajectory, nulls and offsets; prompt, sigmas and ``extra``
        (a shallow copy) shared; the evaluation counts are ``extra["counts_items"][k]`` (forward, backward) where
        the inverter measured them per image (null-text), else the batch's divided by b. A ``cond`` of b rows gives
        row k, and ``extra["items"][k]`` (an inverter's per-image entries, DPL's learned tokens) replaces the shared
        entries of the same names. IndexError outside 0..b-1."""
        b = self.items
        if not 0 <= k < b:
            raise IndexError(f"item {k} of an inversion of {b} image(s); valid 0..{b - 1}")

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t[k:k + 1] if t.shape[0] == b and b > 1 else t
        fw, bw = self.extra.get("counts_items", [(self.unet_forward // b, self.unet_backward // b)] * b)[k]
        extra = {name: v for name, v in self.extra.items() if name != "items"}
        extra.update(self.extra["items"][k] if "items" in self.extra else {})
        return Inversion(sigmas=self.sigmas, trajectory=[pick(t) for t in self.trajectory], cond=pick(self.cond),
                         nulls=None if self.nulls is None else [pick(n) for n in self.nulls], prompt=self.prompt,
                         mode=self.mode, guidance=self.guidance,
                         offsets=None if self.offsets is None else [pick(o) for o in self.offsets],
                         unet_forward=fw, unet_backward=bw, extra=extra)


def z_scale(sigma: torch.Tensor) -> torch.Tensor:
    return 1 / torch.sqrt(1 + sigma ** 2)


@torch.no_grad()
def ddim_invert(eps: EpsFn, x0: torch.Tensor, sigmas: torch.Tensor, cond: torch.Tensor,
                on_step: Callable[[int], None] | None = None) -> list[torch.Tensor]:
    """The DDIM trajectory of ``x0`` under the conditional prompt only (guidance 1).

    ``eps(x, sigma, context)`` takes k-diffusion states and scales them by 1 / sqrt(1 + sigma^2) itself (ComfyUI's
    EPS input scaling, ShapesWorld's ``model.eps``); the UNet sees the current latent unscaled at the next sigma,
    as upstream's ``next_step`` (module docstring). Returns N+1 states, [0] the noisiest."""
    n = len(sigmas) - 1
    states = [None] * (n + 1)
    x = x0
    states[n] = x0
    for i in range(n - 1, -1, -1):
        x_in = x * (z_scale(sigmas[i + 1]) / z_scale(sigmas[i]))       # = z_{i+1} after eps's own input scaling
        x = x + eps(x_in, sigmas[i], cond) * (sigmas[i] - sigmas[i + 1])
        states[i] = x
        if on_step is not None:
            on_step(n - 1 - i)
    return states


def ddim_step(x: torch.Tensor, e: torch.Tensor, s: torch.Tensor, s_next: torch.Tensor) -> torch.Tensor:
    """One DDIM (eta 0) step from sigma s to s_next given the guided eps."""
    return x + e * (s_next - s)


def optimize_null(eps: EpsFn, x: torch.Tensor, sig: torch.Tensor, sig_next: torch.Tensor, e_cond: torch.Tensor,
                  target: torch.Tensor, null: torch.Tensor, guidance: float, lr: float, iters: int,
                  threshold: float | None, on_inner: Callable[[int], float] | None = None,
                  keep_best: bool = False, guide: GuideFn | None = None,
                  cond: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """One sampling step's null embedding: a fresh Adam on ``null`` so that the guided DDIM step from ``x``
    lands on ``target``; stops early under ``threshold`` (None: never). Returns it and the iterations run.
    ``eps`` here evaluates null (unconditional) contexts. The embedding is optimized in float32 when its dtype
    is lower (Adam's small steps vanish in bf16/fp16); float64 stays float64. ``keep_best`` (not upstream):
    return the null of the lowest loss evaluated, the starting one included, instead of the last; with a bf16/fp16
    UNet the gradients are noisy enough that the last Adam step can be worse than where it started. Off by default
    (upstream); measured both ways in fp16 on ShapesWorld by ``python -m attention.shapesworld.null_precision``.
    ``guide``: how the step is guided (default ``cfg_guide(eps, guidance)``), ``cond`` the context ``e_cond``
    comes from; the guide must be differentiable in the null."""
    guide = guide or cfg_guide(eps, guidance)
    null = null.detach().to(torch.promote_types(null.dtype, torch.float32)).clone().requires_grad_(True)
    opt = torch.optim.Adam([null], lr=lr)
    done = 0
    best: tuple[float, torch.Tensor] | None = None
    for j in range(iters):
        rec = ddim_step(x, guide(x, sig, cond, e_cond, null), sig, sig_next)
        loss = torch.nn.functional.mse_loss(rec * z_scale(sig_next), target * z_scale(sig_next))
        if keep_best and (best is None or float(loss.detach()) < best[0]):
            best = (float(loss.detach()), null.detach().clone())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done += 1
        value = float(loss.detach())
        if on_inner is not None:
            on_inner(j, value)
        if threshold is not None and value < threshold:
            break
    if keep_best and best is not None:
        with torch.no_grad():   # the last step's result too (one more evaluation)
            last = torch.nn.functional.mse_loss(ddim_step(x, guide(x, sig, cond, e_cond, null), sig, sig_next)
                                                * z_scale(sig_next), target * z_scale(sig_next))
        if float(last) > best[0]:
            return best[1], done
    return null.detach(), done


def null_text_optimize(eps: EpsFn, trajectory: list[torch.Tensor], sigmas: torch.Tensor, cond: torch.Tensor,
                       null_init: torch.Tensor, s: NullTextSettings,
                       on_inner: Callable[[int, int, float], None] | None = None, eps_null: EpsFn | None = None,
                       guide: GuideFn | None = None) -> tuple[list[torch.Tensor], dict, torch.Tensor]:
    """Per-step null embeddings that make guided DDIM retrace ``trajectory``.

    ``eps`` must be differentiable with respect to its context argument. Returns the embeddings,
    counts {forward, backward, inner_steps} (UNet rows evaluated) and the reconstruction (the last
    guided state, which is what sampling with these embeddings gives). ``eps_null`` evaluates the null
    contexts (default ``eps``; SDXL gives the null rows their own pooled embedding, as ComfyUI does); ``guide``
    combines the two (default ``cfg_guide(eps_null, s.guidance)``).
    """
    eps_null = eps_null or eps
    guide = guide or cfg_guide(eps_null, s.guidance)
    n = len(sigmas) - 1
    null = null_init.detach().clone()
    nulls, counts = [], {"forward": 0, "backward": 0, "inner_steps": 0}
    x = trajectory[0].detach()
    for i in range(n):
        sig, sig_next = sigmas[i], sigmas[i + 1]
        with torch.no_grad():
            e_cond = eps(x, sig, cond)
        threshold = None if s.epsilon is None else s.epsilon + i * 2e-5
        inner = None if on_inner is None else (lambda j, v, i=i: on_inner(i, j, v))
        null, done = optimize_null(eps_null, x, sig, sig_next, e_cond, trajectory[i + 1].detach(), null, s.guidance,
                                   s.lr * (1.0 - i / 100.0), s.inner_steps, threshold, inner, s.keep_best, guide, cond)
        counts["forward"] += 2 + done + int(s.keep_best)
        counts["backward"] += done
        counts["inner_steps"] += done
        nulls.append(null.clone())
        with torch.no_grad():
            x = ddim_step(x, guide(x, sig, cond, e_cond, null), sig, sig_next)
    return nulls, counts, x


@torch.no_grad()
def reconstruct(eps: EpsFn, inv: Inversion, null_fallback: torch.Tensor, eps_null: EpsFn | None = None,
                device: torch.device | str | None = None, guide: GuideFn | None = None) -> torch.Tensor:
    """Guided DDIM from x_T with the inversion's nulls (or ``null_fallback``): the reconstruction, on ``device``
    (default: where x_T is; an Inversion keeps its tensors on the CPU, the UNet may be on a GPU). ``guide``:
    default ``cfg_guide(eps_null, inv.guidance)``."""
    guide = guide or cfg_guide(eps_null or eps, inv.guidance)
    dev = torch.device(device) if device is not None else inv.x_T.device
    x, sigmas, cond = inv.x_T.to(dev), inv.sigmas.to(dev), inv.cond.to(dev)
    for i in range(len(sigmas) - 1):
        u = (inv.nulls[i] if inv.nulls is not None else null_fallback).to(dev)
        x = ddim_step(x, guide(x, sigmas[i], cond, eps(x, sigmas[i], cond), u), sigmas[i], sigmas[i + 1])
    return x
