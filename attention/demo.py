"""The Attention Lab demo: every pipeline of the pack on ShapesWorld, on a CPU.

    python -m attention.demo --out demo_output

Writes PNGs and ``report.md`` with the quality harness's figures. Pipelines so far:
text-to-image with the embedded model, attention capture (per-word maps, overlays,
masks) through the same controllers the ComfyUI nodes install, SelfAttnCluster's
self-attention clustering on the same capture, prompt mixing (MnM), Null-Text Inversion
and Prompt-to-Prompt editing (``demo_editing.py``), Dynamic Prompt Learning (``demo_dpl.py``),
StructureDiffusion (``demo_structure.py``) and training-free SpaText (``demo_spatext.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from PIL import Image

from .cluster import cluster_colours, cluster_store
from .demo_dpl import dpl_section
from .demo_editing import mnm_section, p2p_section
from .demo_spatext import spatext_section
from .demo_structure import structure_section
from .render import colorize, grid, masks_from_maps, normalize, overlay, upsample
from .shapesworld.evaluate import attention_localization, cluster_localization, generation_quality
from .shapesworld.harness import classifier_accuracy, colour_blobs, iou_curve, mask_iou
from .shapesworld.model import DEFAULT_WEIGHTS, ShapesWorldModel, patches_for
from .shapesworld.world import COLOURS
from .store import AttentionStore, StoreConfig, word_maps

log = logging.getLogger("attention_lab.demo")

SAMPLE_PROMPTS = [
    "a red circle and a blue square on a gray background", "a green star on a black background",
    "a yellow triangle and a purple cross", "an orange diamond on a white background",
    "a cyan circle, a red star and a blue triangle", "a purple square and a green circle",
    "a blue cross on a white background", "a yellow star and an orange circle on a black background",
]


def save(images: torch.Tensor, path: Path, scale: int = 4) -> None:
    """(H, W, 3) or (1, H, W, 3) in [0, 1] -> PNG, nearest-upscaled."""
    img = images[0] if images.dim() == 4 else images
    pil = Image.fromarray((img.clamp(0, 1) * 255).round().byte().cpu().numpy())
    pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST).save(path)


def capture_demo(model: ShapesWorldModel, out: Path, prompt: str, words: list[str], seed: int) -> list[str]:
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
    lines = [f"Prompt: `{prompt}` (seed {seed}); columns: {', '.join('%dx%d' % s for s in sizes)}, mean; "
             f"rows: {', '.join(words)}.", "", "![maps](attention_maps.png) ![overlays](overlays.png)", "",
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
              f"then the masks of {words[0]}, {words[1]} and the background.", "", "![clusters](clusters.png)"]
    for i, w in enumerate(words[:2]):
        blobs = colour_blobs(image, word_colour[w])
        if blobs:
            lines.append(f"* {w}: IoU of the cluster mask with the {word_colour[w]} blob "
                         f"{mask_iou(up[i], blobs[0]):.2f}")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_output")
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS))
    p.add_argument("--quick", action="store_true", help="fewer prompts and scenes for the figures")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = ShapesWorldModel(args.weights)
    report = ["# Attention Lab demo (ShapesWorld)", "",
              f"Model: `{Path(args.weights).name}`, training {json.dumps(model.training)}", ""]

    t = time.perf_counter()
    imgs = model.generate(SAMPLE_PROMPTS, seed=7, steps=20, cfg=5.0).cpu()
    gen_s = time.perf_counter() - t
    save(grid(imgs.permute(0, 2, 3, 1), cols=4), out / "samples.png")
    report += ["## Text to image", "", f"{len(SAMPLE_PROMPTS)} prompts, 20 Euler steps, CFG 5: "
               f"{gen_s:.2f} s for the batch ({gen_s / len(SAMPLE_PROMPTS):.3f} s per image).", "",
               "![samples](samples.png)", ""] + [f"{i + 1}. {p_}" for i, p_ in enumerate(SAMPLE_PROMPTS)] + [""]
    log.info("text to image: %.2f s", gen_s)

    report += ["## Attention capture (AttentionCapture + AttentionMapView)", ""]
    report += capture_demo(model, out, SAMPLE_PROMPTS[0], ["circle", "square", "background"], seed=7) + [""]
    log.info("capture done")

    report += mnm_section(model, out, save, args.quick)
    log.info("prompt mixing done")
    report += p2p_section(model, out, save, args.quick)
    log.info("inversion and prompt-to-prompt done")
    report += dpl_section(model, out, save, args.quick)
    log.info("dynamic prompt learning done")
    report += structure_section(model, out, save, args.quick)
    log.info("structure diffusion done")
    report += spatext_section(model, out, save, args.quick)
    log.info("spatext done")

    n_prompts, n_scenes = (20, 12) if args.quick else (50, 40)
    gq = generation_quality(model, n_prompts)
    loc = attention_localization(model, n_scenes)
    report += ["## Quality harness", "",
               f"* Named colours present in {gq['colour_presence']:.0%} of {gq['images']} images (gate 90%); "
               f"classifier agrees with the named shape for {gq['shape_agreement']:.0%} of {gq['objects']} objects "
               f"(gate 70%).",
               f"* Region classifier held-out accuracy: {json.dumps(classifier_accuracy())}.",
               f"* Cross-attention localization on {loc['scenes']} held-out scenes, best-threshold mean IoU "
               f"(shape word vs object mask):", "", "| maps | " + " | ".join(next(iter(loc['iou'].values()))) + " |",
               "|---" * (1 + len(next(iter(loc['iou'].values())))) + "|"]
    for name, row in loc["iou"].items():
        report.append(f"| {name} | " + " | ".join(f"{v['best_iou']:.3f}" for v in row.values()) + " |")
    cl = cluster_localization(model, 10 if args.quick else 20)
    report += ["", f"* SelfAttnCluster masks against the ground truth on {cl['scenes']} held-out scenes (noised to "
               f"t={cl['t']}, {cl['clusters']} clusters, threshold {cl['threshold']}): mean IoU "
               f"{cl['word_mask_iou']:.3f} for the shape words' masks, {cl['background_mask_iou']:.3f} for the "
               f"background mask."]
    report += ["", f"* Leakage at the coarsest resolution (share of the shape word's attention mass): "
               f"{json.dumps(loc['leakage_coarsest'])}", ""]
    report += [f"Demo wall time: {time.perf_counter() - t0:.1f} s."]
    (out / "report.md").write_text("\n".join(report) + "\n")
    (out / "figures.json").write_text(json.dumps({"generation": gq, "localization": loc, "clustering": cl}, indent=1))
    log.info("wrote %s in %.1f s", out / "report.md", time.perf_counter() - t0)


if __name__ == "__main__":
    main()
