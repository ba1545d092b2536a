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


class StepBoundaryHook:
    """A denoiser ``(x, sigma, **kw) -> x0`` wrapped so that an ``after_step(i, x)`` hook (LocalBlend, the
    prompt-mixing background blend) runs on any sampler's state between steps, in place.

    The hook of step i runs on the state that enters the first evaluation at the schedule point
    ``sigmas[i + 1]``, before the model sees it; ``finish(x)`` runs the hooks still due on the final
    sample. For one-evaluation samplers whose model input is their state (Euler, DPM++ 2M, LMS,
    iPNDM, DEIS, ancestral Euler) this is exactly "after step i", as in our DDIM loop. A sampler that
    evaluates at ``sigmas[i + 1]`` on a predictor first (Heun) gets the hook on that predictor; one
    whose model input is a rescaled copy of its state (UniPC) keeps its state, and only ``finish``
    applies the hooks to its final sample. Attributes of the wrapped denoiser stay readable (samplers
    look up ``inner_model``).
    """

    def __init__(self, denoiser: Callable, sigmas: torch.Tensor, after_step: AfterStep):
        self.__dict__.update(inner=denoiser, schedule=sigmas.detach().float().cpu(), after_step=after_step, done=-1)

    def __getattr__(self, name):
        return getattr(self.__dict__["inner"], name)

    def _index(self, sigma) -> int | None:
        s = float(sigma.flatten()[0]) if isinstance(sigma, torch.Tensor) else float(sigma)
        hits = ((self.schedule - s).abs() <= 1e-4 * max(abs(s), 1e-8)).nonzero()
        return int(hits[0]) if len(hits) else None

    def _run(self, x: torch.Tensor, upto: int) -> None:
        for i in range(self.done + 1, upto + 1):
            new = self.after_step(i, x)
            if new is not x:
                x.copy_(new)
        self.done = max(self.done, upto)

    def __call__(self, x, sigma, *args, **kwargs):
        j = self._index(sigma)
        if j is not None and j - 1 > self.done:
            self._run(x, j - 1)
        return self.inner(x, sigma, *args, **kwargs)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.schedule) - 2
        if self.done < last:
            x = x.clone()
            self._run(x, last)
        return x
