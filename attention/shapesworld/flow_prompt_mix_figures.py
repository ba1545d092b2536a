"""Prompt mixing (MnM) on ShapesWorld-Flow: the mixing window and the self-attention injection, measured.

    python -m attention.shapesworld.flow_prompt_mix_figures [--seeds 8] [--steps 20] [--cfg 4] [--threads 1]

The node's path on a DiT (``nodes/prompt_mix.py``) outside ComfyUI, on the pure-torch twin through the pack's
attention hook (``joint.dit_options``, as ``flow_p2p_figures``): pass 1 samples the original alone with an
``AttentionStore`` (heads kept) on every block; its clusters give the original's foreground
(``prompt_mixing.foreground``, labelled by the workflow's nouns "circle, square, background", "background" taken
from the original) and its maps the injection masks (``injection_masks``). Pass 2 samples [original, one variation
per proxy] from the same noise: the variation rows are conditioned on their proxy prompts with the original's
pooled vector, ``JointProxyValues(window)`` gives them the original's text keys (and its text values outside the
window), ``JointSelfAttentionInjection`` mixes the original's image->image attention on the preserved square until
``self_injection_end``, and ``BackgroundBlend`` copies the background once at ``blend_at`` (0.7, the workflow's).
Euler on the 'simple' schedule (the node's DDIM on a CONST model), CFG batched as ComfyUI batches it.

Prompt "a red circle and a blue square on a gray background", the circle varied by triangle / star / diamond /
cross (the UNet figure's proxies, ``prompt_mix.PROXIES``), seeds 0..seeds-1, over the ``SWEEP`` of (window,
self_injection_end). Per setting, the UNet figure's metrics (``prompt_mix.mixing_quality``) on the variations'
largest red blob, the region classifier of the shape gate (``harness.load_classifier``): the share that takes the
proxy's shape, the share whose classified shape differs from the original's (changes shape), the share that keeps a
red object, its centroid shift (px), the mean absolute pixel change on the object (original and variation blobs,
dilated 3x3: how much the object changes), PSNR (dB, [0, 1] pixels) outside the object and on the other object
(the original's blue blob, dilated) against the original. Beside them the model's ceiling measured the same way:
the share of plain generations of each proxy prompt (same noise, same sampler) whose red object is the proxy's
shape, and the original's rate for the circle. ShapesWorld-Flow draws a named shape only 24 % of the time
(docs/shapesworld-flow.md): read "takes the proxy's shape" against that ceiling, and "changes shape" as the
variation the method exists for. Printed last: the front of settings that no other setting beats on both the share
that changes shape and the PSNR outside the object (taking the proxy's shape cannot rank settings on a model that
draws almost no proxy shape); the workflow's default is chosen on it (docs/dit-editing.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from .. import cli
from ..chunks import ChunkFilter
from ..hook import AttentionHook, Install
from ..joint import JointLayout, dit_options
from ..prompt_mixing import (
    BackgroundBlend,
    JointProxyValues,
    JointSelfAttentionInjection,
    MixSettings,
    blend_labels,
    foreground,
    injection_masks,
    proxy_prompt,
)
from ..sampling import sample_euler
from ..store import AttentionStore, StoreConfig
from .flow_evaluate import add_weights, load_model, open_command
from .flow_word_maps import dit_info
from .harness import colour_blobs, load_classifier
from .prompt_mix import PROXIES, score, summarize

PROMPT = "a red circle and a blue square on a gray background"
OBJECT, PRESERVE = "circle", ("square",)
NOUNS, BACKGROUND_NOUNS = "circle, square, background", "background"     # the workflow's (workflow_graphs_dit_edit)
SELF_MAX = 32 * 32                    # nodes/prompt_mix.SELF_MAX: image-to-image attention kept up to 32x32 tokens
BLEND_AT = 0.7                        # the workflow's and upstream's 35/50
# (window, self_injection_end): the paper's window with its injection, the workflow's before this measurement
# ([0, 1), 0.3), and windows that start earlier or end later than the paper's
SWEEP = (((0.14, 0.34), 0.8), ((0.14, 0.34), 0.3), ((0.0, 1.0), 0.3), ((0.0, 1.0), 0.8), ((0.0, 1.0), 0.0),
         ((0.0, 0.34), 0.3), ((0.0, 0.34), 0.8), ((0.0, 0.6), 0.8), ((0.14, 1.0), 0.8), ((0.34, 1.0), 0.3),
         ((0.34, 1.0), 1.0))


@dataclass
class Original:
    """Pass 1 of one seed: the image (3, S, S) in [0, 1], its foreground (gh, gw), the injection masks."""
    seed: int
    noise: torch.Tensor               # (1, 3, S, S) unit noise
    image: torch.Tensor
    foreground: torch.Tensor
    masks: dict


def _setup(model):
    info = dit_info(model)
    grid = (model.size // info.patch,) * 2
    labels = blend_labels(model.prompt_words(PROMPT), OBJECT, NOUNS, BACKGROUND_NOUNS)
    return info, grid, labels, frozenset(info.layer_ids())


@torch.no_grad()
def original(model, seed: int, steps: int, cfg: float, s: MixSettings) -> Original:
    """Pass 1: the prompt alone from ``seed``'s noise, its attention captured on every block."""
    info, grid, labels, ids = _setup(model)
    sigmas, noise = model.sigmas(steps), model.noise(1, seed)
    cond, uncond = model.encode([PROMPT]), model.encode([""])
    store = AttentionStore(StoreConfig(self_max_tokens=SELF_MAX, keep_heads=True))
    hook = AttentionHook(dit=info).with_install(Install(store, ids))
    extra = dit_options(hook, info, JointLayout(txt=cond[0].shape[1], grid=grid))
    store.reset()
    x = sample_euler(model.denoiser(cond, uncond, cfg, extra, sigmas), noise * sigmas[0], sigmas)
    store.finish(x)
    fg = foreground(store, 0, labels.positions, s, labels.background, labels.obj)
    keep = [model.word_positions(PROMPT, w) for w in PRESERVE]
    masks = injection_masks(store, keep, model.word_positions(PROMPT, OBJECT), s.injection_threshold, SELF_MAX)
    return Original(seed, noise, ((x[0] + 1) / 2).clamp(0, 1), fg, masks)


@torch.no_grad()
def variations(model, orig: Original, steps: int, cfg: float, s: MixSettings,
               proxies: list[str] = PROXIES) -> torch.Tensor:
    """Pass 2: [original, one variation per proxy] (1+k, 3, S, S) in [0, 1] from ``orig``'s noise, as the node."""
    s = s.validate()
    info, grid, labels, ids = _setup(model)
    k, sigmas = len(proxies), model.sigmas(steps)
    ctx, pooled = model.encode([PROMPT])
    proxy_ctx = model.encode([proxy_prompt(PROMPT, OBJECT, p) for p in proxies])[0]
    cond = (torch.cat([ctx, proxy_ctx]), pooled.expand(1 + k, -1))     # proxy text streams, the original's pooled
    uncond = tuple(t.expand(1 + k, *t.shape[1:]) for t in model.encode([""]))
    hook = AttentionHook(dit=info).with_install(Install(ChunkFilter(JointProxyValues(*s.window)), ids))
    if PRESERVE and s.self_injection_end > 0:
        inj = JointSelfAttentionInjection(orig.masks, s.self_injection_end)
        layers = frozenset(i for i in ids if i in orig.masks)
        hook = hook.with_install(Install(ChunkFilter(inj, full_frame=True), layers, self_attn=True, cross_attn=False))
    step = s.blend_step(steps)
    var_store = AttentionStore(StoreConfig(self_max_tokens=SELF_MAX, step_end=((step or steps) + 1) / steps))
    blend = BackgroundBlend(var_store, orig.foreground, labels.positions, s, step, labels.background, labels.obj)
    if step is not None:
        hook = hook.with_install(Install(var_store, ids))
    extra = dit_options(hook, info, JointLayout(txt=ctx.shape[1], grid=grid))
    var_store.reset()
    x_T = (orig.noise * sigmas[0]).expand(1 + k, -1, -1, -1).clone()
    x = sample_euler(model.denoiser(cond, uncond, cfg, extra, sigmas), x_T, sigmas, blend)
    var_store.finish(x)
    return ((x + 1) / 2).clamp(0, 1)


@torch.no_grad()
def ceiling(model, origs: list[Original], steps: int, cfg: float, clf, proxies: list[str] = PROXIES) -> dict:
    """Plain generations of each proxy prompt from each seed's noise (no hook): share whose red object is the
    proxy's shape; and the originals' share whose red object is a circle."""
    hit, circle = 0, 0
    prompts = [proxy_prompt(PROMPT, OBJECT, p) for p in proxies]
    for o in origs:
        imgs = model.generate(prompts, steps=steps, cfg=cfg, noise=o.noise.expand(len(prompts), -1, -1, -1))
        for img, p in zip(imgs, proxies):
            blobs = colour_blobs(img, "red")
            hit += bool(blobs) and clf.predict(img[None], blobs[0][None])[0][0] == p
        blobs = colour_blobs(o.image, "red")
        circle += bool(blobs) and clf.predict(o.image[None], blobs[0][None])[0][0] == OBJECT
    return {"plain_proxy_prompt_draws_proxy_shape": round(hit / (len(origs) * len(proxies)), 3),
            "original_draws_circle": round(circle / len(origs), 3)}


def sweep(model, seeds: int, steps: int, cfg: float, settings=SWEEP) -> dict:
    clf = load_classifier()
    base = MixSettings(blend_at=BLEND_AT)
    origs = [original(model, seed, steps, cfg, base) for seed in range(seeds)]
    out = {"ceiling": ceiling(model, origs, steps, cfg, clf)}
    for window, inj in settings:
        s = MixSettings(window=window, self_injection_end=inj, blend_at=BLEND_AT)
        scores = []
        for o in origs:
            imgs = variations(model, o, steps, cfg, s)
            scores += [score(o.image, imgs[1 + j], p, clf) for j, p in enumerate(PROXIES)]
        out[f"window [{window[0]:.2f}, {window[1]:.2f}), self_injection_end {inj}"] = summarize(scores)
    out["front: no other setting changes more shapes and keeps more outside the object"] = front(out)
    return out


def front(table: dict) -> list[str]:
    """The settings of ``table`` (its "window ..." rows) that no other setting beats on both the shape-change share
    and the PSNR outside the object (at least as good on both, better on one), most shape changes first."""
    rows = {k: (v["changes_shape"], v["psnr_outside_object_db"]) for k, v in table.items() if k.startswith("window")}
    kept = [k for k, (c, q) in rows.items()
            if not any(c2 >= c and q2 >= q and (c2, q2) != (c, q) for c2, q2 in rows.values())]
    return sorted(kept, key=lambda k: (-rows[k][0], -rows[k][1]))


def build_parser():
    p = cli.parser(__doc__, "attention.shapesworld.flow_prompt_mix_figures")
    add_weights(p)
    p.add_argument("--seeds", type=cli.int_range(1), default=8, help="seeds (x 4 proxies) per setting (1 or more)")
    p.add_argument("--steps", type=cli.int_range(2), default=20, help="Euler steps (2 or more; the workflow's 20)")
    p.add_argument("--cfg", type=cli.float_range(0), default=4.0, help="CFG (>= 0; the workflow's 4)")
    cli.add_threads(p)
    return p


def main(argv=None):
    args, model = open_command(build_parser(), argv, load_model, log_info=False)
    out = {"prompt": PROMPT, "proxies": PROXIES, "seeds": args.seeds, "steps": args.steps, "cfg": args.cfg,
           "blend_at": BLEND_AT}
    out.update(sweep(model, args.seeds, args.steps, args.cfg))
    print(json.dumps(out, indent=1), flush=True)


if __name__ == "__main__":
    main()
