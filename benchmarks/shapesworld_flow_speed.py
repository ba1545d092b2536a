"""Benchmark: ShapesWorld-Flow's generation time against the ShapesWorld UNet's, in one run (not a test).

    python benchmarks/shapesworld_flow_speed.py [--threads 1 2] [--steps 20]

One 32x32 image, ``--steps`` Euler steps, CFG (uncond and cond batched as ComfyUI does) for both models with the
same prompt: median of repeated runs after a warm-up, per thread count, and the ratio flow / UNet.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))

from shapesworld_speed import median_time  # noqa: E402

from attention import cli  # noqa: E402


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--threads", type=cli.int_range(1, 64), nargs="+", default=[1, 2], help="torch thread counts")
    p.add_argument("--steps", type=cli.int_range(1, 200), default=20, help="Euler steps per image")
    p.add_argument("--flow-weights", type=cli.existing_file, default=None, metavar="FILE",
                   help="ShapesWorld-Flow weights (default: the shipped file)")
    args = p.parse_args(argv)
    from attention.shapesworld.flow_model import ShapesWorldFlowModel
    from attention.shapesworld.model import ShapesWorldModel
    unet = ShapesWorldModel()
    flow = ShapesWorldFlowModel(args.flow_weights) if args.flow_weights else ShapesWorldFlowModel()
    params = {"unet": sum(q.numel() for q in unet.unet.parameters()),
              "flow": sum(q.numel() for q in flow.transformer.parameters())}
    print(f"parameters: UNet {params['unet']:,}, flow transformer {params['flow']:,} "
          f"(text encoder {sum(q.numel() for q in flow.text.parameters()):,}, shared)")
    prompt = ["a red circle and a blue square on a gray background"]
    for threads in args.threads:
        torch.set_num_threads(threads)
        t_unet = median_time(lambda: unet.generate(prompt, seed=0, steps=args.steps, cfg=5.0))
        t_flow = median_time(lambda: flow.generate(prompt, seed=0, steps=args.steps, cfg=4.0))
        print(f"{threads} thread(s), one image, {args.steps} steps with CFG: UNet {t_unet:.3f} s, flow {t_flow:.3f} s "
              f"(flow / UNet = {t_flow / t_unet:.2f})")


if __name__ == "__main__":
    main()
