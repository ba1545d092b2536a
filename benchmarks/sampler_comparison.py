"""Benchmark: P2P and prompt mixing with ComfyUI's samplers against our DDIM, on ShapesWorld inside ComfyUI.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/sampler_comparison.py [--images 8 --seeds 3]

Runs the real nodes (P2PEditSampler, PromptMixSampler) on the embedded ShapesWorld model, once with
no sampler (our DDIM loop, 50 steps, 'simple' schedule) and once per SAMPLER/SIGMAS pair as a graph
wires them (KSamplerSelect + BasicScheduler): euler and uni_pc on the 'simple' schedule, dpmpp_2m on
'karras', each at 20 and 50 steps. It lives here rather than in ``attention/shapesworld`` because the
samplers are ComfyUI's own (attention/ imports nothing from ComfyUI); the scoring is the figure
commands' (``attention/shapesworld/editing.py`` swap figures, ``prompt_mix.py`` mixing quality):

* P2P, circle -> triangle on generated sources (seeds 0..images-1, guidance 7.5): share of edits whose
  red object the classifier calls a triangle, PSNR (dB) outside the object (source and edited red
  blobs, dilated 3x3) with and without LocalBlend ('circle, triangle');
* MnM, circle -> triangle/star/diamond/cross with 'square' preserved (seeds 0..seeds-1, guidance 5,
  ShapesWorld settings: window [0.34, 1), injection to 1, blend at 0.7): share of variations taking
  the proxy's shape, PSNR outside the object (original and variation red blobs, dilated, less the
  other object);
* seconds per node run (wall time on this machine; compare rows of one run only).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from comfy_env import comfy_or_skip, encode  # noqa: E402

SOURCE = "a red circle and a blue square on a gray background"
TARGET = "a red triangle and a blue square on a gray background"
PROXIES = ["triangle", "star", "diamond", "cross"]
CONFIGS = [("euler", "euler", "simple", 20), ("dpmpp_2m karras", "dpmpp_2m", "karras", 20),
           ("uni_pc", "uni_pc", "simple", 20), ("ddim (ours)", None, None, 50), ("euler", "euler", "simple", 50),
           ("dpmpp_2m karras", "dpmpp_2m", "karras", 50), ("uni_pc", "uni_pc", "simple", 50)]


def images(latents: torch.Tensor) -> torch.Tensor:
    return ((latents + 1) / 2).clamp(0, 1)


def dilate(mask: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.max_pool2d(mask.float()[None, None], 3, 1, 1)[0, 0] > 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=8, help="P2P sources (seeds) per configuration")
    p.add_argument("--seeds", type=int, default=3, help="MnM seeds per configuration (x4 proxies)")
    p.add_argument("--only", default="", help="comma-separated sampler names to run (default: all)")
    p.add_argument("--steps", default="", help="comma-separated step counts to run (default: all)")
    p.add_argument("--skip-mnm", action="store_true")
    p.add_argument("--skip-p2p", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    args = p.parse_args(argv)
    comfy_or_skip()
    if args.threads:
        torch.set_num_threads(args.threads)
    from attention_lab.attention.shapesworld.harness import colour_blobs, load_classifier, psnr
    from attention_lab.nodes.p2p import P2PEditSampler
    from attention_lab.nodes.prompt_mix import PromptMixSampler
    from attention_lab.nodes.shapesworld import load_shapesworld
    from comfy_extras.nodes_custom_sampler import BasicScheduler, KSamplerSelect

    model, clip, _ = load_shapesworld()
    clf = load_classifier()
    latent = {"samples": torch.zeros(1, 3, 32, 32)}
    negative = encode(clip, "")
    only = {s.strip() for s in args.only.split(",") if s.strip()}

    def shape_of(img, blob):
        return clf.predict(img[None], blob[None])[0][0]

    for label, name, scheduler, steps in CONFIGS:
        if (only and (name or "ddim") not in only) or (args.steps and str(steps) not in args.steps.split(",")):
            continue
        with torch.inference_mode():
            smp = KSamplerSelect.execute(name).result[0] if name else None
            sig = BasicScheduler.execute(model, scheduler, steps, 1.0).result[0] if name else None
        row = {"sampler": label, "steps": steps}
        for blend in ("", "circle, triangle") if not args.skip_p2p else ():
            hits, outside, t0 = 0, [], time.perf_counter()
            for seed in range(args.images):
                with torch.inference_mode():
                    out = P2PEditSampler.execute(
                        model, clip, SOURCE, TARGET, negative, latent, edit="auto", seed=seed, steps=steps, cfg=7.5,
                        scheduler="simple", cross_replace_steps=0.8, cross_replace_words="", self_replace_steps=0.4,
                        reweight="", blend_words=blend, blend_threshold=0.3, blend_start=0.2, sampler=smp,
                        sigmas=sig).result[0]["samples"]
                src, edited = images(out)
                src_blobs, blobs = colour_blobs(src, "red"), colour_blobs(edited, "red")
                hits += bool(blobs) and shape_of(edited, blobs[0]) == "triangle"
                region = torch.zeros(src.shape[1:], dtype=torch.bool)
                for b in src_blobs[:1] + blobs[:1]:
                    region |= b
                outside.append(psnr(edited, src, ~dilate(region)))
            tag = "with LocalBlend" if blend else "without LocalBlend"
            row[f"p2p takes triangle, {tag}"] = round(hits / args.images, 3)
            row[f"p2p PSNR outside dB, {tag}"] = round(sum(outside) / len(outside), 2)
            row[f"p2p s/edit, {tag}"] = round((time.perf_counter() - t0) / args.images, 2)
        if not args.skip_mnm:
            hits, outside, n, t0 = 0, [], 0, time.perf_counter()
            for seed in range(args.seeds):
                with torch.inference_mode():
                    out = PromptMixSampler.execute(
                        model, clip, SOURCE, negative, latent, "circle", ", ".join(PROXIES), suggestions=4,
                        preserve_words="square", seed=seed, steps=steps, cfg=5.0, scheduler="simple", mix_start=0.34,
                        mix_end=1.0, self_injection_end=1.0, injection_threshold=0.05, blend_at=0.7, clusters=5,
                        cluster_threshold=0.3, sampler=smp, sigmas=sig).result[0]["samples"]
                imgs = images(out)
                orig = imgs[0]
                orig_blob = colour_blobs(orig, "red")
                other = colour_blobs(orig, "blue")
                other = dilate(other[0]) if other else torch.zeros(orig.shape[1:], dtype=torch.bool)
                for j, proxy in enumerate(PROXIES):
                    img = imgs[1 + j]
                    n += 1
                    blobs = colour_blobs(img, "red")
                    hits += bool(blobs) and shape_of(img, blobs[0]) == proxy
                    region = torch.zeros(orig.shape[1:], dtype=torch.bool)
                    for b in orig_blob[:1] + blobs[:1]:
                        region |= b
                    outside.append(psnr(img, orig, ~(dilate(region) & ~other)))
            row["mnm takes proxy shape"] = round(hits / n, 3)
            row["mnm PSNR outside dB"] = round(sum(outside) / n, 2)
            row["mnm s/run (original + 4 variations)"] = round((time.perf_counter() - t0) / args.seeds, 2)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
