"""Benchmark: PromptMixSampler's proxy search (proxy_words empty) on SD1.5's text encoder, before and after.

    COMFYUI_PATH=/path/to/ComfyUI OMP_NUM_THREADS=1 python benchmarks/proxy_search.py [--before-sample 200]

Builds SD1.5's CLIP text encoder at its real size from ComfyUI's own classes (random weights: the time does
not depend on them) and times, in one run:
* before: the former search, one ``CLIP.encode_from_tokens`` per vocabulary prompt over all 14,071 candidate
  entries; timed on ``--before-sample`` evenly spaced entries and scaled to the 14,071 + 52 prompts it
  encoded (``--before-all`` times the whole former loop instead, about 20 minutes on 2 cores);
* each way of encoding on the same ``--modes-sample`` candidates of the object word's token count: one
  prompt per call (as before), full-length batches, batches cut after the end token, and cut batches whose
  shared start runs once (the search's way);
* after, cold: ``nodes/proxy_search.suggest`` with an empty cache folder (candidates of the object word's
  token count only, the shared-prefix batches, written to the cache);
* after, cached: the same call again; nothing is kept in memory between calls, so it reads the cache file
  as a restarted ComfyUI does.
Prints seconds, the machine's load average (other jobs share the CPU), and the ratios.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from attention import cli  # noqa: E402


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--prompt", default="a photo of a cat on a table", help="the node's prompt")
    p.add_argument("--word", default="cat", help="the object word")
    p.add_argument("--suggestions", type=cli.int_range(1, 16), default=4, help="proxies to suggest")
    p.add_argument("--before-sample", type=cli.int_range(1), default=200,
                   help="vocabulary prompts timed one at a time for the former search")
    p.add_argument("--before-all", action="store_true", help="time the whole former search instead of a sample")
    p.add_argument("--modes-sample", type=cli.int_range(8), default=128,
                   help="candidates timed in each way (one per call, full-length, cut, shared prefix)")
    args = p.parse_args(argv)
    comfy = os.environ.get("COMFYUI_PATH", "")
    if not (Path(comfy) / "comfy").is_dir():
        p.error(f"COMFYUI_PATH={comfy!r} is not a ComfyUI checkout: set COMFYUI_PATH=/path/to/ComfyUI and run "
                f"this with that ComfyUI's python (which needs pytest for the test helpers)")
    sys.path.insert(0, str(ROOT / "tests"))
    from comfy_env import comfy_or_skip, sd15_clip
    comfy_or_skip()
    import folder_paths
    from attention_lab.attention.prompt_mixing import PROXY_TEMPLATE, proxy_candidates, suggest_proxies
    from attention_lab.nodes import proxy_search
    from attention_lab.nodes.common import PROXY_CANDIDATES, tokenizer_words, word_ids

    logging.getLogger("attention_lab").setLevel(logging.INFO)     # the search's lines: counts, mode, cache file

    t0 = time.perf_counter()
    clip = sd15_clip()
    params = sum(p.numel() for p in clip.cond_stage_model.parameters()) / 1e6
    print(f"SD1.5 text encoder (ComfyUI SD1ClipModel, {params:.1f} M "
          f"parameters, random weights) built in {time.perf_counter() - t0:.1f} s; torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    vocab = proxy_candidates(tokenizer_words(clip), args.word)
    plain = proxy_search.PooledTextEncoder(clip).plain
    before_prompts = len(vocab) + 2 + 50          # vocabulary, two references, the shortlist's prompts
    with torch.inference_mode():
        if args.before_all:
            t0 = time.perf_counter()
            old = suggest_proxies(plain, vocab, args.prompt, args.word, args.suggestions)
            before = time.perf_counter() - t0
            print(f"before: one prompt per call, all {len(vocab):,} candidates: {before:.1f} s -> {old}")
        else:
            step = max(1, len(vocab) // args.before_sample)
            sample = [PROXY_TEMPLATE.format(word=w) for w in vocab[::step][:args.before_sample]]
            plain(sample[:2])                                   # load the model, warm up
            t0 = time.perf_counter()
            plain(sample)
            each = (time.perf_counter() - t0) / len(sample)
            before = each * before_prompts
            print(f"before: one prompt per call, {each * 1000:.1f} ms per prompt on {len(sample)} evenly spaced "
                  f"candidates; x {before_prompts:,} prompts = {before:.0f} s (scaled, not run whole)")

        # seconds per prompt of each batched way, on the same candidates of the object word's token count
        n_word = len(word_ids(clip, args.word, "l"))
        fitting = [w for w in vocab[:4 * args.modes_sample] if len(word_ids(clip, w, "l")) == n_word]
        texts = [PROXY_TEMPLATE.format(word=w) for w in fitting[:args.modes_sample]]
        enc = proxy_search.PooledTextEncoder(clip)
        per_prompt = {}
        for mode in ("per-text", "batched", "truncated", "shared-prefix"):
            enc.mode = mode
            enc.encode(texts[:4])
            t0 = time.perf_counter()
            enc.encode(texts)
            per_prompt[mode] = (time.perf_counter() - t0) / len(texts)
        print(f"per prompt on {len(texts)} candidates of {n_word} token(s): " + ", ".join(
            f"{k} {v * 1000:.1f} ms" for k, v in per_prompt.items()) + " ('per-text': one call each, as before; "
            "'batched': full-length batches; 'truncated': cut after the end token; 'shared-prefix': cut, and the "
            "shared '<start> a photo of a' run once, the search's)")
        print("ratios per prompt: " + ", ".join(f"per-text / {k} {per_prompt['per-text'] / v:.1f}x"
                                                for k, v in per_prompt.items() if k != "per-text"))

        with tempfile.TemporaryDirectory() as tmp:
            folder_paths.folder_names_and_paths[proxy_search.CACHE_FOLDER] = ([tmp], set())
            times = []
            for label in ("cold", "cached"):
                t0 = time.perf_counter()
                words = proxy_search.suggest(clip, args.prompt, args.word, args.suggestions, PROXY_CANDIDATES[0])
                times.append(time.perf_counter() - t0)
                print(f"after, {label}: {times[-1]:.1f} s -> {words}")
            files = list(Path(tmp).rglob("*.safetensors"))
            size = sum(f.stat().st_size for f in files) / 2 ** 20
            print(f"cache: {len(files)} file(s), {size:.1f} MiB")
    print(f"ratios: before / cold {before / times[0]:.1f}x, before / cached {before / times[1]:.0f}x, "
          f"cold / cached {times[0] / times[1]:.0f}x; load average now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
