"""Demo section for StructureDiffusion: plain against noun-phrase values, same prompts and noise.

Same patch as the node (``attention/structure.py``) through ``attention/shapesworld/structure.py``; the full
measurement over 200 prompts is ``python -m attention.shapesworld.structure``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..render import grid
from ..shapesworld.model import ShapesWorldModel
from ..shapesworld.structure import binding_figures, generate, structured_patch

PROMPTS = ["a red circle and a blue square", "a yellow triangle and a purple cross",
           "a green star and an orange diamond", "a cyan square and a red star"]


def structure_section(model: ShapesWorldModel, out: Path, save, quick: bool) -> list[str]:
    plain = generate(model, PROMPTS, seed=3, steps=20, cfg=5.0, structured=False).cpu()
    structured = generate(model, PROMPTS, seed=3, steps=20, cfg=5.0, structured=True).cpu()
    save(grid(torch.cat([plain, structured]).permute(0, 2, 3, 1), cols=len(PROMPTS)), out / "structure.png")
    n = 8 if quick else 24
    fig = binding_figures(model, n=n, seed=1)
    rows = [f"| {name} | {fig[name]['binding']:.0%} | {fig[name]['attribute_swap']:.0%} | "
            f"{fig[name]['seconds_per_image']:.3f} |" for name in ("baseline", "StructureDiffusion")]
    phrases = "; ".join(" | ".join(structured_patch(model, p)[1]) for p in PROMPTS[:2])
    return ["## StructureDiffusion (noun-phrase values)", "",
            f"Top row plain, bottom row with the phrase values; same noise (seed 3), 20 steps, CFG 5. Phrases found "
            f"automatically, e.g. {phrases}.", "", "![structure](structure.png)", "",
            f"Attribute binding on {n} seeded two-object prompts (each colour's largest blob classified as its "
            f"shape; the 200-prompt figure is `python -m attention.shapesworld.structure`): {fig['fixed']} fixed, "
            f"{fig['broken']} broken by the node.", "",
            "| sampling | both objects right | a colour takes the other's shape | s / image |", "|---|---|---|---|",
            *rows, ""]
