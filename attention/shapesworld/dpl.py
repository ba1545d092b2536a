"""Dynamic Prompt Learning on the ShapesWorld model (outside ComfyUI), and its figures.

The pipeline of the official code with this pack's pieces: DDIM inversion with attention capture, the
background mask from self-attention clusters labelled by the nouns' cross-attention (5 clusters, threshold
0.2; ``cluster.py``), then ``dpl.dpl_invert`` and P2P editing with the learned per-step tokens. Same code
as the nodes; "real" images come from the generator, so every mask is exact.

Figures (the paper's protocol, Fig. 5): IoU-versus-threshold curves of the nouns' cross-attention during the
reconstruction against the objects' masks, DPL against Null-Text Inversion, on two-object scenes with a
same-colour distractor, a same-shape distractor and small objects on a large background; leakage onto the
other object and the background; a word swap of one object (PSNR outside it); cost.

    python -m attention.shapesworld.dpl [--images 2] [--steps 50] [--cost | --cost-only | --ablation | --sink]
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..cluster import cluster_store
from ..dpl import DPL_SH, CrossMapRecorder, DPLSettings, background_at_size, dpl_invert, kept_nouns
from ..inversion import Inversion, NullTextSettings, ddim_invert, null_text_optimize
from ..p2p import p2p_sample
from ..schedule import simple_sigmas
from ..store import AttentionStore, StoreConfig, word_maps
from .editing import batch_eps, edit
from .evaluate import token_mass
from .harness import THRESHOLDS, iou_curve, leakage, psnr
from .model import ShapesWorldModel, layer_patches, patches_for
from .world import SceneSpec, ShapesWorld

# Ablation: the official recipe without L_dj. This model has no attention sink like SD's start token, so every
# raw noun map carries a large uniform part and two nouns' maps have cosine ~0.9 even when their peaks sit on
# different objects: L_dj's threshold is never met and every step runs all its updates (docs/dpl-design.md).
NO_DJ = dataclasses.replace(DPL_SH, lam_dj=0.0)

# (name, objects, nouns of the caption, radius range or None)
CASES = [
    ("same colour", [("red", "circle"), ("red", "square")], ["circle", "square"], None),
    ("same shape", [("red", "circle"), ("blue", "circle")], ["red circle", "blue circle"], None),
    ("large background", [("green", "star"), ("yellow", "cross")], ["star", "cross"], (3.5, 4.5)),
]


@contextmanager
def frozen(model: ShapesWorldModel):
    """No gradients into the model's own weights while tokens and nulls are optimized."""
    params = [*model.unet.parameters(), *model.text.parameters()]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def token_encoder(model: ShapesWorldModel, prompt: str, positions: list[tuple[int, ...]]):
    """(initial (S, d) vectors, encode(params) -> (1, m, d)) with the nouns' tokens learnable."""
    ids = model.tokenizer.encode_batch([prompt]).to(model.device)
    base = model.text.token_embedding(ids).detach()
    idx = torch.tensor([p for pos in positions for p in pos], device=model.device)

    def encode(params):
        return model.text.forward_embeddings(base.index_put((torch.zeros_like(idx), idx), params[0]))
    return [base[0, idx].clone()], encode


def estimate_background(model: ShapesWorldModel, x0: torch.Tensor, prompt: str, positions, sigmas, cond):
    """DDIM inversion with capture, then the clusters no noun claims: (trajectory, background (16, 16))."""
    store = AttentionStore(StoreConfig())
    traj = ddim_invert(batch_eps(model, sigmas, patches_for(store)), x0, sigmas, cond)
    store.finish()
    self_size = max(store.resolutions(cross=False))
    cross_size = max(store.resolutions(cross=True))
    res = cluster_store(store, positions, 0, 5, 0.2, self_size, cross_size, seed=1)
    return traj, res.background_mask()


def invert_dpl(model: ShapesWorldModel, image: torch.Tensor, prompt: str, nouns: list[str], steps: int = 50,
               settings: DPLSettings = DPL_SH) -> tuple[Inversion, torch.Tensor, dict]:
    """DPL inversion of ``image`` (3, S, S) in [0, 1]: the inversion (per-step conds in extra), reconstruction."""
    sigmas = simple_sigmas(steps)
    positions = [model.word_positions(prompt, n) for n in nouns]
    cond, null = model.encode([prompt]), model.encode([""])
    x0 = image[None] * 2 - 1
    traj, bg = estimate_background(model, x0, prompt, positions, sigmas, cond)
    recorder = CrossMapRecorder((model.size // 4, model.size // 4))
    eps = batch_eps(model, sigmas, layer_patches([], [recorder]))
    with frozen(model), torch.enable_grad():
        params0, encode = token_encoder(model, prompt, positions)
        res = dpl_invert(eps, encode, params0, recorder, traj, sigmas, positions,
                         lambda size: background_at_size(bg, size, (model.size, model.size)),
                         null, settings)
    inv = Inversion(sigmas=sigmas, trajectory=traj, cond=res.conds[0], nulls=res.nulls, prompt=prompt, mode="dpl",
                    guidance=settings.null.guidance, unet_forward=steps * 2 + res.counts["forward"],
                    unet_backward=res.counts["backward"])
    inv.extra.update(conds=res.conds, params=res.params, positions=positions, background=bg, nouns=nouns)
    return inv, ((res.reconstruction[0] + 1) / 2).clamp(0, 1), res.counts


def invert_nti(model: ShapesWorldModel, image: torch.Tensor, prompt: str, steps: int = 50,
               guidance: float = 7.5) -> tuple[Inversion, torch.Tensor, dict]:
    sigmas = simple_sigmas(steps)
    cond, null = model.encode([prompt]), model.encode([""])
    x0 = image[None] * 2 - 1
    traj = ddim_invert(batch_eps(model, sigmas), x0, sigmas, cond)
    with frozen(model), torch.enable_grad():
        nulls, counts, rec = null_text_optimize(batch_eps(model, sigmas), traj, sigmas, cond, null,
                                                NullTextSettings(guidance=guidance))
    inv = Inversion(sigmas=sigmas, trajectory=traj, cond=cond, nulls=nulls, prompt=prompt, mode="null-text",
                    guidance=guidance, unet_forward=steps + counts["forward"], unet_backward=counts["backward"])
    return inv, ((rec[0] + 1) / 2).clamp(0, 1), counts


def step_conds(model: ShapesWorldModel, inv: Inversion, targets: list[str]) -> list[torch.Tensor]:
    """Per step [source, targets] contexts: the learned vectors for every noun a target keeps."""
    def finder(t: str):
        def find(k: int) -> tuple[int, ...]:
            try:
                return model.word_positions(t, inv.extra["nouns"][k])
            except ValueError:
                return ()
        return find
    counts = [len(p) for p in inv.extra["positions"]]
    plain, learned = {}, {}                 # per target: a fixed context, or (encode, rows of the learned vectors)
    for j, t in enumerate(targets):
        pos, rows = kept_nouns(counts, finder(t))
        if pos:
            learned[j] = (token_encoder(model, t, pos)[1], rows)
        else:
            plain[j] = model.encode([t])
    out = []
    for i, src in enumerate(inv.extra["conds"]):
        ctx = [plain[j] if j in plain else learned[j][0]([inv.extra["params"][i][0][learned[j][1]]]).detach()
               for j in range(len(targets))]
        out.append(torch.cat([src] + ctx))
    return out


@torch.no_grad()
def reconstruction_maps(model: ShapesWorldModel, inv: Inversion) -> AttentionStore:
    """Cross-attention of the cond row while retracing the inversion (the maps the editor sees)."""
    store = AttentionStore(StoreConfig(capture_self=False))
    conds = inv.extra.get("conds") or inv.cond
    p2p_sample(batch_eps(model, inv.sigmas, patches_for(store, self_layers=False)), inv.x_T, inv.sigmas, conds,
               inv.nulls, inv.guidance)
    store.finish()
    return store


def _scene(world: ShapesWorld, objects, radius):
    return world.sample(SceneSpec(list(objects), background="gray", name_background=True), radius_range=radius)


def localization_figures(model: ShapesWorldModel, methods: dict[str, DPLSettings | None], images: int = 2,
                         steps: int = 50, seed: int = 5, cases=CASES) -> dict:
    """Per method (None = Null-Text Inversion): IoU curves per map size, best-threshold mean IoU, leakage,
    reconstruction and word-swap PSNR, cost; the same images for every method."""
    world = ShapesWorld(seed=seed)
    scenes = [(nouns, _scene(world, objects, radius)) for _, objects, nouns, radius in cases for _ in range(images)]
    rows: dict = {}
    for nouns, sc in scenes:
        for method, settings in methods.items():
            t0 = time.time()
            if settings is not None:
                inv, rec, counts = invert_dpl(model, sc.image, sc.caption, nouns, steps, settings)
            else:
                inv, rec, counts = invert_nti(model, sc.image, sc.caption, steps)
            seconds = time.time() - t0
            r = rows.setdefault(method, {"curves": {}, "leak_other": [], "leak_bg": [], "rec_psnr": [],
                                         "swap_psnr": [], "forward": [], "backward": [], "seconds": [],
                                         "token_updates": []})
            store = reconstruction_maps(model, inv)
            positions = [model.word_positions(sc.caption, n) for n in nouns]
            for k, (ob, pos) in enumerate(zip(sc.objects, positions)):
                others = torch.zeros_like(ob.mask)
                for j, o2 in enumerate(sc.objects):
                    if j != k:
                        others |= o2.mask
                for size in store.resolutions(cross=True):
                    wm = word_maps(store, [pos], size)[0].cpu()
                    r["curves"].setdefault(f"{size[0]}x{size[1]}", []).append(iou_curve(wm, ob.mask))
                coarse = word_maps(store, [pos], min(store.resolutions(cross=True)))[0].cpu()
                lk = leakage(coarse, ob.mask, others, sc.background_mask)
                r["leak_other"].append(lk["others"])
                r["leak_bg"].append(lk["background"])
            r["rec_psnr"].append(psnr(rec, sc.image))
            r["forward"].append(inv.unet_forward)
            r["backward"].append(inv.unet_backward)
            r["seconds"].append(seconds)
            r["token_updates"].append(counts.get("token_updates", 0))
            # word swap of the first object's shape word; PSNR against the image outside that object
            shape = sc.objects[0].shape
            target = sc.caption.replace(shape, "triangle" if shape != "triangle" else "star", 1)
            conds = step_conds(model, inv, [target]) if settings is not None else None
            out = edit(model, sc.caption, [target], inversion=inv, step_conds=conds)
            region = F.max_pool2d(sc.objects[0].mask.float()[None, None], 5, 1, 2)[0, 0] > 0
            r["swap_psnr"].append(psnr(out[1], sc.image, ~region))
    out = {}
    for method, r in rows.items():
        curves = {k: torch.stack(v).mean(0) for k, v in r["curves"].items()}
        mean = lambda v: round(sum(v) / len(v), 4)  # noqa: E731
        out[method] = {
            "best_mean_iou": {k: round(float(c.max()), 3) for k, c in curves.items()},
            "iou_curve": {k: [round(float(x), 3) for x in c] for k, c in curves.items()},
            "leakage_other_object": mean(r["leak_other"]), "leakage_background": mean(r["leak_bg"]),
            "reconstruction_psnr_db": round(mean(r["rec_psnr"]), 2),
            "swap_psnr_outside_object_db": round(mean(r["swap_psnr"]), 2),
            "unet_forward_per_image": mean(r["forward"]), "unet_backward_per_image": mean(r["backward"]),
            "seconds_per_image": round(mean(r["seconds"]), 1), "token_updates_per_image": mean(r["token_updates"]),
        }
    out["thresholds"] = [round(float(t), 2) for t in THRESHOLDS]
    out["images"] = len(scenes)
    return out


def build_parser():
    from .. import cli
    p = cli.parser(__doc__, "attention.shapesworld.dpl")
    p.add_argument("--images", type=cli.int_range(1), default=2, help="images per case (3 cases)")
    p.add_argument("--steps", type=cli.int_range(2), default=50, help="DDIM steps of inversion and editing")
    p.add_argument("--null-early-stop", type=cli.float_range(0), default=1e-5, help=(
        "DPL's null-text early stop in the localization figures (NTI's 1e-5 by default; after upstream's restart "
        "from the empty prompt it did not fire on ShapesWorld, 51 iterations at every step; 0 = none, the official "
        "recipe, which --cost-only runs)"))
    p.add_argument("--cost", action="store_true", help=(
        "also, after the table, the official recipe on one image: NTI, DPL.sh, without L_dj, and the null-text "
        "rule both ways (carried over; restart alone)"))
    only = p.add_mutually_exclusive_group()
    only.add_argument("--sink", action="store_true", help=(
        "instead: where the model's cross-attention goes (start token, words, end token, padding), the premise of "
        "DPL's cosine losses"))
    only.add_argument("--cost-only", action="store_true", help=(
        "instead: only the second part of --cost (the official recipe on one image, with the null-text controls), "
        "without the table"))
    only.add_argument("--ablation", action="store_true", help=(
        "instead: one image per case, NTI against L_bg alone, L_bg alone at lr 1e-4, and no L_dj at lr 1e-4"))
    cli.add_weights(p)
    return p


def main(argv=None):
    import json

    from .. import cli
    p = build_parser()
    args = p.parse_args(argv)
    if args.sink:
        cli.refuse_unused(p, argv, ("images", "steps", "null_early_stop", "cost"), "with --sink",
                          "drop {flag} or --sink")
    if args.ablation:
        cli.refuse_unused(p, argv, ("images", "cost"), "with --ablation (one image per case)",
                          "drop {flag} or --ablation")
    if args.cost_only:
        cli.refuse_unused(p, argv, ("images", "null_early_stop", "cost"), "with --cost-only (one image, no early stop)",
                          "drop {flag} or --cost-only")
    model = cli.load_model(p, args.weights)
    early = dataclasses.replace(DPL_SH.null, epsilon=args.null_early_stop or None)
    if args.sink:
        print(json.dumps(token_mass(model)), flush=True)
        return
    if args.ablation:
        bg_only = dataclasses.replace(DPL_SH, lam_at=0.0, lam_dj=0.0, null=early)
        variants = {"NTI": None, "L_bg alone": bg_only, "L_bg alone, lr 1e-4": dataclasses.replace(bg_only, lr=1e-4),
                    "no L_dj, lr 1e-4": dataclasses.replace(NO_DJ, lr=1e-4, null=early)}
        res = localization_figures(model, variants, 1, args.steps)
        print(json.dumps({k: {f: v[f] for f in ("best_mean_iou", "leakage_other_object", "leakage_background",
                                                "swap_psnr_outside_object_db", "token_updates_per_image")}
                          for k, v in res.items() if isinstance(v, dict)}), flush=True)
        return
    if not args.cost_only:
        methods = {"NTI": None, "DPL (DPL.sh)": dataclasses.replace(DPL_SH, null=early),
                   "DPL.sh without L_dj (ablation)": dataclasses.replace(NO_DJ, null=early)}
        print(json.dumps(localization_figures(model, methods, args.images, args.steps)), flush=True)
    if args.cost or args.cost_only:
        print(json.dumps(official_cost(model, args.steps)), flush=True)


def official_cost(model: ShapesWorldModel, steps: int) -> dict:
    """NTI, DPL.sh and DPL.sh without L_dj with the official null-text recipe (51 iterations, no early stop) on
    one same-colour image: UNet calls, seconds and token updates per image, and with them the reconstruction and
    swap PSNR and the localization of that image. Two controls measure the null-text rule both ways: DPL.sh with
    NTI's carried-over null (``null_carry_over``, our former default, an option of the node) and upstream's null
    restart alone (one token iteration: no token update, as upstream)."""
    methods = {"NTI": None, "DPL.sh": DPL_SH, "without L_dj": NO_DJ,
               "DPL.sh, null carried over (NTI's rule)": dataclasses.replace(DPL_SH, null_carry_over=True),
               "null restart alone (no token update)": dataclasses.replace(DPL_SH, attn_iters=1)}
    cost = localization_figures(model, methods, 1, steps, seed=11, cases=CASES[:1])
    return {"cost on one image, official null-text (51 iterations, no early stop)": {
        k: {f: v[f] for f in ("unet_forward_per_image", "unet_backward_per_image", "seconds_per_image",
                              "token_updates_per_image", "reconstruction_psnr_db", "swap_psnr_outside_object_db",
                              "best_mean_iou", "leakage_other_object", "leakage_background")}
        for k, v in cost.items() if isinstance(v, dict)}}


if __name__ == "__main__":
    main()
