"""ShapesWorld-Flow's pictures for its model card and help page (pure torch), as one command.

    python -m attention.shapesworld.flow_figures --out docs [--threads 1]

Writes ``shapesworld_flow_samples.png`` (rows: prompts; columns: seeds; 20 Euler steps, CFG 4, nearest-upscaled)
and ``shapesworld_flow_attention.png`` (per prompt: the generated image, then each shape word's joint-attention
map, measured as the gates measure it: the image re-noised to sigma 0.6, one conditional call observed, the
gate's maps, flow_evaluate.GATE_MAPS).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from PIL import Image

from .. import cli
from ..render import grid, normalize, overlay, upsample
from .flow_evaluate import GATE_MAPS, add_weights, capture_noised, load_model, open_command
from .world import SHAPES, Scene

log = logging.getLogger("attention_lab.flow_figures")
PROMPTS = ["a red circle and a blue square on a gray background", "a green star on a black background",
           "a yellow triangle and a purple cross", "an orange diamond and a cyan circle on a white background"]
SCALE = 3


def save_png(image: torch.Tensor, path: Path) -> None:
    """(1, H, W, 3) in [0, 1] -> PNG, nearest-upscaled ``SCALE`` times."""
    arr = (image[0].clamp(0, 1) * 255).round().byte().numpy()
    pic = Image.fromarray(arr)
    pic.resize((pic.width * SCALE, pic.height * SCALE), Image.NEAREST).save(path, optimize=True)
    log.info("wrote %s", path)


@torch.no_grad()
def samples_figure(model, prompts: list[str], seeds: int, steps: int, cfg: float) -> torch.Tensor:
    rows = [model.generate([p] * seeds, seed=0, steps=steps, cfg=cfg) for p in prompts]   # (seeds, 3, S, S) each
    return grid(torch.cat(rows).permute(0, 2, 3, 1), cols=seeds)


@torch.no_grad()
def attention_figure(model, prompts: list[str], steps: int, cfg: float, sigma: float = 0.6) -> torch.Tensor:
    tiles = []
    cols = 1 + max(sum(w in SHAPES for w in p.split()) for p in prompts)
    grid_hw = (model.size // model.flow_config.patch_size,) * 2
    for i, p in enumerate(prompts):
        image = model.generate([p], seed=i, steps=steps, cfg=cfg)[0]                     # (3, S, S)
        scene = Scene(image, [], "", p, torch.ones(model.size, model.size, dtype=torch.bool))
        obs = capture_noised(model, scene, sigma, seed=i)
        hwc = image.permute(1, 2, 0)
        row = [hwc]
        for w in [w for w in p.split() if w in SHAPES]:
            m = obs.word_map(model.prompt_words(p).positions(w), *GATE_MAPS.split("/"), grid_hw)
            row.append(overlay(hwc[None], normalize(upsample(m, (model.size, model.size)))[None])[0])
        row += [torch.ones_like(hwc)] * (cols - len(row))
        tiles += row
    return grid(torch.stack(tiles), cols=cols)


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__, "attention.shapesworld.flow_figures")
    p.add_argument("--out", type=cli.output_dir, default="docs", help="folder for the two PNG files")
    add_weights(p)
    p.add_argument("--seeds", type=cli.int_range(1, 16), default=6, help="samples per prompt")
    p.add_argument("--steps", type=cli.int_range(1, 1000), default=20, help="Euler steps")
    p.add_argument("--cfg", type=cli.float_range(0, 30), default=4.0, help="classifier-free guidance scale")
    cli.add_threads(p)
    return p


def main(argv=None):
    args, model = open_command(build_parser(), argv, load_model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_png(samples_figure(model, PROMPTS, args.seeds, args.steps, args.cfg), out / "shapesworld_flow_samples.png")
    save_png(attention_figure(model, PROMPTS, args.steps, args.cfg), out / "shapesworld_flow_attention.png")


if __name__ == "__main__":
    main()
