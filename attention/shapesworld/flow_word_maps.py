"""Word maps on ShapesWorld-Flow: raw joint attention vs ConceptAttention vs SelfAttnCluster masks, one command.

    python -m attention.shapesworld.flow_word_maps [--scenes 40] [--threads 1]

Every map is made by the pack's own path on DiT models, as AttentionCapture runs it on Flux (``nodes/capture.py``
+ ``nodes/dit.py``, without ComfyUI): an ``AttentionStore`` installed on every double and single block through
``AttentionHook`` (``joint.dit_options``: the override, a block proxy per block, the call's ``JointLayout``), and,
for the concept maps, a ``concept_attention.ConceptStream`` per call built as ``nodes/dit._concept_streams``
builds it (concept tokens: each concept encoded alone, its first word token, through ``txt_in``; modulation
vector: ``time_in`` of the timestep plus ``vector_in`` of a zero pooled vector).

Protocol (the scenes and noise of ``flow_evaluate``'s localization figure): held-out scene i of
``ShapesWorld(seed)`` with 1 + i % 3 objects is noised to each sigma of ``bands`` (x = (1 - s) x0 + s eps, eps
seeded as there), one conditional velocity call per sigma runs with the capture, and the store averages over the
calls (as over sampling steps) and over all blocks. Per object, scored against its exact mask with the best-threshold
mean IoU (``harness.iou_curve``, 21 thresholds on the min-max normalized map upsampled to the image), over all
objects and (each at its own best threshold) over the objects of one-object scenes and of 2-3 object scenes:

* ``raw``: the object's shape word's cross view (image queries -> the word's key), ``store.word_maps``;
* ``concept``: ConceptAttention map of the object's shape word among the concepts [distinct shape words of the
  scene, "background"] (at least two, as the method needs); ``concept_colour``: the same with the objects' colour
  words as concepts (a second store, its own concept stream in the same calls; two objects of one colour share
  a map);
* ``clusters``: SelfAttnCluster's mask (``cluster.cluster_store``: KMeans over the image-image view, labelled by
  the raw word maps; the node's defaults 5 clusters, threshold 0.3, seed 1); ``clusters_concept``: the same
  clusters labelled by the concept maps (the node's ``labels`` = concept attention).

Also printed: the capture's cost in a sampling run (Euler, CFG, with the store on every block, cross and self
views, vs the same run without; medians of ``--repeats`` interleaved pairs after a warm-up, in one process) and
the store's bytes after runs of two step counts (flat: the maps are running sums).

Shapes: x (1, 3, S, S); maps (objects, gh, gw) on the (gh, gw) = S / patch token grid; masks (S, S).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from typing import NamedTuple

import torch

from .. import cli
from ..cluster import cluster_store
from ..concept_attention import ConceptStream
from ..hook import AttentionHook, Install
from ..joint import DitInfo, JointLayout, dit_options
from ..store import AttentionStore, StoreConfig, word_maps
from .flow import timestep_embedding
from .flow_evaluate import add_weights, load_model, open_command
from .harness import IoUReport, iou_curve
from .world import SceneSpec, ShapesWorld

log = logging.getLogger("attention_lab.flow_word_maps")
MAPS = ("raw", "concept", "concept_colour", "clusters", "clusters_concept")
BACKGROUND_CONCEPT = "background"
BANDS = (0.2, 0.4, 0.6, 0.8)    # flow_evaluate.attention_localization's sigmas


class ModulationOut(NamedTuple):
    """ComfyUI's ``ModulationOut`` fields, which ``concept_attention`` reads."""
    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor


class ComfyStyleBlock:
    """A FluxTwin double block seen as ComfyUI's (``txt_mod`` returning ``ModulationOut``s; the twin returns
    tuples in the same order: shift, scale, gate); every other text-stream layer is the twin's own."""

    def __init__(self, block):
        self.block, self.num_heads = block, block.num_heads
        self.txt_norm1, self.txt_attn = block.txt_norm1, block.txt_attn
        self.txt_norm2, self.txt_mlp = block.txt_norm2, block.txt_mlp

    def txt_mod(self, vec):
        m1, m2 = self.block.txt_mod(vec)
        return ModulationOut(*m1), ModulationOut(*m2)


def dit_info(model) -> DitInfo:
    tw = model.transformer
    return DitInfo("flux", len(tw.double_blocks), len(tw.single_blocks), model.flow_config.patch_size)


def concept_embeddings(model, names: tuple[str, ...]) -> torch.Tensor:
    """(C, W): each concept encoded alone, its first word token (``nodes/capture.concept_tokens``' rule)."""
    rows = []
    for name in names:
        context = model.encode([name])[0]                              # (1, T, W)
        rows.append(context[0, min(model.word_positions(name, name))])
    return torch.stack(rows)


def concept_streams(model, store: AttentionStore, sigma: torch.Tensor, rows: list[int]) -> list[ConceptStream]:
    """The call's concept stream over the cond ``rows`` (``nodes/dit._concept_streams`` for the twin)."""
    if not store.config.concepts:
        return []
    tw = model.transformer
    with torch.no_grad():
        vec = tw.time_in(timestep_embedding(sigma.expand(len(rows)), 256))
        vec = vec + tw.vector_in(torch.zeros(len(rows), model.flow_config.vec_in_dim, device=sigma.device))
        emb = store.config.concept_embeddings.to(sigma.device)[None].expand(len(rows), -1, -1)
        blocks = [ComfyStyleBlock(b) for b in tw.double_blocks]
        return [ConceptStream(blocks, tw.txt_in(emb), vec, rows, [store])]


def capture(stores: list[AttentionStore], info: DitInfo) -> AttentionHook:
    hook = AttentionHook(dit=info)
    for store in stores:
        hook = hook.with_install(Install(store, frozenset(info.layer_ids())))
    return hook


@torch.no_grad()
def scene_maps(model, scene, index: int, seed: int, bands: tuple[float, ...], clusters: int, threshold: float,
               cluster_seed: int) -> dict[str, torch.Tensor]:
    """Per map kind, (objects, gh, gw) maps of ``scene``'s objects (clusters: 0/1 masks)."""
    info = dit_info(model)
    grid = (model.size // info.patch,) * 2
    names = tuple(dict.fromkeys(ob.shape for ob in scene.objects)) + (BACKGROUND_CONCEPT,)
    colours = tuple(dict.fromkeys(ob.colour for ob in scene.objects)) + (BACKGROUND_CONCEPT,)
    store = AttentionStore(StoreConfig(capture_self=True, self_max_tokens=grid[0] * grid[1], concepts=names,
                                       concept_embeddings=concept_embeddings(model, names)))
    colour_store = AttentionStore(StoreConfig(capture_cross=False, capture_self=False, concepts=colours,
                                              concept_embeddings=concept_embeddings(model, colours)))
    hook = capture([store, colour_store], info)
    cond = model.encode([scene.caption])
    layout = JointLayout(txt=cond[0].shape[1], grid=grid)
    order = sorted(bands, reverse=True)
    sample_sigmas = torch.tensor(order + [0.0], device=model.device)
    x0 = scene.image[None].to(model.device) * 2 - 1
    for s in order:                                    # flow_evaluate.capture_noised's noise, per band
        g = torch.Generator().manual_seed(seed * 1000 + index * 10 + int(s * 10))
        x = (1 - s) * x0 + s * torch.randn(x0.shape, generator=g).to(model.device)
        sigma = torch.tensor([s], device=model.device)
        to = {"cond_or_uncond": [0], "sigmas": sigma, "sample_sigmas": sample_sigmas,
              **dit_options(hook, info, layout, [c for st in (store, colour_store)
                                                 for c in concept_streams(model, st, sigma, [0])])}
        model.velocity(x, sigma, cond, to)
    store.finish(), colour_store.finish()
    positions = model.object_positions(scene)
    concept_ids = [(names.index(ob.shape),) for ob in scene.objects]
    by_raw = cluster_store(store, positions, 0, clusters, threshold, grid, grid, cluster_seed)
    by_concept = cluster_store(store, concept_ids, 0, clusters, threshold, grid, grid, cluster_seed, "concept")
    return {"raw": word_maps(store, positions, None, 0, True),
            "concept": word_maps(store, concept_ids, None, 0, "concept"),
            "concept_colour": word_maps(colour_store, [(colours.index(ob.colour),) for ob in scene.objects], None,
                                        0, "concept"),
            "clusters": torch.stack([by_raw.word_mask(i) for i in range(len(positions))]),
            "clusters_concept": torch.stack([by_concept.word_mask(i) for i in range(len(positions))])}


def word_map_iou(model, scenes: int = 40, seed: int = 123, bands: tuple[float, ...] = BANDS,
                 clusters: int = 5, threshold: float = 0.3, cluster_seed: int = 1) -> dict:
    """Best-threshold mean IoU (and its threshold) of each map kind against the objects' exact masks; also split
    into one-object and several-object scenes."""
    world = ShapesWorld(seed=seed)
    curves: dict[tuple[str, str], list[torch.Tensor]] = {}
    for i in range(scenes):
        scene = world.sample(SceneSpec([(None, None)] * (1 + i % 3)))
        maps = scene_maps(model, scene, i, seed, bands, clusters, threshold, cluster_seed)
        group = "one_object" if len(scene.objects) == 1 else "several_objects"
        for kind in MAPS:
            for m, ob in zip(maps[kind], scene.objects):
                curves.setdefault((kind, group), []).append(iou_curve(m, ob.mask))
    out = {}
    for kind in MAPS:
        rep = IoUReport.from_curves([c for (k, _), cs in curves.items() if k == kind for c in cs])
        out[kind] = {"best_iou": round(rep.best_iou, 3), "threshold": round(rep.best_threshold, 2), "objects": rep.n}
        for (k, group), cs in sorted(curves.items()):
            if k == kind:
                out[kind][group] = round(IoUReport.from_curves(cs).best_iou, 3)
    return out


@torch.no_grad()
def capture_cost(model, prompts: int, steps: tuple[int, ...], cfg: float, repeats: int = 3, seed: int = 0) -> dict:
    """Median seconds of a sampling run without and with the capture (every block, cross and self views) at the
    largest step count (``repeats`` interleaved pairs, in this one process), and the store's bytes after a run of
    each step count."""
    info = dit_info(model)
    texts = [ShapesWorld(seed=seed + 1).sample(SceneSpec([(None, None)] * (1 + i % 3))).caption
             for i in range(prompts)]
    grid = (model.size // info.patch,) * 2
    store = AttentionStore(StoreConfig(capture_self=True, self_max_tokens=grid[0] * grid[1]))
    layout = JointLayout(txt=model.encode(texts[:1])[0].shape[1], grid=grid)
    extra = dit_options(capture([store], info), info, layout)

    def run(n: int, with_capture: bool) -> float:
        store.reset()
        start = time.perf_counter()
        model.generate(texts, seed=seed, steps=n, cfg=cfg, extra=extra if with_capture else None)
        store.finish()
        return time.perf_counter() - start

    out: dict = {"prompts": prompts, "cfg": cfg, "store_bytes": {}}
    run(2, True)                                        # warm-up
    for n in sorted(steps):
        run(n, True)
        out["store_bytes"][f"steps={n}"] = store.nbytes()
    n = max(steps)
    pairs = [(run(n, False), run(n, True)) for _ in range(repeats)]
    plain, captured = (statistics.median(t) for t in zip(*pairs))
    out.update(steps=n, repeats=repeats, seconds_without=round(plain, 3), seconds_with=round(captured, 3),
               ratio=round(captured / plain, 3))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__, "attention.shapesworld.flow_word_maps")
    add_weights(p)
    p.add_argument("--scenes", type=cli.int_range(1), default=40,
                   help="held-out scenes (1-3 objects each; flow_evaluate uses 40)")
    p.add_argument("--seed", type=cli.int_range(0), default=123, help="seed of the scenes and their noise")
    p.add_argument("--clusters", type=cli.int_range(1, 64), default=5,
                   help="SelfAttnCluster's KMeans cluster count (the node's default 5; at most the 64 grid tokens)")
    p.add_argument("--cluster-threshold", type=cli.float_range(0, 1), default=0.3,
                   help="SelfAttnCluster's labelling threshold in [0, 1] (the node's default 0.3)")
    p.add_argument("--prompts", type=cli.int_range(1), default=4, help="prompts of the timed sampling run")
    p.add_argument("--steps", type=cli.int_range(1, 1000), nargs=2, default=[10, 20], metavar=("A", "B"),
                   help="the two step counts of the store's memory (the larger one is timed)")
    p.add_argument("--cfg", type=cli.float_range(0, 30), default=4.0, help="CFG scale of the timed run")
    p.add_argument("--repeats", type=cli.int_range(1), default=3,
                   help="timed pairs (without, with capture), interleaved; the medians are printed")
    cli.add_threads(p, default=1)
    return p


def main(argv=None):
    args, model = open_command(build_parser(), argv, load_model)
    out = {"weights": args.weights or "shipped", "scenes": args.scenes, "seed": args.seed,
           "grid": [model.size // model.flow_config.patch_size] * 2, "bands": list(BANDS),
           "iou": word_map_iou(model, args.scenes, args.seed, clusters=args.clusters,
                               threshold=args.cluster_threshold),
           "capture_cost": capture_cost(model, args.prompts, tuple(args.steps), args.cfg, args.repeats)}
    log.info(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
