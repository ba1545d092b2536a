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

from ..store import AttentionStore, StoreConfig, word_maps
from ..tokens import find_word_tokens
from .harness import IoUReport, classifier_accuracy, colour_blobs, iou_curve, leakage, load_classifier
from .model import DEFAULT_WEIGHTS, ShapesWorldModel, patches_for
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
    images = torch.cat(images).cpu()
    colour_ok, shape_hits, shape_total = 0, 0, 0
    for img, objs in zip(images, sets):
        found = {c: colour_blobs(img, c) for c, _ in objs}
        colour_ok += all(found[c] for c, _ in objs)
        for c, s in objs:
            shape_total += 1
            if found[c]:
                pred_shape, _ = clf.predict(img[None], found[c][0][None])
                shape_hits += pred_shape[0] == s
    return {"images": n, "colour_presence": colour_ok / n, "shape_agreement": shape_hits / shape_total,
            "objects": shape_total, "steps": steps, "cfg": cfg}


@torch.no_grad()
def attention_localization(model: ShapesWorldModel, n: int = 40, seed: int = 123,
                           bands: tuple[int, ...] = (200, 400, 600, 800)) -> dict:
    """Cross-attention IoU of each shape word against its object's mask on held-out scenes."""
    world = ShapesWorld(seed=seed)
    curves: dict[tuple[tuple[int, int] | str, int], list[torch.Tensor]] = {}
    leaks: list[dict] = []
    for i in range(n):
        k = 1 + i % 3
        scene = world.sample(SceneSpec([(None, None)] * k))
        tok_chunks = [[t for t, _ in c] for c in model.tokenizer.chunks(scene.caption)]
        cond = model.encode([scene.caption])
        x0 = scene.image[None].to(model.device) * 2 - 1
        for t in bands:
            store = AttentionStore(StoreConfig(capture_self=False))
            sigma = model.sigmas[t].view(1).to(model.device)
            g = torch.Generator().manual_seed(seed * 1000 + i * 10 + t)
            x = x0 + sigma * torch.randn(x0.shape, generator=g).to(model.device)
            den = model.denoiser(cond, None, 1.0, patches_for(store, self_layers=False))
            den(x, sigma)
            seen: dict[str, int] = {}
            for ob in scene.objects:
                occ = seen.get(ob.shape, 0)
                seen[ob.shape] = occ + 1
                pos = find_word_tokens(tok_chunks, model.tokenizer.word_ids(ob.shape), ob.shape,
                                       scene.caption, occurrence=occ).positions
                others = torch.zeros_like(ob.mask)
                for o2 in scene.objects:
                    if o2 is not ob:
                        others |= o2.mask
                for size in store.resolutions():
                    wm = word_maps(store, [pos], size)[0].cpu()
                    curves.setdefault((size, t), []).append(iou_curve(wm, ob.mask))
                wm = word_maps(store, [pos], None)[0].cpu()
                curves.setdefault(("mean", t), []).append(iou_curve(wm, ob.mask))
                if t == bands[len(bands) // 2]:
                    leaks.append(leakage(word_maps(store, [pos], min(store.resolutions()))[0].cpu(),
                                         ob.mask, others, scene.background_mask))
    table = {}
    for (size, t), cs in sorted(curves.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        name = size if isinstance(size, str) else f"{size[0]}x{size[1]}"
        rep = IoUReport.from_curves(cs)
        table.setdefault(name, {})[f"t={t}"] = {"best_iou": round(rep.best_iou, 3),
                                                "threshold": round(rep.best_threshold, 2)}
    for name, row in table.items():
        allc = [c for (size, _), cs in curves.items() for c in cs
                if (size if isinstance(size, str) else f"{size[0]}x{size[1]}") == name]
        row["all_bands"] = {"best_iou": round(IoUReport.from_curves(allc).best_iou, 3)}
    mean_leak = {k: round(sum(d[k] for d in leaks) / len(leaks), 3) for k in leaks[0]}
    return {"scenes": n, "iou": table, "leakage_coarsest": mean_leak}


@torch.no_grad()
def cluster_localization(model: ShapesWorldModel, n: int = 20, seed: int = 321, t: int = 400,
                         clusters: int = 5, threshold: float = 0.3) -> dict:
    """SelfAttnCluster's word and background masks against the ground truth (IoU) on held-out scenes."""
    from ..cluster import cluster_self_attention, label_clusters
    world = ShapesWorld(seed=seed)
    word_ious, bg_ious = [], []
    for i in range(n):
        scene = world.sample(SceneSpec([(None, None)] * (1 + i % 3)))
        chunks = [[tk for tk, _ in c] for c in model.tokenizer.chunks(scene.caption)]
        store = AttentionStore(StoreConfig(self_max_tokens=32 * 32))
        sigma = model.sigmas[t].view(1).to(model.device)
        g = torch.Generator().manual_seed(seed + i)
        x0 = scene.image[None].to(model.device) * 2 - 1
        model.denoiser(model.encode([scene.caption]), None, 1.0, patches_for(store))(
            x0 + sigma * torch.randn(x0.shape, generator=g).to(model.device), sigma)
        seen: dict[str, int] = {}
        positions = []
        for ob in scene.objects:
            occ = seen.get(ob.shape, 0)
            seen[ob.shape] = occ + 1
            positions.append(find_word_tokens(chunks, model.tokenizer.word_ids(ob.shape), ob.shape, scene.caption,
                                              occurrence=occ).positions)
        s_size = max(store.resolutions(cross=False))
        k = s_size[0] * s_size[1]
        labels = cluster_self_attention(store.aggregate(s_size, cross=False)[0].reshape(k, k), clusters)
        result = label_clusters(labels, word_maps(store, positions, min(store.resolutions())).cpu(), threshold)
        size = tuple(scene.background_mask.shape)

        def up(m, size=size):
            return torch.nn.functional.interpolate(m[None, None], size=size, mode="nearest")[0, 0].bool()

        def iou(a, b):
            return (a & b).sum().item() / max((a | b).sum().item(), 1)
        for j, ob in enumerate(scene.objects):
            word_ious.append(iou(up(result.word_mask(j)), ob.mask))
        bg_ious.append(iou(up(result.background_mask()), scene.background_mask))
    return {"scenes": n, "t": t, "clusters": clusters, "threshold": threshold,
            "word_mask_iou": round(sum(word_ious) / len(word_ious), 3),
            "background_mask_iou": round(sum(bg_ious) / len(bg_ious), 3)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    p.add_argument("--prompts", type=int, default=50)
    p.add_argument("--scenes", type=int, default=40)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = ShapesWorldModel(args.weights)
    out = {"generation": generation_quality(model, args.prompts),
           "localization": attention_localization(model, args.scenes),
           "clustering": cluster_localization(model),
           "classifier": classifier_accuracy()}
    log.info(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
