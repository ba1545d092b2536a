"""The grounding protocol's data on ShapesWorld: scene sets with masks, their feature pool, the word queries.

Features through ``attention/grounding_features.py`` (ComfyUI's block patches), queries as the nodes build them
(``attention/grounding.py``); the protocol is described in ``grounding.py`` (the figure) and docs/grounding.md.

Shape legend: N examples   n objects (queries) of one example   S image side   T text context width
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from ..grounding import TrainBatch, stack_queries, template_text, word_query
from ..grounding_features import FeatureRecorder
from ..grounding_head_file import HeadMeta
from ..render import normalize
from ..store import AttentionStore, StoreConfig, word_maps
from .harness import colour_blobs, load_classifier
from .model import ShapesWorldModel, patches_for
from .world import COLOURS, SHAPES, SceneSpec, ShapesWorld, caption_for, one_colour_spec

SPLITS = (("star", "diamond"), ("triangle", "cross"), ("circle", "square"))   # unseen words per split
TEMPLATE = "a {word}"   # ShapesWorld's vocabulary has no "photograph"; "a {word}" is its in-vocabulary template
SAME_COLOUR_SHARE = 0.5   # same-colour training scenes per ordinary training scene (see training_examples)
FAMILY = "shapesworld"


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
        to = rec.attach({"cond_or_uncond": [1, 0], **patches_for(store, self_layers=False)})
        s = sigma.view(1).expand(2 * b).to(model.device)
        with rec.hook_final_block(model.unet):
            model.eps(torch.cat([x, x]), s, torch.cat([uncond1.expand(b, -1, -1), cond]), to)
        feats = rec.features(family=FAMILY, context_dim=model.text.width, timestep=t, sigma=float(sigma))
        meta = meta or HeadMeta.for_features(feats, template=TEMPLATE)
        levels.append([f.half().cpu() for f in feats.levels])
        states.append(cond.cpu())
        for j, e in enumerate(exs):
            pos = object_word_positions(model, e)[0]
            maps = torch.zeros(3, 16, 16)
            maps[:len(pos)] = word_maps(store, pos, None, item=j).cpu()
            xattn.append(maps)
    shape_pos, colour_pos = zip(*[object_word_positions(model, e) for e in examples])
    return Pool(examples, tuple(torch.cat([lv[s] for lv in levels]) for s in range(len(levels[0]))),
                torch.cat(states), list(shape_pos), list(colour_pos), torch.stack(xattn), meta,
                time.perf_counter() - t0)


def object_word_positions(model: ShapesWorldModel, ex: Example) -> tuple[list, list]:
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
