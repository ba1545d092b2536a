"""Quality figures of the ShapesWorld model (the gates of its issue), as one command.

    python -m attention.shapesworld.evaluate [--weights assets/shapesworld.safetensors]

Prints: colour presence and shape agreement over seeded prompts, cross-attention IoU per
resolution and timestep band on held-out generator images, leakage, and the classifier's
own held-out accuracy.
"""

from __future__ import annotations

import argparse
import json
import logging

import torch

from .. import cli
from ..cluster import cluster_store
from ..render import upsample
from ..store import AttentionStore, StoreConfig, word_maps
from .harness import IoUReport, classifier_accuracy, iou_curve, leakage, load_classifier, mask_iou, object_scores
from .model import ShapesWorldModel, patches_for
from .text import PAD
from .world import COLOURS, SHAPES, SceneSpec, ShapesWorld, caption_for

log = logging.getLogger("attention_lab.evaluate")


def prompt_set(n: int, seed: int) -> list[list[tuple[str, str]]]:
    """n seeded object lists of one or two objects of distinct colours."""
    g = torch.Generator().manual_seed(seed)
    cols = list(COLOURS)
    out = []
    for i in range(n):
        k = 1 + i % 2
        ci = torch.randperm(len(cols), generator=g)[:k].tolist()
        si = torch.randint(len(SHAPES), (k,), generator=g).tolist()
        out.append([(cols[c], SHAPES[s]) for c, s in zip(ci, si)])
    return out


def pair_prompts(n: int, seed: int) -> list[list[tuple[str, str]]]:
    """n seeded pairs of objects with distinct colours and distinct shapes (CC-500's template)."""
    g = torch.Generator().manual_seed(seed)
    cols, out = list(COLOURS), []
    for _ in range(n):
        c = torch.randperm(len(cols), generator=g)[:2].tolist()
        s = torch.randperm(len(SHAPES), generator=g)[:2].tolist()
        out.append([(cols[c[0]], SHAPES[s[0]]), (cols[c[1]], SHAPES[s[1]])])
    return out


@torch.no_grad()
def generation_quality(model: ShapesWorldModel, n: int = 50, seed: int = 0, steps: int = 20,
                       cfg: float = 5.0) -> dict:
    """Share of images showing every named colour, and of objects whose shape the classifier agrees with."""
    clf = load_classifier()
    sets = prompt_set(n, seed)
    prompts = [caption_for(objs, None) for objs in sets]
    images = []
    for i in range(0, n, 25):
        images.append(model.generate(prompts[i:i + 25], seed=seed + i, steps=steps, cfg=cfg))
    scores = object_scores(torch.cat(images).cpu(), sets, clf)
    return {"images": n, "colour_presence": scores["colour_presence"], "shape_agreement": scores["shape_agreement"],
            "objects": scores["objects"], "steps": steps, "cfg": cfg}


def capture_noised(model: ShapesWorldModel, scene, cond: torch.Tensor, t: int, store: AttentionStore,
                   seed: int) -> None:
    """One conditional denoiser call on ``scene`` noised to timestep ``t``, recorded into ``store``."""
    sigma = model.sigmas[t].view(1).to(model.device)
    g = torch.Generator().manual_seed(seed)
    x0 = scene.image[None].to(model.device) * 2 - 1
    den = model.denoiser(cond, None, 1.0, patches_for(store, self_layers=store.config.capture_self))
    den(x0 + sigma * torch.randn(x0.shape, generator=g).to(model.device), sigma)


@torch.no_grad()
def attention_localization(model: ShapesWorldModel, n: int = 40, seed: int = 123,
                           bands: tuple[int, ...] = (200, 400, 600, 800)) -> dict:
    """Cross-attention IoU of each shape word against its object's mask on held-out scenes."""
    world = ShapesWorld(seed=seed)
    curves: dict[tuple[str, int], list[torch.Tensor]] = {}   # (maps name, t) -> IoU curves
    leaks: list[dict] = []
    for i in range(n):
        scene = world.sample(SceneSpec([(None, None)] * (1 + i % 3)))
        positions = model.object_positions(scene)
        cond = model.encode([scene.caption])
        for t in bands:
            store = AttentionStore(StoreConfig(capture_self=False))
            capture_noised(model, scene, cond, t, store, seed * 1000 + i * 10 + t)
            for ob, pos in zip(scene.objects, positions):
                for size in store.resolutions():
                    wm = word_maps(store, [pos], size)[0].cpu()
                    curves.setdefault((f"{size[0]}x{size[1]}", t), []).append(iou_curve(wm, ob.mask))
                wm = word_maps(store, [pos], None)[0].cpu()
                curves.setdefault(("mean", t), []).append(iou_curve(wm, ob.mask))
                if t == bands[len(bands) // 2]:
                    others = torch.zeros_like(ob.mask)
                    for o2 in scene.objects:
                        if o2 is not ob:
                            others |= o2.mask
                    leaks.append(leakage(word_maps(store, [pos], min(store.resolutions()))[0].cpu(),
                                         ob.mask, others, scene.background_mask))
    table: dict[str, dict] = {}
    for (name, t), cs in sorted(curves.items()):
        rep = IoUReport.from_curves(cs)
        table.setdefault(name, {})[f"t={t}"] = {"best_iou": round(rep.best_iou, 3),
                                                "threshold": round(rep.best_threshold, 2)}
    for name, row in table.items():
        allc = [c for (nm, _), cs in curves.items() if nm == name for c in cs]
        row["all_bands"] = {"best_iou": round(IoUReport.from_curves(allc).best_iou, 3)}
    mean_leak = {k: round(sum(d[k] for d in leaks) / len(leaks), 3) for k in leaks[0]}
    return {"scenes": n, "iou": table, "leakage_coarsest": mean_leak}


@torch.no_grad()
def token_mass(model: ShapesWorldModel, n: int = 20, seed: int = 123,
               bands: tuple[int, ...] = (200, 400, 600, 800)) -> dict:
    """Where a pixel's cross-attention goes: the mean share of the start token, the prompt's words, the end
    token and the padding, per map size, over ``n`` held-out scenes and the timestep bands.

    SD's cross-attention sends most of it to the start token (an "attention sink"), which is what lets
    DPL's cosine losses read a noun's raw map as near zero off its object (docs/dpl-design.md)."""
    world = ShapesWorld(seed=seed)
    sums: dict[str, torch.Tensor] = {}   # "HxW" -> (4,) summed shares
    counts: dict[str, int] = {}
    for i in range(n):
        scene = world.sample(SceneSpec([(None, None)] * (1 + i % 3)))
        ids = model.tokenizer.encode_batch([scene.caption])[0]
        end = int((ids != PAD).sum()) - 1                   # index of the end token
        cond = model.encode([scene.caption])
        for t in bands:
            store = AttentionStore(StoreConfig(capture_self=False))
            capture_noised(model, scene, cond, t, store, seed * 1000 + i * 10 + t)
            for acc in store.cross.values():
                mass = (acc.total[0] / acc.count).mean(0).cpu()   # (tokens,) mean over pixels
                share = torch.stack([mass[0], mass[1:end].sum(), mass[end], mass[end + 1:].sum()])
                key = f"{acc.height}x{acc.width}"
                sums[key] = sums.get(key, 0) + share
                counts[key] = counts.get(key, 0) + 1
    names = ("start_token", "words", "end_token", "padding")
    return {"scenes": n, "bands": list(bands),
            "share": {k: {nm: round(float(v), 3) for nm, v in zip(names, sums[k] / counts[k])}
                      for k in sorted(sums)}}


@torch.no_grad()
def cluster_localization(model: ShapesWorldModel, n: int = 20, seed: int = 321, t: int = 400,
                         clusters: int = 5, threshold: float = 0.3) -> dict:
    """SelfAttnCluster's word and background masks against the ground truth (IoU) on held-out scenes."""
    world = ShapesWorld(seed=seed)
    word_ious, bg_ious = [], []
    for i in range(n):
        scene = world.sample(SceneSpec([(None, None)] * (1 + i % 3)))
        store = AttentionStore(StoreConfig(self_max_tokens=32 * 32))
        capture_noised(model, scene, model.encode([scene.caption]), t, store, seed + i)
        result = cluster_store(store, model.object_positions(scene), 0, clusters, threshold,
                               max(store.resolutions(cross=False)), min(store.resolutions()))
        size = tuple(scene.background_mask.shape)
        for j, ob in enumerate(scene.objects):
            word_ious.append(mask_iou(upsample(result.word_mask(j), size, "nearest"), ob.mask))
        bg_ious.append(mask_iou(upsample(result.background_mask(), size, "nearest"), scene.background_mask))
    return {"scenes": n, "t": t, "clusters": clusters, "threshold": threshold,
            "word_mask_iou": round(sum(word_ious) / len(word_ious), 3),
            "background_mask_iou": round(sum(bg_ious) / len(bg_ious), 3)}


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__, "attention.shapesworld.evaluate")
    cli.add_weights(p)
    p.add_argument("--prompts", type=cli.int_range(1), default=50, help="seeded prompts of the generation figures")
    p.add_argument("--prompt-seed", type=cli.int_range(0), default=0, help="seed of the prompt set and its noise")
    p.add_argument("--scenes", type=cli.int_range(1), default=40, help="held-out scenes of the localization figures")
    p.add_argument("--cluster-scenes", type=cli.int_range(1), default=20,
                   help="held-out scenes of the SelfAttnCluster figures")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = cli.load_model(p, args.weights)
    out = {"generation": generation_quality(model, args.prompts, seed=args.prompt_seed),
           "localization": attention_localization(model, args.scenes),
           "clustering": cluster_localization(model, args.cluster_scenes),
           "classifier": classifier_accuracy()}
    log.info(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
