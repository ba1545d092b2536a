"""SpaText (training-free) on the ShapesWorld model (outside ComfyUI), and its figure.

Same patches as the ComfyUI node ``SpaTextGuider``: ``attention/spatext.py``. The figure asks for a layout a prompt
cannot express: two objects with distinct colours and shapes, each given its own region (a box in one quadrant,
the other in the opposite quadrant) and its own region prompt ("a red circle"). As in the paper, the global
prompt describes the scene ("on a gray background") and the region prompts the objects. Per image and object:
the named colour's largest blob has its centre inside the object's box (placement) and the region classifier
calls it the named shape; layout = both objects placed and shaped. Baseline: the full caption ("a red circle
and a blue square on a gray background") without regions, where placement is left to chance. A third row keeps
the full caption as the global prompt with the regions: pixels outside the regions read the global prompt, so
objects it names can appear outside their boxes too.

    python -m attention.shapesworld.spatext [--prompts 100] [--seed 0] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch

from .. import cli
from ..sampling import sample_euler
from ..schedule import simple_sigmas
from ..spatext import ExpandContext, RegionalAttention, spatext_guidance
from .evaluate import pair_prompts
from .harness import colour_blobs, load_classifier
from .model import ShapesWorldModel
from .unet import ShapesUNet
from .world import caption_for

log = logging.getLogger("attention_lab.spatext")

BOX = 14        # region box side in pixels (of 32)
QUADRANTS = [(0, 0), (0, 1), (1, 0), (1, 1)]


def spatial_patches(region_contexts: torch.Tensor, masks: torch.Tensor) -> dict:
    """transformer_options for the spatial pass: (1 or B, R, m, c) region states, (1 or B, R, S, S) masks."""
    expand = ExpandContext(region_contexts)
    regional = RegionalAttention(masks, expand.lengths)
    return {"patches": {"attn2_patch": [expand]},
            "patches_replace": {"attn2": {(lid.kind, lid.number): regional
                                          for lid in ShapesUNet.attention_layer_ids()}}}


@torch.no_grad()
def generate(model: ShapesWorldModel, prompts: list[str], region_prompts: list[list[str]] | None,
             masks: torch.Tensor | None, seed: int = 0, steps: int = 20, s_global: float = 5.0,
             s_local: float = 5.0, negative: str = "") -> torch.Tensor:
    """Images (B, 3, S, S); ``region_prompts`` per prompt (R each) with ``masks`` (B or 1, R, S, S) in [0, 1].
    ``region_prompts=None`` or ``s_local=0``: plain CFG on the global prompt."""
    sigmas = simple_sigmas(steps).to(model.device)
    cond = model.encode(prompts)
    uncond = model.encode([negative] * len(prompts))
    b = len(prompts)
    spatial = None
    if region_prompts is not None and s_local != 0:
        ctx = torch.stack([model.encode(r) for r in region_prompts])       # (B, R, m, c)
        spatial = spatial_patches(ctx, masks.to(model.device))

    def denoiser(x, sigma):
        to = {"cond_or_uncond": [1, 0], "sigmas": sigma[:1], "sample_sigmas": sigmas, "patches_replace": {}}
        eps = model.eps(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([uncond, cond]), to)
        e_neg, e_glob = eps[:b], eps[b:]
        if spatial is None:
            e = spatext_guidance(e_neg, e_glob, e_glob, s_global, 0.0)
        else:
            to_s = {"cond_or_uncond": [0], "sigmas": sigma[:1], "sample_sigmas": sigmas, **spatial}
            e = spatext_guidance(e_neg, e_glob, model.eps(x, sigma, cond, to_s), s_global, s_local)
        return x - e * sigma.view(-1, 1, 1, 1)
    x = model.noise(b, seed) * sigmas[0]
    return ((sample_euler(denoiser, x, sigmas) + 1) / 2).clamp(0, 1)


def layouts(n: int, seed: int, size: int = 32) -> torch.Tensor:
    """(n, 2, size, size) box masks: the first object's box in a random quadrant, the second's opposite."""
    g = torch.Generator().manual_seed(seed + 1)
    half = size // 2
    out = torch.zeros(n, 2, size, size)
    for i in range(n):
        q = QUADRANTS[int(torch.randint(4, (1,), generator=g))]
        for j, (r, c) in enumerate((q, (1 - q[0], 1 - q[1]))):
            y = r * half + int(torch.randint(half - BOX + 1 if half >= BOX else 1, (1,), generator=g))
            x = c * half + int(torch.randint(half - BOX + 1 if half >= BOX else 1, (1,), generator=g))
            y, x = min(y, size - BOX), min(x, size - BOX)
            out[i, j, y:y + BOX, x:x + BOX] = 1
    return out


def layout_score(images: torch.Tensor, sets, masks: torch.Tensor, clf) -> dict:
    placed, shaped, both = 0, 0, 0
    for img, objs, m in zip(images, sets, masks):
        ok_all = True
        for (colour, shape), box in zip(objs, m):
            blobs = colour_blobs(img, colour)
            if not blobs:
                ok_all = False
                continue
            ys, xs = blobs[0].nonzero(as_tuple=True)
            cy, cx = int(ys.float().mean().round()), int(xs.float().mean().round())
            in_box = bool(box[cy, cx] > 0)
            right = clf.predict(img[None], blobs[0][None])[0][0] == shape
            placed += in_box
            shaped += right
            ok_all &= in_box and right
        both += ok_all
    objects = sum(len(s) for s in sets)
    return {"layout": round(both / len(sets), 4), "placed": round(placed / objects, 4),
            "shape_agreement": round(shaped / objects, 4)}


def layout_figures(model: ShapesWorldModel, n: int = 100, seed: int = 0, steps: int = 20, s_global: float = 5.0,
                   s_local: float = 7.5, background: str = "gray", batch: int = 25) -> dict:
    clf = load_classifier()
    sets = pair_prompts(n, seed)
    captions = [caption_for(objs, background) for objs in sets]
    scene = [f"on {'an' if background[0] in 'aeiou' else 'a'} {background} background"] * n
    regions = [[caption_for([o], None) for o in objs] for objs in sets]
    masks = layouts(n, seed, model.size)
    runs = {"full caption, no regions": (captions, None, 0.0),
            "SpaText: scene as global prompt, objects in regions": (scene, regions, s_local),
            "SpaText: full caption as global prompt, objects in regions": (captions, regions, s_local)}
    out = {}
    for name, (globals_, region_prompts, s_l) in runs.items():
        t0 = time.perf_counter()
        images = torch.cat([generate(model, globals_[i:i + batch], None if region_prompts is None else
                                     region_prompts[i:i + batch], masks[i:i + batch], seed + i, steps, s_global, s_l)
                            for i in range(0, n, batch)]).cpu()
        out[name] = {**layout_score(images, sets, masks, clf),
                     "seconds_per_image": round((time.perf_counter() - t0) / n, 4)}
    base = out["full caption, no regions"]["seconds_per_image"]
    out["time_ratio_vs_plain"] = {k: round(v["seconds_per_image"] / base, 3) for k, v in out.items()}
    out.update(prompts=n, steps=steps, s_global=s_global, s_local=s_local,
               box_area_share=round(float(masks.mean()), 4),
               example={"caption": captions[0], "scene": scene[0], "regions": regions[0]})
    return out


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__, "attention.shapesworld.spatext")
    cli.add_weights(p)
    p.add_argument("--prompts", type=cli.int_range(1), default=100, help="seeded two-object prompts with layouts")
    p.add_argument("--seed", type=cli.int_range(0), default=0, help="seed of the prompts, layouts and noise")
    p.add_argument("--steps", type=cli.int_range(1), default=20, help="Euler steps per image")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = cli.load_model(p, args.weights)
    log.info(json.dumps(layout_figures(model, args.prompts, args.seed, args.steps), indent=1))


if __name__ == "__main__":
    main()
