"""Cost of the nodes' model-evaluation path on ShapesWorld inside ComfyUI, to compare two checkouts of the pack.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/node_path_cost.py [--pack DIR] [--steps 20] [--repeats 3]

Runs the real nodes of the pack checked out at ``--pack`` (default: this checkout; give another one, e.g. a
checkout of an older commit, to measure the same work on its code) on the embedded ShapesWorld model, and prints
the median wall time of each, and its ratio to a stock KSampler image of the same steps timed in the same
process (the ratio is what to compare between checkouts; the seconds follow the machine's load):

* KSampler: one image, euler, ``steps`` steps, CFG 7.5 (the reference);
* P2P from a seed: P2PEditSampler, source + 2 edits (circle -> triangle, red -> green), LocalBlend;
* NullTextInvert: null-text mode, official settings (10 inner steps, early stop 1e-5);
* P2P from the inversion: P2PEditSampler on that inversion, source + 1 edit.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

SOURCE = "a red circle and a blue square on a gray background"
TARGETS = ["a red triangle and a blue square on a gray background",
           "a green circle and a blue square on a gray background"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pack", default=str(Path(__file__).resolve().parents[1]), help="checkout of the pack to run")
    p.add_argument("--steps", type=int, default=20, help="sampling / inversion steps")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per node (median reported)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    if not (Path(os.environ.get("COMFYUI_PATH", "")) / "comfy").is_dir():
        p.error("set COMFYUI_PATH to a ComfyUI checkout and run this with that ComfyUI's python")
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(args.pack).resolve() / "tests"))
    from comfy_env import comfy_or_skip, encode, sample
    comfy_or_skip()
    from attention_lab.nodes.inversion import NullTextInvert
    from attention_lab.nodes.p2p import P2PEditSampler
    from attention_lab.nodes.shapesworld import load_shapesworld
    model, clip, _ = load_shapesworld()
    n = args.steps
    lat = torch.zeros(1, 3, 32, 32)
    p2p_args = dict(edit="auto", seed=0, steps=n, cfg=7.5, scheduler="simple", cross_replace_steps=0.8,
                    cross_replace_words="", self_replace_steps=0.4, reweight="", blend_words="circle, triangle",
                    blend_threshold=0.3, blend_start=0.2)
    state = {}

    def stock():
        return sample(model, encode(clip, SOURCE), encode(clip, ""), lat, cfg=7.5, sampler="euler", steps=n, seed=0,
                      scheduler="simple")

    def p2p_seed():
        return P2PEditSampler.execute(model, clip, SOURCE, "\n".join(TARGETS), encode(clip, ""), {"samples": lat},
                                      **p2p_args).result

    def invert():
        state["inv"] = NullTextInvert.execute(model, clip, SOURCE, "null-text", n, 7.5, "simple", 10, 1e-5,
                                              latent={"samples": state["image"]}).result[0]

    def p2p_inverted():
        return P2PEditSampler.execute(model, clip, SOURCE, TARGETS[0], encode(clip, ""), {"samples": lat},
                                      inversion=state["inv"], **p2p_args).result

    runs = {"KSampler (1 image)": stock, "P2P from a seed (3 rows)": p2p_seed, "NullTextInvert null-text": invert,
            "P2P from the inversion (2 rows)": p2p_inverted}
    times = {k: [] for k in runs}
    with torch.inference_mode():
        state["image"] = stock()
        for fn in runs.values():
            fn()                                  # warm-up
        for _ in range(args.repeats):             # interleaved, so load changes hit every node alike
            for name, fn in runs.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = med["KSampler (1 image)"]
    print(f"pack {Path(args.pack).resolve()}, ShapesWorld 32x32, {n} steps, {args.repeats} interleaved runs, "
          f"{torch.get_num_threads()} thread(s)")
    for name, t in med.items():
        print(f"  {name:34s} {t:7.3f} s   {t / ref:6.2f} x KSampler")


if __name__ == "__main__":
    main()
