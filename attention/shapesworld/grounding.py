"""Grounded generation (Li et al. 2023) on ShapesWorld: the seen/unseen figure and the embedded head.

Same core as the ComfyUI nodes: features through ``attention/grounding_features.py`` (ComfyUI's block patches),
the head, queries, loss and training loop of ``attention/grounding.py``. Protocol (docs/grounding.md):
the 6 shape words in three splits of 4 seen / 2 unseen; training scenes and prompts contain seen shapes only;
test scenes (fresh seeds, 1-3 objects of any shape and colour, so distractors with the same colour or shape
occur) query every object's shape word; a same-colour set (2-3 objects of one colour, distinct shapes) is
reported separately. Features: every block output at t = 1 (upstream), uncond ‖ cond, of the image re-noised to
t. Per class IoU = sum(I) / sum(U) over the test queries; mIoU over seen and unseen classes; H = their
harmonic mean; leakage = share of predicted pixels on other objects. This file is the figure and its command;
the scene sets, feature pool and queries are ``grounding_data.py``, training and scoring ``grounding_eval.py``,
the ablations ``grounding_ablations.py``, the embedded head ``grounding_asset.py``.

    python -m attention.shapesworld.grounding [--quick] [--threads 1]   # the figure (--quick: one split, smaller)
    python -m attention.shapesworld.grounding --part main --splits 2 --scores s2.json   # one piece of it ...
    python -m attention.shapesworld.grounding --combine s1.json s2.json ...              # ... and the tables
    python -m attention.shapesworld.grounding --train-asset [--force]   # the embedded head under assets/
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import torch

from .. import cli
from .grounding_ablations import ABLATIONS, ablations
from .grounding_asset import HEAD_ASSET, train_asset
from .grounding_data import (
    SAME_COLOUR_SHARE,
    SPLITS,
    build_pool,
    exact_examples,
    pseudo_examples,
    template_vectors,
    training_examples,
)
from .grounding_eval import (
    Recipe,
    best_threshold,
    cluster_masks,
    crossattn_masks,
    score_head,
    score_masks,
    summary_cells,
    train,
)
from .model import ShapesWorldModel
from .world import SHAPES

log = logging.getLogger("attention_lab.grounding")

PROMPT_ROW = "head, exact masks, prompt queries (ours, default)"


def _row(name: str, per_split: list[dict]) -> str:
    avg = {k: sum(d[k] for d in per_split) / len(per_split) for k in per_split[0]}
    cells = " | ".join(f"{d['seen']:.3f} / {d['unseen']:.3f} / {d['h']:.3f}" for d in per_split)
    return (f"| {name} | {cells} | **{avg['seen']:.3f} / {avg['unseen']:.3f} / {avg['h']:.3f}** | "
            f"{avg['leak']:.3f} |")



def figure(model: ShapesWorldModel, quick: bool = False, seed: int = 0, sizes: tuple | None = None,
           steps: int | None = None, part: str = "all", splits: tuple[int, ...] = (1, 2, 3),
           which: tuple[str, ...] = ABLATIONS, heads: tuple[str, ...] = ("prompt", "template", "pseudo"),
           device: str = "cpu") -> dict:
    """The measurements as a JSON-able dict (``render`` turns one or several into the tables). Full: 3 splits,
    256 exact-mask training scenes per split, 96 generated images for pseudo-labels, 144 + 60 test scenes,
    ablations on split 1; quick: split 1, 160 scenes, 48 + 24 test scenes, no pseudo-label head, no ablations.
    ``part``: "all", "main" (the two tables) or "ablations" (``which`` of split 1's ablations); ``splits``: the
    split numbers of the main tables, so the figure can run as several processes; rows are also logged as they
    are measured. Every exact-mask training set also holds half as many same-colour scenes (``training_examples``)."""
    t_all = time.perf_counter()
    ks = (1,) if quick or part == "ablations" else tuple(splits)
    n_train, n_pseudo, n_test, n_same = sizes or ((160, 0, 48, 24) if quick else (256, 96, 144, 60))
    recipe = Recipe(steps=steps or (200 if quick else Recipe.steps), device=device)
    templates = template_vectors(model)
    costs: dict[str, float] = {}

    t = time.perf_counter()
    test_items = exact_examples(10_000 + seed, n_test)
    same_items = exact_examples(20_000 + seed, n_same, same_colour=True)
    test, same = build_pool(model, test_items, seed=1), build_pool(model, same_items, seed=2)
    costs["test features (s/image)"] = (time.perf_counter() - t) / (n_test + n_same)
    t = time.perf_counter()
    thr = best_threshold(test)
    n_cluster = min(n_test, 24 if quick else 48, len(same_items))
    clus = {"main": cluster_masks(model, test_items[:n_cluster]), "same": cluster_masks(model, same_items[:n_cluster])}
    costs["SelfAttnCluster (s/image)"] = (time.perf_counter() - t) / (2 * n_cluster)
    sub, same_sub = test.subset(list(range(n_cluster))), same.subset(list(range(n_cluster)))
    baselines = {
        "cross-attention word masks, threshold 0.5 (AttentionMapView default)":
            (score_masks(test, crossattn_masks(test, 0.5)), score_masks(same, crossattn_masks(same, 0.5))),
        f"cross-attention word masks, oracle threshold {thr:.2f} (best on this test set)":
            (score_masks(test, crossattn_masks(test, thr)), score_masks(same, crossattn_masks(same, thr))),
        f"SelfAttnCluster word masks (t=400, 5 clusters, 0.3; first {n_cluster} scenes of each set)":
            (score_masks(sub, clus["main"]), score_masks(same_sub, clus["same"])),
    }
    pseudo, kept = None, 0.0
    if n_pseudo and (("pseudo" in heads and part != "ablations") or (part != "main" and "pseudo_template" in which)):
        t = time.perf_counter()
        pseudo_items = pseudo_examples(model, 30_000 + seed, n_pseudo)
        costs["pseudo-label fill: generate 20 steps + label (s/image)"] = (time.perf_counter() - t) / n_pseudo
        pseudo = build_pool(model, pseudo_items, seed=3)
        kept = float(torch.cat([e.valid for e in pseudo.examples]).float().mean())

    rows: dict[str, dict[str, list[dict]]] = {}
    for name, (a, b) in baselines.items():
        rows[name] = {str(k): [a.summary(SPLITS[k - 1]), b.summary(SPLITS[k - 1])] for k in ks}
        log.info("baseline %s: %s", name, {k: summary_cells(v[0]) for k, v in rows[name].items()})
    train_s, seg_s, ablation_rows = [], [], []
    for k in ks:
        unseen = SPLITS[k - 1]
        seen = tuple(w for w in SHAPES if w not in unseen)
        t = time.perf_counter()
        exact = build_pool(model, training_examples(40_000 + 100 * (k - 1) + seed, n_train, seen), seed=3 + k)
        costs["exact-mask fill: features (s/image)"] = (time.perf_counter() - t) / len(exact.examples)
        runs = [(PROMPT_ROW, exact, replace(recipe, mode="prompt")),
                ("head, exact masks, template queries (paper)", exact, replace(recipe, mode="template"))]
        own = None
        if pseudo is not None:
            own = pseudo.subset([i for i, e in enumerate(pseudo.examples) if all(s in seen for _, s in e.objects)])
            runs.append(("head, pseudo-labels, prompt queries", own, replace(recipe, mode="prompt")))
        reference = None
        kinds = ("prompt", "template", "pseudo")
        chosen = runs[:1] if part == "ablations" else [r for r, kind in zip(runs, kinds) if kind in heads]
        for name, pool, rc in chosen:
            head, meta, sec = train(pool, rc, templates, seen, name)
            train_s.append(sec)
            t = time.perf_counter()
            a, b = score_head(head, test, rc.mode, templates), score_head(head, same, rc.mode, templates)
            seg_s.append((time.perf_counter() - t) / (n_test + n_same))
            rows.setdefault(name, {})[str(k)] = [a.summary(unseen), b.summary(unseen)]
            reference = reference or (a, b)
            log.info("split %d %s: trained in %.1f s; main %s; same-colour %s", k, name, sec,
                     summary_cells(a.summary(unseen)), summary_cells(b.summary(unseen)))
        if k == 1 and not quick and part != "main":
            ablation_rows = ablations(model, (exact, own), reference, test, same, test_items, clus, templates,
                                      recipe, seed, which, n_train)
    costs["train one head (s)"] = sum(train_s) / len(train_s)
    costs["segment (s/image)"] = sum(seg_s) / len(seg_s)
    costs["this process (s)"] = time.perf_counter() - t_all
    return {"splits": list(ks), "part": part, "rows": rows if part != "ablations" else {},
            "ablations": ablation_rows, "costs": costs,
            "setup": {"train": n_train, "pseudo": n_pseudo, "kept": kept, "test": n_test, "same": n_same,
                      "steps": recipe.steps, "batch": recipe.batch, "lr": recipe.lr, "device": device,
                      "same_colour_share": SAME_COLOUR_SHARE}}


def render(results: list[dict]) -> list[str]:
    """Markdown tables of one or several ``figure`` results (e.g. one process per split)."""
    main = [r for r in results if r["rows"]]
    ks = sorted({k for r in main for k in r["splits"]})
    lines: list[str] = []
    if main:
        rows: dict[str, dict[str, list]] = {}
        for r in main:
            for name, per in r["rows"].items():
                rows.setdefault(name, {}).update(per)
        st = dict(main[0]["setup"])
        with_pseudo = [r["setup"] for r in main if r["setup"]["pseudo"]]
        if with_pseudo:
            st.update(pseudo=with_pseudo[0]["pseudo"], kept=with_pseudo[0]["kept"])
        pseudo_note = (f"or the seen-only share of {st['pseudo']} generated images (pseudo-labels: {st['kept']:.0%} "
                       f"of objects kept by the classifier)" if st["pseudo"] else "(no pseudo-label head)")
        share = st.get("same_colour_share", 0.0)
        extra = f" + {round(st['train'] * share)} same-colour" if share else ""
        lines += [f"Seen/unseen grounding on ShapesWorld ({len(ks)} split(s) of 4 seen / 2 unseen shapes; "
                  f"{st['train']}{extra} exact-mask training scenes per split {pseudo_note}, {st['steps']} Adam "
                  f"steps of {st['batch']}, lr {st['lr']}; test: {st['test']} scenes + a same-colour set of "
                  f"{st['same']}; run on {st.get('device', 'cpu')}). "
                  "Cells: mIoU seen / unseen / harmonic mean per split; leakage = share of predicted pixels on "
                  "other objects.", ""]
        head_cols = " | ".join(f"split {k} (unseen {', '.join(SPLITS[k - 1])})" for k in ks)
        heads = [n for n in rows if n.startswith("head")]
        for title, which in (("Main test set", 0), ("Same-colour distractor set (colour cannot name the object)", 1)):
            lines += [f"**{title}**", "", f"| method | {head_cols} | mean | leakage |",
                      "|---|" + "---|" * (len(ks) + 2)]
            for name in heads + [n for n in rows if n not in heads]:
                per = rows[name]
                if all(str(k) in per for k in ks):
                    lines.append(_row(name, [per[str(k)][which] for k in ks]))
            lines.append("")
    abl = [a for r in results for a in r["ablations"]]
    if abl:
        lines += [f"**Ablations** (split 1, unseen {', '.join(SPLITS[0])}; prompt queries unless named; cells: mIoU "
                  "seen / unseen / H, main set | same-colour set; leakage on the main set)", "",
                  "| variant | main set | same-colour set | leakage |", "|---|---|---|---|"]
        seen_names = set()
        for name, a, b in abl:
            if name in seen_names:
                continue
            seen_names.add(name)
            lines.append(f"| {name} | {a['seen']:.3f} / {a['unseen']:.3f} / {a['h']:.3f} | "
                         f"{b['seen']:.3f} / {b['unseen']:.3f} / {b['h']:.3f} | {a['leak']:.3f} |")
        lines.append("")
    for r in results:
        lines.append(f"Costs ({r['part']}, splits {r['splits']}): "
                     + "; ".join(f"{k} {v:.3f}" for k, v in r["costs"].items()) + ".")
    return lines + [""]



def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__, "attention.shapesworld.grounding")
    p.add_argument("--quick", action="store_true", help="one split, smaller sets, no ablations (the demo's size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--part", choices=("all", "main", "ablations"), default="all",
                   help="main: the two tables; ablations: split 1's ablations")
    p.add_argument("--splits", default="1,2,3", help="split numbers of the main tables (one process per split)")
    p.add_argument("--ablations", default=",".join(ABLATIONS), help=f"which ablations ({', '.join(ABLATIONS)})")
    p.add_argument("--heads", default="prompt,template,pseudo", help="main-table heads to train (prompt, template: "
                   "exact masks; pseudo: pseudo-labels, prompt queries)")
    p.add_argument("--sizes", default="", help="train,pseudo,test,same (default 256,96,144,60; quick 160,0,48,24)")
    p.add_argument("--steps", type=int, default=0, help=f"Adam steps per head (default {Recipe.steps}; quick 200)")
    p.add_argument("--scores", default="", help="also write the measurements as JSON here (for --combine)")
    p.add_argument("--combine", nargs="+", default=None, help="print the tables of several --scores files")
    p.add_argument("--train-asset", action="store_true", help="train the embedded head instead of the figure")
    p.add_argument("--out", default=str(HEAD_ASSET), help="where --train-asset writes the head")
    p.add_argument("--force", action="store_true", help="let --train-asset replace an existing file")
    p.add_argument("--device", default="cpu", help="torch device of the UNet and the head training (cpu, cuda); "
                   "the same numbers up to float rounding, in far less time on a GPU")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default; 1 is much faster "
                   "than 2 when other processes share the 2 cores)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.combine:
        log.info("\n".join(render([json.loads(Path(f).read_text()) for f in args.combine])))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    model = ShapesWorldModel(device=args.device)
    if args.train_asset:
        train_asset(model, Path(args.out), args.force, seed=args.seed)
        return
    sizes = tuple(int(x) for x in args.sizes.split(",")) if args.sizes else None
    result = figure(model, args.quick, args.seed, sizes, args.steps or None, args.part,
                    tuple(int(x) for x in args.splits.split(",")), tuple(args.ablations.split(",")),
                    tuple(args.heads.split(",")), args.device)
    if args.scores:
        Path(args.scores).write_text(json.dumps(result, indent=1))
    log.info("\n".join(render([result])))


if __name__ == "__main__":
    main()
