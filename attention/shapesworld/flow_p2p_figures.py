"""Prompt-to-Prompt on ShapesWorld-Flow (DiT joint attention): a colour swap from a seed and from a
rectified-flow inversion, with and without LocalBlend, both joint-row modes, and the cost of an edit.

    python -m attention.shapesworld.flow_p2p_figures [--images 8] [--steps 20] [--cfg 4] [--inversion-steps 16]
                                                     [--inversion-cfg 1]

A colour swap (red circle -> green circle, and -> yellow as the second target), not a shape swap: ShapesWorld-Flow
draws the named colour 100 % of the time but the named shape only 24 % (docs/shapesworld-flow.md), so a shape swap
would measure the model, not the edit. Same code as the node: ``attention/p2p.py`` (plan, LocalBlend, the batch
sampler), ``attention/p2p_joint.py`` (the joint-attention controller) through the pack's attention hook on the
pure-torch twin (``joint.dit_options``: the override and a block proxy per block, as ComfyUI's Flux runs it), CFG
batched as ComfyUI batches it (``ShapesWorldFlowModel.denoiser``). Inversions: ``rf_inversion.rf_invert`` with the
same guidance, retraced with the same solver (``p2p_sample(solver=...)``), as NullTextInvert + P2PEditSampler do.

Printed per setting: edits, the share whose edited object takes the new colour (its largest blob of that colour
overlaps the source object by half or more), PSNR (dB, [0, 1] pixels) outside the object (source object and
the edit's blob, dilated by one pixel) against the source row (seed) or the real image (inversion). Cost: median
seconds of [source + 2 targets] edited vs the same 3-row batch sampled plainly (no hook), interleaved, one run;
the bytes LocalBlend's store holds after a run of half and of all the steps (no per-step cache).
"""

from __future__ import annotations

import json
import statistics
import time

import torch
import torch.nn.functional as F

from .. import cli
from ..hook import AttentionHook, Install
from ..joint import JointLayout, dit_options
from ..p2p import LocalBlend, blend_positions, build_plan, p2p_sample
from ..p2p_joint import JOINT_ROWS, JointP2PController
from ..rf_inversion import rf_invert, velocity_from_denoiser
from ..store import AttentionStore, StoreConfig
from .flow_evaluate import add_weights, load_model
from .flow_word_maps import dit_info
from .harness import colour_blobs, psnr
from .rf_inversion_figures import scenes, table_sigma_min

SOURCE = "a red circle and a blue square on a gray background"
TARGETS = ["a green circle and a blue square on a gray background",
           "a yellow circle and a blue square on a gray background"]
NEW = ["green", "yellow"]


def editor(model, targets: list[str], steps: int, rows: str, blend: bool, cross: float = 0.8,
           self_steps: float = 0.4):
    """(transformer_options for the twin's calls, LocalBlend or None) of an edit of SOURCE into ``targets``."""
    info = dit_info(model)
    grid = (model.size // info.patch,) * 2
    prompts = [SOURCE] + targets
    length = model.encode(prompts[:1])[0].shape[1]
    plan = build_plan(SOURCE, targets, "auto", steps, cross, {}, self_steps, {}, length, grid[0] * grid[1],
                      model.prompt_words)
    hook = AttentionHook(dit=info).with_install(Install(JointP2PController(plan, steps, rows),
                                                        frozenset(info.layer_ids())))
    lb = None
    if blend:
        store = AttentionStore(StoreConfig(capture_self=False))
        hook = hook.with_install(Install(store, frozenset(info.layer_ids()), self_attn=False, cross_attn=True))
        words = blend_positions(prompts, ["red"] + NEW[:len(targets)], model.prompt_words)
        lb = LocalBlend(store, words, grid, 0.3, int(0.2 * steps))
    return dit_options(hook, info, JointLayout(txt=length, grid=grid)), lb


@torch.no_grad()
def edit(model, x_T: torch.Tensor, sigmas: torch.Tensor, cfg: float, targets: list[str], rows: str = "renormalize",
         blend: bool = False, solver: str = "euler", hooked: bool = True, keep: dict | None = None) -> torch.Tensor:
    """[source, targets] (1+k, 3, S, S) in [0, 1] from x_T (1, 3, S, S); ``hooked`` False: plain sampling of the
    same batch (no controller), for the cost; ``keep`` receives the LocalBlend ("blend")."""
    prompts = [SOURCE] + targets
    steps = len(sigmas) - 1
    extra, lb = editor(model, targets, steps, rows, blend) if hooked else (None, None)
    if keep is not None:
        keep["blend"] = lb
    cond, uncond = model.encode(prompts), model.encode([""] * len(prompts))
    den = model.denoiser(cond, uncond, cfg, extra, sigmas)

    def guide(x, sigma, c, u):
        s = sigma.reshape(-1)[:1].expand(x.shape[0])
        return (x - den(x, s)) / s.view(-1, 1, 1, 1)
    x = p2p_sample(None, x_T, sigmas, cond[0], None, cfg, lb, guide=guide, solver=solver)
    return ((x + 1) / 2).clamp(0, 1)


class Scores:
    def __init__(self):
        self.rows: dict[str, dict] = {}

    def add(self, name: str, source_img: torch.Tensor, obj: torch.Tensor, edited: torch.Tensor, colour: str):
        r = self.rows.setdefault(name, {"n": 0, "hit": 0, "psnr": []})
        r["n"] += 1
        blobs = colour_blobs(edited, colour)
        blob = blobs[0] if blobs else torch.zeros_like(obj)
        r["hit"] += bool(blobs) and float((blob & obj).sum()) >= 0.5 * float(blob.sum())
        region = F.max_pool2d((obj | blob).float()[None, None], 3, 1, 1)[0, 0] > 0
        r["psnr"].append(psnr(edited, source_img, ~region))

    def table(self) -> dict:
        return {k: {"edits": r["n"], "takes_new_colour": round(r["hit"] / r["n"], 3),
                    "psnr_outside_object_db": round(sum(r["psnr"]) / r["n"], 2)} for k, r in self.rows.items()}


def from_seed(model, images: int, steps: int, cfg: float) -> dict:
    sc, sigmas = Scores(), model.sigmas(steps)
    for i in range(images):
        x_T = model.noise(1, i) * sigmas[0]
        for rows in JOINT_ROWS:
            for blend in (False, True):
                out = edit(model, x_T, sigmas, cfg, TARGETS, rows, blend)
                red = colour_blobs(out[0], "red")
                obj = red[0] if red else torch.zeros(out.shape[-2:], dtype=torch.bool)
                for j, colour in enumerate(NEW):
                    sc.add(f"seed, {rows}, {'with' if blend else 'without'} LocalBlend", out[0], obj, out[1 + j],
                           colour)
    return sc.table()


def from_inversion(model, images: int, steps: int, cfg: float) -> dict:
    sc, sigmas, floor = Scores(), model.sigmas(steps), table_sigma_min(model.shift)
    rec_psnr: dict[str, list] = {}
    for scene in scenes(images, model.size, seed=1):
        image = scene.image.to(model.device)
        v = velocity_from_denoiser(model.denoiser(model.encode([SOURCE]), model.encode([""]), cfg,
                                                  sample_sigmas=sigmas), floor)
        for solver in ("euler", "fireflow"):
            x_T = rf_invert(v, image[None] * 2 - 1, sigmas, solver)[0]
            for blend in (False, True):
                out = edit(model, x_T, sigmas, cfg, TARGETS, "renormalize", blend, solver)
                if not blend:
                    rec_psnr.setdefault(solver, []).append(psnr(out[0], image))
                for j, colour in enumerate(NEW):
                    sc.add(f"rf-{solver} inversion, {'with' if blend else 'without'} LocalBlend", image,
                           scene.objects[0].mask, out[1 + j], colour)
    out = sc.table()
    for solver, vals in rec_psnr.items():
        out[f"rf-{solver} inversion, source row (reconstruction)"] = {"psnr_db": round(sum(vals) / len(vals), 2)}
    return out


def cost(model, steps: int, cfg: float, repeats: int = 3) -> dict:
    """Median seconds: the 3-row batch plainly, the edit (source + 2 targets), the edit with LocalBlend."""
    sigmas = model.sigmas(steps)
    x_T = model.noise(1, 0) * sigmas[0]
    runs = {"plain": dict(hooked=False), "edit": {}, "edit + LocalBlend": dict(blend=True)}
    times: dict[str, list] = {k: [] for k in runs}
    for _ in range(repeats):
        for name, kw in runs.items():
            t0 = time.perf_counter()
            edit(model, x_T, sigmas, cfg, TARGETS, **kw)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    held = {}
    for n in (steps // 2, steps):                       # what LocalBlend keeps: flat in the steps
        keep: dict = {}
        edit(model, x_T, model.sigmas(n), cfg, TARGETS, blend=True, keep=keep)
        held[f"steps={n}"] = keep["blend"].store.nbytes()
    return {"rows": 3, "steps": steps, "seconds": {k: round(v, 3) for k, v in med.items()},
            "localblend_store_bytes": held,
            "edit_over_plain": round(med["edit"] / med["plain"], 3),
            "edit_localblend_over_plain": round(med["edit + LocalBlend"] / med["plain"], 3)}


def build_parser():
    p = cli.parser(__doc__, "attention.shapesworld.flow_p2p_figures")
    add_weights(p)
    p.add_argument("--images", type=cli.int_range(1), default=8, help="seeds and generator scenes (1 or more)")
    p.add_argument("--steps", type=cli.int_range(2), default=20, help="sampling / inversion steps (2 or more)")
    p.add_argument("--cfg", type=cli.float_range(0), default=4.0, help="CFG of the seed edits (>= 0)")
    p.add_argument("--inversion-steps", type=cli.int_range(2), default=16,
                   help="inversion steps (2 or more; FireFlow needs about 16 on this model, docs/rf-inversion.md)")
    p.add_argument("--inversion-cfg", type=cli.float_range(0), default=1.0,
                   help="CFG of the inversion and of its edits (>= 0; the same both ways, as the node; 1 = upstream "
                        "FireFlow's guidance)")
    p.add_argument("--repeats", type=cli.int_range(1), default=3, help="timed repeats of the cost (1 or more)")
    p.add_argument("--threads", type=cli.int_range(1), default=None, help="torch CPU threads (default: torch's)")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(p, args.weights)
    out = {"images": args.images, "steps": args.steps, "cfg": args.cfg, "inversion_steps": args.inversion_steps,
           "inversion_cfg": args.inversion_cfg,
           "cost": cost(model, args.steps, args.cfg, args.repeats)}
    print(json.dumps(out, indent=1), flush=True)
    print(json.dumps({"seed": from_seed(model, args.images, args.steps, args.cfg)}, indent=1), flush=True)
    print(json.dumps({"inversion": from_inversion(model, args.images, args.inversion_steps,
                                                                   args.inversion_cfg)}, indent=1),
          flush=True)


if __name__ == "__main__":
    main()
