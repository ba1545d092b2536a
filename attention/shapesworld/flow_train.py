"""Train ShapesWorld-Flow, the rectified-flow Flux-style MMDiT (seeded, resumable, CPU by default).

    python -m attention.shapesworld.flow_train --out shapesworld_flow_trained.safetensors --threads 1

Objective: rectified flow (Liu et al. 2022; SD3, Esser et al. 2024): x_t = (1 - t) x0 + t eps, the transformer
predicts the velocity eps - x0 with a plain MSE; t drawn uniform in (0, 1) (``--t-law uniform``, the default, as
Liu et al.) or logit-normal (SD3's rf/lognorm(0, 1), mean and std settable). ``--init`` starts the model and its
EMA from an earlier weights file (a later stage of a run; the optimizer starts afresh). Two measured options
that the shipped recipe does not use (docs/shapesworld-flow.md, second round of pilots): ``--loss-weight min-snr``
(the UNet recipe's min-SNR-gamma, written for the velocity) and ``--teacher FILE`` (a ShapesWorld UNet's one-step
prediction as the target at mid noise, i.e. distillation).
The text encoder is ShapesWorld's, frozen (read from --text-weights and copied into the output so the file
is self-contained): the transformer reads its per-token context and its pooled (end-token) vector, the same tensors
ComfyUI's CLIP interface of the ShapesWorld loader returns. 10 % of captions are dropped to the empty
prompt for classifier-free guidance, as for the UNet. AdamW, linear warm-up then cosine decay to 10 %, gradient
clipping at 1, EMA of the weights (the EMA weights are saved, fp16). Batch ``i`` and the noise and times of step
``i`` come from generators seeded with (seed, i), so a resumed run computes exactly what an uninterrupted run
does. A checkpoint (``<out>.ckpt``) is written every ``--save-every`` steps and at the end; rerunning the same
command resumes from it (a rerun with other training options or another model config is refused; --fresh starts
over).

The defaults are the recipe of the shipped assets/shapesworld_flow.safetensors (docs/shapesworld-flow.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from pathlib import Path

import torch

from .. import cli
from .flow import FlowConfig, FluxTwin
from .flow_model import (
    FLOW_PREFIX,
    TEXT_WEIGHTS,
    FlowWeightsError,
    load_text_encoder,
    pooled_from_context,
    read_flow_weights,
    save_flow_weights,
    split_state,
)
from .model import ShapesWorldModel
from .train import BatchStream
from .weights import SHIPPED_WEIGHTS, same_file, shown_path, weights_problem

log = logging.getLogger("attention_lab.flow_train")
IMAGE_SIZE = 32
TEACHER_WINDOW = (0.25, 0.9)   # flow times where --teacher's prediction is the target (UNet sigma 0.33 to 9)
SAMPLING = {"shift": 1.0, "multiplier": 1.0}   # ComfyUI ModelSamplingDiscreteFlow settings (FluxSchnell's)


def axes_for(head_dim: int) -> tuple[int, int, int]:
    """RoPE split of a head (index, row, column) in Flux's proportions (16, 56, 56 of 128), all even."""
    side = 2 * int(7 * head_dim / 32)
    return head_dim - 2 * side, side, side


def model_config(args) -> dict:
    head = args.hidden_size // args.num_heads
    flux = FlowConfig(hidden_size=args.hidden_size, num_heads=args.num_heads, depth=args.depth,
                      depth_single_blocks=args.depth_single_blocks, patch_size=args.patch_size,
                      axes_dim=axes_for(head), mlp_ratio=args.mlp_ratio, theta=args.theta)
    return {"flux": flux.flux_params(), "text_width": 128, "text_layers": 3, "image_size": IMAGE_SIZE,
            "sampling": dict(SAMPLING), "parameterization": "velocity (CONST: x0 = x - sigma v)"}


def teacher_file(text: str) -> str:
    """argparse type of --teacher: a ShapesWorld UNet weights file."""
    fix = None if same_file(Path(text), SHIPPED_WEIGHTS) else (
        f"give a ShapesWorld UNet weights file as the teacher, e.g. the shipped {shown_path(SHIPPED_WEIGHTS)}")
    problem = weights_problem(text, fix)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def recipe_of(args) -> dict:
    """The training options a checkpoint must be resumed with (all but the model config, checked apart); the
    weights file's training metadata starts from them ("steps" there is the step reached, "schedule_steps" this)."""
    keys = ("steps", "batch", "lr", "warmup", "ema", "p_uncond", "t_law", "t_mean", "t_std", "loss_weight",
            "min_snr_gamma", "seed")
    out = {k: getattr(args, k) for k in keys}
    out.update(teacher=Path(args.teacher).name if args.teacher else None, text_weights=Path(args.text_weights).name)
    return out


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def checkpoint_path(out: Path) -> Path:
    return Path(str(out) + ".ckpt")


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step + 500_000_000)


def flow_targets(x0: torch.Tensor, gen: torch.Generator, t_mean: float, t_std: float, t_law: str = "logit-normal"):
    """(x_t, t, velocity target) for images x0 (B, C, H, W): t ~ sigmoid(N(t_mean, t_std)) (or U(0, 1) for the
    "uniform" law), eps ~ N(0, 1)."""
    if t_law == "uniform":
        t = torch.rand(x0.shape[0], generator=gen).to(x0.device)
    else:
        t = torch.sigmoid(t_mean + t_std * torch.randn(x0.shape[0], generator=gen)).to(x0.device)
    eps = torch.randn(x0.shape, generator=gen).to(x0.device)
    tt = t.view(-1, 1, 1, 1)
    return (1 - tt) * x0 + tt * eps, t, eps - x0


def teacher_velocity(teacher, xt: torch.Tensor, t: torch.Tensor, context: torch.Tensor, data_target: torch.Tensor,
                     window: tuple[float, float]) -> torch.Tensor:
    """The velocity target with the teacher's posterior mean in place of the sampled image where t lies in
    ``window``: v = (x_t - x0_teacher) / t, x0_teacher the ShapesWorld UNet's conditional one-step prediction at the
    same signal-to-noise ratio (k-diffusion state x_t / (1 - t) at sigma t / (1 - t); ``context`` from the
    teacher's own text encoder). Elsewhere (low noise, where 1 / t would amplify the teacher's error, and beyond the
    UNet's largest sigma) the data target stays. (B, C, H, W) tensors, t (B,)."""
    inside = (t >= window[0]) & (t <= window[1])
    if not bool(inside.any()):
        return data_target
    ti = t[inside].view(-1, 1, 1, 1)
    with torch.no_grad():
        x0 = teacher.denoiser(context[inside], None, 1.0)(xt[inside] / (1 - ti), (ti / (1 - ti)).flatten())
    out = data_target.clone()
    out[inside] = (xt[inside] - x0) / ti
    return out


def loss_weight(t: torch.Tensor, law: str, gamma: float) -> torch.Tensor:
    """Per-sample weight of the velocity MSE at times t (B,). "none": 1. "min-snr": min-SNR-gamma (Hang et al.,
    ICCV 2023), the weighting of the ShapesWorld UNet's recipe, written for the velocity: the x0-space MSE weighted
    by min(SNR, gamma), SNR = ((1 - t) / t)^2, is the velocity MSE (x0 error = t * velocity error) weighted by
    min((1 - t)^2, gamma t^2), which peaks at t = 1 / (1 + sqrt(gamma)) (0.31 for gamma 5) and fades at both ends."""
    if law == "none":
        return torch.ones_like(t)
    return torch.minimum((1 - t) ** 2, gamma * t ** 2)


def train(args) -> None:
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    config = model_config(args)
    model = FluxTwin(FlowConfig.from_dict(config["flux"])).init_weights().to(device)
    text = load_text_encoder(args.text_weights).to(device)
    teacher = ShapesWorldModel(args.teacher, device=str(device)) if args.teacher else None
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    out = Path(args.out)
    ckpt = Path(args.ckpt) if args.ckpt else checkpoint_path(out)
    start, elapsed = 0, 0.0
    if ckpt.exists() and not args.fresh:
        state = torch.load(ckpt, map_location=device, weights_only=True)
        if state["config"] != json.dumps(config):
            raise SystemExit(f"{ckpt} holds a run of another model config; give --fresh to start over or another "
                             f"--out / --ckpt")
        saved = state.get("recipe")     # absent in checkpoints written before the recipe was stored
        if saved is not None and saved != recipe_of(args):
            changed = {k: f"{saved.get(k)} -> {v}" for k, v in recipe_of(args).items() if saved.get(k) != v}
            raise SystemExit(f"{ckpt} holds a run with other training options ({changed}): rerun with the "
                             "checkpoint's options to resume it, or give --fresh to start over, or another --out / "
                             "--ckpt")
        model.load_state_dict(state["model"]), ema.load_state_dict(state["ema"]), opt.load_state_dict(state["opt"])
        start, elapsed = state["step"], state["elapsed"]
        log.info("resumed from %s at step %d", ckpt, start)
    elif args.init:      # a later stage: model and EMA start from a weights file (the optimizer starts afresh)
        sd, init_config, _ = read_flow_weights(args.init)
        if init_config["flux"] != config["flux"]:
            raise SystemExit(f"--init {args.init} holds another model config ({json.dumps(init_config['flux'])}); "
                             "give the same --hidden-size, --num-heads, --depth, ... as its run")
        for m in (model, ema):
            m.load_state_dict(split_state(sd, FLOW_PREFIX))
        log.info("initialised from %s", args.init)
    log.info("model: %d transformer parameters, config %s", sum(p.numel() for p in model.parameters()),
             json.dumps(config["flux"]))
    stream = BatchStream(args.seed, args.batch, args.p_uncond, IMAGE_SIZE)
    t0, losses = time.time(), []
    stop = args.stop_at or args.steps
    for step in range(start, stop):
        x0, ids = stream[step]
        x0, ids = x0.to(device), ids.to(device)
        with torch.no_grad():
            context = text(ids)
            pooled = pooled_from_context(context, ids)
        xt, t, target = flow_targets(x0, step_generator(args.seed, step), args.t_mean, args.t_std, args.t_law)
        if teacher is not None:
            with torch.no_grad():
                teacher_context = teacher.text(ids)
            target = teacher_velocity(teacher, xt, t, teacher_context, target, TEACHER_WINDOW)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        mse = (model(xt, t, context, y=pooled) - target).pow(2).mean(dim=(1, 2, 3))      # (B,)
        loss = (mse * loss_weight(t, args.loss_weight, args.min_snr_gamma)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        losses.append(float(loss.detach()))
        done = step + 1
        if done % args.log_every == 0:
            log.info("step %d/%d loss %.4f lr %.2e %.3f s/step", done, args.steps, sum(losses) / len(losses),
                     opt.param_groups[0]["lr"], (time.time() - t0) / (done - start))
            losses.clear()
        if done % args.save_every == 0 or done == stop:
            total = elapsed + time.time() - t0
            torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": done,
                        "elapsed": total, "config": json.dumps(config), "recipe": recipe_of(args)}, ckpt)
            meta = {**recipe_of(args), "steps": done, "schedule_steps": args.steps, "stop_at": args.stop_at,
                    "teacher_window": list(TEACHER_WINDOW) if args.teacher else None,
                    "init": Path(args.init).name if args.init else None,
                    "device": str(device), "threads": torch.get_num_threads(), "seconds": round(total, 1),
                    "torch": torch.__version__}
            save_flow_weights(out, ema, text, config, meta)
            log.info("saved %s (step %d, %.0f s)", out, done, total)
    log.info("finished at step %d", stop)


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__, "attention.shapesworld.flow_train")
    p.add_argument("--out", type=cli.output_file, default="shapesworld_flow_trained.safetensors",
                   help="weights file to write (EMA weights, fp16, with the frozen text encoder), rewritten at every "
                        "checkpoint")
    cli.add_overwrite_shipped(p)
    p.add_argument("--steps", type=cli.int_range(1), default=6000, help="training steps (length of the lr schedule)")
    p.add_argument("--stop-at", type=cli.int_range(0), default=0,
                   help="stop after this many steps, keeping the learning-rate schedule of --steps (0: run all); "
                        "rerunning without it resumes")
    p.add_argument("--batch", type=cli.int_range(1), default=32, help="images per step")
    p.add_argument("--lr", type=cli.float_range(0, lo_open=True), default=8e-4, help="peak learning rate (AdamW)")
    p.add_argument("--warmup", type=cli.int_range(0), default=300, help="linear warm-up steps of the learning rate")
    p.add_argument("--ema", type=cli.float_range(0, 1, hi_open=True), default=0.999,
                   help="EMA decay of the saved weights")
    p.add_argument("--p-uncond", type=cli.float_range(0, 1), default=0.1,
                   help="share of captions dropped to the empty prompt (classifier-free guidance training)")
    p.add_argument("--t-law", choices=("logit-normal", "uniform"), default="uniform",
                   help="law of the training times t in (0, 1)")
    p.add_argument("--t-mean", type=cli.float_range(-4, 4), default=0.0, help="mean of the logit-normal time law")
    p.add_argument("--t-std", type=cli.float_range(0, 4, lo_open=True), default=1.0,
                   help="std of the logit-normal time law (1 = SD3's rf/lognorm(0, 1))")
    p.add_argument("--loss-weight", choices=("none", "min-snr"), default="none",
                   help="per-sample weight of the velocity MSE: none, or min-SNR-gamma (the UNet recipe's weighting; "
                        "favours the middle times where shapes are decided)")
    p.add_argument("--min-snr-gamma", type=cli.float_range(0, 100, lo_open=True), default=5.0,
                   help="gamma of --loss-weight min-snr (the UNet recipe's 5)")
    p.add_argument("--teacher", type=teacher_file, default=None, metavar="FILE",
                   help="ShapesWorld UNet weights file: its one-step x0 prediction replaces the sampled image in the "
                        f"velocity target for t in {TEACHER_WINDOW} (distillation; the teacher reads the caption "
                        "with its own text encoder)")
    p.add_argument("--hidden-size", type=cli.int_range(16, 1024, multiple_of=8), default=128,
                   help="transformer width D (a multiple of 8; D / num-heads is the head size, even, >= 8)")
    p.add_argument("--num-heads", type=cli.int_range(1, 64), default=4, help="attention heads")
    p.add_argument("--depth", type=cli.int_range(0, 32), default=2, help="double-stream (MMDiT) blocks")
    p.add_argument("--depth-single-blocks", type=cli.int_range(0, 64), default=2, help="single-stream blocks")
    p.add_argument("--mlp-ratio", type=cli.float_range(0.5, 8), default=4.0, help="MLP width / D")
    p.add_argument("--patch-size", type=cli.int_range(1, 8), default=4,
                   help="patch side in pixels (a divisor of 32; 4 gives 8x8 = 64 image tokens, 2 gives 16x16 = 256)")
    p.add_argument("--theta", type=cli.int_range(2, 100_000), default=10000,
                   help="RoPE base period (Flux: 10000); smaller spreads the rotation frequencies over the short "
                        "8x8 token grid")
    p.add_argument("--text-weights", type=cli.weights_file, default=str(TEXT_WEIGHTS), metavar="FILE",
                   help="ShapesWorld weights file whose text encoder conditions the model (frozen)")
    p.add_argument("--seed", type=cli.int_range(0), default=0, help="seed of the weights, batches, noise and times")
    p.add_argument("--device", type=cli.device, default="cpu", help="torch device (cpu, cuda, cuda:N, mps)")
    cli.add_threads(p)
    p.add_argument("--log-every", type=cli.int_range(1), default=50, help="log the mean loss every N steps")
    p.add_argument("--save-every", type=cli.int_range(1), default=250, help="checkpoint and weights every N steps")
    p.add_argument("--init", type=cli.existing_file, default=None, metavar="FILE",
                   help="start the model and its EMA from this ShapesWorld-Flow weights file (a later stage)")
    p.add_argument("--ckpt", default="", metavar="FILE", help="resumable checkpoint path (default: <out>.ckpt)")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint and start over")
    return p


def check_args(p: argparse.ArgumentParser, args, argv=None) -> None:
    """Checks that need two flags or the file system."""
    head = args.hidden_size // args.num_heads
    if args.hidden_size % args.num_heads or head % 2 or head < 8:
        p.error(f"argument --num-heads: {args.num_heads} heads do not split --hidden-size {args.hidden_size} into "
                f"even heads of at least 8: give a --num-heads that divides it with an even quotient >= 8 "
                f"(e.g. {max(1, args.hidden_size // 32)})")
    if IMAGE_SIZE % args.patch_size:
        p.error(f"argument --patch-size: {args.patch_size} does not divide the {IMAGE_SIZE}-pixel image: give 1, 2, "
                "4 or 8")
    if args.stop_at > args.steps:
        p.error(f"argument --stop-at: {args.stop_at} is out of range: give an integer in [0, --steps] = "
                f"[0, {args.steps}] (0 runs the whole schedule)")
    if args.warmup >= args.steps:
        p.error(f"argument --warmup: {args.warmup} is out of range: give an integer in [0, --steps) = "
                f"[0, {args.steps})")
    if "min_snr_gamma" in cli.given(p, argv) and args.loss_weight != "min-snr":
        p.error(f"argument --min-snr-gamma: {args.min_snr_gamma} has no effect with --loss-weight {args.loss_weight}: "
                "add --loss-weight min-snr, or leave --min-snr-gamma out")
    if args.init:
        try:
            read_flow_weights(args.init)
        except FlowWeightsError as e:
            p.error(f"argument --init: {e}")
    cli.refuse_shipped(p, args.out, args.overwrite_shipped)
    if args.ckpt:
        try:
            cli.output_file(args.ckpt)
        except argparse.ArgumentTypeError as e:
            p.error(f"argument --ckpt: {e}")


def main(argv=None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    check_args(p, args, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cli.set_threads(args.threads)
    train(args)


if __name__ == "__main__":
    main()
