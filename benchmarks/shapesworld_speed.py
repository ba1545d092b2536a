"""Benchmark: ShapesWorld generation time on this machine (not a test).

    python benchmarks/shapesworld_speed.py [--weights FILE]

One 32x32 image, 20 Euler steps, CFG 5 (uncond and cond batched as ComfyUI does): median of
repeated runs after a warm-up, for 1 and 2 torch threads, and the per-image time in a batch of 8.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attention import cli  # noqa: E402


def median_time(fn, repeats: int = 7) -> float:
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main(argv=None):
    p = cli.parser(__doc__)
    cli.add_weights(p)
    args = p.parse_args(argv)
    model = cli.load_model(p, args.weights)
    prompt = ["a red circle and a blue square on a gray background"]
    for threads in (1, 2):
        torch.set_num_threads(threads)
        one = median_time(lambda: model.generate(prompt, seed=0, steps=20, cfg=5.0))
        eight = median_time(lambda: model.generate(prompt * 8, seed=0, steps=20, cfg=5.0), repeats=3)
        print(f"{threads} thread(s): one image {one:.3f} s; batch of 8 {eight:.3f} s ({eight / 8:.3f} s per image)")


if __name__ == "__main__":
    main()
