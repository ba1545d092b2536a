"""Rectified-flow inversion on ShapesWorld-Flow: reconstruction PSNR of plain Euler inversion vs FireFlow at equal
model evaluations (FireFlow n steps = n + 1 velocity evaluations = Euler n + 1 steps), per direction.

    python -m attention.shapesworld.rf_inversion_figures --weights FILE [--images 20] [--steps 4 8 16] [--cfg 1]

The loops are the nodes' (attention/rf_inversion.py: ``rf_invert`` then ``rf_reconstruct`` with the same solver);
the velocity is the pure-torch twin's CFG denoiser (``ShapesWorldFlowModel.denoiser``, ComfyUI's batching) read as
v = (x - x0) / sigma, at sigma 0 at the table's smallest sigma, as the node reads it. Images: the editing figures'
generator scenes (a red circle and a blue square on gray, seeded), their captions the prompts; PSNR on [0, 1]
pixels (the model is pixel-space). Needs the ShapesWorld-Flow model (attention/shapesworld/flow_model.py).
"""

from __future__ import annotations

import hashlib
import json
import time

import torch

from .. import cli
from ..rf_inversion import evaluations, rf_invert, rf_reconstruct, velocity_from_denoiser
from .flow_evaluate import add_weights, load_model, open_command
from .flow_model import DEFAULT_FLOW_WEIGHTS
from .harness import psnr
from .world import SceneSpec, ShapesWorld


def scenes(n: int, size: int, seed: int = 0) -> list:
    """The editing figures' scenes (attention/shapesworld/editing.py) at the model's size."""
    world = ShapesWorld(seed=seed, size=size)
    spec = SceneSpec([("red", "circle"), ("blue", "square")], background="gray", name_background=True)
    return [world.sample(spec) for _ in range(n)]


def table_sigma_min(shift: float, table_size: int = 1000) -> float:
    """ModelSamplingDiscreteFlow's smallest sigma (multiplier 1): shift t / (1 + (shift - 1) t) at t = 1 / 1000."""
    t = 1.0 / table_size
    return shift * t / (1 + (shift - 1) * t)


def reconstruction_psnr(model, images: int, steps: list[int], cfg: float) -> dict:
    """Per FireFlow step count n: mean / min reconstruction PSNR (dB) of Euler (n + 1 steps) and FireFlow (n)."""
    out = {}
    floor = table_sigma_min(model.shift)
    items = scenes(images, model.size)
    with torch.no_grad():
        conds = [(model.encode([s.caption]), model.encode([""])) for s in items]
    for n in steps:
        row = {}
        for solver, k in (("euler", n + 1), ("fireflow", n)):
            sig, vals, t0 = model.sigmas(k), [], time.time()
            for sc, (cond, uncond) in zip(items, conds):
                v = velocity_from_denoiser(model.denoiser(cond, uncond, cfg, sample_sigmas=sig), floor)
                x0 = (sc.image.unsqueeze(0).to(model.device) * 2 - 1)
                rec = rf_reconstruct(v, rf_invert(v, x0, sig, solver)[0], sig, solver)
                vals.append(psnr(((rec + 1) / 2).clamp(0, 1), sc.image.unsqueeze(0).to(model.device)))
            row[solver] = {"steps": k, "evaluations_per_direction": evaluations(solver, k),
                           "psnr_db": round(sum(vals) / len(vals), 2), "min_psnr_db": round(min(vals), 2),
                           "seconds_per_image": round((time.time() - t0) / len(items), 2)}
        row["fireflow_minus_euler_db"] = round(row["fireflow"]["psnr_db"] - row["euler"]["psnr_db"], 2)
        out[f"fireflow {n} steps vs euler {n + 1}"] = row
    return out


def null_text_psnr(model, images: int, steps: int, cfg: float) -> dict:
    """Null-text on a CFG flow model, as the node runs it there (nodes/rf_inversion.py ``cond_euler_inversion``):
    Euler inversion with the prompt alone, then NTI's per-step null optimization (attention/inversion.py, official
    settings) with Euler steps. Mean / min PSNR (dB) and model rows forward / backward per image."""
    from ..inversion import NullTextSettings, null_text_optimize
    floor = table_sigma_min(model.shift)
    model.transformer.requires_grad_(False)
    sig, vals, fwd, bwd, t0 = model.sigmas(steps), [], 0, 0, time.time()
    for sc in scenes(images, model.size):
        with torch.no_grad():
            (ctx, pooled), (null, pooled_u) = model.encode([sc.caption]), model.encode([""])

        def eps(pool):
            return lambda x, s, c: model.velocity(x, s.reshape(-1)[:1].expand(len(x)), (c, pool))
        x0 = sc.image.unsqueeze(0).to(model.device) * 2 - 1
        traj = rf_invert(velocity_from_denoiser(model.denoiser((ctx, pooled)), floor), x0, sig, "euler")
        with torch.enable_grad():
            _, counts, rec = null_text_optimize(eps(pooled), traj, sig, ctx, null, NullTextSettings(guidance=cfg),
                                                eps_null=eps(pooled_u))
        vals.append(psnr(((rec.detach() + 1) / 2).clamp(0, 1), sc.image.unsqueeze(0).to(model.device)))
        fwd, bwd = fwd + steps + counts["forward"] + steps, bwd + counts["backward"]     # + inversion, + rec
    return {"steps": steps, "psnr_db": round(sum(vals) / len(vals), 2), "min_psnr_db": round(min(vals), 2),
            "forward_rows_per_image": fwd / images, "backward_rows_per_image": bwd / images,
            "seconds_per_image": round((time.time() - t0) / images, 2)}


def build_parser():
    p = cli.parser(__doc__, "attention.shapesworld.rf_inversion_figures")
    add_weights(p)
    p.add_argument("--images", type=cli.int_range(1), default=20, help="generator scenes to invert (1 or more)")
    p.add_argument("--steps", type=cli.int_range(1), nargs="+", default=[4, 8, 16],
                   help="FireFlow step counts n (Euler gets n + 1: the same model evaluations)")
    p.add_argument("--cfg", type=cli.float_range(0), default=1.0,
                   help="CFG scale of both directions (>= 0; 1 = conditional only, upstream's Flux guidance 1)")
    p.add_argument("--null-text-steps", type=cli.int_range(0), default=0,
                   help="also null-text (Euler inversion + NTI's null optimization) with this many steps; needs "
                        "--cfg > 1 (0 = skip)")
    p.add_argument("--threads", type=cli.int_range(1), default=None, help="torch CPU threads (default: torch's)")
    return p


def check_null_text(p, args) -> None:
    """parser.error unless --null-text-steps comes with --cfg > 1."""
    if args.null_text_steps and args.cfg <= 1:
        p.error(f"argument --null-text-steps: null-text needs --cfg > 1 (got {args.cfg}): at cfg 1 the null "
                f"embedding has no effect")


def main(argv=None):
    args, model = open_command(build_parser(), argv, load_model, check=check_null_text, log_info=False)
    path = args.weights or DEFAULT_FLOW_WEIGHTS
    weights = {"file": str(path), "sha256": hashlib.sha256(open(path, "rb").read()).hexdigest()[:16],
               "training_steps": model.training.get("steps"), "schedule_steps": model.training.get("schedule_steps")}
    print(json.dumps({"weights": weights, "images": args.images,
                      "cfg": args.cfg, "reconstruction": reconstruction_psnr(model, args.images, args.steps,
                                                                              args.cfg)}, indent=1), flush=True)
    if args.null_text_steps:
        print(json.dumps({"null-text": null_text_psnr(model, args.images, args.null_text_steps, args.cfg)},
                         indent=1), flush=True)


if __name__ == "__main__":
    main()
