"""Demo sections for the editing pipelines: prompt mixing (MnM), Null-Text Inversion and Prompt-to-Prompt.

Each section runs the same code as the nodes on ShapesWorld, saves PNGs into the output folder and
returns its markdown lines with the harness's figures (fewer seeds/images than the figure commands,
which print the full measurements: ``python -m attention.shapesworld.prompt_mix`` and
``python -m attention.shapesworld.editing``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..render import grid
from ..shapesworld import editing as E
from ..shapesworld.harness import psnr
from ..shapesworld.model import ShapesWorldModel
from ..shapesworld.prompt_mix import (
    PROXIES,
    SHAPESWORLD_INJECTION_END,
    SHAPESWORLD_WINDOW,
    MixSettings,
    mixing_quality,
    prompt_mix,
)


def _row(images: torch.Tensor) -> torch.Tensor:
    return grid(images.permute(0, 2, 3, 1).cpu(), cols=images.shape[0])


def mnm_section(model: ShapesWorldModel, out: Path, save, quick: bool) -> list[str]:
    res = prompt_mix(model, E.SOURCE, "circle", PROXIES, ["square"], seed=3, steps=50,
                     settings=MixSettings(window=SHAPESWORLD_WINDOW, self_injection_end=SHAPESWORLD_INJECTION_END))
    save(_row(res["images"]), out / "prompt_mixing.png")
    seeds = 2 if quick else 3
    q = mixing_quality(model, seeds, 50, window=SHAPESWORLD_WINDOW, self_injection_end=SHAPESWORLD_INJECTION_END)
    lines = ["## Prompt mixing (PromptMixSampler, SelfAttnCluster)", "",
             f"`{E.SOURCE}`, object `circle`, proxies {', '.join(PROXIES)}, preserved `square`, 50 DDIM steps, "
             f"mixing window [{SHAPESWORLD_WINDOW[0]}, {SHAPESWORLD_WINDOW[1]}) (ShapesWorld fixes a small object's "
             f"shape late; the paper's SD window [0.14, 0.34) changes no shape here), self-attention injection "
             f"through the window's end, background blend at 0.7. Original, then one variation per proxy:", "",
             "![prompt mixing](prompt_mixing.png)", "",
             f"Over {seeds} seeds x {len(PROXIES)} proxies, MnM against plain prompt switching over the same "
             f"window:", "", "| method | takes proxy shape | red object kept | centroid shift px | "
             "PSNR outside object dB | PSNR on the other object dB |", "|---|---|---|---|---|---|"]
    for name, r in q.items():
        lines.append(f"| {name} | {r['takes_proxy_shape']:.0%} | {r['red_object_kept']:.0%} | "
                     f"{r['centroid_shift_px']} | {r['psnr_outside_object_db']} | {r['psnr_other_object_db']} |")
    return lines + [""]


def p2p_section(model: ShapesWorldModel, out: Path, save, quick: bool) -> list[str]:
    steps = 20 if quick else 50
    plain = E.edit(model, E.SOURCE, [E.TARGET, E.SOURCE.replace("red", "green")], seed=5, steps=steps)
    blended = E.edit(model, E.SOURCE, [E.TARGET], seed=5, steps=steps, blend_words=["circle", "triangle"])
    weighted = E.edit(model, E.SOURCE, [E.SOURCE, E.SOURCE], seed=5, steps=steps, reweight={"square": 0.0})
    save(_row(torch.cat([plain, blended[1:], weighted[2:]])), out / "p2p_generated.png")
    first = {}  # the table's first generator image, inverted once and shown with its edit
    figs = E.reconstruction_figures(model, 2, steps, first=first)
    scene, inv, rec = first["null-text"]
    edited = E.edit(model, scene.caption, [E.TARGET], inversion=inv, blend_words=["circle", "triangle"])
    save(_row(torch.stack([scene.image, rec, edited[1]])), out / "p2p_inverted.png")
    lines = ["## Null-Text Inversion and Prompt-to-Prompt (NullTextInvert, P2PEditSampler)", "",
             f"Generated source (seed 5, {steps} DDIM steps, CFG 5), then: circle -> triangle (replace), red -> green "
             f"(replace), circle -> triangle with LocalBlend on circle/triangle, and reweight square x0:", "",
             "![p2p](p2p_generated.png)", "",
             f"A generator image (never sampled by the model), its null-text reconstruction ({steps} steps, guidance "
             f"7.5; PSNR {psnr(rec, scene.image):.2f} dB, {inv.unet_forward} UNet forward and {inv.unet_backward} "
             f"backward evaluations), and the circle -> triangle edit with LocalBlend:", "",
             "![inverted](p2p_inverted.png)", "",
             f"Reconstruction over 2 generator images at guidance 7.5 "
             f"(plain sampling costs {figs.pop('plain_sampling_unet_forward_per_image')} UNet evaluations):", "",
             "| inversion | mean PSNR dB | min PSNR dB | UNet forward / image | backward / image | s / image |",
             "|---|---|---|---|---|---|"]
    for mode, r in figs.items():
        lines.append(f"| {mode} | {r['psnr_db']} | {r['min_psnr_db']} | {r['unet_forward_per_image']:.0f} | "
                     f"{r['unet_backward_per_image']:.0f} | {r['seconds_per_image']} |")
    mass = E.reweight_figures(model, factors=(0.0, 1.0, 2.0, 4.0), seeds=1, steps=steps)
    lines += ["", f"Reweight: mean attention mass on `red` in the edited row by factor: {json.dumps(mass)}", ""]
    return lines
