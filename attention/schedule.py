"""Stable Diffusion's discrete noise schedule and the sigma <-> timestep maps.

Scaled-linear betas from 0.00085 to 0.012 over 1000 steps, as SD1.x/SDXL. The k-diffusion
variable is x = z_t / sqrt(acp_t) = x0 + sigma * eps with sigma_t = sqrt((1 - acp_t) / acp_t).
"""

from __future__ import annotations

import torch

N_TRAIN_STEPS = 1000


def alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012, n: int = N_TRAIN_STEPS) -> torch.Tensor:
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def train_sigmas() -> torch.Tensor:
    acp = alphas_cumprod()
    return ((1 - acp) / acp).sqrt()


def sigma_to_t(sigma: torch.Tensor, sigmas: torch.Tensor | None = None) -> torch.Tensor:
    """Continuous timestep for a sigma by interpolating log-sigma (as ComfyUI does)."""
    sigmas = train_sigmas() if sigmas is None else sigmas
    log_s = sigmas.log().to(sigma.device)
    ls = sigma.float().clamp(min=float(sigmas[0])).log()
    dists = ls[..., None] - log_s
    low = dists.ge(0).cumsum(-1).argmax(-1).clamp(max=len(sigmas) - 2)
    lo, hi = log_s[low], log_s[low + 1]
    w = ((lo - ls) / (lo - hi)).clamp(0, 1)
    return (1 - w) * low + w * (low + 1)


def simple_sigmas(steps: int) -> torch.Tensor:
    """ComfyUI's 'simple' scheduler: evenly spaced over the 1000 training sigmas, then 0."""
    sig = train_sigmas()
    stride = len(sig) / steps
    s = torch.stack([sig[-(1 + int(i * stride))] for i in range(steps)])
    return torch.cat([s, s.new_zeros(1)])
