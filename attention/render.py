"""Turning attention maps into pictures and masks (numpy/torch only).

Images are ComfyUI-style float tensors (b, H, W, 3) in [0, 1]; masks are (b, H, W).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# A perceptually ordered dark-blue -> teal -> yellow ramp (viridis key points).
_RAMP = torch.tensor([
    [0.267, 0.005, 0.329], [0.283, 0.141, 0.458], [0.254, 0.265, 0.530], [0.207, 0.372, 0.553],
    [0.164, 0.471, 0.558], [0.128, 0.567, 0.551], [0.135, 0.659, 0.518], [0.267, 0.749, 0.441],
    [0.478, 0.821, 0.318], [0.741, 0.873, 0.150], [0.993, 0.906, 0.144]])


def normalize(maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Min-max each map of (..., h, w) to [0, 1] independently."""
    flat = maps.flatten(-2)
    lo = flat.min(-1, keepdim=True).values
    hi = flat.max(-1, keepdim=True).values
    return ((flat - lo) / (hi - lo + eps)).view_as(maps)


def upsample(maps: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """(..., h, w) -> (..., H, W), bilinear for maps or "nearest" for masks and labels."""
    lead = maps.shape[:-2]
    x = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    x = F.interpolate(x, size=size, mode=mode, align_corners=False if mode == "bilinear" else None)
    return x.view(*lead, *size)


def colorize(maps01: torch.Tensor) -> torch.Tensor:
    """(..., H, W) in [0, 1] -> (..., H, W, 3) colours."""
    x = maps01.clamp(0, 1) * (len(_RAMP) - 1)
    lo = x.floor().long().clamp(max=len(_RAMP) - 2)
    frac = (x - lo).unsqueeze(-1)
    ramp = _RAMP.to(maps01.device)
    return ramp[lo] * (1 - frac) + ramp[lo + 1] * frac


def overlay(image: torch.Tensor, maps01: torch.Tensor, alpha: float = 0.55) -> torch.Tensor:
    """Blend heatmaps (b, H, W) over images (b, H, W, 3)."""
    heat = colorize(maps01)
    a = alpha * maps01.clamp(0, 1).unsqueeze(-1) ** 0.5
    return (image * (1 - a) + heat * a).clamp(0, 1)


def masks_from_maps(maps01: torch.Tensor, threshold: float) -> torch.Tensor:
    return (maps01 >= threshold).float()


def grid(images: torch.Tensor, cols: int, pad: int = 2, value: float = 1.0) -> torch.Tensor:
    """(n, H, W, 3) -> (1, rows*(H+pad)-pad, cols*(W+pad)-pad, 3)."""
    n, h, w, c = images.shape
    cols = max(1, min(cols, n))
    rows = (n + cols - 1) // cols
    out = torch.full((rows * (h + pad) - pad, cols * (w + pad) - pad, c), value, dtype=images.dtype)
    for i in range(n):
        r, cc = divmod(i, cols)
        out[r * (h + pad):r * (h + pad) + h, cc * (w + pad):cc * (w + pad) + w] = images[i]
    return out.unsqueeze(0)
