"""The prompt-mixing pipeline on the ShapesWorld model (outside ComfyUI).

Same controllers as the (future) ComfyUI node: ``attention/prompt_mixing.py``. Official defaults
expressed as fractions of the steps: values window [7/50, 17/50), self-attention injection until
40/50 at threshold 0.05, background blend after step 35/50 with 5 clusters at threshold 0.3.

Status (work in progress for the MnM issue): the invariants hold (tests/test_prompt_mixing.py),
but on ShapesWorld the official window does not yet produce shape variations: with
``mixing_quality`` (6 seeds x 4 proxies, 50 steps) 0 of 24 variations took the proxy's shape,
for MnM and for plain prompt switching alike (PSNR outside the object 29.98 dB vs 29.61 dB);
proxy values for the whole run (no localization) changed the shape in 8 of 12. Windows
[0, 0.34), [0.3, 0.7) and [0.5, 0.9) gave 0 of 12. Why this model fixes shapes differently from
SD is the open question before the node is built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cluster import cluster_self_attention, label_clusters
from ..controller import ControlledAttention
from ..prompt_mixing import ProxyValuePatch, SelfAttentionInjection, blend_mask, injection_masks
from ..schedule import karras_free_simple_sigmas
from ..store import AttentionStore, StoreConfig, word_maps
from ..tokens import find_word_tokens
from .model import ShapesWorldModel
from .unet import ShapesUNet


@dataclass
class MixSettings:
    window: tuple[float, float] = (7 / 50, 17 / 50)
    self_injection_end: float = 40 / 50
    injection_threshold: float = 0.05
    blend_at: float | None = 35 / 50
    clusters: int = 5
    cluster_threshold: float = 0.3


def _positions(model: ShapesWorldModel, prompt: str, word: str) -> tuple[int, ...]:
    chunks = [[t for t, _ in c] for c in model.tokenizer.chunks(prompt)]
    return find_word_tokens(chunks, model.tokenizer.word_ids(word), word, prompt).positions


def _foreground(store: AttentionStore, item: int, positions: list[tuple[int, ...]], s: MixSettings) -> torch.Tensor:
    size = max(store.resolutions(cross=False))
    n = size[0] * size[1]
    labels = cluster_self_attention(store.aggregate(size, cross=False)[item].reshape(n, n), s.clusters)
    res = label_clusters(labels, word_maps(store, positions, min(store.resolutions()), item).cpu(),
                         s.cluster_threshold)
    return 1 - res.background_mask()


def _patches(controllers_self, controllers_cross) -> dict:
    blocks = [(lid.kind, lid.number) for lid in ShapesUNet.attention_layer_ids()]
    return {"attn1": {b: ControlledAttention(tuple(controllers_self), False) for b in blocks},
            "attn2": {b: ControlledAttention(tuple(controllers_cross), True) for b in blocks}}


@torch.no_grad()
def prompt_mix(model: ShapesWorldModel, prompt: str, object_word: str, proxies: list[str],
               preserve: list[str], seed: int = 0, steps: int = 50, cfg: float = 5.0,
               settings: MixSettings | None = None) -> dict:
    """Original + one variation per proxy word. Returns images (1+k, 3, S, S) in [0, 1] and masks."""
    s = settings or MixSettings()
    if not 0 <= s.window[0] <= s.window[1] <= 1:
        raise ValueError(f"mixing window {s.window} must satisfy 0 <= start <= end <= 1")
    obj = _positions(model, prompt, object_word)
    keep = [_positions(model, prompt, w) for w in preserve]
    proxy_prompts = [prompt.replace(object_word, p, 1) for p in proxies]
    for p, pp in zip(proxies, proxy_prompts):
        if len(model.tokenizer.word_ids(pp)) != len(model.tokenizer.word_ids(prompt)):
            raise ValueError(f"proxy {p!r} tokenizes to a different length than {object_word!r}")
    sigmas = karras_free_simple_sigmas(steps).to(model.device)
    noise = model.noise(1, seed)
    uncond1 = model.encode([""])
    cond1 = model.encode([prompt])

    # 1. the original, with its attention
    orig_store = AttentionStore(StoreConfig(self_max_tokens=32 * 32))
    den = model.denoiser(cond1, uncond1, cfg, _patches([orig_store], [orig_store]), sigmas)
    x = noise * sigmas[0]
    for i in range(steps):
        x0 = den(x, sigmas[i].expand(1))
        x = x0 + (x - x0) * (sigmas[i + 1] / sigmas[i])
    original = ((x + 1) / 2).clamp(0, 1)
    orig_fg = _foreground(orig_store, 0, [obj] + keep, s)

    # 2. [original, variations] from the same noise
    k = len(proxies)
    blend_step = None if s.blend_at is None else min(int(round(s.blend_at * steps)), steps - 1)
    var_store = AttentionStore(StoreConfig(self_max_tokens=32 * 32, step_end=((blend_step or steps) + 1) / steps))
    injection = SelfAttentionInjection(injection_masks(orig_store, keep, obj, s.injection_threshold),
                                       s.self_injection_end)
    extra = {"patches": {"attn2_patch": [ProxyValuePatch(model.encode(proxy_prompts), *s.window)]}}
    den = model.denoiser(cond1.expand(1 + k, -1, -1), uncond1.expand(1 + k, -1, -1), cfg,
                         _patches([injection, var_store], [var_store]), sigmas, extra=extra)
    x = (noise * sigmas[0]).expand(1 + k, -1, -1, -1).clone()
    masks = []
    for i in range(steps):
        x0 = den(x, sigmas[i].expand(1 + k))
        x = x0 + (x - x0) * (sigmas[i + 1] / sigmas[i])
        if blend_step is not None and i == blend_step:
            for b in range(1, 1 + k):
                m = blend_mask(_foreground(var_store, b, [obj] + keep, s), orig_fg, tuple(x.shape[-2:]))
                masks.append(m)
                x[b] = m * x[b] + (1 - m) * x[0]
    images = ((x + 1) / 2).clamp(0, 1)
    return {"original": original[0], "images": images, "blend_masks": masks, "original_foreground": orig_fg}


@torch.no_grad()
def prompt_switch(model: ShapesWorldModel, prompt: str, object_word: str, proxy: str, seed: int, steps: int,
                  cfg: float, window: tuple[float, float]) -> torch.Tensor:
    """Baseline: the proxy prompt as the whole conditioning inside the window (no localization)."""
    sigmas = karras_free_simple_sigmas(steps).to(model.device)
    uncond = model.encode([""])
    plain = model.denoiser(model.encode([prompt]), uncond, cfg, None, sigmas)
    other = model.denoiser(model.encode([prompt.replace(object_word, proxy, 1)]), uncond, cfg, None, sigmas)
    x = model.noise(1, seed) * sigmas[0]
    for i in range(steps):
        den = other if window[0] <= i / steps < window[1] else plain
        x0 = den(x, sigmas[i].expand(1))
        x = x0 + (x - x0) * (sigmas[i + 1] / sigmas[i])
    return ((x + 1) / 2).clamp(0, 1)[0]


def mixing_quality(model: ShapesWorldModel, seeds: int = 8, steps: int = 50, cfg: float = 5.0) -> dict:
    """MnM against plain prompt switching on 'a red circle and a blue square on a gray background'."""
    from .harness import colour_blobs, load_classifier, psnr
    clf = load_classifier()
    prompt, proxies = "a red circle and a blue square on a gray background", ["triangle", "star", "diamond", "cross"]
    stats = {name: {"proxy_shape": 0, "colour_kept": 0, "psnr_outside": [], "n": 0} for name in ("mnm", "switch")}
    for seed in range(seeds):
        out = prompt_mix(model, prompt, "circle", proxies, ["square"], seed=seed, steps=steps, cfg=cfg)
        orig = out["original"]
        orig_blob = colour_blobs(orig, "red")
        for j, proxy in enumerate(proxies):
            candidates = {"mnm": out["images"][1 + j],
                          "switch": prompt_switch(model, prompt, "circle", proxy, seed, steps, cfg,
                                                  MixSettings().window)}
            for name, img in candidates.items():
                st = stats[name]
                st["n"] += 1
                blobs = colour_blobs(img, "red")
                if blobs:
                    st["colour_kept"] += 1
                    st["proxy_shape"] += clf.predict(img[None], blobs[0][None])[0][0] == proxy
                region = torch.zeros(orig.shape[1:], dtype=torch.bool)
                for b in (orig_blob[:1] + blobs[:1]):
                    region |= b
                region = torch.nn.functional.max_pool2d(region.float()[None, None], 3, 1, 1)[0, 0] > 0
                st["psnr_outside"].append(psnr(img, orig, ~region))
    return {name: {"variations": st["n"], "takes_proxy_shape": round(st["proxy_shape"] / st["n"], 3),
                   "red_object_kept": round(st["colour_kept"] / st["n"], 3),
                   "psnr_outside_object_db": round(sum(st["psnr_outside"]) / len(st["psnr_outside"]), 2)}
            for name, st in stats.items()}
