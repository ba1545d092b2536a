"""Cost of a Prompt-to-Prompt edit on a DiT (ShapesWorld-Flow) against plain sampling of the same batch, one run.

    OMP_NUM_THREADS=1 python benchmarks/dit_p2p_cost.py [--steps 20] [--cfg 4] [--repeats 15] [--threads 1]

The runs of ``attention.shapesworld.flow_p2p_figures.cost`` (its ``edit``: the 3-row batch [source, 2 targets]
sampled plainly with no hook, edited, edited with LocalBlend; same seed, sigmas and CFG), interleaved round by
round. Printed as JSON: per variant the median wall seconds (``time.perf_counter``, what ``cost()`` reports) and
the median CPU seconds of this process (``time.process_time``, less moved by other jobs on a shared machine, with
one thread); the ratios of the medians to plain sampling, and the spread (min, max) of the per-round ratios (each
round times the three variants back to back); LocalBlend's store bytes after the run.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attention import cli  # noqa: E402
from attention.shapesworld import flow_p2p_figures as figures  # noqa: E402
from attention.shapesworld.flow_evaluate import add_weights, load_model  # noqa: E402

VARIANTS = {"plain": dict(hooked=False), "edit": {}, "edit + LocalBlend": dict(blend=True)}


def main(argv=None):
    p = cli.parser(__doc__)
    add_weights(p)
    p.add_argument("--steps", type=cli.int_range(2), default=20, help="sampling steps (2 or more)")
    p.add_argument("--cfg", type=cli.float_range(0), default=4.0, help="classifier-free guidance (>= 0)")
    p.add_argument("--repeats", type=cli.int_range(1), default=15, help="interleaved timed rounds (1 or more)")
    p.add_argument("--threads", type=cli.int_range(1), default=1, help="torch CPU threads (1 or more)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(p, args.weights)
    sigmas = model.sigmas(args.steps)
    x_T = model.noise(1, 0) * sigmas[0]
    keep: dict = {}
    for kw in VARIANTS.values():                          # warm-up
        figures.edit(model, x_T, sigmas, args.cfg, figures.TARGETS, keep=keep, **kw)
    wall: dict[str, list] = {k: [] for k in VARIANTS}
    cpu: dict[str, list] = {k: [] for k in VARIANTS}
    for _ in range(args.repeats):
        for name, kw in VARIANTS.items():
            w, c = time.perf_counter(), time.process_time()
            figures.edit(model, x_T, sigmas, args.cfg, figures.TARGETS, keep=keep, **kw)
            cpu[name].append(time.process_time() - c)
            wall[name].append(time.perf_counter() - w)
    out = {"rows": 3, "steps": args.steps, "cfg": args.cfg, "repeats": args.repeats, "threads": args.threads}
    for label, times in (("wall", wall), ("cpu", cpu)):
        med = {k: statistics.median(v) for k, v in times.items()}
        rounds = {k: [a / b for a, b in zip(v, times["plain"])] for k, v in times.items() if k != "plain"}
        out[label] = {"median_seconds": {k: round(v, 4) for k, v in med.items()},
                      "over_plain": {k: round(med[k] / med["plain"], 3) for k in rounds},
                      "per_round_over_plain_min_max": {k: [round(min(r), 3), round(max(r), 3)]
                                                       for k, r in rounds.items()}}
    out["localblend_store_bytes"] = keep["blend"].store.nbytes()
    print(json.dumps(out, indent=1), flush=True)


if __name__ == "__main__":
    main()
