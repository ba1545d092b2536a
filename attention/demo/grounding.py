"""Demo section for grounded generation (Li et al. 2023): the embedded grounding head segments the words of new
generations, seen and unseen shapes, and the quick seen/unseen figure.

Same core as the nodes (``attention/grounding.py``, features through ``attention/grounding_features.py``) via
``attention/shapesworld/grounding*.py``; the full three-split figure with ablations is
``python -m attention.shapesworld.grounding``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..render import grid, overlay
from ..shapesworld.grounding import figure, render
from ..shapesworld.grounding_asset import HEAD_ASSET, load_asset
from ..shapesworld.grounding_data import Example, batch_of, build_pool, template_vectors
from ..shapesworld.harness import colour_blobs, mask_iou
from ..shapesworld.model import ShapesWorldModel
from ..shapesworld.world import caption_for

OBJECTS = [[("red", "circle"), ("blue", "star")], [("green", "diamond"), ("yellow", "square")],
           [("purple", "triangle"), ("orange", "cross")], [("cyan", "star"), ("red", "diamond")]]


def grounding_section(model: ShapesWorldModel, out: Path, save, quick: bool) -> list[str]:
    t = time.perf_counter()
    head, meta = load_asset()
    prompts = [caption_for(objs, None) for objs in OBJECTS]
    images = model.generate(prompts, seed=11, steps=20, cfg=5.0).cpu()
    items = []
    for img, cap, objs in zip(images, prompts, OBJECTS):
        blobs = [(colour_blobs(img, c) or [torch.zeros(img.shape[1:], dtype=torch.bool)])[0] for c, _ in objs]
        m = torch.stack(blobs)
        items.append((img, Example(cap, objs, m, m.flatten(1).any(1), m)))
    pool = build_pool(model, items, t=meta.timestep, seed=5)
    batch = batch_of(pool, list(range(len(items))), meta.query, template_vectors(model, meta.template))
    probs, masks = head.segment(batch.levels, batch.queries, batch.valid, tuple(images.shape[-2:]))
    hw = tuple(images.shape[-2:])
    tiles, rows = [], []
    for b, (img, objs) in enumerate(zip(images, OBJECTS)):
        pic = img.permute(1, 2, 0)
        tiles.append(pic)
        for n, (_colour, shape) in enumerate(objs):
            tiles.append(overlay(pic[None], probs[b, n][None].float())[0])
            tiles.append(masks[b, n].float()[..., None].expand(*hw, 3))
            blob = items[b][1].masks[n]
            iou = f"{mask_iou(masks[b, n], blob):.2f}" if bool(blob.any()) else "n/a (no blob)"
            status = "seen" if shape in meta.seen_words else "**unseen**"
            rows.append(f"| {prompts[b]} | {shape} ({status}) | {iou} |")
    save(grid(torch.stack(tiles), cols=5), out / "grounding.png")
    seg_s = time.perf_counter() - t
    n = (96, 0, 24, 12) if quick else None
    table = render([figure(model, quick=True, sizes=n, steps=200 if quick else None)])
    return ["## Grounded generation (grounding head on UNet features)", "",
            f"The embedded head (`{HEAD_ASSET.name}`: seen words {', '.join(meta.seen_words)}; {meta.query} "
            f"queries; features of every UNet block at t = {meta.timestep}, uncond ‖ cond) segments the shape words "
            "of four new generations (20 steps, CFG 5, seed 11). Columns: image, then per word the sigmoid "
            "probability over the image and the mask (> 0.5).", "", "![grounding](grounding.png)", "",
            "| prompt | word | IoU of the mask with the named colour's largest blob |", "|---|---|---|", *rows, "",
            f"Segmenting these four images (generation, features, head): {seg_s:.1f} s.", "",
            "Quick seen/unseen figure (train heads on seen shapes, test on all; the three-split figure with "
            "pseudo-labels, ablations and self-training is `python -m attention.shapesworld.grounding`):", "",
            *table, f"Section time {time.perf_counter() - t:.1f} s.", ""]
