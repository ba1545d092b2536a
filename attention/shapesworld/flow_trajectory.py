"""Where ShapesWorld-Flow loses the shapes: one-step denoising against whole sampling trajectories (pure torch).

    python -m attention.shapesworld.flow_trajectory [--weights FILE] [--scenes 40] [--out docs] [--threads 1]

The model's named-shape gate fails (docs/shapesworld-flow.md). This command tells apart two causes, on held-out
ShapesWorld scenes with their exact captions, scored with the gate's region classifier
(:func:`attention.shapesworld.harness.object_scores`: each named colour's largest blob classified as a shape):

* ``x0@s``: the scene noised to sigma ``s`` (x = (1 - s) x0 + s eps), one conditional velocity call, its one-step
  prediction x0 = x - s v. If these keep the shapes, the denoiser has learned them;
* ``euler_from@s``: the same noised scene integrated to sigma 0 with Euler over the 'simple' schedule's sigmas
  below ``s`` (``--steps`` of the whole schedule; CFG 1, so only the caption's velocity acts); if these lose the
  shapes that ``x0@s`` kept, the velocity field carries the errors along the trajectory;
* ``from_noise``: the gate's own protocol, the caption sampled from pure noise (Euler, ``--steps``, ``--cfg``).

Prints one JSON object: per setting the shape agreement (share of objects), the colour presence (share of scenes)
and, for the clean scenes, the classifier's own agreement (its ceiling here). With ``--out`` also writes
``shapesworld_flow_trajectory.png``: per scene (rows) the scene, the one-step predictions, the trajectories and the
sample from noise (columns in the JSON's order).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from .. import cli
from ..render import grid
from .flow_evaluate import add_weights, load_model
from .flow_figures import save_png
from .flow_model import sample_euler_flow
from .harness import load_classifier, object_scores
from .world import ShapesWorld

log = logging.getLogger("attention_lab.flow_trajectory")
ONE_STEP = (0.2, 0.4, 0.6, 0.8)
TRAJECTORY = (0.4, 0.6, 0.8)


def trailing_sigmas(sigmas: torch.Tensor, start: float) -> torch.Tensor:
    """``start`` followed by the schedule's sigmas below it (down to its final 0)."""
    return torch.cat([sigmas.new_tensor([start]), sigmas[sigmas < start]])


@torch.no_grad()
def trajectory_figures(model, n: int, seed: int, steps: int, cfg: float) -> tuple[dict, dict]:
    """({setting: scores}, {setting: images (n, 3, S, S) in [0, 1]}) over ``n`` held-out scenes of ``seed``."""
    images, captions, scenes = ShapesWorld(seed=seed, size=model.size).batch(n)
    sets = [[(o.colour, o.shape) for o in s.objects] for s in scenes]
    x0 = images.to(model.device) * 2 - 1                                              # (n, 3, S, S) in [-1, 1]
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + 1)).to(model.device)
    cond, uncond = model.encode(captions), model.encode([""] * n)
    plain = model.denoiser(cond)
    sigmas = model.sigmas(steps)
    out = {"clean": x0}
    for s in ONE_STEP:
        out[f"x0@{s}"] = plain((1 - s) * x0 + s * eps, torch.full((n,), s, device=model.device))
    for s in TRAJECTORY:
        out[f"euler_from@{s}"] = sample_euler_flow(plain, (1 - s) * x0 + s * eps, trailing_sigmas(sigmas, s))
    out["from_noise"] = sample_euler_flow(model.denoiser(cond, uncond, cfg, sample_sigmas=sigmas), eps.clone(),
                                          sigmas)
    pictures = {k: ((v + 1) / 2).clamp(0, 1).cpu() for k, v in out.items()}
    clf = load_classifier()
    scores = {}
    for k, pic in pictures.items():
        r = object_scores(pic, sets, clf)
        scores[k] = {key: round(r[key], 3) for key in ("shape_agreement", "colour_presence")}
    return scores, pictures


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__, "attention.shapesworld.flow_trajectory")
    add_weights(p)
    p.add_argument("--scenes", type=cli.int_range(1, 256), default=40, help="held-out scenes (1-3 objects each)")
    p.add_argument("--seed", type=cli.int_range(0), default=321, help="seed of the scenes and their noise")
    p.add_argument("--steps", type=cli.int_range(1, 1000), default=20, help="Euler steps of the whole schedule")
    p.add_argument("--cfg", type=cli.float_range(0, 30), default=4.0, help="guidance scale of the from-noise samples")
    p.add_argument("--out", type=cli.output_dir, default=None,
                   help="also write shapesworld_flow_trajectory.png (first 6 scenes) into this folder")
    cli.add_threads(p)
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cli.set_threads(args.threads)
    model = load_model(p, args.weights)
    scores, pictures = trajectory_figures(model, args.scenes, args.seed, args.steps, args.cfg)
    log.info(json.dumps({"weights": args.weights or "shipped", "scenes": args.scenes, "seed": args.seed,
                         "steps": args.steps, "cfg": args.cfg, "scores": scores}, indent=1))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        rows = min(6, args.scenes)
        tiles = torch.stack([pictures[k][i] for i in range(rows) for k in pictures])   # (rows * cols, 3, S, S)
        save_png(grid(tiles.permute(0, 2, 3, 1), cols=len(pictures)), out / "shapesworld_flow_trajectory.png")


if __name__ == "__main__":
    main()
