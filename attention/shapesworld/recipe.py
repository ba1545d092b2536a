"""The ShapesWorld training recipe in one command: base stage, then fine-tuning stage.

    python -m attention.shapesworld.recipe --out shapesworld_recipe.safetensors --threads 2

Stage ``base`` learns shapes and where each word goes (plain min-SNR-5, no offset noise). It
runs the first 3,000 steps of a 4,800-step cosine schedule (``stop_at``): the length that fits
the 150-minute CPU budget at 1.6 s a step and was measured to pass every quality gate after
fine-tuning (docs/shapesworld.md, "Training record"); the lr is still 1.2e-4 when it stops. Stage
``finetune`` starts from its EMA weights and adds offset noise and the x0 floor, so the
model takes colours from the text and leaves clean backgrounds when sampled from pure noise.
Starting with offset noise and the floor instead gives blobby shapes and weaker localization
(docs/shapesworld.md, "Training record"). Each stage is :mod:`attention.shapesworld.train` with its own
checkpoint, so an interrupted recipe resumes where it stopped; a finished stage is skipped.
The base stage writes ``<out stem>.base.safetensors`` next to ``--out``.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import cli
from . import train

log = logging.getLogger("attention_lab.recipe")


@dataclass(frozen=True)
class Stage:
    name: str
    steps: int
    lr: float
    warmup: int
    offset_noise: float
    x0_floor: float
    seed: int
    stop_at: int = 0  # end the stage here, keeping the cosine schedule of `steps` (0: run all steps)

    @property
    def last_step(self) -> int:
        return train.last_step(self.steps, self.stop_at)


STAGES = (
    Stage("base", steps=4800, lr=3e-4, warmup=200, offset_noise=0.0, x0_floor=0.0, seed=0, stop_at=3000),
    Stage("finetune", steps=800, lr=1e-4, warmup=50, offset_noise=0.1, x0_floor=0.25, seed=11),
)


def stage_argv(stage: Stage, out: Path, init: Path | None, threads: int, log_every: int,
               overwrite_shipped: bool = False) -> list[str]:
    argv = ["--overwrite-shipped"] if overwrite_shipped else []
    argv += ["--out", str(out), "--steps", str(stage.steps), "--lr", str(stage.lr),
            "--warmup", str(stage.warmup), "--offset-noise", str(stage.offset_noise),
            "--x0-floor", str(stage.x0_floor), "--seed", str(stage.seed), "--stop-at", str(stage.stop_at),
            "--threads", str(threads), "--log-every", str(log_every)]
    return argv + (["--init", str(init)] if init else [])


def finished(out: Path, steps: int) -> bool:
    ckpt = train.checkpoint_path(out)
    if not (out.exists() and ckpt.exists()):
        return False
    return torch.load(ckpt, map_location="cpu", weights_only=True)["step"] >= steps


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__, "attention.shapesworld.recipe")
    p.add_argument("--out", type=cli.output_file, default="shapesworld_recipe.safetensors",
                   help="final weights file (the base stage writes <stem>.base.safetensors beside it)")
    cli.add_overwrite_shipped(p)
    cli.add_threads(p)
    p.add_argument("--log-every", type=cli.int_range(1), default=100, help="log the mean loss every N steps")
    return p


def main(argv=None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    cli.refuse_shipped(p, args.out, args.overwrite_shipped)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    final = Path(args.out)
    outs = [final.with_name(final.stem + ".base" + final.suffix), final]
    init = None
    for stage, out in zip(STAGES, outs):
        if finished(out, stage.last_step):
            log.info("stage %s already finished: %s", stage.name, out)
        else:
            log.info("stage %s: %d of %d scheduled steps -> %s", stage.name, stage.last_step, stage.steps, out)
            train.main(stage_argv(stage, out, init, args.threads, args.log_every, args.overwrite_shipped))
        init = out


if __name__ == "__main__":
    main()
