"""Sampling loops in k-diffusion sigma space, shared by the demo, the tests and the nodes.

The state is x = z_t / sqrt(acp_t) = x0 + sigma * eps (ComfyUI's convention). A
``denoiser(x, sigma) -> x0`` closure hides the model and the guidance; these loops are
deterministic given the initial noise (eta = 0 DDIM is Euler in this space).
"""

from __future__ import annotations

from typing import Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
AfterStep = Callable[[int, torch.Tensor], torch.Tensor]
OnStep = Callable[[int, torch.Tensor, torch.Tensor], None]


@torch.no_grad()
def sample_euler(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor,
                 after_step: AfterStep | None = None, on_step: OnStep | None = None) -> torch.Tensor:
    """DDIM (eta = 0) / Euler: x_{i+1} = x0 + (x - x0) * sigma_{i+1} / sigma_i.

    ``after_step(i, x)`` may return a changed state after step ``i`` (e.g. a latent blend);
    ``on_step(i, x, x0)`` sees each step's input and prediction (previews, progress).
    """
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0 = denoiser(x, s.expand(x.shape[0]))
        if on_step is not None:
            on_step(i, x, x0)
        x = x0 + (x - x0) * (s_next / s)
        if after_step is not None:
            x = after_step(i, x)
    return x


def cfg_combine(cond_x0: torch.Tensor, uncond_x0: torch.Tensor, scale: float) -> torch.Tensor:
    return uncond_x0 + scale * (cond_x0 - uncond_x0)
