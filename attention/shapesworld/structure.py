"""StructureDiffusion on the ShapesWorld model (outside ComfyUI), and its figure.

Same patch as the ComfyUI node ``StructureDiffusion``: ``attention/structure.py``. The figure follows the
paper's compositional prompts (CC-500: "a {colour} {object} and a {colour} {object}"): the same seeded prompts
and noise with and without noun-phrase values, and per image whether every named colour shows up as a blob the
region classifier calls the named shape (attribute binding), with the colour-presence and shape-agreement
shares of ``evaluate.py``.

    python -m attention.shapesworld.structure [--prompts 200] [--seed 0] [--steps 20] [--cfg 5]
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch

from .. import cli
from ..structure import StructuredValuePatch, aligned_values, noun_phrases, phrase_spans
from .evaluate import pair_prompts
from .harness import load_classifier, object_scores
from .model import ShapesWorldModel
from .world import caption_for

log = logging.getLogger("attention_lab.structure")


def structured_patch(model: ShapesWorldModel, prompt: str,
                     phrases: list[str] | None = None) -> tuple[StructuredValuePatch, list[str]]:
    """The patch for ``prompt`` with ``phrases`` (None: the rule-based chunker) and the phrases used."""
    phrases = noun_phrases(prompt) if phrases is None else phrases
    pw = model.prompt_words(prompt)   # a phrase not in the prompt is refused, naming it and the prompt's words
    spans = phrase_spans(phrases, lambda p: pw.occurrences(p) or (pw.positions(p, "noun phrase"),))
    full = model.encode([prompt])[0]
    states = list(model.encode(phrases)) if phrases else []
    value = aligned_values(full, states, spans).mean(0)
    return StructuredValuePatch(full, value), phrases


@torch.no_grad()
def generate(model: ShapesWorldModel, prompts: list[str], seed: int, steps: int, cfg: float,
             structured: bool) -> torch.Tensor:
    """Images (B, 3, S, S); with ``structured`` every prompt gets its noun-phrase values."""
    if not structured:
        return model.generate(prompts, seed=seed, steps=steps, cfg=cfg)
    parts = [structured_patch(model, p)[0] for p in prompts]
    patch = StructuredValuePatch(torch.cat([q.keys for q in parts]), torch.cat([q.values for q in parts]))
    return model.generate(prompts, seed=seed, steps=steps, cfg=cfg, extra={"patches": {"attn2_patch": [patch]}})


def binding_figures(model: ShapesWorldModel, n: int = 200, seed: int = 0, steps: int = 20, cfg: float = 5.0,
                    batch: int = 25) -> dict:
    """Baseline against StructureDiffusion on the same prompts and noise; seconds are per image."""
    clf = load_classifier()
    sets = pair_prompts(n, seed)
    prompts = [caption_for(objs, None) for objs in sets]
    out = {}
    for name, structured in (("baseline", False), ("StructureDiffusion", True)):
        t0 = time.perf_counter()
        images = torch.cat([generate(model, prompts[i:i + batch], seed + i, steps, cfg, structured)
                            for i in range(0, n, batch)]).cpu()
        seconds = time.perf_counter() - t0
        scores = object_scores(images, sets, clf)
        out[name] = {k: round(scores[k], 4) for k in ("binding", "colour_presence", "shape_agreement",
                                                       "attribute_swap")}
        out[name].update(seconds_per_image=round(seconds / n, 4), per_image=scores["per_image"])
    base, struct = out["baseline"].pop("per_image"), out["StructureDiffusion"].pop("per_image")
    out["fixed"] = sum(s and not b for b, s in zip(base, struct))
    out["broken"] = sum(b and not s for b, s in zip(base, struct))
    out["time_ratio"] = round(out["StructureDiffusion"]["seconds_per_image"] / out["baseline"]["seconds_per_image"], 3)
    out.update(prompts=n, steps=steps, cfg=cfg, phrases_example=structured_patch(model, prompts[0])[1])
    return out


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__, "attention.shapesworld.structure")
    cli.add_weights(p)
    p.add_argument("--prompts", type=cli.int_range(1), default=200, help="two-object prompts (CC-500 template)")
    p.add_argument("--seed", type=cli.int_range(0), default=0, help="seed of the prompt set and of the noise")
    p.add_argument("--steps", type=cli.int_range(1), default=20, help="Euler steps per image")
    p.add_argument("--cfg", type=cli.float_range(0), default=5.0, help="classifier-free guidance scale (1 = none)")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = cli.load_model(p, args.weights)
    res = binding_figures(model, args.prompts, args.seed, args.steps, args.cfg)
    log.info(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
