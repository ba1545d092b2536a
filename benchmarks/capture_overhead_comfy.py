"""Benchmark: AttentionCapture overhead on an SD1.5-architecture UNet inside ComfyUI.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/capture_overhead_comfy.py [--size 512 --steps 2]

Builds the real SD1.5 UNet configuration (random weights: timing does not depend on them),
samples with KSampler's code path plain and with AttentionCapture (every cross-attention layer,
self-attention at 32x32 and below), interleaved, and prints the median ratio.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from attention import cli  # noqa: E402


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--size", type=cli.int_range(64, multiple_of=8), default=512, help="image side in pixels")
    p.add_argument("--steps", type=cli.int_range(1), default=2, help="sampling steps per timed run")
    p.add_argument("--repeats", type=cli.int_range(1), default=3, help="interleaved timed runs per variant")
    args = p.parse_args(argv)
    comfy = os.environ.get("COMFYUI_PATH", "")
    if not (Path(comfy) / "comfy").is_dir():
        p.error(f"COMFYUI_PATH={comfy!r} is not a ComfyUI checkout: set COMFYUI_PATH=/path/to/ComfyUI and run "
                f"this with that ComfyUI's python (which needs pytest for the test helpers)")
    sys.path.insert(0, str(ROOT / "tests"))
    from comfy_env import comfy_or_skip
    comfy_or_skip()
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sample
    import comfy.supported_models
    from attention_lab.nodes.capture import AttentionCapture
    cfg = {'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True,
           'legacy': False, 'adm_in_channels': None, 'in_channels': 4, 'model_channels': 320,
           'num_res_blocks': [2, 2, 2, 2], 'transformer_depth': [1, 1, 1, 1, 1, 1, 0, 0],
           'channel_mult': [1, 2, 4, 4], 'transformer_depth_middle': 1, 'use_linear_in_transformer': False,
           'context_dim': 768, 'num_heads': 8, 'transformer_depth_output': [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
           'use_temporal_attention': False, 'use_temporal_resblock': False, 'dtype': torch.float32}
    mc = comfy.supported_models.SD15(cfg)
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({})
    with torch.no_grad():
        for prm in model.diffusion_model.parameters():
            prm.normal_(0, 0.02)
    patcher = comfy.model_patcher.ModelPatcher(model, mm.get_torch_device(), mm.unet_offload_device())
    g = torch.Generator().manual_seed(0)
    pos = [[torch.randn(1, 77, 768, generator=g), {}]]
    neg = [[torch.randn(1, 77, 768, generator=g), {}]]
    latent = torch.zeros(1, 4, args.size // 8, args.size // 8)
    with torch.inference_mode():
        captured, store = AttentionCapture.execute(patcher, "all", True, 32, 0.0, 1.0).result

        def run(m):
            noise = comfy.sample.prepare_noise(latent, 0)
            t0 = time.perf_counter()
            comfy.sample.sample(m, noise, args.steps, 7.0, "euler", "normal", pos, neg, latent, disable_pbar=True,
                                seed=0)
            return time.perf_counter() - t0
        run(patcher)
        times = {"plain": [], "capture": []}
        for _ in range(args.repeats):
            times["plain"].append(run(patcher))
            times["capture"].append(run(captured))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"SD1.5 architecture, {args.size}x{args.size}, {args.steps} steps, CFG 7, "
          f"median of {args.repeats} interleaved runs, {torch.get_num_threads()} threads")
    print(f"  plain   {med['plain']:.2f} s")
    print(f"  capture {med['capture']:.2f} s   ratio {med['capture'] / med['plain']:.3f}")
    print(f"  store: {store.nbytes() / 2**20:.1f} MiB, {len(store.cross)} cross + {len(store.self_)} self layers")


if __name__ == "__main__":
    main()
