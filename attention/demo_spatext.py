"""Demo section for SpaText (training-free): region prompts against the plain caption, same noise.

Same patches as the node (``attention/spatext.py``) through ``attention/shapesworld/spatext.py``; the full
measurement over 100 prompts is ``python -m attention.shapesworld.spatext``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .render import grid
from .shapesworld.evaluate import pair_prompts
from .shapesworld.harness import load_classifier
from .shapesworld.model import ShapesWorldModel
from .shapesworld.spatext import generate, layout_score, layouts
from .shapesworld.world import caption_for


def spatext_section(model: ShapesWorldModel, out: Path, save, quick: bool) -> list[str]:
    t = time.perf_counter()
    n = 8 if quick else 16
    sets = pair_prompts(n, seed=2)
    captions = [caption_for(objs, "gray") for objs in sets]
    regions = [[caption_for([o], None) for o in objs] for objs in sets]
    masks = layouts(n, seed=2, size=model.size)
    plain = generate(model, captions, None, None, seed=4, steps=20)
    spatial = generate(model, ["on a gray background"] * n, regions, masks, seed=4, steps=20, s_local=7.5)
    boxes = torch.stack([masks[:4, 0], torch.zeros_like(masks[:4, 0]), masks[:4, 1]], 1)   # region 1 red, 2 blue
    save(grid(torch.cat([boxes, plain[:4].cpu(), spatial[:4].cpu()]).permute(0, 2, 3, 1), cols=4),
         out / "spatext.png")
    clf = load_classifier()
    rows = [f"| {name} | {s['layout']:.0%} | {s['placed']:.0%} | {s['shape_agreement']:.0%} |"
            for name, s in (("full caption, no regions", layout_score(plain.cpu(), sets, masks, clf)),
                            ("SpaText (scene + region prompts)", layout_score(spatial.cpu(), sets, masks, clf)))]
    return ["## SpaText, training-free (region prompts)", "",
            "Top: the regions (red = first object's box, blue = second's); middle: the full caption "
            f"('{captions[0]}') without regions; bottom: global prompt 'on a gray background' with the region "
            f"prompts ({' / '.join(regions[0])}, ...), s_global 5, s_local 7.5, same noise.", "",
            "![spatext](spatext.png)", "",
            f"Layout on {n} prompts (both objects with their centre in their box and the right shape; the "
            f"100-prompt figure is `python -m attention.shapesworld.spatext`):", "",
            "| sampling | layout | objects placed | shapes right |", "|---|---|---|---|", *rows, "",
            f"Section time {time.perf_counter() - t:.1f} s.", ""]
