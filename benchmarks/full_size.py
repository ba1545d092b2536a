"""Cost of the pack's nodes at the sizes users run: random-weight SD1.5 (512 px) and SDXL (1024 px) UNets built
from ComfyUI's own classes, through the real nodes, as ratios to plain sampling measured in one run.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/full_size.py                  # CPU: reduced (see "reduced")
    ATTENTION_LAB_COMFY_DEVICE=cuda COMFYUI_PATH=... python benchmarks/full_size.py   # GPU: the real sizes

Prints ONE JSON object. Per model: plain KSampler ('ddim' sampler, 'ddim_uniform' schedule, cfg 7.5) of one image
and of a batch of 3 prompts (prompt encoding included, as a graph runs it), then, each as a ratio of time to the
matching plain run and with its peak memory: AttentionCapture (every layer, self-attention up to 32x32) + the same
KSampler; P2P Edit Sampler from a seed (source + 2 edits) and with LocalBlend, against the plain batch of 3;
NullTextInvert in modes ddim, negative-prompt, direct and null-text (official 10 inner steps, early stop 1e-5),
against plain sampling of one image; DPL Token Optimizer (two nouns). Peak memory: on a GPU
``torch.cuda.max_memory_allocated`` above what was allocated before the run; on a CPU the resident set size
(/proc/self/statm, sampled every 2 ms) above its value before the run, glibc's freed heap handed back to the OS
first (malloc_trim), so that what earlier runs freed does not hide this run's use. The weights are random (normal,
std 0.02), so null-text's early stop and DPL's thresholds do not act as on trained weights: their times are those of
a run that goes to the iteration limits more often than a real one would. Text encoders: the real classes and
tokenizers (SD1.5's CLIP-L; SDXL's CLIP-L and CLIP-G) at their real widths with 3 narrow layers: the prompt encoding
is the same in a variant and its baseline, and the real encoders' seconds per prompt on a CPU would swamp the
reduced UNet runs (DPL's backward through the text encoder is cheaper than with the real one).

On a CPU the defaults are reduced so that the run finishes in minutes (128 px, 2 steps, null-text 2 inner steps, DPL
2 token and 3 null iterations per step; the JSON lists them under "reduced"; 11 min on one thread of a shared 2-core
machine); SDXL's 2.6 B float32 weights (10 GB) are not built on a CPU unless ``--models sd15,sdxl`` asks for them.
On a GPU: the real sizes and steps, fp16, null-text's official settings, DPL's official iterations over 5 steps, and
no run starts after ``--budget`` seconds (420), so that the whole script fits 8 minutes. ``--profile VARIANT``
prints torch.profiler's table of that variant (the top operators by self CPU time, on a GPU by CUDA time) to stderr.
"""

from __future__ import annotations

import ctypes
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from attention import cli  # noqa: E402
from tools.random_sd15_checkpoint import UNET as SD15_UNET  # noqa: E402
from tools.random_sd15_checkpoint import random_model  # noqa: E402

SDXL_UNET = {'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True,
             'legacy': False, 'num_classes': 'sequential', 'adm_in_channels': 2816, 'in_channels': 4,
             'model_channels': 320, 'num_res_blocks': [2, 2, 2], 'transformer_depth': [0, 0, 2, 2, 10, 10],
             'channel_mult': [1, 2, 4], 'transformer_depth_middle': 10, 'use_linear_in_transformer': True,
             'context_dim': 2048, 'num_head_channels': 64, 'transformer_depth_output': [0, 0, 0, 2, 2, 2, 10, 10, 10],
             'use_temporal_attention': False, 'use_temporal_resblock': False}
FULL = {"sd15": 512, "sdxl": 1024}                   # image side users run, px
SOURCE = "a photo of a cat sitting on a wooden bench in a garden"
TARGETS = ["a photo of a dog sitting on a wooden bench in a garden",
           "a photo of a cat sitting on a stone bench in a garden"]
BLEND = "cat, dog"
NOUNS = "cat, bench"
CFG = 7.5
VARIANTS = ("capture", "p2p", "p2p_localblend", "inversion_ddim", "inversion_negative-prompt", "inversion_direct",
            "inversion_null-text", "dpl")


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


class PeakMemory:
    """Peak memory of a block above its start, in MiB: CUDA allocations on a GPU, else the sampled RSS."""

    def __init__(self, cuda: bool):
        self.cuda, self.peak = cuda, 0.0

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self):
        while not self._stop.is_set():
            self._max = max(self._max, self._rss())
            time.sleep(0.002)

    def __enter__(self):
        if not self.cuda and _LIBC is not None:
            _LIBC.malloc_trim(0)           # hand freed heap back to the OS, so that RSS rises with this run's use
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._base = self._max = self._rss()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            top = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            top = max(self._max, self._rss())
        self.peak = (top - self._base) / 2 ** 20


def build(kind: str, dtype: torch.dtype):
    """(MODEL, CLIP) of ``kind`` ('sd15', 'sdxl') with random weights, ComfyUI's own classes."""
    import comfy.supported_models
    from comfy_env import tiny_sdxl_clip
    cls, cfg = (comfy.supported_models.SD15, SD15_UNET) if kind == "sd15" else (comfy.supported_models.SDXL, SDXL_UNET)
    patcher = random_model(cls, cfg, dtype, torch.Generator().manual_seed(0))
    return patcher, (sd15_text_encoder() if kind == "sd15" else tiny_sdxl_clip())


def sd15_text_encoder():
    """SD1.5's CLIP class and tokenizer at its real width (768) with 3 narrow layers, seeded random weights: the
    real encoder's 123 M parameters take seconds per prompt on one CPU thread, which would swamp a reduced UNet
    run, and add the same encoding to a variant and its baseline alike."""
    import comfy.sd1_clip
    from comfy_env import _clip
    cfg = {"hidden_size": 768, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 3,
           "projection_dim": 768}
    return _clip(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel, {"clip_l_model_config": cfg}, seed=4)


def variants(model, clip, steps: int, side: int, nt_inner: int, dpl: dict):
    """name -> (callable, the plain run it is compared with)."""
    import comfy.sample
    from attention_lab.nodes.capture import AttentionCapture
    from attention_lab.nodes.dpl import DPLTokenOptimizer
    from attention_lab.nodes.inversion import NullTextInvert
    from attention_lab.nodes.p2p import P2PEditSampler
    from comfy_env import encode
    lat1 = torch.zeros(1, 4, side // 8, side // 8)
    lat3 = lat1.expand(3, -1, -1, -1).clone()
    state: dict = {}

    def ksampler(m, prompts, latent):
        """Each prompt encoded once (a CLIPTextEncode each), one row per prompt, then KSampler."""
        enc = [encode(clip, p)[0] for p in prompts]
        pos = [[torch.cat([e[0] for e in enc]), dict(enc[0][1])]]
        if "pooled_output" in pos[0][1]:
            pos[0][1]["pooled_output"] = torch.cat([e[1]["pooled_output"] for e in enc])
        noise = comfy.sample.prepare_noise(latent, 0)
        return comfy.sample.sample(m, noise, steps, CFG, "ddim", "ddim_uniform", pos, encode(clip, ""), latent,
                                   disable_pbar=True, seed=0)

    def plain_1():
        state["image"] = ksampler(model, [SOURCE], lat1)       # also the image the inversions invert

    def capture():
        captured, _ = AttentionCapture.execute(model, "all", True, 32, 0.0, 1.0).result
        ksampler(captured, [SOURCE], lat1)

    def p2p(blend: str):
        def run():
            P2PEditSampler.execute(model, clip, SOURCE, "\n".join(TARGETS), encode(clip, ""), {"samples": lat1},
                                   "auto", 0, steps, CFG, "ddim_uniform", 0.8, "", 0.4, "", blend, 0.3, 0.2)
        return run

    def invert(mode: str):
        def run():
            NullTextInvert.execute(model, clip, SOURCE, mode, steps, CFG, "ddim_uniform", nt_inner, 1e-5,
                                   latent={"samples": state["image"]})
        return run

    def dpl_run():
        DPLTokenOptimizer.execute(model, clip, {"samples": state["image"]}, SOURCE, NOUNS, dpl["steps"], CFG,
                                  "ddim_uniform", 1.0, 0.05, 0.05, "25, 50, 25", "0.3, 0.7, 0.9", dpl["attn_iters"],
                                  1e-3, dpl["null_iters"], 0.0, 0)

    table = {"plain_1": (plain_1, None), "plain_3": (lambda: ksampler(model, [SOURCE] + TARGETS, lat3), None),
             "capture": (capture, "plain_1"), "p2p": (p2p(""), "plain_3"),
             "p2p_localblend": (p2p(BLEND), "plain_3"), "dpl": (dpl_run, "plain_1")}
    for mode in ("ddim", "negative-prompt", "direct", "null-text"):
        table[f"inversion_{mode}"] = (invert(mode), "plain_1")
    return table


def profile(fn, cuda: bool, rows: int = 30) -> None:
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        fn()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=rows), file=sys.stderr)


def measure(kind: str, args, cuda: bool, dtype: torch.dtype, deadline: float) -> dict:
    model, clip = build(kind, dtype)
    side = args.size or FULL[kind]
    dpl = {"steps": args.dpl_steps or args.steps, "attn_iters": args.dpl_attn_iters, "null_iters": args.dpl_null_iters}
    table = variants(model, clip, args.steps, side, args.nt_inner, dpl)
    chosen = [v for v in VARIANTS if v in args.only] if args.only else list(VARIANTS)
    times: dict[str, list[float]] = {k: [] for k in ["plain_1", "plain_3"] + chosen}
    peaks: dict[str, float] = {}
    skipped: list[str] = []
    with torch.inference_mode():
        table["plain_1"][0]()                                     # warm-up (model load, kernels), the image
        for _ in range(args.repeats):
            for name in times:
                if times[name] and time.perf_counter() > deadline:
                    continue                                      # past --budget: no more repeats
                if not times[name] and time.perf_counter() > deadline:
                    skipped.append(name)
                    continue
                with PeakMemory(cuda) as mem:
                    t = time.perf_counter()
                    table[name][0]()
                    if cuda:
                        torch.cuda.synchronize()
                    times[name].append(time.perf_counter() - t)
                peaks[name] = max(peaks.get(name, 0.0), mem.peak)
                print(f"{kind} {name}: {times[name][-1]:.2f} s", file=sys.stderr)
        if args.profile:
            profile(table[args.profile][0], cuda)
    med = {k: statistics.median(v) for k, v in times.items() if v}
    chosen = [c for c in chosen if c in med]
    out = {"image_px": side, "steps": args.steps, "seconds": {k: round(v, 3) for k, v in med.items()},
           "peak_memory_mib": {k: round(v, 1) for k, v in peaks.items()}, "ratio": {}}
    for name in chosen:
        base = table[name][1]
        out["ratio"][f"{name} / {base}"] = round(med[name] / med[base], 3)
    out["repeats"] = {k: len(v) for k, v in times.items() if v}
    if skipped:
        out["skipped_past_budget"] = sorted(set(skipped))
    del model, clip
    return out


def main(argv=None):
    p = cli.parser(__doc__)
    cuda = os.environ.get("ATTENTION_LAB_COMFY_DEVICE", "cpu") == "cuda"
    p.add_argument("--models", default="sd15,sdxl" if cuda else "sd15", help="comma-separated: sd15, sdxl")
    p.add_argument("--size", type=cli.int_range(64, multiple_of=64), default=None if cuda else 128,
                   help="image side in px for every model (default: on a GPU each model's own, 512 / 1024)")
    p.add_argument("--steps", type=cli.int_range(2), default=50 if cuda else 2, help="sampling/inversion steps")
    p.add_argument("--nt-inner", type=cli.int_range(1), default=10 if cuda else 2,
                   help="null-text inner steps (official 10)")
    p.add_argument("--dpl-steps", type=cli.int_range(2), default=5 if cuda else None,
                   help="DPL's steps (default: --steps)")
    p.add_argument("--dpl-attn-iters", type=cli.int_range(0), default=21 if cuda else 2,
                   help="DPL token updates per step (official 21)")
    p.add_argument("--dpl-null-iters", type=cli.int_range(1), default=51 if cuda else 3,
                   help="DPL null iterations per step (official 51)")
    p.add_argument("--repeats", type=cli.int_range(1), default=2, help="interleaved timed runs (median)")
    p.add_argument("--budget", type=cli.float_range(0, lo_open=True), default=420 if cuda else 3600,
                   help="seconds after which no further run starts (variants not yet run are listed as skipped)")
    p.add_argument("--threads", type=cli.int_range(1), default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--only", type=lambda s: [v.strip() for v in s.split(",") if v.strip()], default=None,
                   help=f"comma-separated subset of {', '.join(VARIANTS)}")
    p.add_argument("--profile", choices=("plain_1", "plain_3") + VARIANTS, default=None,
                   help="print torch.profiler's table of one more run of this variant to stderr")
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in FULL]
    if bad:
        p.error(f"argument --models: {bad} not among {sorted(FULL)}")
    if args.only and not set(args.only) <= set(VARIANTS):
        p.error(f"argument --only: {sorted(set(args.only) - set(VARIANTS))} not among {VARIANTS}")
    comfy_path = os.environ.get("COMFYUI_PATH", "")
    if not (Path(comfy_path) / "comfy").is_dir():
        p.error(f"COMFYUI_PATH={comfy_path!r} is not a ComfyUI checkout: set COMFYUI_PATH=/path/to/ComfyUI and run "
                f"this with that ComfyUI's python (which needs pytest for the test helpers)")
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "tests"))
    from comfy_env import comfy_or_skip
    comfy_or_skip()
    import comfy.ldm.modules.attention as attn
    dtype = torch.float16 if cuda else torch.float32
    t0 = time.perf_counter()
    report = {"device": torch.cuda.get_device_name() if cuda else f"cpu, {torch.get_num_threads()} threads",
              "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__, "cfg": CFG,
              "comfy_attention": attn.optimized_attention.__name__,
              "command": "python benchmarks/full_size.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    runs = set(args.only or VARIANTS)
    reduced: dict = {}
    for kind in models:
        side = args.size or FULL[kind]
        if side != FULL[kind] or args.steps != 50:
            reduced[kind] = {"image_px": side, "full_px": FULL[kind], "steps": args.steps, "full_steps": 50}
    if args.nt_inner != 10 and "inversion_null-text" in runs:
        reduced["null-text"] = {"inner_steps": args.nt_inner, "official": 10}
    dpl_steps = args.dpl_steps or args.steps
    if (args.dpl_attn_iters, args.dpl_null_iters, dpl_steps) != (21, 51, 50) and "dpl" in runs:
        reduced["dpl"] = {"steps": dpl_steps, "attn_iters": args.dpl_attn_iters, "null_iters": args.dpl_null_iters,
                          "official": {"steps": 50, "attn_iters": 21, "null_iters": 51}}
    if not cuda and "sdxl" not in models:
        reduced["sdxl"] = "not run on a CPU by default (2.6 B float32 weights, 10 GB); --models sd15,sdxl"
    if reduced:
        report["reduced"] = reduced
    for kind in models:
        report[kind] = measure(kind, args, cuda, dtype, t0 + args.budget)
    report["total_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
