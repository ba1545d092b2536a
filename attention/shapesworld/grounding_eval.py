"""Training a grounding head on a ShapesWorld feature pool, and scoring heads and the training-free baselines
(cross-attention word masks, SelfAttnCluster) against the exact masks: per-class IoU, seen/unseen mIoU, leakage.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..cluster import cluster_store
from ..grounding import HeadConfig, TrainBatch, build_head, train_head
from ..render import normalize, upsample
from ..store import AttentionStore, StoreConfig
from .grounding_data import Example, Pool, batch_of, example_queries, object_word_positions
from .harness import THRESHOLDS
from .model import ShapesWorldModel, patches_for
from .world import SHAPES

HEAD = {"widths": (4, 8, 16), "dim": 64, "heads": 4, "ffn": 256}   # upstream layout, ShapesWorld-sized (B8)


@dataclass
class Recipe:
    mode: str = "prompt"        # query mode
    steps: int = 400
    batch: int = 16
    lr: float = 1e-3
    seed: int = 0
    colours: bool = False       # colour words as extra training queries (ablation)
    prior: bool = False         # the word's cross-attention map as an extra input (ours, not the paper's)
    head: dict = field(default_factory=lambda: dict(HEAD))
    device: str = "cpu"         # where the head trains (the trained head is returned on the CPU)


def train(pool: Pool, recipe: Recipe, templates: dict, seen: tuple[str, ...], source: str):
    """Train a head on ``pool`` (seen words only); returns (head, meta, seconds)."""
    usable = [i for i, e in enumerate(pool.examples) if bool(e.valid.any())]
    g = torch.Generator().manual_seed(recipe.seed)
    kw = dict(recipe.head, widths=tuple(recipe.head["widths"][s] for s in pool.level_ids))
    config = HeadConfig(pool.meta.channels, pool.meta.context_dim, prior_channels=int(recipe.prior), **kw)
    head = build_head(config, recipe.seed)

    def batches(step: int) -> TrainBatch:
        pick = torch.randint(len(usable), (recipe.batch,), generator=g).tolist()
        return batch_of(pool, [usable[j] for j in pick], recipe.mode, templates, recipe.colours, recipe.prior)
    result = train_head(head, batches, recipe.steps, lr=recipe.lr, device=recipe.device)
    training = {"steps": recipe.steps, "batch": recipe.batch, "lr": recipe.lr, "seed": recipe.seed,
                "optimizer": "Adam", "loss": "BCE-with-logits (upstream)", "data": source,
                "examples": len(usable), "colour_queries": recipe.colours, "final_loss": round(result.losses[-1], 4),
                "seconds": round(result.seconds, 1)}
    meta = replace(pool.meta, query=recipe.mode, seen_words=tuple(seen), training=training)
    return result.head.cpu(), meta, result.seconds


class Score:
    """Per-class intersection/union sums and leakage of one method on one test set."""

    def __init__(self):
        self.inter: dict[str, float] = {}
        self.union: dict[str, float] = {}
        self.on_others = self.predicted = 0.0

    def add(self, word: str, pred: torch.Tensor, target: torch.Tensor, others: torch.Tensor) -> None:
        pred, target = pred.bool(), target.bool()
        self.inter[word] = self.inter.get(word, 0.0) + float((pred & target).sum())
        self.union[word] = self.union.get(word, 0.0) + float((pred | target).sum())
        if bool(others.any()):
            self.on_others += float((pred & others).sum())
            self.predicted += float(pred.sum())

    def iou(self, word: str) -> float:
        return self.inter.get(word, 0.0) / max(self.union.get(word, 0.0), 1.0)

    def summary(self, unseen: tuple[str, ...]) -> dict:
        seen_w = [w for w in SHAPES if w not in unseen and w in self.union]
        unseen_w = [w for w in unseen if w in self.union]
        s = sum(self.iou(w) for w in seen_w) / max(len(seen_w), 1)
        u = sum(self.iou(w) for w in unseen_w) / max(len(unseen_w), 1)
        return {"seen": s, "unseen": u, "h": 2 * s * u / (s + u) if s + u else 0.0,
                "leak": self.on_others / max(self.predicted, 1.0)}


def others_of(ex: Example, covered: list[int]) -> torch.Tensor:
    rest = [j for j in range(len(ex.objects)) if j not in covered]
    return ex.truth[rest].any(0) if rest else torch.zeros_like(ex.truth[0])


@torch.no_grad()
def score_head(head, pool: Pool, mode: str, templates: dict, prior: bool = False, batch: int = 64) -> Score:
    score = Score()
    for i in range(0, len(pool.examples), batch):
        idx = list(range(i, min(i + batch, len(pool.examples))))
        qs = [example_queries(pool, j, mode, templates, truth=True) for j in idx]
        b = batch_of(pool, idx, mode, templates, prior=prior)
        _, masks = head.segment(b.levels, b.queries, b.valid, tuple(qs[0].targets.shape[-2:]), b.prior)
        for k, (j, q) in enumerate(zip(idx, qs)):
            for n, (w, objs) in enumerate(zip(q.words, q.objects)):
                score.add(w, masks[k, n], q.targets[n], others_of(pool.examples[j], objs))
    return score


def score_masks(pool: Pool, masks: list[torch.Tensor]) -> Score:
    """Score per-object masks (list over examples of (n, S, S)) against each object's exact mask."""
    score = Score()
    for ex, m in zip(pool.examples, masks):
        for j, (_, shape) in enumerate(ex.objects):
            score.add(shape, m[j], ex.truth[j], others_of(ex, [j]))
    return score


def crossattn_masks(pool: Pool, threshold: float) -> list[torch.Tensor]:
    """AttentionMapView's word masks: mean-of-layers map, normalized after upsampling, >= threshold."""
    size = tuple(pool.examples[0].truth.shape[-2:])
    return [normalize(upsample(pool.xattn[i, :len(ex.objects)], size)) >= threshold
            for i, ex in enumerate(pool.examples)]


@torch.no_grad()
def cluster_masks(model: ShapesWorldModel, items: list, t: int = 400, clusters: int = 5, threshold: float = 0.3,
                  seed: int = 321) -> list[torch.Tensor]:
    """SelfAttnCluster word masks (evaluate.cluster_localization's settings), one (n, S, S) per image."""
    out = []
    for k, (image, ex) in enumerate(items):
        store = AttentionStore(StoreConfig(self_max_tokens=32 * 32))
        sigma = model.sigmas[t].view(1).to(model.device)
        g = torch.Generator().manual_seed(seed + k)
        x0 = image[None].to(model.device) * 2 - 1
        den = model.denoiser(model.encode([ex.caption]), None, 1.0, patches_for(store))
        den(x0 + sigma * torch.randn(x0.shape, generator=g).to(model.device), sigma)
        shape_pos, _ = object_word_positions(model, ex)
        res = cluster_store(store, shape_pos, 0, clusters, threshold, max(store.resolutions(cross=False)),
                            min(store.resolutions()))
        size = tuple(image.shape[1:])
        out.append(torch.stack([upsample(res.word_mask(j), size, "nearest") > 0.5 for j in range(len(shape_pos))]))
    return out


def best_threshold(pool: Pool) -> float:
    """The cross-attention threshold with the best mIoU over all six shapes on this very test set (oracle)."""
    best = max(((sum(score_masks(pool, crossattn_masks(pool, float(t))).iou(w) for w in SHAPES), float(t))
                for t in THRESHOLDS[1:-1]))
    return best[1]



def summary_cells(d: dict) -> str:
    return f"{d['seen']:.3f} / {d['unseen']:.3f} / {d['h']:.3f} (leak {d['leak']:.3f})"
