"""Cost of a Prompt-to-Prompt edit on a DiT (ShapesWorld-Flow) against plain sampling of the same batch, one run.

    OMP_NUM_THREADS=1 python benchmarks/dit_p2p_cost.py [--steps 20] [--cfg 4] [--repeats 15] [--threads 1]
                                                        [--baseline OTHER_CHECKOUT]

The runs of ``attention.shapesworld.flow_p2p_figures.cost`` (its ``edit``: the 3-row batch [source, 2 targets]
sampled plainly with no hook, edited, edited with LocalBlend; same seed, sigmas and CFG), interleaved round by
round. ``--baseline DIR``: the same three runs of another checkout's ``attention`` package (e.g. ``git worktree add
/tmp/base main``), loaded beside this one and timed in the same rounds, for a before/after from one run on a
shared machine. Printed as JSON: per variant the median wall seconds (``time.perf_counter``, what ``cost()``
reports) and the median CPU seconds of this process (``time.process_time``, less moved by other jobs, with one
thread); each edit's ratio of medians to its own checkout's plain sampling, and the spread (min, max) of its
per-round ratios (a round times every variant back to back, every other round in reverse order); LocalBlend's
store bytes after a run. Then ``store_observe_ms``: one ``AttentionStore.observe_probs`` call on probabilities of
``--store-shape`` (cond rows, heads, grid queries, text keys; default a 512 px Flux: 3 rows, 24 heads, 32x32
tokens, 512 T5 keys) keeping every key, as LocalBlend's store did, against one narrowed to a word's key
(``keep_keys``), median of ``--store-repeats`` calls each. ``--profile N``: instead, N edits with LocalBlend under
cProfile, printing the share of the run (and ms per run) spent in each piece of the edit and of LocalBlend
(cProfile's own per-call cost inflates the Python-heavy pieces; the ratios above are without it).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attention import cli  # noqa: E402
from attention.context import AttnContext  # noqa: E402
from attention.layers import LayerId  # noqa: E402
from attention.shapesworld import flow_p2p_figures as figures  # noqa: E402
from attention.shapesworld.flow_evaluate import add_weights, load_model  # noqa: E402
from attention.store import AttentionStore, StoreConfig  # noqa: E402

PIECES = {   # (file, function) -> what it is
    ("joint.py", "dit_call"): "hook on every DiT attention call (all below that runs inside attention)",
    ("calls.py", "kernel_except"): "model kernel on the rows/queries not recomputed (edit steps)",
    ("joint.py", "_explicit_cond_grid"): "edit steps: kernel_except + cond rows' grid queries explicit + edit + store",
    ("p2p_joint.py", "edit_probs"): "P2P edit of the probabilities (cross replace, self injection, renormalize)",
    ("joint.py", "_observe"): "LocalBlend maps of the steps with no edit due (explicit softmax of the cond rows)",
    ("store.py", "observe_probs"): "LocalBlend store: head mean + running sum of the words' columns",
    ("store.py", "wants_probs"): "LocalBlend store: which calls it reads",
    ("p2p.py", "__call__"): "LocalBlend after each step: mask (aggregate, pool, upsample, threshold) + blend",
    ("context.py", "batch_and_step"): "step and batch layout of each call",
}

EDITS = {"plain": dict(hooked=False), "edit": {}, "edit + LocalBlend": dict(blend=True)}


def load_baseline(root: Path):
    """(flow_p2p_figures, flow_evaluate) of the ``attention`` package under ``root``, imported as
    ``attention_baseline`` (the package's own imports are relative)."""
    pkg = root / "attention"
    if not (pkg / "shapesworld" / "flow_p2p_figures.py").is_file():
        raise SystemExit(f"--baseline {root}: no attention/shapesworld/flow_p2p_figures.py there; give the root of "
                         f"another checkout of this pack")
    name = "attention_baseline"
    spec = importlib.util.spec_from_file_location(name, pkg / "__init__.py", submodule_search_locations=[str(pkg)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return (importlib.import_module(f"{name}.shapesworld.flow_p2p_figures"),
            importlib.import_module(f"{name}.shapesworld.flow_evaluate"))


def main(argv=None):
    p = cli.parser(__doc__)
    add_weights(p)
    p.add_argument("--steps", type=cli.int_range(2), default=20, help="sampling steps (2 or more)")
    p.add_argument("--cfg", type=cli.float_range(0), default=4.0, help="classifier-free guidance (>= 0)")
    p.add_argument("--repeats", type=cli.int_range(1), default=15, help="interleaved timed rounds (1 or more)")
    p.add_argument("--threads", type=cli.int_range(1), default=1, help="torch CPU threads (1 or more)")
    p.add_argument("--store-shape", type=int, nargs=4, default=(3, 24, 1024, 512), metavar=("ROWS", "HEADS", "N", "M"),
                   help="probabilities of the store timing: cond rows, heads, grid queries (a square), text keys")
    p.add_argument("--store-repeats", type=cli.int_range(1), default=5, help="timed store calls per variant")
    p.add_argument("--profile", type=cli.int_range(1), default=None, metavar="N",
                   help="instead: N edits with LocalBlend under cProfile, the share of each piece (1 or more)")
    p.add_argument("--baseline", type=Path, default=None,
                   help="root of another checkout whose edits are timed in the same rounds (before/after)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.profile:
        return profile(load_model(p, args.weights), args)
    sides = {"": (figures, load_model(p, args.weights))}
    if args.baseline is not None:
        base_figures, base_evaluate = load_baseline(args.baseline.resolve())
        sides["baseline "] = (base_figures, base_evaluate.load_model(p, args.weights))
    runs = {prefix + name: (mod, model, kw) for prefix, (mod, model) in sides.items() for name, kw in EDITS.items()}
    sigmas = sides[""][1].sigmas(args.steps)
    x_T = sides[""][1].noise(1, 0) * sigmas[0]
    keep: dict = {}
    for mod, model, kw in runs.values():                  # warm-up
        mod.edit(model, x_T, sigmas, args.cfg, mod.TARGETS, **kw)
    wall: dict[str, list] = {k: [] for k in runs}
    cpu: dict[str, list] = {k: [] for k in runs}
    for r in range(args.repeats):
        for name, (mod, model, kw) in list(runs.items())[::-1 if r % 2 else 1]:   # every other round reversed
            w, c = time.perf_counter(), time.process_time()
            mod.edit(model, x_T, sigmas, args.cfg, mod.TARGETS, keep=keep, **kw)
            cpu[name].append(time.process_time() - c)
            wall[name].append(time.perf_counter() - w)
            if kw.get("blend"):
                keep[name] = keep.pop("blend").store.nbytes()
    out = {"rows": 3, "steps": args.steps, "cfg": args.cfg, "repeats": args.repeats, "threads": args.threads,
           "baseline": None if args.baseline is None else str(args.baseline)}
    for label, times in (("wall", wall), ("cpu", cpu)):
        med = {k: statistics.median(v) for k, v in times.items()}
        over, spread = {}, {}
        for prefix in sides:
            ref = times[prefix + "plain"]
            for name in EDITS:
                if name == "plain":
                    continue
                key = prefix + name
                over[key] = round(med[key] / med[prefix + "plain"], 3)
                rounds = [a / b for a, b in zip(times[key], ref)]
                spread[key] = [round(min(rounds), 3), round(max(rounds), 3)]
        out[label] = {"median_seconds": {k: round(v, 4) for k, v in med.items()}, "over_plain": over,
                      "per_round_over_plain_min_max": spread}
    out["localblend_store_bytes"] = {k: v for k, v in keep.items() if isinstance(v, int)}
    out["store_observe_ms"] = store_observe(args.store_shape, args.store_repeats)
    print(json.dumps(out, indent=1), flush=True)


def profile(model, args) -> None:
    """The share of ``args.profile`` edits with LocalBlend (cumulative time under cProfile) in each of PIECES."""
    import cProfile
    import pstats
    sigmas = model.sigmas(args.steps)
    x_T = model.noise(1, 0) * sigmas[0]
    figures.edit(model, x_T, sigmas, args.cfg, figures.TARGETS, blend=True)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.profile):
        figures.edit(model, x_T, sigmas, args.cfg, figures.TARGETS, blend=True)
    prof.disable()
    stats = pstats.Stats(prof).stats
    total = sum(tt for (_, _, _), (_, _, tt, _, _) in stats.items())
    out = {"runs": args.profile, "ms_per_run_under_cprofile": round(total / args.profile * 1000, 1), "pieces": {}}
    for (file, func), what in PIECES.items():
        cum = sum(ct for (f, _, fn), (_, _, _, ct, _) in stats.items()
                  if f.endswith("attention/" + file) and fn == func)
        out["pieces"][f"{file}:{func}"] = {"share": round(cum / total, 4),
                                           "ms_per_run": round(cum / args.profile * 1000, 2), "what": what}
    print(json.dumps(out, indent=1), flush=True)


def store_observe(shape: tuple[int, ...], repeats: int) -> dict:
    """Median ms of one observe_probs call of a store keeping every key and of one keeping a single key."""
    rows, heads, n, m = shape
    side = int(n ** 0.5)
    probs = torch.rand(rows, heads, n, m, generator=torch.Generator().manual_seed(0))
    ctx = AttnContext(layer=LayerId("double", 0, 0), is_cross=True, height=side, width=n // side, heads=heads,
                      cond_or_uncond=[0], items=rows, sigma=None, step=0, n_steps=1)
    out = {"shape": list(shape)}
    for name, keys in (("every key", None), ("one word's key", (5,))):
        store = AttentionStore(StoreConfig(capture_self=False))
        if keys:
            store.keep_keys(keys)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            store.observe_probs(probs, ctx, slice(0, n), list(range(rows)))
            times.append((time.perf_counter() - t) * 1000)
        out[name] = round(statistics.median(times), 2)
    return out


if __name__ == "__main__":
    main()
