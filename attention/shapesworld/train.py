"""Train one stage of the ShapesWorld text-to-image model (seeded, resumable, CPU by default).

    python -m attention.shapesworld.train --out base.safetensors
    python -m attention.shapesworld.recipe --out shapesworld_recipe.safetensors   # both stages

Objective: epsilon prediction on SD's discrete schedule with min-SNR-5 loss weighting, AdamW
(lr 3e-4, 200 warm-up steps, cosine decay to 10%), EMA 0.999, batch 64, 10% caption dropout
for classifier-free guidance. The defaults are the recipe's base stage. Two options serve its
fine-tuning stage: ``--x0-floor`` bounds the x0-space weight from below (so the high-noise
steps, which fix the background colour, still learn) and ``--offset-noise`` adds per-channel
offsets to the noise (without them the model reads the background colour from the faint signal
left at t=999 and invents colours from pure noise at sampling time); ``--init`` starts from a
weights file. Batch ``i`` is drawn from a generator seeded with (seed, i), so a resumed run
sees exactly the batches it would have seen. A checkpoint (``<out>.ckpt``) is written every
``--save-every`` steps and at the end.
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
from safetensors.torch import save_file

from .. import cli
from ..schedule import alphas_cumprod
from .model import MODEL_CONFIG, build_models
from .text import ShapesTokenizer
from .weights import weights_problem
from .world import ShapesWorld

log = logging.getLogger("attention_lab.train")

class BatchStream(torch.utils.data.Dataset):
    """Batch i of the stream: images in [-1, 1] and caption token ids (with dropout)."""

    def __init__(self, seed: int, batch: int, p_uncond: float, size: int):
        self.seed, self.batch, self.p_uncond, self.size = seed, batch, p_uncond, size
        self.tok = ShapesTokenizer()

    def __len__(self):
        return 10 ** 9

    def __getitem__(self, i: int):
        world = ShapesWorld(seed=self.seed * 1_000_003 + i, size=self.size)
        images, captions, _ = world.batch(self.batch)
        drop = torch.rand(self.batch, generator=world.gen) < self.p_uncond
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        return images * 2 - 1, self.tok.encode_batch(captions)


def lr_at(step: int, total: int, base: float, warmup: int = 200) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def last_step(steps: int, stop_at: int) -> int:
    """The step a run ends at: ``stop_at`` ends it early on the ``steps``-long schedule; 0 runs it all."""
    return stop_at or steps


def checkpoint_path(out: Path) -> Path:
    """Where a run writing ``out`` keeps its resumable checkpoint by default."""
    return Path(str(out) + ".ckpt")


def save_weights(path: Path, unet, text, meta: dict, dtype=torch.float16) -> None:
    """EMA weights in ``dtype`` (fp16 keeps the file under 10 MB; inference upcasts)."""
    tensors = {f"unet.{k}": v.detach().to(dtype).cpu().contiguous() for k, v in unet.state_dict().items()}
    tensors.update({f"text.{k}": v.detach().to(dtype).cpu().contiguous() for k, v in text.state_dict().items()})
    save_file(tensors, str(path), metadata={"config": json.dumps(MODEL_CONFIG), "training": json.dumps(meta)})


def train(args) -> None:
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    unet, text = build_models()
    unet.to(device), text.to(device)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text).eval()
    ckpt = Path(args.ckpt) if args.ckpt else checkpoint_path(Path(args.out))
    start = 0
    elapsed = 0.0
    if ckpt.exists() and not args.fresh:
        state = torch.load(ckpt, map_location=device)
        unet.load_state_dict(state["unet"]), text.load_state_dict(state["text"])
        ema_unet.load_state_dict(state["ema_unet"]), ema_text.load_state_dict(state["ema_text"])
        opt.load_state_dict(state["opt"])
        start, elapsed = state["step"], state.get("elapsed", 0.0)
        log.info("resumed from %s at step %d", ckpt, start)
    if args.init and start == 0:  # fine-tune: start model and EMA from a weights file
        from safetensors.torch import load_file
        sd = load_file(args.init)
        for prefix, mods in (("unet.", (unet, ema_unet)), ("text.", (text, ema_text))):
            part = {k[len(prefix):]: v.float() for k, v in sd.items() if k.startswith(prefix)}
            for mod in mods:
                mod.load_state_dict(part)
        log.info("initialised from %s", args.init)
    acp = alphas_cumprod().to(device)
    snr = acp / (1 - acp)
    # min-SNR-gamma in x0 terms, with a floor so high-noise steps still learn the global layout
    # (background colour) that SD's schedule fixes in its first sampling steps; 0 = plain min-SNR
    weight = snr.clamp(max=args.min_snr_gamma).clamp(min=args.x0_floor) / snr
    stream = BatchStream(args.seed, args.batch, args.p_uncond, MODEL_CONFIG["image_size"])
    stop = last_step(args.steps, args.stop_at)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, sampler=range(start, stop),
                                         num_workers=args.workers, persistent_workers=False,
                                         prefetch_factor=4 if args.workers else None)
    noise_gen = torch.Generator(device=device).manual_seed(args.seed + start)
    t0 = time.time()
    losses = []
    step = start
    for step, (x0, ids) in enumerate(loader, start=start):
        x0, ids = x0.to(device, non_blocking=True), ids.to(device, non_blocking=True)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        t = torch.randint(0, 1000, (x0.shape[0],), device=device, generator=noise_gen)
        eps = torch.randn(x0.shape, device=device, generator=noise_gen)
        if args.offset_noise:  # per-channel offsets: the model must take colours from the text,
            # not from the faint signal SD's schedule leaves at t=999 (pure noise has none)
            eps = eps + args.offset_noise * torch.randn(x0.shape[0], x0.shape[1], 1, 1, device=device,
                                                        generator=noise_gen)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        pred = unet(xt, t, text(ids))
        w = weight[t] if args.min_snr_gamma > 0 else torch.ones_like(weight[t])
        loss = ((pred - eps) ** 2).mean(dim=(1, 2, 3)).mul(w).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            for e, m in ((ema_unet, unet), (ema_text, text)):
                for pe, pm in zip(e.parameters(), m.parameters()):
                    pe.lerp_(pm, 1 - decay)
        losses.append(float(loss.detach()))
        done = step + 1
        if done % args.log_every == 0:
            log.info("step %d/%d loss %.4f lr %.2e %.3f s/step", done, args.steps,
                     sum(losses) / len(losses), opt.param_groups[0]["lr"], (time.time() - t0) / (done - start))
            losses.clear()
        if done % args.save_every == 0 or done == stop:
            total = elapsed + time.time() - t0
            torch.save({"unet": unet.state_dict(), "text": text.state_dict(), "ema_unet": ema_unet.state_dict(),
                        "ema_text": ema_text.state_dict(), "opt": opt.state_dict(), "step": done,
                        "elapsed": total}, ckpt)
            meta = {"steps": done, "schedule_steps": args.steps, "stop_at": args.stop_at,
                    "batch": args.batch, "seed": args.seed, "lr": args.lr,
                    "init": Path(args.init).name if args.init else None, "warmup": args.warmup,
                    "offset_noise": args.offset_noise, "x0_floor": args.x0_floor, "min_snr_gamma": args.min_snr_gamma,
                    "device": str(device), "seconds": round(total, 1)}
            save_weights(Path(args.out), ema_unet, ema_text, meta)
            log.info("saved %s (step %d, %.0f s)", args.out, done, total)
    log.info("finished at step %d", step + 1)


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__, "attention.shapesworld.train")
    p.add_argument("--out", type=cli.output_file, default="shapesworld_trained.safetensors",
                   help="weights file to write (EMA weights, fp16), rewritten at every checkpoint")
    cli.add_overwrite_shipped(p)
    p.add_argument("--steps", type=cli.int_range(1), default=4800, help="length of the learning-rate schedule")
    p.add_argument("--stop-at", type=cli.int_range(0), default=0,
                   help="stop after this many steps, keeping the learning-rate schedule of --steps (0: run all)")
    p.add_argument("--batch", type=cli.int_range(1), default=64, help="images per step")
    p.add_argument("--lr", type=cli.float_range(0, lo_open=True), default=3e-4, help="peak learning rate (AdamW)")
    p.add_argument("--ema", type=cli.float_range(0, 1, hi_open=True), default=0.999,
                   help="EMA decay of the saved weights")
    p.add_argument("--min-snr-gamma", type=cli.float_range(0), default=5.0,
                   help="min-SNR loss weighting gamma (0 = unweighted epsilon loss)")
    p.add_argument("--x0-floor", type=cli.float_range(0), default=0.0,
                   help="lower bound of the x0-space loss weight (high-noise steps); 0 = plain min-SNR")
    p.add_argument("--offset-noise", type=cli.float_range(0), default=0.0,
                   help="std of per-channel noise offsets (0 = plain Gaussian noise)")
    p.add_argument("--p-uncond", type=cli.float_range(0, 1), default=0.1,
                   help="share of captions dropped (classifier-free guidance training)")
    p.add_argument("--seed", type=cli.int_range(0), default=0, help="seed of the batches, noise and initial weights")
    p.add_argument("--device", type=cli.device, default="cpu", help="torch device (cpu, cuda, cuda:N, mps)")
    p.add_argument("--workers", type=cli.int_range(0), default=1, help="data-loader worker processes (0: in process)")
    cli.add_threads(p)
    p.add_argument("--log-every", type=cli.int_range(1), default=100, help="log the mean loss every N steps")
    p.add_argument("--save-every", type=cli.int_range(1), default=500, help="checkpoint and weights every N steps")
    p.add_argument("--init", default="", metavar="FILE", help="start from these weights (fine-tuning)")
    p.add_argument("--warmup", type=cli.int_range(0), default=200, help="linear warm-up steps of the learning rate")
    p.add_argument("--ckpt", default="", metavar="FILE", help="resumable checkpoint path (default: <out>.ckpt)")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    return p


def check_args(parser: argparse.ArgumentParser, args) -> None:
    """The checks that need two flags or the file system (argparse's types check one value each)."""
    if args.stop_at > args.steps:
        parser.error(f"argument --stop-at: {args.stop_at} is out of range: give an integer in [0, --steps] = "
                     f"[0, {args.steps}] (0 runs the whole schedule)")
    cli.refuse_shipped(parser, args.out, args.overwrite_shipped)
    if args.init:
        problem = weights_problem(args.init, "give a ShapesWorld weights file to start from (e.g. the base "
                                             "stage's output), or leave --init out to start from scratch")
        if problem:
            parser.error(f"argument --init: {problem}")
    if args.ckpt:
        try:
            cli.output_file(args.ckpt)
        except argparse.ArgumentTypeError as e:
            parser.error(f"argument --ckpt: {e}")


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cli.set_threads(args.threads)
    train(args)


if __name__ == "__main__":
    main()
