"""Demo sections for text to image and attention capture (AttentionCapture, AttentionMapView, SelfAttnCluster).

The capture goes through the same controllers the ComfyUI nodes install; the figures of the quality
harness over many scenes are ``python -m attention.shapesworld.evaluate`` (and the demo's last section).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..cluster import cluster_colours, cluster_store
from ..render import colorize, grid, masks_from_maps, normalize, overlay, upsample
from ..shapesworld.harness import colour_blobs, iou_curve, mask_iou
from ..shapesworld.model import ShapesWorldModel, patches_for
from ..shapesworld.world import COLOURS
from ..store import AttentionStore, StoreConfig, word_maps

SAMPLE_PROMPTS = [
    "a red circle and a blue square on a gray background", "a green star on a black background",
    "a yellow triangle and a purple cross", "an orange diamond on a white background",
    "a cyan circle, a red star and a blue triangle", "a purple square and a green circle",
    "a blue cross on a white background", "a yellow star and an orange circle on a black background",
]
CAPTURE_WORDS = ["circle", "square", "background"]


def samples_section(model: ShapesWorldModel, out: Path, save, quick: bool) -> list[str]:
    t = time.perf_counter()
    imgs = model.generate(SAMPLE_PROMPTS, seed=7, steps=20, cfg=5.0).cpu()
    secs = time.perf_counter() - t
    save(grid(imgs.permute(0, 2, 3, 1), cols=4), out / "samples.png")
    return ["## Text to image", "", f"{len(SAMPLE_PROMPTS)} prompts, 20 Euler steps, CFG 5: {secs:.2f} s for the "
            f"batch ({secs / len(SAMPLE_PROMPTS):.3f} s per image).", "", "![samples](samples.png)", "",
            *[f"{i + 1}. {p}" for i, p in enumerate(SAMPLE_PROMPTS)], ""]


def capture_section(model: ShapesWorldModel, out: Path, save, quick: bool) -> list[str]:
    prompt, words, seed = SAMPLE_PROMPTS[0], CAPTURE_WORDS, 7
    store = AttentionStore(StoreConfig(self_max_tokens=32 * 32))
    image = model.generate([prompt], seed=seed, steps=20, cfg=5.0, patches=patches_for(store))[0].cpu()
    positions = [model.word_positions(prompt, w) for w in words]
    sizes = store.resolutions()
    hw = tuple(image.shape[1:])
    rows = []
    for size in sizes + [None]:
        maps = normalize(upsample(word_maps(store, positions, size), hw))
        rows.append(colorize(maps))
    heat = grid(torch.cat([r[None] for r in rows]).transpose(0, 1).reshape(-1, *hw, 3), cols=len(sizes) + 1)
    save(heat, out / "attention_maps.png")
    mean = normalize(upsample(word_maps(store, positions, None), hw))
    over = overlay(image.permute(1, 2, 0).expand(len(words), *hw, 3), mean)
    save(grid(torch.cat([image.permute(1, 2, 0)[None], over]), cols=len(words) + 1), out / "overlays.png")
    masks = masks_from_maps(mean, 0.5)
    save(grid(masks[..., None].expand(-1, -1, -1, 3), cols=len(words)), out / "masks.png")
    lines = ["## Attention capture (AttentionCapture + AttentionMapView)", "",
             f"Prompt: `{prompt}` (seed {seed}); heatmap columns: {', '.join('%dx%d' % s for s in sizes)}, mean; "
             f"rows: {', '.join(words)}. Then the image and each word's mean map over it, and each word's mask "
             f"(mean map >= 0.5, AttentionMapView's MASK output).", "",
             "![maps](attention_maps.png)", "", "![overlays](overlays.png) ![masks](masks.png)", "",
             "| word | IoU of its 0.5-mask with the object's colour blob in the generated image |", "|---|---|"]
    word_colour = {w: next((c for c in COLOURS if f"{c} {w}" in prompt), None) for w in words}
    for w, m in zip(words, mean):
        blobs = colour_blobs(image, word_colour[w]) if word_colour[w] else []
        iou = f"{float(iou_curve(m, blobs[0])[10]):.2f}" if blobs else "n/a (no blob)"
        lines.append(f"| {w} | {iou} |")
    # SelfAttnCluster on the same capture: KMeans over self-attention, labelled by cross-attention
    s_size = max(store.resolutions(cross=False))
    result = cluster_store(store, positions[:2], 0, 4, 0.3, s_size, min(sizes), seed=1)
    word_masks = torch.stack([result.word_mask(i) for i in range(2)] + [result.background_mask()])
    up = upsample(word_masks, hw, "nearest")
    pic_up = upsample(cluster_colours(result.labels).permute(2, 0, 1), hw, "nearest")
    save(grid(torch.cat([pic_up.permute(1, 2, 0)[None], up[..., None].expand(-1, -1, -1, 3)]), cols=4),
         out / "clusters.png")
    lines += ["", f"SelfAttnCluster ({s_size[0]}x{s_size[1]} self-attention, 4 clusters, threshold 0.3): clusters, "
              f"then the masks of {words[0]}, {words[1]} and the background.", "", "![clusters](clusters.png)", ""]
    for i, w in enumerate(words[:2]):
        blobs = colour_blobs(image, word_colour[w])
        if blobs:
            lines.append(f"* {w}: IoU of the cluster mask with the {word_colour[w]} blob "
                         f"{mask_iou(up[i], blobs[0]):.2f}")
    return lines + [""]
