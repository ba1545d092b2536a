"""The two-stage training recipe: its stages reach train.py intact, match the committed weights,
and a finished stage is recognised (so an interrupted recipe resumes instead of restarting)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from attention.shapesworld import recipe, train

WEIGHTS = Path(__file__).resolve().parents[1] / "assets" / "shapesworld.safetensors"
SETTINGS = ("steps", "lr", "warmup", "offset_noise", "x0_floor", "seed", "stop_at")  # a Stage's fields = train.py's


def settings(obj, fields=SETTINGS) -> tuple:
    """A stage's settings from a Stage, parsed trainer arguments or a weights file's metadata dict
    (files saved before --stop-at existed lack that key: they ran their whole schedule, stop_at 0)."""
    return tuple(obj.get(k, 0) if isinstance(obj, dict) else getattr(obj, k) for k in fields)


def test_stage_arguments_reach_the_trainer(tmp_path):
    base, finetune = recipe.STAGES
    for stage, init in ((base, None), (finetune, tmp_path / "base.safetensors")):
        args = train.build_parser().parse_args(recipe.stage_argv(stage, tmp_path / "o.safetensors", init, 2, 10))
        assert settings(args) == settings(stage)
        assert args.init == (str(init) if init else "")


def test_trainer_defaults_are_the_base_stage():
    """All but the early stop: the plain trainer runs its whole schedule unless told otherwise."""
    fields = tuple(f for f in SETTINGS if f != "stop_at")
    assert settings(train.build_parser().parse_args([]), fields) == settings(recipe.STAGES[0], fields)
    assert train.build_parser().parse_args([]).stop_at == 0


def test_stop_at_keeps_the_schedule_and_saves_the_last_step(tmp_path):
    out = tmp_path / "w.safetensors"
    train.main(["--out", str(out), "--steps", "6", "--stop-at", "2", "--warmup", "0", "--batch", "2", "--workers", "0"])
    state = torch.load(train.checkpoint_path(out), weights_only=True)
    assert state["step"] == 2
    last_lr = state["opt"]["param_groups"][0]["lr"]  # step index 1 on the 6-step cosine, not the 2-step one
    assert last_lr == train.lr_at(1, 6, 3e-4, 0) and last_lr != train.lr_at(1, 2, 3e-4, 0)
    with safe_open(str(out), framework="pt") as f:
        meta = json.loads(f.metadata()["training"])
    assert (meta["steps"], meta["schedule_steps"], meta["stop_at"]) == (2, 6, 2)
    assert recipe.finished(out, 2) and not recipe.finished(out, 6)


def test_committed_weights_were_made_by_the_finetune_stage():
    with safe_open(str(WEIGHTS), framework="pt") as f:
        meta = json.loads(f.metadata()["training"])
    assert settings(meta) == settings(recipe.STAGES[1])


def test_stop_at_beyond_the_schedule_is_refused(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        train.main(["--out", str(tmp_path / "unused.safetensors"), "--steps", "6", "--stop-at", "7"])
    assert exit_.value.code == 2
    assert "argument --stop-at: 7 is out of range: give an integer in [0, --steps] = [0, 6]" in capsys.readouterr().err


def test_finished_reads_the_checkpoint_step(tmp_path):
    out = tmp_path / "w.safetensors"
    assert not recipe.finished(out, 800)
    out.write_bytes(b"x")
    torch.save({"step": 500}, train.checkpoint_path(out))
    assert not recipe.finished(out, 800)
    torch.save({"step": 800}, train.checkpoint_path(out))
    assert recipe.finished(out, 800)
