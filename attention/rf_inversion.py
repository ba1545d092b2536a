"""Rectified-flow inversion (Flux, SD3, ShapesWorld-Flow): plain Euler and FireFlow, and the reconstruction.

FireFlow: Deng et al., "FireFlow: Fast Inversion of Rectified Flow for Image Semantic Editing" (arXiv 2412.07517,
ICML 2025). Update rules ported from the official code,
https://github.com/HolmesShuan/FireFlow-Fast-Inversion-of-Rectified-Flow-for-Image-Semantic-Editing
(commit 98588a6f87662d73d8f9722294ad1fcf02ed211d, Apache-2.0), ``src/flux/sampling.py``: ``denoise`` (plain
Euler, "reflow") and ``denoise_fireflow``; ``src/edit.py`` inverts with ``inverse=True`` (the same loop over the
reversed time list) and samples back with the same solver. Our code, their math:

- Euler: x <- x + (t_next - t) v(x, t).
- FireFlow: a midpoint step whose starting velocity is the previous step's midpoint velocity (computed fresh
  only on the first step): v0 = v(x, t) on step 0, else the stored one; x_mid = x + (t_next - t) / 2 * v0;
  v_mid = v(x_mid, t + (t_next - t) / 2); stored <- v_mid; x <- x + (t_next - t) v_mid. N steps cost N + 1
  velocity evaluations (Euler: N). Upstream quirk kept: the reused velocity was evaluated at the previous step's
  midpoint, not at (x, t).

Upstream inverts with Flux's distilled guidance 1 and reconstructs with the same solver (its reconstruction script
``inversion_reconstruction.sh`` samples at guidance 1 too); here the velocity is whatever callable the caller
passes (the nodes: the MODEL's guided velocity at the node's guidance, the same for both directions).

Sigma space (ComfyUI's CONST models: ModelSamplingDiscreteFlow, ModelSamplingFlux): the state is
x = (1 - sigma) x0 + sigma noise, the timestep is sigma in [0, 1] (upstream's t), and the denoiser's prediction is
x0 = x - sigma v, so v = (x - x0) / sigma. Sampling sigmas descend s_0 > ... > s_N = 0; inversion walks them
backwards (upstream reverses its time list). ComfyUI's denoiser form loses v at sigma 0 (x0 = x there), where
inversion's first step evaluates it: ``velocity_from_denoiser`` reads it at ``sigma_floor`` (the nodes: the model's
smallest table sigma, 3e-4 on Flux, 1e-3 * shift on SD3) instead. Departure, named: the transformer sees
t = sigma_floor instead of 0 there.

Shapes (einops legend): x (b, c, h, w) (b = 1 for an inversion); sigmas (N+1,) descending, last 0; trajectory
N+1 states (b, c, h, w), [0] at s_0 (the inverted noise), [N] the clean latent.
"""

from __future__ import annotations

from typing import Callable

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]       # (x, sigma) -> velocity v, x's shape
DenoiserFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]       # (x, sigma) -> x0 prediction
SOLVERS = ("euler", "fireflow")


def velocity_from_denoiser(denoiser: DenoiserFn, sigma_floor: float) -> VelocityFn:
    """v = (x - x0) / sigma of a CONST denoiser, read at max(sigma, ``sigma_floor``) (the denoiser form has no v at
    sigma 0; module docstring). ``sigma_floor`` > 0."""
    if not sigma_floor > 0:
        raise ValueError(f"sigma_floor is {sigma_floor}; it must be > 0 (the velocity (x - x0) / sigma needs a "
                         f"nonzero sigma); use the model's smallest sigma")

    def v(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)[:1].clamp(min=sigma_floor)
        return (x - denoiser(x, s)) / s.to(x.dtype).view(-1, *[1] * (x.ndim - 1))
    return v


def euler_step(velocity: VelocityFn, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
    """Upstream ``denoise``'s update: x + (t_next - t) v(x, t)."""
    return x + (t_next - t) * velocity(x, t)


def fireflow_step(velocity: VelocityFn, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
                  v_start: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream ``denoise_fireflow``'s update: the midpoint step from (x, t) to t_next starting from ``v_start``
    (None: v(x, t), upstream's first step). Returns (the new state, the midpoint velocity to reuse next)."""
    v0 = velocity(x, t) if v_start is None else v_start
    h = t_next - t
    v_mid = velocity(x + h / 2 * v0, t + h / 2)
    return x + h * v_mid, v_mid


def rf_solve(velocity: VelocityFn, x: torch.Tensor, times: torch.Tensor, solver: str,
             on_step: Callable[[int, torch.Tensor], None] | None = None) -> list[torch.Tensor]:
    """Integrate dx/dt = v(x, t) along ``times`` (ascending: inversion; descending: sampling) with ``solver``
    ("euler" or "fireflow"), starting fresh as upstream's ``denoise*`` does. Returns the len(times) states, [0] =
    ``x``. ``on_step(i, state)`` after each step."""
    if solver not in SOLVERS:
        raise ValueError(f"solver {solver!r} is not one of {SOLVERS}")
    states, v_next = [x], None
    for i in range(len(times) - 1):
        if solver == "euler":
            x = euler_step(velocity, x, times[i], times[i + 1])
        else:
            x, v_next = fireflow_step(velocity, x, times[i], times[i + 1], v_next)
        states.append(x)
        if on_step is not None:
            on_step(i, x)
    return states


def evaluations(solver: str, steps: int) -> int:
    """Velocity evaluations of one pass of ``steps`` steps: Euler N, FireFlow N + 1."""
    if solver not in SOLVERS:
        raise ValueError(f"solver {solver!r} is not one of {SOLVERS}")
    return steps if solver == "euler" else steps + 1


@torch.no_grad()
def rf_invert(velocity: VelocityFn, x0: torch.Tensor, sigmas: torch.Tensor, solver: str,
              on_step: Callable[[int, torch.Tensor], None] | None = None) -> list[torch.Tensor]:
    """The inversion of the clean latent ``x0`` (b, c, h, w) up the descending ``sigmas`` (N+1,): upstream's
    ``denoise(..., inverse=True)``. Returns the trajectory in sampling order: N+1 states, [0] at sigmas[0] (the
    inverted noise), [N] = ``x0``."""
    return rf_solve(velocity, x0, sigmas.flip(0), solver, on_step)[::-1]


@torch.no_grad()
def rf_reconstruct(velocity: VelocityFn, x_T: torch.Tensor, sigmas: torch.Tensor, solver: str,
                   on_step: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Sampling from ``x_T`` down the descending ``sigmas`` with the inversion's solver (upstream's
    ``denoise(..., inverse=False)``): the reconstruction, (b, c, h, w)."""
    return rf_solve(velocity, x_T, sigmas, solver, on_step)[-1]

