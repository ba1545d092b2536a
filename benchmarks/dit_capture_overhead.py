"""Cost of AttentionCapture on a DiT (ComfyUI's own Flux class) inside ComfyUI, and the store's memory.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/dit_capture_overhead.py [--steps 10] [--repeats 3]

The model is the tier-2 tests' tiny random Flux (``tests/comfy_env.tiny_flux``: 2 double + 2 single blocks,
hidden 64, guidance-distilled layout) with its tiny T5/CLIP-L, a 32x48 latent (a 16x24 token grid), euler,
CFG 1 as Flux dev is run. Printed, from one run: the median time of the sampler alone, with capture of the
cross views only, with the self views too, and with ConceptAttention maps of three concepts, each as a ratio
to the sampler alone (interleaved repeats); and the store's bytes after 5, 10 and 20 steps (flat in the step
count: maps are running sums). The tiny model makes the ratios an upper bound of the hook's relative cost (its
attention is a larger share of the work than a real Flux's at the same token count, and the hook's fixed
per-call work is not amortised); measure a real checkpoint the same way where one exists.
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

PROMPT = "a photo of a red cat riding a blue bicycle under the sky"


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--steps", type=cli.int_range(1), default=10, help="sampling steps of the timed runs")
    p.add_argument("--repeats", type=cli.int_range(1), default=3,
                   help="interleaved timed runs per variant (median reported)")
    p.add_argument("--threads", type=cli.int_range(1), default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    if not (Path(os.environ.get("COMFYUI_PATH", "")) / "comfy").is_dir():
        p.error("set COMFYUI_PATH to a ComfyUI checkout and run this with that ComfyUI's python")
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "tests"))
    from comfy_env import comfy_or_skip, encode, sample, tiny_flux, tiny_flux_clip
    comfy_or_skip()
    from attention_lab.nodes.capture import AttentionCapture

    model, clip = tiny_flux(guidance_embed=True), tiny_flux_clip()
    pos, neg = encode(clip, PROMPT), encode(clip, "")
    lat = torch.zeros(1, 16, 32, 48)

    def capture(**kw):
        a = dict(layers="all", capture_self=False, self_max_size=32, start=0.0, end=1.0)
        a.update(kw)
        with torch.inference_mode():
            return AttentionCapture.execute(model, **a).result

    variants = {"sampler alone": (model, None), "capture, cross views": capture(),
                "capture, cross + self": capture(capture_self=True),
                "capture + 3 concepts": capture(concepts="cat, bicycle, sky", clip=clip)}

    def run(m, steps):
        with torch.inference_mode():
            return sample(m, pos, neg, lat, cfg=1.0, steps=steps, sampler="euler", scheduler="simple")

    run(model, 2)                                                        # warm-up
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, (m, _) in variants.items():
            t0 = time.perf_counter()
            run(m, args.steps)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"tiny random Flux (ComfyUI's class), 16x24 tokens, {args.steps} steps euler, CFG 1, {args.threads} "
          f"thread(s), median of {args.repeats} interleaved runs")
    for k in variants:
        print(f"  {k:22s} {med[k]:.3f} s   ratio to the sampler alone {med[k] / med['sampler alone']:.2f}")
    m, store = variants["capture, cross + self"]
    sizes = []
    for steps in (5, 10, 20):
        run(m, steps)
        sizes.append((steps, store.nbytes(), len(store.steps_recorded)))
    print("  store bytes by step count (cross + self): " +
          ", ".join(f"{s} steps: {b / 2 ** 20:.2f} MiB ({n} steps recorded)" for s, b, n in sizes))


if __name__ == "__main__":
    main()
