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
and, for the clean scenes, the classifier's own agreement (its ceiling here); ``ShapesWorld UNet one-step``: the
UNet's ``x0@s`` on the same scenes and noise at the same signal-to-noise ratios (what a denoiser that draws the
shapes keeps); ``one-step, empty caption``: both models' ``x0@s`` conditioned on the empty prompt (what each reads
from the noisy image alone). Then ``word_sensitivity``, for this
model and for the ShapesWorld UNet at the same signal-to-noise ratios: on ``--scenes`` one-object scenes, how much
the one-step x0 prediction near the object (the object's mask dilated by 3 pixels; mean absolute value, pixels in
[-1, 1]) moves when the caption's shape word is swapped for another shape, and when its colour word is swapped
for another colour (the UNet's state at flow sigma s is x0 + s / (1 - s) eps, the same signal-to-noise ratio).
With ``--out`` also writes
``shapesworld_flow_trajectory.png``: per scene (rows) the scene, the one-step predictions, the trajectories and the
sample from noise (columns in the JSON's order).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import cli
from ..render import grid
from .flow_evaluate import add_weights, load_model, open_command
from .flow_figures import save_png
from .flow_model import sample_euler_flow
from .harness import load_classifier, object_scores
from .model import ShapesWorldModel
from .world import COLOURS, SHAPES, SceneSpec, ShapesWorld

log = logging.getLogger("attention_lab.flow_trajectory")
ONE_STEP = (0.2, 0.4, 0.6, 0.8)
TRAJECTORY = (0.4, 0.6, 0.8)
SENSITIVITY = (0.3, 0.6, 0.9)


def trailing_sigmas(sigmas: torch.Tensor, start: float) -> torch.Tensor:
    """``start`` followed by the schedule's sigmas below it (down to its final 0)."""
    return torch.cat([sigmas.new_tensor([start]), sigmas[sigmas < start]])


def held_out(model, n: int, seed: int):
    """(captions, objects per scene [(colour, shape)], x0 (n, 3, S, S) in [-1, 1], noise eps of seed + 1): the
    ``n`` held-out scenes of ``seed`` every setting below is scored on."""
    images, captions, scenes = ShapesWorld(seed=seed, size=model.size).batch(n)
    sets = [[(o.colour, o.shape) for o in s.objects] for s in scenes]
    x0 = images.to(model.device) * 2 - 1
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + 1)).to(model.device)
    return captions, sets, x0, eps


def scored(pictures: dict, sets: list, clf) -> dict:
    """{setting: {shape_agreement, colour_presence}} of pictures (n, 3, S, S) in [0, 1] (the gate's region
    classifier on each named colour's largest blob)."""
    out = {}
    for k, pic in pictures.items():
        r = object_scores(pic, sets, clf)
        out[k] = {key: round(r[key], 3) for key in ("shape_agreement", "colour_presence")}
    return out


def to_picture(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1) / 2).clamp(0, 1).cpu()


@torch.no_grad()
def trajectory_figures(model, n: int, seed: int, steps: int, cfg: float) -> tuple[dict, dict]:
    """({setting: scores}, {setting: images (n, 3, S, S) in [0, 1]}) over ``n`` held-out scenes of ``seed``."""
    captions, sets, x0, eps = held_out(model, n, seed)
    cond, uncond = model.encode(captions), model.encode([""] * n)
    plain = model.denoiser(cond)
    sigmas = model.sigmas(steps)
    out = {"clean": x0}
    for s in ONE_STEP:
        out[f"x0@{s}"] = one_step_x0(model, x0, eps, s, cond)
    for s in TRAJECTORY:
        out[f"euler_from@{s}"] = sample_euler_flow(plain, (1 - s) * x0 + s * eps, trailing_sigmas(sigmas, s))
    out["from_noise"] = sample_euler_flow(model.denoiser(cond, uncond, cfg, sample_sigmas=sigmas), eps.clone(),
                                          sigmas)
    pictures = {k: to_picture(v) for k, v in out.items()}
    return scored(pictures, sets, load_classifier()), pictures


@torch.no_grad()
def one_step_scores(model, n: int, seed: int, empty_caption: bool = False) -> dict:
    """{"x0@s": {shape_agreement, colour_presence}} of ``model``'s one-step predictions on the scenes and noise of
    :func:`held_out` (for the UNet: at the same signal-to-noise ratios), as :func:`trajectory_figures` scores them;
    with ``empty_caption`` conditioned on the empty prompt instead (what the denoiser reads from the image alone)."""
    captions, sets, x0, eps = held_out(model, n, seed)
    cond = model.encode([""] * n if empty_caption else captions)
    return scored({f"x0@{s}": to_picture(one_step_x0(model, x0, eps, s, cond)) for s in ONE_STEP}, sets,
                  load_classifier())


def one_step_x0(model, x0: torch.Tensor, eps: torch.Tensor, s: float, cond) -> torch.Tensor:
    """The conditional one-step x0 prediction at flow sigma ``s`` (B, 3, S, S); the UNet (k-diffusion sigma) is
    asked at the same signal-to-noise ratio, x0 + s / (1 - s) eps."""
    rows = x0.shape[0]
    if isinstance(model, ShapesWorldModel):
        k = s / (1 - s)
        return model.denoiser(cond, None, 1.0)(x0 + k * eps, torch.full((rows,), k, device=x0.device))
    return model.denoiser(cond)((1 - s) * x0 + s * eps, torch.full((rows,), s, device=x0.device))


@torch.no_grad()
def word_sensitivity(model, n: int, seed: int) -> dict:
    """{sigma: {"shape": mean |x0(shape word swapped) - x0(caption)| near the object, "colour": the same for the
    colour word}} over ``n`` one-object scenes of ``seed`` (gray background, named)."""
    world, g = ShapesWorld(seed=seed, size=model.size), torch.Generator().manual_seed(seed + 1)
    colours = [c for c in COLOURS if c != "gray"]
    sums = {s: {"shape": 0.0, "colour": 0.0} for s in SENSITIVITY}
    for i in range(n):
        scene = world.sample(SceneSpec([(None, None)], background="gray", name_background=True))
        obj = scene.objects[0]
        shape = [w for w in SHAPES if w != obj.shape][i % (len(SHAPES) - 1)]
        colour = [c for c in colours if c != obj.colour][i % (len(colours) - 1)]
        captions = [scene.caption, scene.caption.replace(obj.shape, shape), scene.caption.replace(obj.colour, colour)]
        x0 = (scene.image[None] * 2 - 1).to(model.device).expand(3, -1, -1, -1)
        eps = torch.randn(1, *x0.shape[1:], generator=g).to(model.device).expand(3, -1, -1, -1)
        near = F.max_pool2d(obj.mask[None, None].float(), 7, 1, 3)[0, 0].bool().to(model.device)   # (S, S)
        cond = model.encode(captions)
        for s in SENSITIVITY:
            pred = one_step_x0(model, x0, eps, s, cond)
            sums[s]["shape"] += float((pred[1] - pred[0]).abs()[:, near].mean()) / n
            sums[s]["colour"] += float((pred[2] - pred[0]).abs()[:, near].mean()) / n
    return {str(s): {k: round(v, 4) for k, v in d.items()} for s, d in sums.items()}


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
    args, model = open_command(build_parser(), argv, load_model)
    scores, pictures = trajectory_figures(model, args.scenes, args.seed, args.steps, args.cfg)
    unet = ShapesWorldModel()
    sensitivity = {"this model": word_sensitivity(model, args.scenes, args.seed),
                   "ShapesWorld UNet": word_sensitivity(unet, args.scenes, args.seed)}
    log.info(json.dumps({"weights": args.weights or "shipped", "scenes": args.scenes, "seed": args.seed,
                         "steps": args.steps, "cfg": args.cfg, "scores": scores,
                         "ShapesWorld UNet one-step": one_step_scores(unet, args.scenes, args.seed),
                         "one-step, empty caption": {
                             "this model": one_step_scores(model, args.scenes, args.seed, empty_caption=True),
                             "ShapesWorld UNet": one_step_scores(unet, args.scenes, args.seed, empty_caption=True)},
                         "word_sensitivity": sensitivity}, indent=1))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        rows = min(6, args.scenes)
        tiles = torch.stack([pictures[k][i] for i in range(rows) for k in pictures])   # (rows * cols, 3, S, S)
        save_png(grid(tiles.permute(0, 2, 3, 1), cols=len(pictures)), out / "shapesworld_flow_trajectory.png")


if __name__ == "__main__":
    main()
