"""The prompt-mixing pipeline on the ShapesWorld model (outside ComfyUI).

Same controllers as the ComfyUI node ``PromptMixSampler``: ``attention/prompt_mixing.py``. Official
defaults expressed as fractions of the steps: values window [7/50, 17/50), self-attention injection
until 40/50 at threshold 0.05, background blend after step 35/50 with 5 clusters at threshold 0.3.

On ShapesWorld the official window changes no shape: this small pixel-space model fixes a 10-pixel
object's shape in the late, low-noise steps. ``python -m attention.shapesworld.prompt_mix`` (50 steps,
6 seeds x 4 proxies, circle -> triangle/star/diamond/cross in SOURCE) prints, with the official
settings, 0 of 24 variations taking the proxy's shape for MnM and for plain prompt switching alike; with
the ShapesWorld settings (window [0.34, 1), injection through the window's end, blend at 0.7) 87.5 %
for MnM (100 % for switching), PSNR outside the object 30.36 dB for MnM against 28.65 dB for switching
and 23.32 dB against 21.73 dB on the other object. ``--probe-only`` prints which windows vary shapes.
"""

from __future__ import annotations

import torch

from ..prompt_mixing import (
    BackgroundBlend,
    MixSettings,
    ProxyValuePatch,
    SelfAttentionInjection,
    blend_labels,
    foreground,
    injection_masks,
    proxy_prompt,
)
from ..sampling import sample_euler
from ..schedule import simple_sigmas
from ..store import AttentionStore, StoreConfig
from .model import ShapesWorldModel, layer_patches

PROXIES = ["triangle", "star", "diamond", "cross"]   # proxies of the measurement prompt's circle
# ShapesWorld fixes a small object's shape in the late, low-noise steps (see window_probe), so the
# mixing window that varies shapes on it is [0.34, 1), not SD 1.4's [0.14, 0.34); the self-attention
# injection then runs to the end too, covering the whole window as the official 0.8 covers [0.14, 0.34).
SHAPESWORLD_WINDOW = (0.34, 1.0)
SHAPESWORLD_INJECTION_END = 1.0


@torch.no_grad()
def prompt_mix(model: ShapesWorldModel, prompt: str, object_word: str, proxies: list[str],
               preserve: list[str], seed: int = 0, steps: int = 50, cfg: float = 5.0,
               settings: MixSettings | None = None, nouns: list[str] | None = None,
               background_nouns: tuple[str, ...] = ("background",)) -> dict:
    """Original + one variation per proxy word. Returns images (1+k, 3, S, S) in [0, 1] and masks.

    ``nouns``: the words that label the blend's clusters, upstream every noun of the prompt (None: the node's
    default, ``prompt_nouns``: the caption's shape words and 'background', what NLTK tags as nouns here);
    ``background_nouns``: nouns whose clusters are taken from the original (upstream's ``background_nouns``; this
    caption names its background)."""
    s = (settings or MixSettings()).validate()
    obj = model.word_positions(prompt, object_word)
    keep = [model.word_positions(prompt, w) for w in preserve]
    found = blend_labels(model.prompt_words(prompt), object_word, ", ".join(nouns or []), ", ".join(background_nouns))
    labels, bg_words, obj_word = found.positions, found.background, found.obj
    proxy_prompts = [proxy_prompt(prompt, object_word, p) for p in proxies]
    for p, pp in zip(proxies, proxy_prompts):
        if len(model.tokenizer.word_ids(pp)) != len(model.tokenizer.word_ids(prompt)):
            raise ValueError(f"proxy {p!r} tokenizes to a different length than {object_word!r}")
    sigmas = simple_sigmas(steps).to(model.device)
    noise = model.noise(1, seed)

    # 1. the original, with its attention
    orig_store = AttentionStore(StoreConfig(self_max_tokens=32 * 32, keep_heads=True))
    original = model.generate([prompt], steps=steps, cfg=cfg, noise=noise, sigmas=sigmas,
                              patches=layer_patches([orig_store], [orig_store]))
    orig_fg = foreground(orig_store, 0, labels, s, bg_words, obj_word)

    # 2. [original, variations] from the same noise
    k = len(proxies)
    step = s.blend_step(steps)
    var_store = AttentionStore(StoreConfig(self_max_tokens=32 * 32, step_end=((step or steps) + 1) / steps))
    injection = SelfAttentionInjection(injection_masks(orig_store, keep, obj, s.injection_threshold),
                                       s.self_injection_end)
    extra = {"patches": {"attn2_patch": [ProxyValuePatch(model.encode(proxy_prompts), *s.window)]}}
    den = model.denoiser(model.encode([prompt]).expand(1 + k, -1, -1), model.encode([""]).expand(1 + k, -1, -1), cfg,
                         layer_patches([injection, var_store], [var_store]), sigmas, extra=extra)
    blend = BackgroundBlend(var_store, orig_fg, labels, s, step, bg_words, obj_word)
    x = sample_euler(den, (noise * sigmas[0]).expand(1 + k, -1, -1, -1).clone(), sigmas, blend)
    images = ((x + 1) / 2).clamp(0, 1)
    return {"original": original[0], "images": images, "blend_masks": blend.masks, "original_foreground": orig_fg}


@torch.no_grad()
def prompt_switch(model: ShapesWorldModel, prompt: str, object_word: str, proxy: str, seed: int, steps: int,
                  cfg: float, window: tuple[float, float]) -> torch.Tensor:
    """Baseline: the proxy prompt as the whole conditioning inside the window (no localization)."""
    sigmas = simple_sigmas(steps).to(model.device)
    uncond = model.encode([""])
    plain = model.denoiser(model.encode([prompt]), uncond, cfg, None, sigmas)
    other = model.denoiser(model.encode([prompt.replace(object_word, proxy, 1)]), uncond, cfg, None, sigmas)
    step_of = {float(sig): i for i, sig in enumerate(sigmas[:-1])}

    def switched(x, sigma):
        inside = window[0] <= step_of[float(sigma[0])] / steps < window[1]
        return (other if inside else plain)(x, sigma)
    x = sample_euler(switched, model.noise(1, seed) * sigmas[0], sigmas)
    return ((x + 1) / 2).clamp(0, 1)[0]


def _dilate(mask: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.max_pool2d(mask.float()[None, None], 3, 1, 1)[0, 0] > 0


def _centroid(mask: torch.Tensor) -> torch.Tensor:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return torch.stack([ys.float().mean(), xs.float().mean()])


def score(orig: torch.Tensor, var: torch.Tensor, proxy: str, clf) -> dict:
    """One variation ``var`` (3, S, S) in [0, 1] of ``orig`` against the proxy word, on their largest red blobs,
    read by the region classifier ``clf``: takes the proxy's shape, changes shape (the classified shape differs from
    the original's), keeps a red object, centroid shift (px), mean absolute pixel change on the object (original and
    variation blobs, dilated 3x3), PSNR (dB) outside the object and on the other object (the original's blue blob,
    dilated 3x3). The UNet's and ShapesWorld-Flow's prompt-mixing figures both score with it."""
    from .harness import colour_blobs, psnr
    ob, vb = colour_blobs(orig, "red"), colour_blobs(var, "red")
    other = colour_blobs(orig, "blue")
    other = _dilate(other[0]) if other else None
    region = torch.zeros(orig.shape[1:], dtype=torch.bool)
    for b in ob[:1] + vb[:1]:
        region |= b
    region = _dilate(region) & ~(other if other is not None else torch.zeros_like(region))
    was = clf.predict(orig[None], ob[0][None])[0][0] if ob else None
    now = clf.predict(var[None], vb[0][None])[0][0] if vb else None
    return {"proxy_shape": now == proxy, "changed": now is not None and now != was, "kept": bool(vb),
            "shift": float((_centroid(vb[0]) - _centroid(ob[0])).norm()) if ob and vb else None,
            "object_change": float((var - orig).abs()[:, region].mean()) if region.any() else 0.0,
            "psnr_outside": psnr(var, orig, ~region),
            "psnr_other": psnr(var, orig, other) if other is not None else None}


def summarize(scores: list[dict]) -> dict:
    """Means of :func:`score`'s rows (None = not measured, left out), rounded."""
    def mean(key):
        vals = [d[key] for d in scores if d[key] is not None]
        return sum(vals) / max(len(vals), 1)
    return {"variations": len(scores), "takes_proxy_shape": round(mean("proxy_shape"), 3),
            "changes_shape": round(mean("changed"), 3), "red_object_kept": round(mean("kept"), 3),
            "centroid_shift_px": round(mean("shift"), 2), "object_change_abs": round(mean("object_change"), 3),
            "psnr_outside_object_db": round(mean("psnr_outside"), 2),
            "psnr_other_object_db": round(mean("psnr_other"), 2)}


def mixing_quality(model: ShapesWorldModel, seeds: int = 8, steps: int = 50, cfg: float = 5.0,
                   window: tuple[float, float] = MixSettings().window, blend_at: float | None = 35 / 50,
                   self_injection_end: float = 40 / 50) -> dict:
    """MnM against plain prompt switching over the same window on 'a red circle and a blue square on
    a gray background' (circle -> each of PROXIES): share of variations whose red object takes the
    proxy's shape (classifier), share that keep a red object, its centroid shift in pixels, PSNR
    outside the object (original and variation blobs, dilated 3x3) and PSNR on the other object (the
    original's blue blob, dilated 3x3) against the original."""
    from .harness import load_classifier
    clf = load_classifier()
    prompt, proxies = "a red circle and a blue square on a gray background", PROXIES
    scores: dict[str, list[dict]] = {"mnm": [], "switch": []}
    for seed in range(seeds):
        out = prompt_mix(model, prompt, "circle", proxies, ["square"], seed=seed, steps=steps, cfg=cfg,
                         settings=MixSettings(window=window, blend_at=blend_at,
                                              self_injection_end=self_injection_end))
        for j, proxy in enumerate(proxies):
            switch = prompt_switch(model, prompt, "circle", proxy, seed, steps, cfg, window)
            for name, img in (("mnm", out["images"][1 + j]), ("switch", switch)):
                scores[name].append(score(out["original"], img, proxy, clf))
    unet_table = ("changes_shape", "object_change_abs")   # measured since, for ShapesWorld-Flow; not in this table
    return {name: {k: v for k, v in summarize(rows).items() if k not in unet_table} for name, rows in scores.items()}


def window_probe(model: ShapesWorldModel, windows: list[tuple[float, float]], seeds: int, steps: int,
                 localize: bool, cfg: float = 5.0) -> dict:
    """Share of variations of the circle that take the proxy's shape, per mixing window.

    ``localize`` False turns off the self-attention injection and the background blend, leaving
    only the proxy values.
    """
    from .harness import colour_blobs, load_classifier
    clf = load_classifier()
    prompt = "a red circle and a blue square on a gray background"
    out = {}
    for w in windows:
        s = MixSettings(window=w) if localize else MixSettings(window=w, self_injection_end=0.0, blend_at=None)
        hits = 0
        for seed in range(seeds):
            images = prompt_mix(model, prompt, "circle", PROXIES, ["square"], seed=seed, steps=steps, cfg=cfg,
                                settings=s)["images"]
            for j, proxy in enumerate(PROXIES):
                blobs = colour_blobs(images[1 + j], "red")
                hits += bool(blobs) and clf.predict(images[1 + j][None], blobs[0][None])[0][0] == proxy
        out[f"[{w[0]:.2f}, {w[1]:.2f})"] = f"{hits}/{seeds * len(PROXIES)}"
    return out


def build_parser():
    from .. import cli
    p = cli.parser(__doc__, "attention.shapesworld.prompt_mix")
    p.add_argument("--seeds", type=cli.int_range(1), default=6, help="seeds of the mixing-quality table (x 4 proxies)")
    p.add_argument("--steps", type=cli.int_range(2), default=50, help="DDIM steps of every figure")
    p.add_argument("--probe", action="store_true", help="also probe which mixing windows change the shape")
    p.add_argument("--probe-only", action="store_true", help="only the window probe")
    p.add_argument("--probe-seeds", type=cli.int_range(1), default=2, help="seeds per window in the probe")
    cli.add_weights(p)
    return p


def main(argv=None):
    """python -m attention.shapesworld.prompt_mix: the MnM figures on ShapesWorld."""
    import json

    from .. import cli
    p = build_parser()
    args = p.parse_args(argv)
    if args.probe_only:
        cli.refuse_unused(p, argv, ("seeds",), "with --probe-only", "drop {flag} or --probe-only")
    elif not args.probe:
        cli.refuse_unused(p, argv, ("probe_seeds",), "without --probe", "add --probe or drop {flag}")
    model = cli.load_model(p, args.weights)
    for name, w, inj in (("official settings, window [0.14, 0.34)", MixSettings().window, 40 / 50),
                         ("ShapesWorld settings, window [0.34, 1), injection to 1", SHAPESWORLD_WINDOW,
                          SHAPESWORLD_INJECTION_END)) if not args.probe_only else ():
        q = mixing_quality(model, args.seeds, args.steps, window=w, self_injection_end=inj)
        print(json.dumps({f"mixing_quality, {name}": q}), flush=True)
    if not (args.probe or args.probe_only):
        return
    windows = [(7 / 50, 17 / 50), (0.14, 1.0), (0.34, 1.0), (0.6, 1.0), (0.8, 1.0), (0.0, 0.6), (0.0, 0.8)]
    print(json.dumps({"takes_proxy_shape, MnM with localization":
                      window_probe(model, windows, args.probe_seeds, args.steps, True),
                      "takes_proxy_shape, proxy values only":
                      window_probe(model, windows, args.probe_seeds, args.steps, False)}))


if __name__ == "__main__":
    main()
