"""Null-Text Inversion and Prompt-to-Prompt on the ShapesWorld model (outside ComfyUI), and their figures.

Same code as the nodes: ``attention/inversion.py`` (inversion, null-text optimization) and
``attention/p2p.py`` (plans, controllers, LocalBlend, the batch sampler). "Real" images are drawn by
the ShapesWorld generator (never seen by the model as such), so their masks are exact.

    python -m attention.shapesworld.editing [--images 20] [--steps 50] [--weights FILE]
    python -m attention.shapesworld.editing --inversions [--swap-images 8]   (negative-prompt / NTI / Direct)
"""

from __future__ import annotations

import time

import torch

from ..direct_inversion import SourceCorrection, direct_offsets
from ..inversion import Inversion, NullTextSettings, ddim_invert, null_text_optimize, reconstruct
from ..p2p import LocalBlend, P2PController, blend_positions, build_plan, p2p_sample, self_replace_limit
from ..schedule import simple_sigmas
from ..store import AttentionStore, StoreConfig
from .model import ShapesWorldModel, layer_patches
from .world import SceneSpec, ShapesWorld

SOURCE = "a red circle and a blue square on a gray background"
TARGET = "a red triangle and a blue square on a gray background"


def batch_eps(model: ShapesWorldModel, sigmas: torch.Tensor, patches: dict | None = None):
    """eps(x, sigma, context, cond_or_uncond) with ComfyUI's transformer_options contract."""
    def eps(x, sigma, context, cou=(0,)):
        to = {"cond_or_uncond": list(cou), "sigmas": sigma.reshape(1), "sample_sigmas": sigmas, **(patches or {})}
        return model.eps(x, sigma.reshape(1).expand(x.shape[0]), context, to)
    return eps


def invert(model: ShapesWorldModel, image: torch.Tensor, prompt: str, steps: int = 50, guidance: float = 7.5,
           mode: str = "null-text", settings: NullTextSettings | None = None) -> tuple[Inversion, torch.Tensor]:
    """Inversion of ``image`` (3, S, S) in [0, 1]; returns it and the reconstruction in [0, 1]. Modes: ddim,
    negative-prompt, null-text, direct (Direct Inversion: the offsets' pass is its reconstruction)."""
    sigmas = simple_sigmas(steps)
    eps = batch_eps(model, sigmas)
    cond, null = model.encode([prompt]), model.encode([""])
    x0 = image[None] * 2 - 1
    traj = ddim_invert(eps, x0, sigmas, cond)
    fwd, bwd, offsets = steps, 0, None
    if mode == "null-text":
        s = settings or NullTextSettings(guidance=guidance)
        with torch.enable_grad():
            nulls, counts, rec = null_text_optimize(eps, traj, sigmas, cond, null, s)
        fwd, bwd = fwd + counts["forward"], counts["backward"]
    elif mode == "direct":
        offsets, rec = direct_offsets(eps, traj, sigmas, cond, null, guidance)
        nulls, fwd = [null] * steps, fwd + 2 * steps          # the edit keeps the offsets' null
    else:
        nulls = [cond] * steps if mode == "negative-prompt" else None
    inv = Inversion(sigmas=sigmas, trajectory=traj, cond=cond, nulls=nulls, prompt=prompt, mode=mode,
                    guidance=guidance, offsets=offsets, unet_forward=fwd, unet_backward=bwd)
    if mode not in ("null-text", "direct"):
        rec = reconstruct(eps, inv, null)
        inv.unet_forward += 2 * steps
    return inv, ((rec[0] + 1) / 2).clamp(0, 1)


def _tok_fns(model: ShapesWorldModel):
    """prompt -> its words (the pack's word rule on ShapesWorld's tokenizer)."""
    return model.prompt_words


@torch.no_grad()
def edit(model: ShapesWorldModel, source: str, targets: list[str], inversion: Inversion | None = None,
         seed: int = 0, steps: int = 50, cfg: float = 5.0, cross_replace: float = 0.8, self_replace: float = 0.4,
         reweight: dict | None = None, blend_words: list[str] | None = None, edit_kind: str = "auto",
         store: AttentionStore | None = None, step_conds: list[torch.Tensor] | None = None) -> torch.Tensor:
    """[source, edits] images (1+k, 3, S, S) in [0, 1] by P2P from a seed or an inversion; ``step_conds``:
    per-step [source, targets] contexts (a DPL inversion's learned tokens) instead of the prompts' own."""
    words_of = _tok_fns(model)
    sigmas = inversion.sigmas if inversion is not None else simple_sigmas(steps)
    steps = len(sigmas) - 1
    cfg = inversion.guidance if inversion is not None else cfg
    conds = model.encode([source] + targets) if step_conds is None else step_conds
    length, s = (conds[0] if step_conds is not None else conds).shape[-2], model.size
    plan = build_plan(source, targets, edit_kind, steps, cross_replace, {}, self_replace, reweight or {}, length,
                      self_replace_limit((s, s), inversion is not None), words_of)
    controllers = [P2PController(plan, steps)]
    blend = None
    if blend_words:
        bstore = AttentionStore(StoreConfig(capture_self=False))
        controllers.append(bstore)
        blend = LocalBlend(bstore, blend_positions([source] + targets, blend_words, words_of),
                           (s // 4, s // 4), 0.3, int(0.2 * steps))
    if store is not None:
        controllers.append(store)
    patches = layer_patches(controllers[:1], controllers)
    if inversion is not None:
        x_T, nulls = inversion.x_T, inversion.nulls if inversion.nulls is not None else model.encode([""])
    else:
        x_T, nulls = model.noise(1, seed) * sigmas[0], model.encode([""])
    after = blend if inversion is None or inversion.offsets is None else SourceCorrection(inversion.offsets, blend)
    x = p2p_sample(batch_eps(model, sigmas, patches), x_T, sigmas, conds, nulls, cfg, after)
    return ((x + 1) / 2).clamp(0, 1)


def _scenes(n: int, seed: int = 0):
    world = ShapesWorld(seed=seed)
    return [world.sample(SceneSpec([("red", "circle"), ("blue", "square")], background="gray", name_background=True))
            for _ in range(n)]


def reconstruction_figures(model: ShapesWorldModel, images: int = 20, steps: int = 50, guidance: float = 7.5,
                           first: dict | None = None) -> dict:
    """Reconstruction PSNR (dB, images in [0, 1]) and UNet evaluations per mode on generator images.
    ``first``, if given, receives per mode the first scene with its inversion and reconstruction,
    for a caller that shows one of them (the demo) without inverting it a second time."""
    from .harness import psnr
    out = {}
    scenes = _scenes(images)
    for mode in ("ddim", "negative-prompt", "null-text"):
        vals, fwd, bwd, t0 = [], 0, 0, time.time()
        for sc in scenes:
            inv, rec = invert(model, sc.image, sc.caption, steps, guidance, mode)
            if first is not None and mode not in first:
                first[mode] = (sc, inv, rec)
            vals.append(psnr(rec, sc.image))
            fwd, bwd = fwd + inv.unet_forward, bwd + inv.unet_backward
        out[mode] = {"psnr_db": round(sum(vals) / len(vals), 2), "min_psnr_db": round(min(vals), 2),
                     "unet_forward_per_image": fwd / len(scenes), "unet_backward_per_image": bwd / len(scenes),
                     "seconds_per_image": round((time.time() - t0) / len(scenes), 2)}
    out["plain_sampling_unet_forward_per_image"] = 2 * steps
    return out


def swap_figures(model: ShapesWorldModel, images: int = 8, steps: int = 50, guidance: float = 7.5) -> dict:
    """circle -> triangle: the edited object's shape (classifier) and PSNR outside its mask, with and
    without LocalBlend, on generated (seed) and on inverted generator images."""
    from .harness import colour_blobs, load_classifier, psnr
    clf = load_classifier()
    rows = {}

    def score(name, src_img, edited, obj_mask):
        r = rows.setdefault(name, {"triangle": 0, "psnr_outside": [], "n": 0})
        r["n"] += 1
        blobs = colour_blobs(edited, "red")
        if blobs:
            r["triangle"] += clf.predict(edited[None], blobs[0][None])[0][0] == "triangle"
        region = obj_mask | (blobs[0] if blobs else torch.zeros_like(obj_mask))
        region = torch.nn.functional.max_pool2d(region.float()[None, None], 3, 1, 1)[0, 0] > 0
        r["psnr_outside"].append(psnr(edited, src_img, ~region))
    for i in range(images):
        for blend in (None, ["circle", "triangle"]):
            tag = "with LocalBlend" if blend else "without LocalBlend"
            out = edit(model, SOURCE, [TARGET], seed=i, steps=steps, cfg=guidance, blend_words=blend)
            src_blobs = colour_blobs(out[0], "red")
            mask = src_blobs[0] if src_blobs else torch.zeros(out.shape[-2:], dtype=torch.bool)
            score(f"generated, {tag}", out[0], out[1], mask)
    for sc in _scenes(images, seed=1):
        inv, _ = invert(model, sc.image, SOURCE, steps, guidance, "null-text")
        for blend in (None, ["circle", "triangle"]):
            tag = "with LocalBlend" if blend else "without LocalBlend"
            out = edit(model, SOURCE, [TARGET], inversion=inv, blend_words=blend)
            score(f"inverted (NTI), {tag}", sc.image, out[1], sc.objects[0].mask)
    return {k: {"edits": r["n"], "takes_triangle": round(r["triangle"] / r["n"], 3),
                "psnr_outside_object_db": round(sum(r["psnr_outside"]) / r["n"], 2)} for k, r in rows.items()}


INVERSIONS = ("negative-prompt", "null-text", "direct")


def inversion_swap_figures(model: ShapesWorldModel, images: int = 8, steps: int = 50, guidance: float = 7.5,
                           modes: tuple[str, ...] = INVERSIONS, cross_replace: float = 0.8,
                           self_replace: float = 0.4) -> dict:
    """The word swap circle -> triangle from each inversion of the same generator images (``swap_figures``'
    inverted rows, one per mode): reconstruction PSNR of the inversion and of the edit's source row, the swap's
    success and PSNR outside the edited object with and without LocalBlend, seconds and UNet rows per inversion,
    and plain CFG sampling of one image (same steps and guidance) timed in the same run for the ratios.
    ``cross_replace`` / ``self_replace``: the edit's fractions (the figure's 0.8 / 0.4; PnP Inversion's PIE-Bench
    runs use 0.4 / 0.6)."""
    from .harness import colour_blobs, load_classifier, psnr
    clf = load_classifier()
    scenes = _scenes(images, seed=1)
    model.generate([SOURCE], steps=steps, cfg=guidance)                       # warm-up
    t0 = time.perf_counter()
    for seed in range(3):
        model.generate([SOURCE], seed=seed, steps=steps, cfg=guidance)
    plain = (time.perf_counter() - t0) / 3
    out = {"plain sampling of 1 image": {"seconds": round(plain, 3), "unet_forward": 2 * steps}}
    for mode in modes:
        r = {"rec": [], "src": [], "inv_s": 0.0, "edit_s": 0.0, "fwd": 0, "bwd": 0}
        for sc in scenes:
            t0 = time.perf_counter()
            inv, rec = invert(model, sc.image, SOURCE, steps, guidance, mode)
            r["inv_s"] += time.perf_counter() - t0
            r["rec"].append(psnr(rec, sc.image))
            r["fwd"], r["bwd"] = r["fwd"] + inv.unet_forward, r["bwd"] + inv.unet_backward
            for blend in (None, ["circle", "triangle"]):
                t0 = time.perf_counter()
                edited = edit(model, SOURCE, [TARGET], inversion=inv, blend_words=blend,
                              cross_replace=cross_replace, self_replace=self_replace)
                r["edit_s"] += time.perf_counter() - t0
                r["src"].append(psnr(edited[0], sc.image))
                blobs = colour_blobs(edited[1], "red")
                row = r.setdefault("with LocalBlend" if blend else "without LocalBlend", [0, []])
                row[0] += bool(blobs) and clf.predict(edited[1][None], blobs[0][None])[0][0] == "triangle"
                region = sc.objects[0].mask | (blobs[0] if blobs else torch.zeros_like(sc.objects[0].mask))
                region = torch.nn.functional.max_pool2d(region.float()[None, None], 3, 1, 1)[0, 0] > 0
                row[1].append(psnr(edited[1], sc.image, ~region))
        n = len(scenes)
        out[mode] = {
            "reconstruction_psnr_db": round(sum(r["rec"]) / n, 2),
            "edit_source_row_psnr_db": round(sum(r["src"]) / len(r["src"]), 2),
            **{f"swap {k}": {"takes_triangle": round(r[k][0] / n, 3),
                             "psnr_outside_object_db": round(sum(r[k][1]) / n, 2)}
               for k in ("without LocalBlend", "with LocalBlend")},
            "unet_forward_per_image": r["fwd"] / n, "unet_backward_per_image": r["bwd"] / n,
            "inversion_seconds": round(r["inv_s"] / n, 3),
            "inversion_time / plain sampling": round(r["inv_s"] / n / plain, 2),
            "edit_seconds (source + 1 edit)": round(r["edit_s"] / (2 * n), 3)}
    return out


def reweight_figures(model: ShapesWorldModel, factors=(0.0, 0.5, 1.0, 2.0, 4.0), seeds: int = 3,
                     steps: int = 20) -> dict:
    """Mean cross-attention mass on 'red' in the edited row for each reweight factor."""
    out = {}
    pos = model.word_positions(SOURCE, "red", occurrence=0)
    for f in factors:
        mass = 0.0
        for seed in range(seeds):
            store = AttentionStore(StoreConfig(capture_self=False))
            edit(model, SOURCE, [SOURCE], seed=seed, steps=steps, reweight={"red": f}, store=store)
            agg = store.aggregate(None, cross=True)                    # (items, h, w, m)
            mass += float(agg[1, ..., list(pos)].sum(-1).mean())
        out[str(f)] = round(mass / seeds, 4)
    return out


def build_parser():
    from .. import cli
    p = cli.parser(__doc__, "attention.shapesworld.editing")
    p.add_argument("--images", type=cli.int_range(1), default=20,
                   help="generator images inverted for the reconstruction table")
    p.add_argument("--swap-images", type=cli.int_range(1), default=8,
                   help="images per source (seeded, inverted) in the word-swap table")
    p.add_argument("--steps", type=cli.int_range(2), default=50,
                   help="DDIM steps of the reconstruction and word-swap figures")
    p.add_argument("--reweight-seeds", type=cli.int_range(1), default=3,
                   help="seeds per factor in the reweight figure")
    p.add_argument("--reweight-steps", type=cli.int_range(2), default=20, help="DDIM steps of the reweight figure")
    p.add_argument("--inversions", action="store_true",
                   help="only the inversion comparison: the word swap from negative-prompt, null-text and direct "
                        "inversion of --swap-images images, with times measured in one run")
    p.add_argument("--modes", default=",".join(INVERSIONS),
                   help=f"--inversions: comma-separated modes among {', '.join(INVERSIONS)}")
    p.add_argument("--cross-replace", type=cli.float_range(0.0, 1.0), default=0.8,
                   help="--inversions: cross_replace_steps of the edit, 0-1 (PnP Inversion's PIE-Bench runs: 0.4)")
    p.add_argument("--self-replace", type=cli.float_range(0.0, 1.0), default=0.4,
                   help="--inversions: self_replace_steps of the edit, 0-1 (PnP Inversion's PIE-Bench runs: 0.6)")
    cli.add_weights(p)
    return p


def main(argv=None):
    import json

    from .. import cli
    p = build_parser()
    args = p.parse_args(argv)
    model = cli.load_model(p, args.weights)
    torch.manual_seed(0)
    if args.inversions:
        modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
        bad = [m for m in modes if m not in INVERSIONS]
        if bad or not modes:
            p.error(f"--modes {args.modes!r}: {bad or 'none'} not among {', '.join(INVERSIONS)}")
        print(json.dumps({"word swap circle -> triangle from each inversion": inversion_swap_figures(
            model, args.swap_images, args.steps, modes=modes, cross_replace=args.cross_replace,
            self_replace=args.self_replace)}, indent=1), flush=True)
        return
    print(json.dumps({"reweight: attention mass on 'red' by factor": reweight_figures(
        model, seeds=args.reweight_seeds, steps=args.reweight_steps)}), flush=True)
    print(json.dumps({"word swap circle -> triangle": swap_figures(model, args.swap_images, args.steps)}), flush=True)
    print(json.dumps({"reconstruction at guidance 7.5": reconstruction_figures(model, args.images, args.steps)}),
          flush=True)


if __name__ == "__main__":
    main()
