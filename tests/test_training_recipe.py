"""The two-stage training recipe: its stages reach train.py intact, match the committed weights,
and a finished stage is recognised (so an interrupted recipe resumes instead of restarting)."""

import json
from pathlib import Path

import torch
from safetensors import safe_open

from attention.shapesworld import recipe, train

WEIGHTS = Path(__file__).resolve().parents[1] / "assets" / "shapesworld.safetensors"


def test_stage_arguments_reach_the_trainer(tmp_path):
    base, finetune = recipe.STAGES
    for stage, init in ((base, None), (finetune, tmp_path / "base.safetensors")):
        args = train.build_parser().parse_args(recipe.stage_argv(stage, tmp_path / "o.safetensors", init, 2, 10))
        got = (args.steps, args.lr, args.warmup, args.offset_noise, args.x0_floor, args.seed)
        assert got == (stage.steps, stage.lr, stage.warmup, stage.offset_noise, stage.x0_floor, stage.seed)
        assert args.init == (str(init) if init else "")


def test_trainer_defaults_are_the_base_stage():
    args = train.build_parser().parse_args([])
    base = recipe.STAGES[0]
    assert (args.steps, args.lr, args.warmup, args.offset_noise, args.x0_floor, args.seed) == (
        base.steps, base.lr, base.warmup, base.offset_noise, base.x0_floor, base.seed)


def test_committed_weights_were_made_by_the_finetune_stage():
    with safe_open(str(WEIGHTS), framework="pt") as f:
        meta = json.loads(f.metadata()["training"])
    stage = recipe.STAGES[1]
    assert (meta["steps"], meta["lr"], meta["warmup"], meta["offset_noise"], meta["x0_floor"], meta["seed"]) == (
        stage.steps, stage.lr, stage.warmup, stage.offset_noise, stage.x0_floor, stage.seed)


def test_finished_reads_the_checkpoint_step(tmp_path):
    out = tmp_path / "w.safetensors"
    assert not recipe.finished(out, 800)
    out.write_bytes(b"x")
    torch.save({"step": 500}, str(out) + ".ckpt")
    assert not recipe.finished(out, 800)
    torch.save({"step": 800}, str(out) + ".ckpt")
    assert recipe.finished(out, 800)
