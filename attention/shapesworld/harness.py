"""The quality harness: turns attention and image claims into numbers on ShapesWorld.

Protocols:
* attention IoU over thresholds (DPL paper, Fig. 5): a word's map is min-max normalized,
  upsampled to the image, thresholded at t in [0, 1]; IoU with the object's mask;
  curves are averaged over objects and the best threshold of the mean curve is reported;
* leakage: share of a word's attention mass on other objects and on the background;
* PSNR (optionally restricted to a region), colour blobs and the region classifier.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from scipy import ndimage

from ..render import normalize, upsample
from .classifier import RegionClassifier
from .world import COLOURS

THRESHOLDS = torch.linspace(0, 1, 21)
CLASSIFIER_WEIGHTS = Path(__file__).resolve().parents[2] / "assets" / "shapes_classifier.safetensors"


def iou_curve(word_map: torch.Tensor, mask: torch.Tensor, thresholds: torch.Tensor = THRESHOLDS) -> torch.Tensor:
    """IoU of (normalized, upsampled map >= t) with ``mask`` for every threshold t."""
    m = normalize(upsample(word_map.float(), tuple(mask.shape)))
    gt = mask.bool()
    out = []
    for t in thresholds:
        pred = m >= t
        inter = (pred & gt).sum().item()
        union = (pred | gt).sum().item()
        out.append(inter / union if union else 0.0)
    return torch.tensor(out)


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """Intersection over union of two boolean masks (0 when both are empty)."""
    a, b = a.bool(), b.bool()
    return (a & b).sum().item() / max((a | b).sum().item(), 1)


def leakage(word_map: torch.Tensor, own: torch.Tensor, others: torch.Tensor, background: torch.Tensor) -> dict:
    """Shares of the word's attention mass on its object, the other objects and the background."""
    m = upsample(word_map.float().clamp(min=0), tuple(own.shape))
    total = m.sum().clamp(min=1e-12)
    return {"own": float((m * own).sum() / total), "others": float((m * others).sum() / total),
            "background": float((m * background).sum() / total)}


def psnr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """PSNR in dB of images in [0, 1], (3, H, W) or (B, 3, H, W); over ``mask`` pixels if given."""
    err = (a.float() - b.float()) ** 2
    if mask is not None:
        m = mask.float().expand_as(err)
        mse = (err * m).sum() / (m.sum().clamp(min=1))
    else:
        mse = err.mean()
    return float(10 * torch.log10(1.0 / mse.clamp(min=1e-10)))


def colour_blobs(image: torch.Tensor, colour: str, tol: float = 0.3, min_pixels: int = 8) -> list[torch.Tensor]:
    """Connected regions of ``image`` (3, H, W) close to a named colour, largest first."""
    ref = torch.tensor(COLOURS[colour]).view(3, 1, 1)
    near = ((image - ref) ** 2).sum(0).sqrt() < tol
    labels, n = ndimage.label(near.numpy())
    blobs = [torch.from_numpy(labels == i) for i in range(1, n + 1)]
    blobs = [b for b in blobs if b.sum() >= min_pixels]
    return sorted(blobs, key=lambda b: -int(b.sum()))


def object_scores(images: torch.Tensor, sets: list[list[tuple[str, str]]], clf) -> dict:
    """Per image of ``images`` (B, 3, H, W) and its named (colour, shape) objects: every colour present; each
    colour's largest blob classified as its shape (all of them: binding); some colour's blob taking another
    named object's shape (attribute swap). Shares over images, shape agreement over objects."""
    present, shape_hits, bound, swapped = [], 0, [], 0
    for img, objs in zip(images, sets):
        blobs = {c: colour_blobs(img, c) for c, _ in objs}
        ok, swap = [], False
        for c, s in objs:
            pred = clf.predict(img[None], blobs[c][0][None])[0][0] if blobs[c] else None
            shape_hits += pred == s
            ok.append(pred == s)
            swap |= pred is not None and pred != s and any(pred == s2 for c2, s2 in objs if c2 != c)
        present.append(all(blobs[c] for c, _ in objs))
        bound.append(all(ok))
        swapped += swap
    n, objects = len(sets), sum(len(o) for o in sets)
    return {"binding": sum(bound) / n, "colour_presence": sum(present) / n, "shape_agreement": shape_hits / objects,
            "attribute_swap": swapped / n, "objects": objects, "per_image": bound}


def load_classifier(path: Path = CLASSIFIER_WEIGHTS) -> RegionClassifier:
    net = RegionClassifier()
    net.load_state_dict(load_file(str(path)))
    return net.eval()


def classifier_accuracy(path: Path = CLASSIFIER_WEIGHTS) -> dict:
    """The classifier's own held-out accuracy, recorded in its weights file when it was trained."""
    import json

    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["accuracy"])


@dataclass
class IoUReport:
    curve: torch.Tensor       # mean IoU per threshold
    best_iou: float
    best_threshold: float
    n: int

    @classmethod
    def from_curves(cls, curves: list[torch.Tensor]) -> "IoUReport":
        mean = torch.stack(curves).mean(0)
        i = int(mean.argmax())
        return cls(mean, float(mean[i]), float(THRESHOLDS[i]), len(curves))


def summarize(values: list[float]) -> str:
    a = np.asarray(values, dtype=float)
    return f"{a.mean():.3f} (n={len(a)})"
