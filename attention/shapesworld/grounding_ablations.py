"""The ablations of the ShapesWorld grounding figure (split 1): what each ingredient of the head's recipe is worth.

Run by ``python -m attention.shapesworld.grounding`` (``--part ablations`` alone, ``--ablations`` to pick).
"""

from __future__ import annotations

import logging
from dataclasses import replace

from .grounding_data import SPLITS, Pool, build_pool, exact_examples, training_examples
from .grounding_eval import Recipe, cluster_masks, score_head, score_masks, summary_cells, train
from .world import SHAPES

log = logging.getLogger("attention_lab.grounding")

ABLATIONS = ("no_same", "colours", "prior", "t200", "drop8", "seen2", "self", "pseudo_template")


def ablations(model, pools: tuple, reference: tuple, test: Pool, same: Pool, test_items: list, clus: dict,
              templates: dict, recipe: Recipe, seed: int, which: tuple[str, ...] = ABLATIONS,
              n_plain: int = 256) -> list:
    """Split 1 only, prompt queries unless named; reported, not tuned on the test split. ``n_plain``: the ordinary
    (any-colour) scenes of the training set, its same-colour scenes come on top. Returns [name, main summary,
    same-colour summary] rows."""
    unseen = SPLITS[0]
    seen = tuple(w for w in SHAPES if w not in unseen)
    out: list = [["reference: the split-1 prompt-query head of the main table (t = 1, all 3 sizes, 4 seen words)",
                  reference[0].summary(unseen), reference[1].summary(unseen)]]
    exact, pseudo = pools

    def run(name, pool, rc, tpool=test, spool=same, seen_words=seen):
        head = train(pool, rc, templates, seen_words, name)[0]
        a = score_head(head, tpool, rc.mode, templates, rc.prior).summary(unseen)
        b = score_head(head, spool, rc.mode, templates, rc.prior).summary(unseen)
        out.append([name, a, b])
        log.info("ablation %s: main %s; same-colour %s", name, summary_cells(a), summary_cells(b))
    for key in which:
        if key == "no_same":
            plain = training_examples(40_000 + seed, len(exact.examples), seen, same_colour_share=0.0)
            run("no same-colour training scenes (the paper's kind of set; same number of scenes)",
                build_pool(model, plain, seed=4), recipe)
        elif key == "colours":
            run("colour words as extra training queries", exact, replace(recipe, colours=True))
        elif key == "prior":
            run("word's cross-attention map as an extra input (ours, not the paper's)", exact,
                replace(recipe, prior=True))
        elif key == "t200":
            items = training_examples(40_000 + seed, n_plain, seen)
            same_items = exact_examples(20_000 + seed, len(same.examples), same_colour=True)
            run("features at t = 200 (train and test)", build_pool(model, items, t=200, seed=4), recipe,
                build_pool(model, test_items, t=200, seed=1), build_pool(model, same_items, t=200, seed=2))
        elif key == "drop8":
            run("8x8 features dropped", exact.with_levels([1, 2]), recipe, test.with_levels([1, 2]),
                same.with_levels([1, 2]))
        elif key == "seen2":
            two = seen[:2]
            run(f"2 seen words ({', '.join(two)}; same number of scenes)",
                build_pool(model, training_examples(50_000 + seed, n_plain, two), seed=5), recipe,
                seen_words=two)
        elif key == "self":
            n_st = min(48, len(exact.examples))
            cm = cluster_masks(model, exact_examples(40_000 + seed, n_st, seen), seed=777)
            st_pool = exact.subset(list(range(n_st)))
            st_pool = replace(st_pool, examples=[replace(e, masks=m, valid=m.flatten(1).any(1))
                                                 for e, m in zip(st_pool.examples, cm)])
            run(f"self-training: head on SelfAttnCluster masks of {n_st} training scenes (compare with the "
                "SelfAttnCluster row)", st_pool, recipe)
            n = len(clus["main"])
            out.append(["SelfAttnCluster masks themselves (first test scenes of each set)",
                        score_masks(test.subset(list(range(n))), clus["main"]).summary(unseen),
                        score_masks(same.subset(list(range(n))), clus["same"]).summary(unseen)])
        elif key == "pseudo_template" and pseudo is not None:
            run("pseudo-labels, template queries (the paper's whole pipeline)", pseudo,
                replace(recipe, mode="template"))
    return out
