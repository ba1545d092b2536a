"""Cost of inversion and Prompt-to-Prompt relative to plain sampling, measured in one run (ShapesWorld, CPU).

    python benchmarks/editing_speed.py [--steps 50] [--threads 2] [--weights FILE]

Prints, per inversion mode, its time and UNet evaluations (rows: one image at one sigma, forward or
backward) relative to plain CFG sampling of the same image with the same steps, and the time of a
P2P batch (source + 2 edits, with and without LocalBlend) relative to plain sampling of a batch of 3.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attention import cli  # noqa: E402
from attention.shapesworld import editing as E  # noqa: E402


def timed(fn, repeat: int = 1):
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    return (time.perf_counter() - t) / repeat, out


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--steps", type=cli.int_range(2), default=50, help="DDIM steps of every run")
    p.add_argument("--threads", type=cli.int_range(1), default=2, help="torch CPU threads")
    cli.add_weights(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = cli.load_model(p, args.weights)
    n = args.steps
    scene = E._scenes(1, seed=7)[0]
    plain_1, _ = timed(lambda: model.generate([E.SOURCE], steps=n, cfg=7.5), 3)
    report = {"steps": n, "plain sampling of 1 image": {"seconds": round(plain_1, 3), "unet_evaluations": 2 * n}}
    for mode in ("ddim", "negative-prompt", "null-text", "direct"):
        t, (inv, _) = timed(lambda m=mode: E.invert(model, scene.image, scene.caption, n, 7.5, m))
        report[f"inversion {mode}"] = {
            "time_ratio": round(t / plain_1, 2),
            "forward_ratio": round(inv.unet_forward / (2 * n), 2),
            "backward_evaluations": inv.unet_backward}
    targets = [E.TARGET, E.SOURCE.replace("red", "green")]
    plain_3, _ = timed(lambda: model.generate([E.SOURCE] + targets, steps=n, cfg=7.5), 3)
    t_p2p, _ = timed(lambda: E.edit(model, E.SOURCE, targets, seed=0, steps=n, cfg=7.5), 3)
    t_blend, _ = timed(lambda: E.edit(model, E.SOURCE, targets, seed=0, steps=n, cfg=7.5,
                                      blend_words=["circle", "triangle"]), 3)
    report["P2P batch of 3 / plain batch of 3"] = round(t_p2p / plain_3, 2)
    report["P2P + LocalBlend batch of 3 / plain batch of 3"] = round(t_blend / plain_3, 2)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
