"""Quality figures of ShapesWorld-Flow (its gates), as one command.

    python -m attention.shapesworld.flow_evaluate [--weights assets/shapesworld_flow.safetensors]

Prints: colour presence and shape agreement over seeded prompts (the UNet's protocol and region classifier,
:func:`attention.shapesworld.evaluate.generation_quality`), and the word-map localization of the joint attention:
each held-out scene is noised to sigma in ``bands`` (x = (1 - sigma) x0 + sigma eps), one conditional velocity
call runs with :class:`JointAttentionObserver` as the ``optimized_attention_override``, and each shape word's map
is scored against its object's exact mask (best-threshold mean IoU, the UNet's protocol in harness.py), per
direction (image queries -> the word's key, ``img2txt``; the word's query -> image keys, ``txt2img``) and per block
group (double, single, all).
"""

from __future__ import annotations

import argparse
import json
import logging

import torch

from .. import cli
from .flow_model import FlowWeightsError, ShapesWorldFlowModel
from .harness import IoUReport, iou_curve, leakage
from .world import SceneSpec, ShapesWorld

log = logging.getLogger("attention_lab.flow_evaluate")
DIRECTIONS = ("img2txt", "txt2img")
GROUPS = ("double", "single", "all")
GATE_MAPS = "img2txt/all"     # the maps the localization gate and the figures use (direction/group)


class JointAttentionObserver:
    """A small ``optimized_attention_override`` for Flux-layout joint attention (text tokens first): records, per
    block, the head-mean attention between every text token and every image token in both directions, and runs
    the attention unchanged. To be replaced by the pack's general DiT hook (issue 28).

    ``text_tokens``: T, the length of the context; q, k, v arrive as (B, h, T + N, d) after RoPE.
    ``maps[(block_type, block_index)]`` = {"img2txt": (B, T, N), "txt2img": (B, T, N)}.
    """

    def __init__(self, text_tokens: int, chained=None):
        self.text_tokens, self.chained = text_tokens, chained
        self.maps: dict[tuple[str, int], dict[str, torch.Tensor]] = {}

    def __call__(self, func, q, k, v, heads, *args, **kwargs):
        to = kwargs["transformer_options"]
        t = self.text_tokens
        probs = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)  # (B,h,L,L)
        self.maps[(to["block_type"], to["block_index"])] = {
            "img2txt": probs[:, :, t:, :t].mean(1).transpose(1, 2).cpu(),   # (B, T, N): image query -> text key
            "txt2img": probs[:, :, :t, t:].mean(1).cpu()}                   # (B, T, N): text query -> image key
        if self.chained is not None:
            return self.chained(func, q, k, v, heads, *args, **kwargs)
        return func(q, k, v, heads, *args, **kwargs)

    def word_map(self, positions: tuple[int, ...], direction: str, group: str, grid: tuple[int, int],
                 item: int = 0) -> torch.Tensor:
        """(h, w) map of the text positions of a word: summed over its tokens, averaged over the group's blocks."""
        keys = [k for k in self.maps if group == "all" or k[0] == group]
        m = torch.stack([self.maps[k][direction][item, list(positions)].sum(0) for k in keys]).mean(0)
        return m.view(*grid)


def capture_noised(model, scene, sigma: float, seed: int) -> JointAttentionObserver:
    """One conditional velocity call on ``scene`` at ``sigma``, observed."""
    g = torch.Generator().manual_seed(seed)
    x0 = scene.image[None].to(model.device) * 2 - 1
    x = (1 - sigma) * x0 + sigma * torch.randn(x0.shape, generator=g).to(model.device)
    cond = model.encode([scene.caption])
    obs = JointAttentionObserver(cond[0].shape[1])
    with torch.no_grad():
        model.velocity(x, torch.tensor([sigma], device=model.device), cond, {"optimized_attention_override": obs})
    return obs


@torch.no_grad()
def attention_localization(model, n: int = 40, seed: int = 123, bands: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8)):
    """Best-threshold mean IoU of each shape word's joint-attention map with its object, on held-out scenes."""
    world = ShapesWorld(seed=seed)
    grid = (model.size // model.flow_config.patch_size,) * 2
    curves: dict[tuple[str, str, float], list[torch.Tensor]] = {}
    leaks: dict[str, list[dict]] = {}
    for i in range(n):
        scene = world.sample(SceneSpec([(None, None)] * (1 + i % 3)))
        positions = model.object_positions(scene)
        for s in bands:
            obs = capture_noised(model, scene, s, seed * 1000 + i * 10 + int(s * 10))
            for ob, pos in zip(scene.objects, positions):
                others = torch.zeros_like(ob.mask)
                for o2 in scene.objects:
                    if o2 is not ob:
                        others |= o2.mask
                for d in DIRECTIONS:
                    for gname in GROUPS:
                        wm = obs.word_map(pos, d, gname, grid)
                        curves.setdefault((d, gname, s), []).append(iou_curve(wm, ob.mask))
                        if s == bands[len(bands) // 2]:
                            leaks.setdefault(f"{d}/{gname}", []).append(
                                leakage(wm, ob.mask, others, scene.background_mask))
    table: dict[str, dict] = {}
    for (d, gname, s), cs in sorted(curves.items()):
        rep = IoUReport.from_curves(cs)
        table.setdefault(f"{d}/{gname}", {})[f"sigma={s}"] = {"best_iou": round(rep.best_iou, 3),
                                                              "threshold": round(rep.best_threshold, 2)}
    for name, row in table.items():
        d, gname = name.split("/")
        allc = [c for (dd, gg, _), cs in curves.items() if (dd, gg) == (d, gname) for c in cs]
        row["all_bands"] = {"best_iou": round(IoUReport.from_curves(allc).best_iou, 3)}
        row["leakage"] = {k: round(sum(x[k] for x in leaks[name]) / len(leaks[name]), 3) for k in leaks[name][0]}
    return {"scenes": n, "grid": list(grid), "bands": list(bands), "iou": table}


def add_weights(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", type=cli.existing_file, default=None, metavar="FILE",
                   help="ShapesWorld-Flow weights file (default: the shipped assets/shapesworld_flow.safetensors)")


def load_model(p: argparse.ArgumentParser, weights: str | None) -> ShapesWorldFlowModel:
    """The ShapesWorld-Flow model of ``weights`` (default: the shipped file), or parser.error with the reason."""
    try:
        return ShapesWorldFlowModel(weights) if weights else ShapesWorldFlowModel()
    except FlowWeightsError as e:
        p.error(f"argument --weights: {e}")


def open_command(p: argparse.ArgumentParser, argv: list[str] | None, load,
                 check=None, log_info: bool = True) -> tuple[argparse.Namespace, ShapesWorldFlowModel]:
    """The opening of a ShapesWorld-Flow figure command: ``argv`` parsed by ``p``, then ``check(p, args)`` (checks
    that need two flags, refused through ``p.error``), INFO logging to stderr (unless ``log_info`` is False: the
    commands that print their JSON keep their stderr as it was), the torch threads of ``--threads`` and the model
    ``load(p, args.weights)`` returns. ``load`` is the CALLER's module-global ``load_model``, passed at call time so
    that tests patching that module's ``load_model`` see the bad values refused before the model loads."""
    args = p.parse_args(argv)
    if check is not None:
        check(p, args)
    if log_info:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    cli.set_threads(args.threads)
    return args, load(p, args.weights)


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__, "attention.shapesworld.flow_evaluate")
    add_weights(p)
    p.add_argument("--prompts", type=cli.int_range(1), default=50, help="seeded prompts of the generation figures")
    p.add_argument("--prompt-seed", type=cli.int_range(0), default=0, help="seed of the prompt set and its noise")
    p.add_argument("--steps", type=cli.int_range(1, 1000), default=20, help="Euler steps of the generation figures")
    p.add_argument("--cfg", type=cli.float_range(0, 30), default=4.0, help="classifier-free guidance scale")
    p.add_argument("--shift", type=cli.float_range(0, 100, lo_open=True), default=None,
                   help="sampling time shift of the generation figures (default: the file's, ComfyUI's "
                        "ModelSamplingDiscreteFlow shift)")
    p.add_argument("--scenes", type=cli.int_range(1), default=40, help="held-out scenes of the localization figures")
    p.add_argument("--skip", choices=("none", "generation", "localization"), default="none",
                   help="leave one part out")
    cli.add_threads(p)
    return p


def main(argv=None):
    from .evaluate import generation_quality
    args, model = open_command(build_parser(), argv, load_model)
    if args.shift is not None:
        model.shift = args.shift
    out: dict = {"weights": args.weights or "shipped", "shift": model.shift, "cfg": args.cfg,
                 "training": model.training}
    if args.skip != "generation":
        out["generation"] = generation_quality(model, args.prompts, seed=args.prompt_seed, steps=args.steps,
                                               cfg=args.cfg)
    if args.skip != "localization":
        out["localization"] = attention_localization(model, args.scenes)
    log.info(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
