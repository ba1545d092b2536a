"""Demo section for Dynamic Prompt Learning: one distractor image, NTI against DPL, maps and a word swap.

Same code as the nodes on ShapesWorld (``attention/shapesworld/dpl.py``); the full measurement over the three
cases is ``python -m attention.shapesworld.dpl``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..render import colorize, grid, normalize, upsample
from ..shapesworld import dpl as W
from ..shapesworld.editing import edit
from ..shapesworld.harness import iou_curve, psnr
from ..shapesworld.model import ShapesWorldModel
from ..shapesworld.world import ShapesWorld
from ..store import word_maps


def _maps_row(model, store, caption, nouns, size):
    maps = [word_maps(store, [model.word_positions(caption, n)], min(store.resolutions(cross=True)))[0]
            for n in nouns]
    return colorize(normalize(upsample(torch.stack(maps), (size, size)))), maps


def dpl_section(model: ShapesWorldModel, out: Path, save, quick: bool) -> list[str]:
    steps = 20 if quick else 30
    name, objects, nouns, radius = W.CASES[0]
    sc = W._scene(ShapesWorld(seed=5), objects, radius)
    target = sc.caption.replace(sc.objects[0].shape, "triangle", 1)
    settings = dataclasses.replace(W.DPL_SH, null=dataclasses.replace(W.DPL_SH.null, epsilon=1e-5))
    rows, lines, res = [], [], {}
    region = F.max_pool2d(sc.objects[0].mask.float()[None, None], 5, 1, 2)[0, 0] > 0
    for method in ("NTI", "DPL"):
        t1 = time.perf_counter()
        if method == "DPL":
            inv, rec, counts = W.invert_dpl(model, sc.image, sc.caption, nouns, steps, settings)
        else:
            inv, rec, counts = W.invert_nti(model, sc.image, sc.caption, steps)
        secs = time.perf_counter() - t1
        store = W.reconstruction_maps(model, inv)
        pics, maps = _maps_row(model, store, sc.caption, nouns, model.size)
        ious = [float(iou_curve(m, ob.mask).max()) for m, ob in zip(maps, sc.objects)]
        conds = W.step_conds(model, inv, [target]) if method == "DPL" else None
        edited = edit(model, sc.caption, [target], inversion=inv, step_conds=conds)[1]
        rows.append(torch.cat([sc.image[None].permute(0, 2, 3, 1), pics, edited[None].permute(0, 2, 3, 1)]))
        res[method] = {"iou": sum(ious) / len(ious), "rec": psnr(rec, sc.image),
                       "null_iters": counts.get("null_iters", 0)}
        lines.append(f"| {method} | {', '.join(f'{v:.2f}' for v in ious)} | {res[method]['rec']:.2f} | "
                     f"{psnr(edited, sc.image, ~region):.2f} | {inv.unet_forward} / {inv.unet_backward} | "
                     f"{counts.get('token_updates', 0)} | {secs:.1f} |")
    save(grid(torch.cat(rows), cols=2 + len(nouns)), out / "dpl.png")
    nti, dpl = res["NTI"], res["DPL"]
    head = ["## Dynamic Prompt Learning (DPLTokenOptimizer, P2PEditSampler)", "",
            f"A same-colour distractor, `{sc.caption}`, nouns {', '.join(nouns)}, {steps} DDIM steps, guidance 7.5. "
            f"DPL: background mask from self-attention clusters (5, threshold 0.2) of the DDIM inversion, then "
            f"per-step noun tokens with the official DPL.sh recipe (null-text early stop 1e-5; it ran "
            f"{dpl['null_iters'] / steps:.1f} of {settings.null.inner_steps} null iterations per step after the "
            f"restart from the empty prompt). "
            f"Rows NTI, DPL: image, the nouns' cross-attention (coarsest maps, during the reconstruction), the P2P "
            f"swap `{sc.objects[0].shape} -> triangle` (no LocalBlend). On this image DPL's maps localize "
            f"{'better' if dpl['iou'] > nti['iou'] else 'no better'} than NTI's (mean best IoU {dpl['iou']:.2f} "
            f"against {nti['iou']:.2f}); over the six images of `python -m attention.shapesworld.dpl` they localize "
            f"worse. DPL reconstructs at {dpl['rec']:.1f} dB against NTI's {nti['rec']:.1f} dB; its null text restarts "
            f"from the empty prompt every step, as upstream, which on this model reconstructs worse than NTI's "
            f"carried-over null (the node's null_start option; docs/figures.md, docs/dpl-design.md):", "",
            "![dpl](dpl.png)", "",
            "| inversion | best IoU per noun | reconstruction PSNR dB | swap PSNR outside the object dB | "
            "UNet forward / backward | token updates | s |", "|---|---|---|---|---|---|---|"]
    return head + lines + [""]
