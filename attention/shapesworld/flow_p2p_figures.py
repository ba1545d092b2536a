"""Prompt-to-Prompt on ShapesWorld-Flow (DiT joint attention): a colour swap and a shape swap from a seed and from a
rectified-flow inversion, with and without LocalBlend, both joint-row modes, and the cost of an edit.

    python -m attention.shapesworld.flow_p2p_figures [--swap colour|shape] [--images 8] [--steps 20] [--cfg 4]
                                                     [--inversion-steps 16] [--inversion-cfg 1] [--skip-cost]

``--swap colour`` (default): red circle -> green circle, and -> yellow as the second target. ``--swap shape``: red
circle -> red triangle, and -> red star (the word swap of issue 29 and of the UNet figure, circle -> triangle).
ShapesWorld-Flow draws the named colour 100 % of the time but the named shape only 24 % (docs/shapesworld-flow.md),
so every shape-swap figure is printed beside the model's own ceiling, measured the same way: the share of plain
generations of the target prompt (the same batch sampled without the controller: same noise, same sampler) whose
red object the region classifier calls the new shape, and the source prompt's rate for the circle; with ``--swap
shape`` also what the classifier calls the red object of plain generations of each shape word (seeds as
``--images``). Same code as the node: ``attention/p2p.py`` (plan, LocalBlend, the batch sampler),
``attention/p2p_joint.py`` (the joint-attention controller) through the pack's attention hook on the pure-torch
twin (``joint.dit_options``: the override and a block proxy per block, as ComfyUI's Flux runs it), CFG batched as
ComfyUI batches it (``ShapesWorldFlowModel.denoiser``). Inversions: ``rf_inversion.rf_invert`` with the same
guidance, retraced with the same solver (``p2p_sample(solver=...)``), as NullTextInvert + P2PEditSampler do.

Printed per setting: edits, the share whose edited object takes the new colour (its largest blob of that colour
overlaps the source object by half or more) or the new shape (its largest red blob overlaps the source object by
half or more and ``harness.load_classifier``'s region classifier, the shape gate's, calls that blob the new shape),
the share whose source already showed it (``source_already_*``: a shape the source drew by chance, which an edit
that changes nothing keeps), the plain-generation ceiling above (``plain_*``), PSNR (dB, [0, 1] pixels) outside
the object (source object and the edit's blob, dilated by one pixel) against the source row (seed) or the real
image (inversion). Cost: median seconds of [source + 2 targets] edited vs the same 3-row batch sampled plainly (no
hook), interleaved, one run; the bytes LocalBlend's store holds after a run of half and of all the steps (no
per-step cache).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import cli
from ..hook import AttentionHook, Install
from ..joint import JointLayout, dit_options
from ..p2p import LocalBlend, blend_positions, build_plan, p2p_sample
from ..p2p_joint import JOINT_ROWS, JointP2PController
from ..rf_inversion import rf_invert, velocity_from_denoiser
from ..store import AttentionStore, StoreConfig
from .flow_evaluate import add_weights, load_model, open_command
from .flow_word_maps import dit_info
from .harness import colour_blobs, load_classifier, psnr
from .rf_inversion_figures import scenes, table_sigma_min
from .world import SHAPES

SOURCE = "a red circle and a blue square on a gray background"
TARGETS = ["a green circle and a blue square on a gray background",
           "a yellow circle and a blue square on a gray background"]
NEW = ["green", "yellow"]


@dataclass(frozen=True)
class Swap:
    """A word swap of SOURCE's red circle: ``old`` -> each of ``new`` (one target prompt each); ``kind`` colour
    (the object's colour word) or shape (its shape word; the object stays red)."""
    kind: str
    targets: tuple[str, ...]
    old: str
    new: tuple[str, ...]


COLOUR_SWAP = Swap("colour", tuple(TARGETS), "red", tuple(NEW))
SHAPE_SWAP = Swap("shape", ("a red triangle and a blue square on a gray background",
                            "a red star and a blue square on a gray background"), "circle", ("triangle", "star"))
SWAPS = {s.kind: s for s in (COLOUR_SWAP, SHAPE_SWAP)}
OBJECT_COLOUR = "red"          # SOURCE's edited object is red; a shape swap keeps it red


def object_blob(image: torch.Tensor, swap: Swap, word: str) -> torch.Tensor | None:
    """The (S, S) mask of the object that should carry ``word`` in ``image`` (3, S, S): the largest blob of that
    colour (colour swap) or of the object's red (shape swap); None if there is none."""
    blobs = colour_blobs(image, word if swap.kind == "colour" else OBJECT_COLOUR)
    return blobs[0] if blobs else None


def draws(image: torch.Tensor, swap: Swap, word: str, clf) -> tuple[bool, torch.Tensor | None]:
    """(does ``image`` show ``word`` on its object, the object's blob): colour swap, a blob of that colour; shape
    swap, the red blob that ``clf`` (the shape gate's region classifier) calls ``word``."""
    blob = object_blob(image, swap, word)
    if blob is None:
        return False, None
    if swap.kind == "colour":
        return True, blob
    return clf.predict(image[None].cpu(), blob[None])[0][0] == word, blob


def editor(model, targets: list[str], steps: int, rows: str, blend: bool, cross: float = 0.8,
           self_steps: float = 0.4, swap: Swap = COLOUR_SWAP):
    """(transformer_options for the twin's calls, LocalBlend or None) of an edit of SOURCE into ``targets``;
    LocalBlend on ``swap``'s words (the old word and the new word of each target)."""
    info = dit_info(model)
    grid = (model.size // info.patch,) * 2
    prompts = [SOURCE] + targets
    length = model.encode(prompts[:1])[0].shape[1]
    plan = build_plan(SOURCE, targets, "auto", steps, cross, {}, self_steps, {}, length, grid[0] * grid[1],
                      model.prompt_words)
    hook = AttentionHook(dit=info).with_install(Install(JointP2PController(plan, steps, rows),
                                                        frozenset(info.layer_ids())))
    lb = None
    if blend:
        store = AttentionStore(StoreConfig(capture_self=False))
        hook = hook.with_install(Install(store, frozenset(info.layer_ids()), self_attn=False, cross_attn=True))
        words = blend_positions(prompts, [swap.old] + list(swap.new[:len(targets)]), model.prompt_words)
        lb = LocalBlend(store, words, grid, 0.3, int(0.2 * steps))
    return dit_options(hook, info, JointLayout(txt=length, grid=grid)), lb


@torch.no_grad()
def edit(model, x_T: torch.Tensor, sigmas: torch.Tensor, cfg: float, targets: list[str], rows: str = "renormalize",
         blend: bool = False, solver: str = "euler", hooked: bool = True, keep: dict | None = None,
         swap: Swap = COLOUR_SWAP) -> torch.Tensor:
    """[source, targets] (1+k, 3, S, S) in [0, 1] from x_T (1, 3, S, S); ``hooked`` False: plain sampling of the
    same batch (no controller), for the cost and the ceiling; ``keep`` receives the LocalBlend ("blend");
    ``swap``: whose words LocalBlend reads."""
    prompts = [SOURCE] + list(targets)
    steps = len(sigmas) - 1
    extra, lb = editor(model, list(targets), steps, rows, blend, swap=swap) if hooked else (None, None)
    if keep is not None:
        keep["blend"] = lb
    cond, uncond = model.encode(prompts), model.encode([""] * len(prompts))
    den = model.denoiser(cond, uncond, cfg, extra, sigmas)

    def guide(x, sigma, c, u):
        s = sigma.reshape(-1)[:1].expand(x.shape[0])
        return (x - den(x, s)) / s.view(-1, 1, 1, 1)
    x = p2p_sample(None, x_T, sigmas, cond[0], None, cfg, lb, guide=guide, solver=solver)
    return ((x + 1) / 2).clamp(0, 1)


class Scores:
    """Per setting: edits, hits (the edit shows the new word on the source object), PSNR outside the object; per
    source group (seed / an inversion solver), the plain-generation ceiling of the same batches."""

    def __init__(self, swap: Swap, clf=None):
        self.swap, self.clf = swap, clf
        self.rows: dict[str, dict] = {}
        self.ceiling: dict[str, dict] = {}

    def add(self, name: str, source_img: torch.Tensor, obj: torch.Tensor, edited: torch.Tensor, word: str):
        """One edit ``edited`` (3, S, S) meant to show ``word``; ``obj`` (S, S) the source's object, ``source_img``
        the reference of the PSNR outside the object."""
        r = self.rows.setdefault(name, {"n": 0, "hit": 0, "already": 0, "psnr": []})
        r["n"] += 1
        shown, blob = draws(edited, self.swap, word, self.clf)
        blob = torch.zeros_like(obj) if blob is None else blob
        r["hit"] += shown and float((blob & obj).sum()) >= 0.5 * float(blob.sum())
        r["already"] += draws(source_img, self.swap, word, self.clf)[0]      # the source shows it before the edit
        region = F.max_pool2d((obj | blob).float()[None, None], 3, 1, 1)[0, 0] > 0
        r["psnr"].append(psnr(edited, source_img, ~region))

    def add_plain(self, group: str, plain: torch.Tensor):
        """The plain rows [source, targets] (1+k, 3, S, S) of one batch: does each draw its own word at all."""
        c = self.ceiling.setdefault(group, {"n": 0, "target": 0, "source": 0})
        c["n"] += 1
        c["source"] += draws(plain[0], self.swap, self.swap.old, self.clf)[0]
        c["target"] += sum(draws(plain[1 + j], self.swap, w, self.clf)[0] for j, w in enumerate(self.swap.new))

    def table(self) -> dict:
        out = {}
        for k, r in self.rows.items():
            row = {"edits": r["n"], f"takes_new_{self.swap.kind}": round(r["hit"] / r["n"], 3),
                   f"source_already_new_{self.swap.kind}": round(r["already"] / r["n"], 3)}
            c = next((c for g, c in self.ceiling.items() if k.startswith(g)), None)
            if c is not None:
                row[f"plain_target_prompt_draws_new_{self.swap.kind}"] = round(
                    c["target"] / (c["n"] * len(self.swap.new)), 3)
                row[f"plain_source_prompt_draws_{self.swap.old}"] = round(c["source"] / c["n"], 3)
            row["psnr_outside_object_db"] = round(sum(r["psnr"]) / r["n"], 2)
            out[k] = row
        return out


def from_seed(model, images: int, steps: int, cfg: float, swap: Swap = COLOUR_SWAP) -> dict:
    sc, sigmas = Scores(swap, load_classifier()), model.sigmas(steps)
    for i in range(images):
        x_T = model.noise(1, i) * sigmas[0]
        sc.add_plain("seed", edit(model, x_T, sigmas, cfg, swap.targets, hooked=False, swap=swap).cpu())
        for rows in JOINT_ROWS:
            for blend in (False, True):
                out = edit(model, x_T, sigmas, cfg, swap.targets, rows, blend, swap=swap).cpu()
                red = colour_blobs(out[0], OBJECT_COLOUR)
                obj = red[0] if red else torch.zeros(out.shape[-2:], dtype=torch.bool)
                for j, word in enumerate(swap.new):
                    sc.add(f"seed, {rows}, {'with' if blend else 'without'} LocalBlend", out[0], obj, out[1 + j],
                           word)
    return sc.table()


def from_inversion(model, images: int, steps: int, cfg: float, swap: Swap = COLOUR_SWAP) -> dict:
    clf = load_classifier()
    sc, sigmas, floor = Scores(swap, clf), model.sigmas(steps), table_sigma_min(model.shift)
    rec_psnr: dict[str, list] = {}
    real_old = 0
    for scene in scenes(images, model.size, seed=1):
        image = scene.image.to(model.device)
        real_old += draws(scene.image, swap, swap.old, clf)[0]
        v = velocity_from_denoiser(model.denoiser(model.encode([SOURCE]), model.encode([""]), cfg,
                                                  sample_sigmas=sigmas), floor)
        for solver in ("euler", "fireflow"):
            x_T = rf_invert(v, image[None] * 2 - 1, sigmas, solver)[0]
            sc.add_plain(f"rf-{solver} inversion",
                         edit(model, x_T, sigmas, cfg, swap.targets, solver=solver, hooked=False, swap=swap).cpu())
            for blend in (False, True):
                out = edit(model, x_T, sigmas, cfg, swap.targets, "renormalize", blend, solver, swap=swap).cpu()
                if not blend:
                    rec_psnr.setdefault(solver, []).append(psnr(out[0], scene.image))
                for j, word in enumerate(swap.new):
                    sc.add(f"rf-{solver} inversion, {'with' if blend else 'without'} LocalBlend", scene.image,
                           scene.objects[0].mask, out[1 + j], word)
    out = sc.table()
    for solver, vals in rec_psnr.items():
        out[f"rf-{solver} inversion, source row (reconstruction)"] = {"psnr_db": round(sum(vals) / len(vals), 2)}
    out[f"real images (the inverted scenes) show the {swap.old}"] = round(real_old / images, 3)
    return out


@torch.no_grad()
def shapes_drawn(model, images: int, steps: int, cfg: float) -> dict:
    """Per shape word w: what the region classifier calls the red object of plain generations of SOURCE with the
    circle replaced by w (seeds 0..images-1): how often the model draws each named shape, and what it draws instead."""
    clf, out = load_classifier(), {}
    for shape in SHAPES:
        prompt = SOURCE.replace("circle", shape)
        counts: dict[str, int] = {}
        for i in range(images):
            img = model.generate([prompt], noise=model.noise(1, i), steps=steps, cfg=cfg)[0].cpu()
            blob = object_blob(img, SHAPE_SWAP, shape)
            called = clf.predict(img[None], blob[None])[0][0] if blob is not None else "no red object"
            counts[called] = counts.get(called, 0) + 1
        out[f"red {shape}"] = dict(sorted(counts.items(), key=lambda kv: -kv[1]))
    return out


def cost(model, steps: int, cfg: float, repeats: int = 3) -> dict:
    """Median seconds: the 3-row batch plainly, the edit (source + 2 targets), the edit with LocalBlend."""
    sigmas = model.sigmas(steps)
    x_T = model.noise(1, 0) * sigmas[0]
    runs = {"plain": dict(hooked=False), "edit": {}, "edit + LocalBlend": dict(blend=True)}
    times: dict[str, list] = {k: [] for k in runs}
    for _ in range(repeats):
        for name, kw in runs.items():
            t0 = time.perf_counter()
            edit(model, x_T, sigmas, cfg, TARGETS, **kw)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    held = {}
    for n in (steps // 2, steps):                       # what LocalBlend keeps: flat in the steps
        keep: dict = {}
        edit(model, x_T, model.sigmas(n), cfg, TARGETS, blend=True, keep=keep)
        held[f"steps={n}"] = keep["blend"].store.nbytes()
    return {"rows": 3, "steps": steps, "seconds": {k: round(v, 3) for k, v in med.items()},
            "localblend_store_bytes": held,
            "edit_over_plain": round(med["edit"] / med["plain"], 3),
            "edit_localblend_over_plain": round(med["edit + LocalBlend"] / med["plain"], 3)}


def build_parser():
    p = cli.parser(__doc__, "attention.shapesworld.flow_p2p_figures")
    add_weights(p)
    p.add_argument("--swap", choices=tuple(SWAPS), default="colour",
                   help="colour: red circle -> green / yellow circle; shape: red circle -> red triangle / red star")
    p.add_argument("--skip-cost", action="store_true", help="leave the cost (timings, LocalBlend bytes) out")
    p.add_argument("--images", type=cli.int_range(1), default=8, help="seeds and generator scenes (1 or more)")
    p.add_argument("--steps", type=cli.int_range(2), default=20, help="sampling / inversion steps (2 or more)")
    p.add_argument("--cfg", type=cli.float_range(0), default=4.0, help="CFG of the seed edits (>= 0)")
    p.add_argument("--inversion-steps", type=cli.int_range(2), default=16,
                   help="inversion steps (2 or more; FireFlow needs about 16 on this model, docs/rf-inversion.md)")
    p.add_argument("--inversion-cfg", type=cli.float_range(0), default=1.0,
                   help="CFG of the inversion and of its edits (>= 0; the same both ways, as the node; 1 = upstream "
                        "FireFlow's guidance)")
    p.add_argument("--repeats", type=cli.int_range(1), default=3, help="timed repeats of the cost (1 or more)")
    p.add_argument("--threads", type=cli.int_range(1), default=None, help="torch CPU threads (default: torch's)")
    return p


def main(argv=None):
    args, model = open_command(build_parser(), argv, load_model, log_info=False)
    swap = SWAPS[args.swap]
    out = {"swap": f"{swap.old} -> {' / '.join(swap.new)}", "images": args.images, "steps": args.steps,
           "cfg": args.cfg, "inversion_steps": args.inversion_steps, "inversion_cfg": args.inversion_cfg}
    if not args.skip_cost:
        out["cost"] = cost(model, args.steps, args.cfg, args.repeats)
    if swap.kind == "shape":
        out["plain generations: the classifier's call of the red object, per named shape"] = shapes_drawn(
            model, args.images, args.steps, args.cfg)
    print(json.dumps(out, indent=1), flush=True)
    print(json.dumps({"seed": from_seed(model, args.images, args.steps, args.cfg, swap)}, indent=1), flush=True)
    print(json.dumps({"inversion": from_inversion(model, args.images, args.inversion_steps, args.inversion_cfg,
                                                  swap)}, indent=1), flush=True)


if __name__ == "__main__":
    main()
