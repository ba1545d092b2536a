"""The embedded ShapesWorld grounding head (``assets/shapesworld_grounding.safetensors``): how it is trained.

    python -m attention.shapesworld.grounding --train-asset [--force] [--out FILE]
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..grounding_head_file import HeadMeta, load_head, save_head
from .grounding_data import SPLITS, build_pool, template_vectors, training_examples
from .grounding_eval import Recipe, train
from .model import ShapesWorldModel
from .weights import ASSETS
from .world import SHAPES

log = logging.getLogger("attention_lab.grounding")

HEAD_ASSET = ASSETS / "shapesworld_grounding.safetensors"


def train_asset(model: ShapesWorldModel, path: Path = HEAD_ASSET, force: bool = False, scenes: int = 384,
                steps: int = Recipe.steps, seed: int = 0) -> tuple[Path, HeadMeta]:
    """The embedded head: split 1 (unseen star, diamond), exact masks, prompt queries. Refuses to overwrite."""
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists (the shipped head); pass --force to retrain and replace it, or "
                              f"--out another path")
    seen = tuple(w for w in SHAPES if w not in SPLITS[0])
    pool = build_pool(model, training_examples(60_000 + seed, scenes, seen), seed=seed)
    recipe = Recipe(steps=steps, seed=seed)
    head, meta, sec = train(pool, recipe, template_vectors(model), seen,
                            f"exact masks of {len(pool.examples)} ShapesWorld scenes (seed {60_000 + seed}: {scenes} "
                            f"in any colours + {len(pool.examples) - scenes} same-colour), seen shapes only")
    save_head(path, head, meta, overwrite=True)
    log.info("wrote %s: %d steps in %.0f s, final loss %.4f", path, steps, sec, meta.training["final_loss"])
    return path, meta


def load_asset(path: Path = HEAD_ASSET):
    return load_head(path)
