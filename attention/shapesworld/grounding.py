"""Grounded generation (Li et al. 2023) on ShapesWorld: the seen/unseen figure and the embedded head.

Same core as the ComfyUI nodes: features through ``attention/grounding_features.py`` (ComfyUI's block patches),
the head, queries, loss and training loop of ``attention/grounding.py``. Protocol (docs/grounding.md):
the 6 shape words in three splits of 4 seen / 2 unseen; training scenes and prompts contain seen shapes only;
test scenes (fresh seeds, 1-3 objects of any shape and colour, so distractors with the same colour or shape
occur) query every object's shape word; a same-colour set (2-3 objects of one colour, distinct shapes) is
reported separately. Features: every block output at t = 1 (upstream), uncond ‖ cond, of the image re-noised to
t. Per class IoU = sum(I) / sum(U) over the test queries; mIoU over seen and unseen classes; H = their
harmonic mean; leakage = share of predicted pixels on other objects.

    python -m attention.shapesworld.grounding [--quick] [--threads 1]   # the figure (--quick: one split, smaller)
    python -m attention.shapesworld.grounding --part main --splits 2 --scores s2.json   # one piece of it ...
    python -m attention.shapesworld.grounding --combine s1.json s2.json ...              # ... and the tables
    python -m attention.shapesworld.grounding --train-asset [--force]   # the embedded head under assets/
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..cluster import cluster_store
from ..grounding import (
    HeadConfig,
    HeadMeta,
    TrainBatch,
    build_head,
    load_head,
    save_head,
    stack_queries,
    template_text,
    train_head,
    word_query,
)
from ..grounding_features import FeatureRecorder
from ..render import normalize, upsample
from ..store import AttentionStore, StoreConfig, word_maps
from .harness import THRESHOLDS, colour_blobs, load_classifier
from .model import ShapesWorldModel, patches_for
from .weights import ASSETS
from .world import COLOURS, SHAPES, SceneSpec, ShapesWorld, caption_for, one_colour_spec

log = logging.getLogger("attention_lab.grounding")

SPLITS = (("star", "diamond"), ("triangle", "cross"), ("circle", "square"))   # unseen words per split
TEMPLATE = "a {word}"   # ShapesWorld's vocabulary has no "photograph"; "a {word}" is its in-vocabulary template
HEAD = {"widths": (4, 8, 16), "dim": 64, "heads": 4, "ffn": 256}   # upstream layout, ShapesWorld-sized (B8)
SAME_COLOUR_SHARE = 0.5   # same-colour training scenes per ordinary training scene (see training_examples)
HEAD_ASSET = ASSETS / "shapesworld_grounding.safetensors"
FAMILY = "shapesworld"
PROMPT_ROW = "head, exact masks, prompt queries (ours, default)"


# ---------------------------------------------------------------------------------------------- data

@dataclass
class Example:
    caption: str
    objects: list[tuple[str, str]]      # (colour, shape) per named object, caption order
    masks: torch.Tensor                 # (n, S, S) bool target per object (exact, pseudo or cluster)
    valid: torch.Tensor                 # (n,) bool: the object's target is usable
    truth: torch.Tensor                 # (n, S, S) bool exact masks (evaluation; = masks for exact sets)


@dataclass
class Pool:
    examples: list[Example]
    levels: tuple[torch.Tensor, ...]    # fp16 (N, C_s, H_s, W_s), coarse -> fine
    states: torch.Tensor                # (N, CONTEXT, T) cond text states of the captions
    shape_pos: list[list[tuple[int, ...]]]    # per example, per object: its shape word's token positions
    colour_pos: list[list[tuple[int, ...]]]
    xattn: torch.Tensor                 # (N, 3, 16, 16) mean cross-attention map of each object's shape word
    meta: HeadMeta | None = None        # layout of the features (head metadata template)
    seconds: float = 0.0
    level_ids: tuple[int, ...] = (0, 1, 2)   # which of the model's three sizes the levels are

    def subset(self, idx: list[int]) -> "Pool":
        ix = torch.tensor(idx, dtype=torch.long)
        return replace(self, examples=[self.examples[i] for i in idx], levels=tuple(x[ix] for x in self.levels),
                       states=self.states[ix], shape_pos=[self.shape_pos[i] for i in idx],
                       colour_pos=[self.colour_pos[i] for i in idx], xattn=self.xattn[ix])

    def with_levels(self, keep: list[int]) -> "Pool":
        meta = replace(self.meta, channels=tuple(self.meta.channels[s] for s in keep),
                       sizes=tuple(self.meta.sizes[s] for s in keep), blocks=())
        return replace(self, levels=tuple(self.levels[s] for s in keep), meta=meta,
                       level_ids=tuple(self.level_ids[s] for s in keep))


def exact_examples(seed: int, n: int, shapes: tuple[str, ...] = SHAPES, same_colour: bool = False) -> list:
    """n generator scenes of 1-3 objects drawn from ``shapes`` (same_colour: 2-3 objects of one colour,
    distinct shapes), with their exact masks."""
    world, g = ShapesWorld(seed=seed), torch.Generator().manual_seed(seed + 7)
    out = []
    for i in range(n):
        if same_colour:
            spec = one_colour_spec(shapes, 2 + i % 2, g)
        else:
            k = 1 + i % 3
            spec = SceneSpec([(None, shapes[int(torch.randint(len(shapes), (), generator=g))]) for _ in range(k)])
        scene = world.sample(spec)
        masks = torch.stack([ob.mask for ob in scene.objects])
        out.append((scene.image, Example(scene.caption, [(ob.colour, ob.shape) for ob in scene.objects], masks,
                                         torch.ones(len(masks), dtype=torch.bool), masks)))
    return out


def training_examples(seed: int, n: int, shapes: tuple[str, ...], same_colour_share: float = SAME_COLOUR_SHARE) -> list:
    """The exact-mask training set: n scenes of 1-3 objects in any colours (seed ``seed``) followed by
    ``round(n * same_colour_share)`` scenes of 2-3 objects sharing one colour (seed ``seed + 30_000``), all of
    ``shapes`` only. Ours, not the paper's: the same-colour scenes make the shape the only cue that tells the
    objects apart; without them a head learns to find the colour the causal text encoder puts into the shape
    word's state (ablation "no same-colour training scenes")."""
    extra = round(n * same_colour_share)
    return exact_examples(seed, n, shapes) + (exact_examples(seed + 30_000, extra, shapes, same_colour=True)
                                              if extra else [])


@torch.no_grad()
def pseudo_examples(model: ShapesWorldModel, seed: int, n: int, steps: int = 20, cfg: float = 5.0,
                    batch: int = 32) -> list:
    """Upstream's data engine on ShapesWorld: generate "a {colour} {shape}" or "... and a ..." (distinct colours),
    label each named object with its colour's largest blob, kept only when the region classifier calls it the
    named shape (upstream skips a class its detector does not find)."""
    clf, g = load_classifier(), torch.Generator().manual_seed(seed)
    cols, objs = list(COLOURS), []
    for i in range(n):
        k = 1 + i % 2
        c = torch.randperm(len(cols), generator=g)[:k].tolist()
        objs.append([(cols[j], SHAPES[int(torch.randint(len(SHAPES), (), generator=g))]) for j in c])
    out = []
    for i in range(0, n, batch):
        prompts = [caption_for(o, None) for o in objs[i:i + batch]]
        images = model.generate(prompts, seed=seed + i, steps=steps, cfg=cfg).cpu()
        for img, cap, ob in zip(images, prompts, objs[i:i + batch]):
            masks, valid = [], []
            for colour, shape in ob:
                blobs = colour_blobs(img, colour)
                m = blobs[0] if blobs else torch.zeros(img.shape[1:], dtype=torch.bool)
                masks.append(m)
                valid.append(bool(blobs) and clf.predict(img[None], m[None])[0][0] == shape)
            masks = torch.stack(masks)
            out.append((img, Example(cap, ob, masks, torch.tensor(valid), masks)))
    return out


@torch.no_grad()
def build_pool(model: ShapesWorldModel, items: list, t: int = 1, seed: int = 0, batch: int = 32) -> Pool:
    """Features (every block at timestep ``t``, uncond ‖ cond) of each image re-noised to t, the captions'
    states, and each shape word's cross-attention map from the same UNet call."""
    t0 = time.perf_counter()
    images = torch.stack([im for im, _ in items])
    examples = [ex for _, ex in items]
    sigma = model.sigmas[t]
    g = torch.Generator().manual_seed(seed)
    levels, states, xattn, meta = [], [], [], None
    uncond1 = model.encode([""])
    for i in range(0, len(items), batch):
        exs = examples[i:i + batch]
        b = len(exs)
        x0 = images[i:i + batch].to(model.device) * 2 - 1
        x = x0 + sigma * torch.randn(x0.shape, generator=g).to(model.device)
        cond = model.encode([e.caption for e in exs])
        store = AttentionStore(StoreConfig(capture_self=False))
        rec = FeatureRecorder()
        to = rec.attach({"cond_or_uncond": [1, 0], "patches_replace": patches_for(store, self_layers=False)})
        s = sigma.view(1).expand(2 * b).to(model.device)
        with rec.hook_final_block(model.unet):
            model.eps(torch.cat([x, x]), s, torch.cat([uncond1.expand(b, -1, -1), cond]), to)
        feats = rec.features(family=FAMILY, context_dim=model.text.width, timestep=t, sigma=float(sigma))
        meta = meta or HeadMeta.for_features(feats, template=TEMPLATE)
        levels.append([f.half().cpu() for f in feats.levels])
        states.append(cond.cpu())
        for j, e in enumerate(exs):
            pos = _positions(model, e)[0]
            maps = torch.zeros(3, 16, 16)
            maps[:len(pos)] = word_maps(store, pos, None, item=j).cpu()
            xattn.append(maps)
    shape_pos, colour_pos = zip(*[_positions(model, e) for e in examples])
    return Pool(examples, tuple(torch.cat([lv[s] for lv in levels]) for s in range(len(levels[0]))),
                torch.cat(states), list(shape_pos), list(colour_pos), torch.stack(xattn), meta,
                time.perf_counter() - t0)


def _positions(model: ShapesWorldModel, ex: Example) -> tuple[list, list]:
    count: dict[str, int] = {}
    shape_pos, colour_pos = [], []
    for colour, shape in ex.objects:
        shape_pos.append(model.word_positions(ex.caption, shape, occurrence=count.get(shape, 0)))
        colour_pos.append(model.word_positions(ex.caption, colour, occurrence=count.get(colour, 0)))
        count[shape] = count.get(shape, 0) + 1
        count[colour] = count.get(colour, 0) + 1
    return shape_pos, colour_pos


# ---------------------------------------------------------------------------------------------- queries

@dataclass
class Queries:
    vectors: torch.Tensor               # (n_q, T)
    targets: torch.Tensor               # (n_q, S, S) bool
    valid: torch.Tensor                 # (n_q,) bool
    words: list[str]                    # class word of each query
    objects: list[list[int]]            # object indices each query covers (its target)


def example_queries(pool: Pool, i: int, mode: str, templates: dict, colours: bool = False,
                    truth: bool = False) -> Queries:
    """Queries of example i. prompt: one per object, the shape word's states in the caption (target: that
    object); template: one per distinct shape word, its template vector (target: all objects of that shape).
    ``colours`` adds the colour words (training ablation); ``truth`` uses the exact masks (evaluation)."""
    ex = pool.examples[i]
    masks = ex.truth if truth else ex.masks
    valid = torch.ones(len(masks), dtype=torch.bool) if truth else ex.valid
    vecs, tgts, oks, words, objs = [], [], [], [], []
    kinds = [(1, pool.shape_pos)] + ([(0, pool.colour_pos)] if colours else [])
    for which, positions in kinds:
        if mode == "prompt":
            for j, obj in enumerate(ex.objects):
                vecs.append(word_query(pool.states[i], positions[i][j]))
                tgts.append(masks[j]), oks.append(bool(valid[j])), words.append(obj[which]), objs.append([j])
        else:
            for w in dict.fromkeys(o[which] for o in ex.objects):
                js = [j for j, o in enumerate(ex.objects) if o[which] == w and valid[j]]
                vecs.append(templates[w])
                tgts.append(masks[js].any(0) if js else torch.zeros_like(masks[0]))
                oks.append(bool(js)), words.append(w), objs.append(js)
    return Queries(torch.stack(vecs), torch.stack(tgts), torch.tensor(oks), words, objs)


@torch.no_grad()
def template_vectors(model: ShapesWorldModel, template: str = TEMPLATE) -> dict[str, torch.Tensor]:
    """Upstream's class embedding: the word's states in its own template prompt, averaged over its tokens."""
    out = {}
    for w in list(SHAPES) + list(COLOURS):
        text = template_text(w, template)
        out[w] = word_query(model.encode([text])[0].cpu(), model.word_positions(text, w))
    return out


def batch_of(pool: Pool, idx: list[int], mode: str, templates: dict, colours: bool = False,
             prior: bool = False) -> TrainBatch:
    qs = [example_queries(pool, i, mode, templates, colours) for i in idx]
    vecs, mask = stack_queries([q.vectors for q in qs])
    n, size = vecs.shape[1], qs[0].targets.shape[-2:]
    targets = torch.zeros(len(idx), n, *size)
    valid = torch.zeros(len(idx), n, dtype=torch.bool)
    pri = torch.zeros(len(idx), n, 1, 16, 16) if prior else None
    for b, (i, q) in enumerate(zip(idx, qs)):
        targets[b, :len(q.valid)] = q.targets.float()
        valid[b, :len(q.valid)] = q.valid
        if prior:
            pri[b, :len(q.valid), 0] = normalize(pool.xattn[i, [o[0] for o in q.objects]])
    ix = torch.tensor(idx, dtype=torch.long)
    return TrainBatch([x[ix].float() for x in pool.levels], vecs, targets, valid & mask, pri)


# ---------------------------------------------------------------------------------------------- train, evaluate

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
        shape_pos, _ = _positions(model, ex)
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


# ---------------------------------------------------------------------------------------------- figure

def _cells(d: dict) -> str:
    return f"{d['seen']:.3f} / {d['unseen']:.3f} / {d['h']:.3f} (leak {d['leak']:.3f})"


def _row(name: str, per_split: list[dict]) -> str:
    avg = {k: sum(d[k] for d in per_split) / len(per_split) for k in per_split[0]}
    cells = " | ".join(f"{d['seen']:.3f} / {d['unseen']:.3f} / {d['h']:.3f}" for d in per_split)
    return (f"| {name} | {cells} | **{avg['seen']:.3f} / {avg['unseen']:.3f} / {avg['h']:.3f}** | "
            f"{avg['leak']:.3f} |")


ABLATIONS = ("no_same", "colours", "prior", "t200", "drop8", "seen2", "self", "pseudo_template")


def figure(model: ShapesWorldModel, quick: bool = False, seed: int = 0, sizes: tuple | None = None,
           steps: int | None = None, part: str = "all", splits: tuple[int, ...] = (1, 2, 3),
           which: tuple[str, ...] = ABLATIONS, heads: tuple[str, ...] = ("prompt", "template", "pseudo"),
           device: str = "cpu") -> dict:
    """The measurements as a JSON-able dict (``render`` turns one or several into the tables). Full: 3 splits,
    256 exact-mask training scenes per split, 96 generated images for pseudo-labels, 144 + 60 test scenes,
    ablations on split 1; quick: split 1, 160 scenes, 48 + 24 test scenes, no pseudo-label head, no ablations.
    ``part``: "all", "main" (the two tables) or "ablations" (``which`` of split 1's ablations); ``splits``: the
    split numbers of the main tables, so the figure can run as several processes; rows are also logged as they
    are measured. Every exact-mask training set also holds half as many same-colour scenes (``training_examples``)."""
    t_all = time.perf_counter()
    ks = (1,) if quick or part == "ablations" else tuple(splits)
    n_train, n_pseudo, n_test, n_same = sizes or ((160, 0, 48, 24) if quick else (256, 96, 144, 60))
    recipe = Recipe(steps=steps or (200 if quick else Recipe.steps), device=device)
    templates = template_vectors(model)
    costs: dict[str, float] = {}

    t = time.perf_counter()
    test_items = exact_examples(10_000 + seed, n_test)
    same_items = exact_examples(20_000 + seed, n_same, same_colour=True)
    test, same = build_pool(model, test_items, seed=1), build_pool(model, same_items, seed=2)
    costs["test features (s/image)"] = (time.perf_counter() - t) / (n_test + n_same)
    t = time.perf_counter()
    thr = best_threshold(test)
    n_cluster = min(n_test, 24 if quick else 48, len(same_items))
    clus = {"main": cluster_masks(model, test_items[:n_cluster]), "same": cluster_masks(model, same_items[:n_cluster])}
    costs["SelfAttnCluster (s/image)"] = (time.perf_counter() - t) / (2 * n_cluster)
    sub, same_sub = test.subset(list(range(n_cluster))), same.subset(list(range(n_cluster)))
    baselines = {
        "cross-attention word masks, threshold 0.5 (AttentionMapView default)":
            (score_masks(test, crossattn_masks(test, 0.5)), score_masks(same, crossattn_masks(same, 0.5))),
        f"cross-attention word masks, oracle threshold {thr:.2f} (best on this test set)":
            (score_masks(test, crossattn_masks(test, thr)), score_masks(same, crossattn_masks(same, thr))),
        f"SelfAttnCluster word masks (t=400, 5 clusters, 0.3; first {n_cluster} scenes of each set)":
            (score_masks(sub, clus["main"]), score_masks(same_sub, clus["same"])),
    }
    pseudo, kept = None, 0.0
    if n_pseudo and (("pseudo" in heads and part != "ablations") or (part != "main" and "pseudo_template" in which)):
        t = time.perf_counter()
        pseudo_items = pseudo_examples(model, 30_000 + seed, n_pseudo)
        costs["pseudo-label fill: generate 20 steps + label (s/image)"] = (time.perf_counter() - t) / n_pseudo
        pseudo = build_pool(model, pseudo_items, seed=3)
        kept = float(torch.cat([e.valid for e in pseudo.examples]).float().mean())

    rows: dict[str, dict[str, list[dict]]] = {}
    for name, (a, b) in baselines.items():
        rows[name] = {str(k): [a.summary(SPLITS[k - 1]), b.summary(SPLITS[k - 1])] for k in ks}
        log.info("baseline %s: %s", name, {k: _cells(v[0]) for k, v in rows[name].items()})
    train_s, seg_s, ablation_rows = [], [], []
    for k in ks:
        unseen = SPLITS[k - 1]
        seen = tuple(w for w in SHAPES if w not in unseen)
        t = time.perf_counter()
        exact = build_pool(model, training_examples(40_000 + 100 * (k - 1) + seed, n_train, seen), seed=3 + k)
        costs["exact-mask fill: features (s/image)"] = (time.perf_counter() - t) / len(exact.examples)
        runs = [(PROMPT_ROW, exact, replace(recipe, mode="prompt")),
                ("head, exact masks, template queries (paper)", exact, replace(recipe, mode="template"))]
        own = None
        if pseudo is not None:
            own = pseudo.subset([i for i, e in enumerate(pseudo.examples) if all(s in seen for _, s in e.objects)])
            runs.append(("head, pseudo-labels, prompt queries", own, replace(recipe, mode="prompt")))
        reference = None
        kinds = ("prompt", "template", "pseudo")
        chosen = runs[:1] if part == "ablations" else [r for r, kind in zip(runs, kinds) if kind in heads]
        for name, pool, rc in chosen:
            head, meta, sec = train(pool, rc, templates, seen, name)
            train_s.append(sec)
            t = time.perf_counter()
            a, b = score_head(head, test, rc.mode, templates), score_head(head, same, rc.mode, templates)
            seg_s.append((time.perf_counter() - t) / (n_test + n_same))
            rows.setdefault(name, {})[str(k)] = [a.summary(unseen), b.summary(unseen)]
            reference = reference or (a, b)
            log.info("split %d %s: trained in %.1f s; main %s; same-colour %s", k, name, sec,
                     _cells(a.summary(unseen)), _cells(b.summary(unseen)))
        if k == 1 and not quick and part != "main":
            ablation_rows = ablations(model, (exact, own), reference, test, same, test_items, clus, templates,
                                      recipe, seed, which, n_train)
    costs["train one head (s)"] = sum(train_s) / len(train_s)
    costs["segment (s/image)"] = sum(seg_s) / len(seg_s)
    costs["this process (s)"] = time.perf_counter() - t_all
    return {"splits": list(ks), "part": part, "rows": rows if part != "ablations" else {},
            "ablations": ablation_rows, "costs": costs,
            "setup": {"train": n_train, "pseudo": n_pseudo, "kept": kept, "test": n_test, "same": n_same,
                      "steps": recipe.steps, "batch": recipe.batch, "lr": recipe.lr, "device": device,
                      "same_colour_share": SAME_COLOUR_SHARE}}


def render(results: list[dict]) -> list[str]:
    """Markdown tables of one or several ``figure`` results (e.g. one process per split)."""
    main = [r for r in results if r["rows"]]
    ks = sorted({k for r in main for k in r["splits"]})
    lines: list[str] = []
    if main:
        rows: dict[str, dict[str, list]] = {}
        for r in main:
            for name, per in r["rows"].items():
                rows.setdefault(name, {}).update(per)
        st = dict(main[0]["setup"])
        with_pseudo = [r["setup"] for r in main if r["setup"]["pseudo"]]
        if with_pseudo:
            st.update(pseudo=with_pseudo[0]["pseudo"], kept=with_pseudo[0]["kept"])
        pseudo_note = (f"or the seen-only share of {st['pseudo']} generated images (pseudo-labels: {st['kept']:.0%} "
                       f"of objects kept by the classifier)" if st["pseudo"] else "(no pseudo-label head)")
        share = st.get("same_colour_share", 0.0)
        extra = f" + {round(st['train'] * share)} same-colour" if share else ""
        lines += [f"Seen/unseen grounding on ShapesWorld ({len(ks)} split(s) of 4 seen / 2 unseen shapes; "
                  f"{st['train']}{extra} exact-mask training scenes per split {pseudo_note}, {st['steps']} Adam "
                  f"steps of {st['batch']}, lr {st['lr']}; test: {st['test']} scenes + a same-colour set of "
                  f"{st['same']}; run on {st.get('device', 'cpu')}). "
                  "Cells: mIoU seen / unseen / harmonic mean per split; leakage = share of predicted pixels on "
                  "other objects.", ""]
        head_cols = " | ".join(f"split {k} (unseen {', '.join(SPLITS[k - 1])})" for k in ks)
        heads = [n for n in rows if n.startswith("head")]
        for title, which in (("Main test set", 0), ("Same-colour distractor set (colour cannot name the object)", 1)):
            lines += [f"**{title}**", "", f"| method | {head_cols} | mean | leakage |",
                      "|---|" + "---|" * (len(ks) + 2)]
            for name in heads + [n for n in rows if n not in heads]:
                per = rows[name]
                if all(str(k) in per for k in ks):
                    lines.append(_row(name, [per[str(k)][which] for k in ks]))
            lines.append("")
    abl = [a for r in results for a in r["ablations"]]
    if abl:
        lines += [f"**Ablations** (split 1, unseen {', '.join(SPLITS[0])}; prompt queries unless named; cells: mIoU "
                  "seen / unseen / H, main set | same-colour set; leakage on the main set)", "",
                  "| variant | main set | same-colour set | leakage |", "|---|---|---|---|"]
        seen_names = set()
        for name, a, b in abl:
            if name in seen_names:
                continue
            seen_names.add(name)
            lines.append(f"| {name} | {a['seen']:.3f} / {a['unseen']:.3f} / {a['h']:.3f} | "
                         f"{b['seen']:.3f} / {b['unseen']:.3f} / {b['h']:.3f} | {a['leak']:.3f} |")
        lines.append("")
    for r in results:
        lines.append(f"Costs ({r['part']}, splits {r['splits']}): "
                     + "; ".join(f"{k} {v:.3f}" for k, v in r["costs"].items()) + ".")
    return lines + [""]


def ablations(model, pools: tuple, reference: tuple, test: Pool, same: Pool, test_items: list, clus: dict,
              templates: dict, recipe: Recipe, seed: int, which: tuple[str, ...] = ABLATIONS,
              n_plain: int = 256) -> list:
    """Split 1 only, prompt queries unless named; reported, not tuned on the test split. ``n_plain``: the ordinary
    (any-colour) scenes of the training set, its same-colour scenes come on top. Returns [name, main summary,
    same-colour summary] rows."""
    unseen = SPLITS[0]
    seen = tuple(w for w in SHAPES if w not in unseen)
    out: list = [["reference: the split-1 prompt-query head of the main table (t = 1, all 3 sizes, 4 seen words)",
                  reference[0].summary(unseen), reference[1].summary(unseen)]]
    exact, pseudo = pools

    def run(name, pool, rc, tpool=test, spool=same, seen_words=seen):
        head = train(pool, rc, templates, seen_words, name)[0]
        a = score_head(head, tpool, rc.mode, templates, rc.prior).summary(unseen)
        b = score_head(head, spool, rc.mode, templates, rc.prior).summary(unseen)
        out.append([name, a, b])
        log.info("ablation %s: main %s; same-colour %s", name, _cells(a), _cells(b))
    for key in which:
        if key == "no_same":
            plain = training_examples(40_000 + seed, len(exact.examples), seen, same_colour_share=0.0)
            run("no same-colour training scenes (the paper's kind of set; same number of scenes)",
                build_pool(model, plain, seed=4), recipe)
        elif key == "colours":
            run("colour words as extra training queries", exact, replace(recipe, colours=True))
        elif key == "prior":
            run("word's cross-attention map as an extra input (ours, not the paper's)", exact,
                replace(recipe, prior=True))
        elif key == "t200":
            items = training_examples(40_000 + seed, n_plain, seen)
            same_items = exact_examples(20_000 + seed, len(same.examples), same_colour=True)
            run("features at t = 200 (train and test)", build_pool(model, items, t=200, seed=4), recipe,
                build_pool(model, test_items, t=200, seed=1), build_pool(model, same_items, t=200, seed=2))
        elif key == "drop8":
            run("8x8 features dropped", exact.with_levels([1, 2]), recipe, test.with_levels([1, 2]),
                same.with_levels([1, 2]))
        elif key == "seen2":
            two = seen[:2]
            run(f"2 seen words ({', '.join(two)}; same number of scenes)",
                build_pool(model, training_examples(50_000 + seed, n_plain, two), seed=5), recipe,
                seen_words=two)
        elif key == "self":
            n_st = min(48, len(exact.examples))
            cm = cluster_masks(model, exact_examples(40_000 + seed, n_st, seen), seed=777)
            st_pool = exact.subset(list(range(n_st)))
            st_pool = replace(st_pool, examples=[replace(e, masks=m, valid=m.flatten(1).any(1))
                                                 for e, m in zip(st_pool.examples, cm)])
            run(f"self-training: head on SelfAttnCluster masks of {n_st} training scenes (compare with the "
                "SelfAttnCluster row)", st_pool, recipe)
            n = len(clus["main"])
            out.append(["SelfAttnCluster masks themselves (first test scenes of each set)",
                        score_masks(test.subset(list(range(n))), clus["main"]).summary(unseen),
                        score_masks(same.subset(list(range(n))), clus["same"]).summary(unseen)])
        elif key == "pseudo_template" and pseudo is not None:
            run("pseudo-labels, template queries (the paper's whole pipeline)", pseudo,
                replace(recipe, mode="template"))
    return out


# ---------------------------------------------------------------------------------------------- embedded head

def train_asset(model: ShapesWorldModel, path: Path = HEAD_ASSET, force: bool = False, scenes: int = 384,
                steps: int = Recipe.steps, seed: int = 0) -> tuple[Path, HeadMeta]:
    """The embedded head: split 1 (unseen star, diamond), exact masks, prompt queries. Refuses to overwrite."""
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists (the shipped head); pass --force to retrain and replace it, or "
                              f"--out another path")
    seen = tuple(w for w in SHAPES if w not in SPLITS[0])
    pool = build_pool(model, training_examples(60_000 + seed, scenes, seen), seed=seed)
    recipe = Recipe(steps=steps, seed=seed)
    head, meta, sec = train(pool, recipe, template_vectors(model), seen,
                            f"exact masks of {len(pool.examples)} ShapesWorld scenes (seed {60_000 + seed}: {scenes} "
                            f"in any colours + {len(pool.examples) - scenes} same-colour), seen shapes only")
    save_head(path, head, meta, overwrite=True)
    log.info("wrote %s: %d steps in %.0f s, final loss %.4f", path, steps, sec, meta.training["final_loss"])
    return path, meta


def load_asset(path: Path = HEAD_ASSET):
    return load_head(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one split, smaller sets, no ablations (the demo's size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--part", choices=("all", "main", "ablations"), default="all",
                   help="main: the two tables; ablations: split 1's ablations")
    p.add_argument("--splits", default="1,2,3", help="split numbers of the main tables (one process per split)")
    p.add_argument("--ablations", default=",".join(ABLATIONS), help=f"which ablations ({', '.join(ABLATIONS)})")
    p.add_argument("--heads", default="prompt,template,pseudo", help="main-table heads to train (prompt, template: "
                   "exact masks; pseudo: pseudo-labels, prompt queries)")
    p.add_argument("--sizes", default="", help="train,pseudo,test,same (default 256,96,144,60; quick 160,0,48,24)")
    p.add_argument("--steps", type=int, default=0, help=f"Adam steps per head (default {Recipe.steps}; quick 200)")
    p.add_argument("--scores", default="", help="also write the measurements as JSON here (for --combine)")
    p.add_argument("--combine", nargs="+", default=None, help="print the tables of several --scores files")
    p.add_argument("--train-asset", action="store_true", help="train the embedded head instead of the figure")
    p.add_argument("--out", default=str(HEAD_ASSET), help="where --train-asset writes the head")
    p.add_argument("--force", action="store_true", help="let --train-asset replace an existing file")
    p.add_argument("--device", default="cpu", help="torch device of the UNet and the head training (cpu, cuda); "
                   "the same numbers up to float rounding, in far less time on a GPU")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default; 1 is much faster "
                   "than 2 when other processes share the 2 cores)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.combine:
        log.info("\n".join(render([json.loads(Path(f).read_text()) for f in args.combine])))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    model = ShapesWorldModel(device=args.device)
    if args.train_asset:
        train_asset(model, Path(args.out), args.force, seed=args.seed)
        return
    sizes = tuple(int(x) for x in args.sizes.split(",")) if args.sizes else None
    result = figure(model, args.quick, args.seed, sizes, args.steps or None, args.part,
                    tuple(int(x) for x in args.splits.split(",")), tuple(args.ablations.split(",")),
                    tuple(args.heads.split(",")), args.device)
    if args.scores:
        Path(args.scores).write_text(json.dumps(result, indent=1))
    log.info("\n".join(render([result])))


if __name__ == "__main__":
    main()
