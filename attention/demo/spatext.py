"""Demo section for SpaText (training-free): region prompts against the plain caption, same noise.

Same patches as the node (``attention/spatext.py``) through ``attention/shapesworld/spatext.py``; the full
measurement over 100 prompts is ``python -m attention.shapesworld.spatext``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..render import grid
from ..shapesworld.evaluate import pair_prompts
from ..shapesworld.harness import load_classifier
from ..shapesworld.model import ShapesWorldModel
from ..shapesworld.spatext import generate, layout_score, layouts
from ..shapesworld.world import caption_for

OUTLINES = ((255, 255, 255), (0, 0, 0))   # region 1 white, region 2 black: neutral against every object colour


def box_figure(rows: torch.Tensor, boxes: torch.Tensor, path: Path, scale: int = 4, pad: int = 2) -> None:
    """Rows of images (R, C, 3, S, S) in [0, 1] as a grid PNG with every tile's region boxes (C, 2, S, S)
    outlined: the first region white, the second black (drawn at the upscaled size, so no pixel is hidden)."""
    from PIL import Image, ImageDraw
    n_rows, cols, _, size, _ = rows.shape
    tiles = grid(rows.reshape(-1, 3, size, size).permute(0, 2, 3, 1), cols=cols)[0]
    pil = Image.fromarray((tiles.clamp(0, 1) * 255).round().byte().numpy())
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(pil)
    for r in range(n_rows):
        for c in range(cols):
            oy, ox = r * (size + pad) * scale, c * (size + pad) * scale
            for box, colour in zip(boxes[c], OUTLINES):
                ys, xs = torch.nonzero(box, as_tuple=True)
                if len(ys):
                    draw.rectangle([ox + int(xs.min()) * scale, oy + int(ys.min()) * scale,
                                    ox + (int(xs.max()) + 1) * scale - 1, oy + (int(ys.max()) + 1) * scale - 1],
                                   outline=colour, width=2)
    pil.save(path)


def spatext_section(model: ShapesWorldModel, out: Path, save, quick: bool) -> list[str]:
    n, shown = (8 if quick else 16), 4
    sets = pair_prompts(n, seed=2)
    captions = [caption_for(objs, "gray") for objs in sets]
    regions = [[caption_for([o], None) for o in objs] for objs in sets]
    masks = layouts(n, seed=2, size=model.size)
    plain = generate(model, captions, None, None, seed=4, steps=20)
    spatial = generate(model, ["on a gray background"] * n, regions, masks, seed=4, steps=20, s_local=7.5)
    canvas = torch.full((shown, 3, model.size, model.size), 0.5)
    box_figure(torch.stack([canvas, plain[:shown].cpu(), spatial[:shown].cpu()]), masks[:shown], out / "spatext.png")
    clf = load_classifier()
    rows = [f"| {name} | {s['layout']:.0%} | {s['placed']:.0%} | {s['shape_agreement']:.0%} |"
            for name, s in (("full caption, no regions", layout_score(plain.cpu(), sets, masks, clf)),
                            ("SpaText (scene + region prompts)", layout_score(spatial.cpu(), sets, masks, clf)))]
    return ["## SpaText, training-free (region prompts)", "",
            "Top: the two regions of each column, first region outlined white, second black; middle: the full "
            "caption without regions; bottom: global prompt 'on a gray background' with the region prompts, "
            "s_global 5, s_local 7.5, same noise. The outlines are repeated on the images: an object belongs "
            "inside its box.", "", "![spatext](spatext.png)", "",
            "| column | full caption (middle row) | white box | black box |", "|---|---|---|---|",
            *[f"| {i + 1} | {captions[i]} | {regions[i][0]} | {regions[i][1]} |" for i in range(shown)], "",
            f"Layout on {n} prompts (both objects with their centre in their box and the right shape; the "
            f"100-prompt figure is `python -m attention.shapesworld.spatext`):", "",
            "| sampling | layout | objects placed | shapes right |", "|---|---|---|---|", *rows, ""]
