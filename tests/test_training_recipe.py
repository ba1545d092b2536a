"""The two-stage training recipe: its stages reach train.py intact, match the committed weights,
and a finished stage is recognised (so an interrupted recipe resumes instead of restarting)."""

import json
from pathlib import Path

import torch
from safetensors import safe_open

from attention.shapesworld import recipe, train

WEIGHTS = Path(__file__).resolve().parents[1] / "assets" / "shapesworld.safetensors"
SETTINGS = ("steps", "lr", "warmup", "offset_noise", "x0_floor", "seed")  # a Stage's fields = train.py's args


def settings(obj) -> tuple:
    """A stage's settings from a Stage, parsed trainer arguments or a weights file's metadata dict."""
    return tuple(obj[k] if isinstance(obj, dict) else getattr(obj, k) for k in SETTINGS)


def test_stage_arguments_reach_the_trainer(tmp_path):
    base, finetune = recipe.STAGES
    for stage, init in ((base, None), (finetune, tmp_path / "base.safetensors")):
        args = train.build_parser().parse_args(recipe.stage_argv(stage, tmp_path / "o.safetensors", init, 2, 10))
        assert settings(args) == settings(stage)
        assert args.init == (str(init) if init else "")


def test_trainer_defaults_are_the_base_stage():
    assert settings(train.build_parser().parse_args([])) == settings(recipe.STAGES[0])


def test_committed_weights_were_made_by_the_finetune_stage():
    with safe_open(str(WEIGHTS), framework="pt") as f:
        meta = json.loads(f.metadata()["training"])
    assert settings(meta) == settings(recipe.STAGES[1])


def test_finished_reads_the_checkpoint_step(tmp_path):
    out = tmp_path / "w.safetensors"
    assert not recipe.finished(out, 800)
    out.write_bytes(b"x")
    torch.save({"step": 500}, str(out) + ".ckpt")
    assert not recipe.finished(out, 800)
    torch.save({"step": 800}, str(out) + ".ckpt")
    assert recipe.finished(out, 800)
