"""Benchmark: cost of AttentionCapture relative to plain sampling, and the store's memory.

    python benchmarks/capture_overhead.py [--repeats 5]

Measured in one run on the ShapesWorld model (same seed, prompt batch and steps):
time(sampling with capture on every cross-attention layer + self-attention at 32x32 and
below) / time(plain sampling), medians of interleaved repeats; and the store's size after
10, 20 and 50 steps (it must not grow with the step count).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attention import cli  # noqa: E402
from attention.controller import AttentionController  # noqa: E402
from attention.shapesworld.model import patches_for  # noqa: E402
from attention.store import AttentionStore, StoreConfig  # noqa: E402

PROMPTS = ["a red circle and a blue square", "a green star on a black background",
           "a yellow triangle, a purple cross and a cyan diamond", "an orange square"]


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--repeats", type=cli.int_range(1), default=5, help="interleaved timed runs per variant")
    p.add_argument("--steps", type=cli.int_range(1), default=20, help="Euler steps per run")
    p.add_argument("--threads", type=cli.int_range(1), default=2, help="torch CPU threads")
    cli.add_weights(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = cli.load_model(p, args.weights)
    store = AttentionStore(StoreConfig(self_max_tokens=32 * 32))
    capture = patches_for(store)
    passthrough = patches_for(AttentionController())  # our wrapper with nothing to do
    runs = {"plain": None, "wrapper only": passthrough, "capture": capture}
    times: dict[str, list[float]] = {k: [] for k in runs}
    model.generate(PROMPTS, seed=0, steps=2)  # warm-up
    for _ in range(args.repeats):
        for name, patches in runs.items():
            store.reset()
            times[name].append(timed(lambda p=patches: model.generate(PROMPTS, seed=0, steps=args.steps, patches=p)))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"ShapesWorld, batch {len(PROMPTS)}, {args.steps} steps, CFG 5, {args.threads} threads, "
          f"median of {args.repeats} interleaved runs")
    for k in runs:
        print(f"  {k:13s} {med[k]:.3f} s   ratio to plain {med[k] / med['plain']:.3f}")
    print("store size after N steps (must stay flat):")
    for steps in (10, 20, 50):
        store.reset()
        model.generate(PROMPTS, seed=0, steps=steps, patches=capture)
        print(f"  {steps:3d} steps: {store.nbytes() / 2**20:.2f} MiB over {len(store.cross)} cross + "
              f"{len(store.self_)} self layers, {len(store.steps_recorded)} steps recorded")


if __name__ == "__main__":
    main()
