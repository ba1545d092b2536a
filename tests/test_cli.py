"""Every command line refuses bad input the same way: argparse's own error, naming the flag, the bad value, the
valid range and the fix, exit status 2, before a model is loaded or a file written. Also: no default overwrites a
shipped file, weight-file hints fit the path, and the demo leaves a linked report when interrupted."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attention import cli, demo
from attention.demo.runner import Progress
from attention.shapesworld import model as model_module
from attention.shapesworld import weights as weight_files

ROOT = Path(__file__).resolve().parents[1]


def entry(name: str):
    """The module of an entry point: a dotted module, or a script under benchmarks/ or tools/."""
    if "/" not in name:
        return importlib.import_module(name)
    spec = importlib.util.spec_from_file_location(f"entry_{Path(name).stem}", ROOT / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module


# (entry point, bad arguments, what the one-line message must say)
BAD = [
    ("attention.demo", ["--threads", "-2"], "argument --threads: -2 is out of range: give an integer >= 0"),
    ("attention.demo", ["--sections", "nope"], "argument --sections: invalid choice: 'nope'"),
    ("attention.demo", ["--out", "README.md"], "argument --out: README.md is a file, not a folder"),
    ("attention.shapesworld.editing", ["--steps", "-5", "--images", "1"],
     "argument --steps: -5 is out of range: give an integer >= 2"),
    ("attention.shapesworld.editing", ["--images", "two"], "argument --images: 'two' is not an integer: give an "
                                                          "integer >= 1"),
    ("attention.shapesworld.prompt_mix", ["--seeds", "0"], "argument --seeds: 0 is out of range"),
    ("attention.shapesworld.prompt_mix", ["--probe-seeds", "3"], "argument --probe-seeds: not used without --probe"),
    ("attention.shapesworld.dpl", ["--steps", "0"], "argument --steps: 0 is out of range: give an integer >= 2"),
    ("attention.shapesworld.dpl", ["--sink", "--images", "3"], "argument --images: not used with --sink"),
    ("attention.shapesworld.dpl", ["--cost-only", "--null-early-stop", "1e-5"],
     "argument --null-early-stop: not used with --cost-only (one image, no early stop)"),
    ("attention.shapesworld.evaluate", ["--prompts", "0", "--scenes", "0"], "argument --prompts: 0 is out of range"),
    ("attention.shapesworld.spatext", ["--steps", "0"], "argument --steps: 0 is out of range: give an integer >= 1"),
    ("attention.shapesworld.structure", ["--cfg", "-1"], "argument --cfg: -1 is out of range: give a number >= 0"),
    ("attention.shapesworld.train", ["--lr", "0"], "argument --lr: 0 is out of range: give a number > 0"),
    ("attention.shapesworld.train", ["--ema", "1"], "argument --ema: 1 is out of range: give a number in [0, 1)"),
    ("attention.shapesworld.train", ["--device", "gpu"], "argument --device: 'gpu' is not a device"),
    ("attention.shapesworld.train", ["--out", "no_such_folder/w.safetensors"],
     "argument --out: no_such_folder/w.safetensors cannot be written: its folder"),
    ("attention.shapesworld.recipe", ["--threads", "-2"], "argument --threads: -2 is out of range"),
    ("attention.shapesworld.classifier", ["--steps", "-1"], "argument --steps: -1 is out of range"),
    ("benchmarks/capture_overhead.py", ["--repeats", "0"], "argument --repeats: 0 is out of range"),
    ("benchmarks/capture_overhead_comfy.py", ["--size", "500"], "argument --size: 500 is out of range: give an "
                                                                "integer >= 64, a multiple of 8"),
    ("benchmarks/editing_speed.py", ["--threads", "0"], "argument --threads: 0 is out of range: give an integer >= 1"),
    ("benchmarks/dit_capture_overhead.py", ["--steps", "0"],
     "argument --steps: 0 is out of range: give an integer >= 1"),
    ("benchmarks/shapesworld_speed.py", ["--weights", "missing.safetensors"],
     "argument --weights: missing.safetensors does not exist"),
    ("tools/build_workflows.py", ["--out", "README.md"], "argument --out: README.md is a file, not a folder"),
    ("tools/queue_workflow.py", ["missing_api.json"], "argument workflow: missing_api.json does not exist"),
    ("tools/random_dit_checkpoints.py", ["out_dir", "--size", "250", "192"],
     "argument --size: [250, 192] are not multiples of 16: give e.g. 256 192"),
]


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: every refusal must come first."""
    def refuse(self, *a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")
    monkeypatch.setattr(model_module.ShapesWorldModel, "__init__", refuse)


@pytest.mark.parametrize("name,argv,message", BAD, ids=[f"{n.split('.')[-1]} {' '.join(a)}" for n, a, _ in BAD])
def test_bad_values_are_refused_with_one_line_and_status_2(name, argv, message, capsys, monkeypatch, no_model):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit_:
        entry(name).main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert message in err, err
    assert err.startswith("usage:") and err.count("error:") == 1 and "Traceback" not in err


def test_every_option_of_every_entry_point_has_help(monkeypatch, capsys):
    made = []
    original = cli.parser
    monkeypatch.setattr(cli, "parser", lambda *a, **k: made.append(original(*a, **k)) or made[-1])
    names = sorted({n for n, _, _ in BAD})
    for name in names:
        with pytest.raises(SystemExit) as exit_:
            entry(name).main(["--help"])
        assert exit_.value.code == 0
    assert len(made) == len(names)
    missing = [(p.prog, a.option_strings or a.dest) for p in made for a in p._actions if not a.help]
    assert not missing


def test_a_flag_error_runs_as_a_clean_process():
    """The real command line: status 2, the message as the last line, no traceback."""
    run = subprocess.run([sys.executable, "-m", "attention.shapesworld.editing", "--steps", "-5", "--images", "1"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1] == ("python -m attention.shapesworld.editing: error: argument "
                                                   "--steps: -5 is out of range: give an integer >= 2")


def test_weight_hints_fit_the_path(tmp_path, monkeypatch, capsys, no_model):
    monkeypatch.chdir(ROOT)
    shipped = weight_files.weights_fix(weight_files.SHIPPED_WEIGHTS)
    assert "git checkout -- assets/shapesworld.safetensors" in shipped and "--out assets" not in shipped
    for other in (weight_files.SHIPPED_CLASSIFIER, weight_files.SHIPPED_FLOW):   # not a ShapesWorld model's weights:
        assert "git checkout" not in weight_files.weights_fix(other)            # restoring it would not help
    for path in ("README.md", str(tmp_path / "mine.safetensors")):
        with pytest.raises(SystemExit):
            entry("attention.shapesworld.structure").main(["--weights", path])
        err = capsys.readouterr().err
        assert path in err and "git" not in err and "--out" not in err, err
        assert "use the shipped assets/shapesworld.safetensors" in err
    (tmp_path / "plain.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b'{"x": 1}'.ljust(16))
    assert "without a ShapesWorld model config" in weight_files.weights_problem(tmp_path / "plain.safetensors")
    assert weight_files.weights_problem(weight_files.SHIPPED_WEIGHTS) is None


def test_no_default_writes_a_shipped_file_and_shipped_files_need_the_flag(tmp_path, monkeypatch, capsys, no_model):
    monkeypatch.chdir(ROOT)
    assert {p.name for p in weight_files.SHIPPED_FILES} >= {p.name for p in weight_files.ASSETS.glob("*.safetensors")}
    for name in ("attention.shapesworld.train", "attention.shapesworld.recipe", "attention.shapesworld.classifier",
                 "attention.shapesworld.flow_train"):
        module = entry(name)
        default = Path(module.build_parser().parse_args([]).out)
        assert default.resolve().parent != weight_files.ASSETS.resolve()
        for shipped in weight_files.SHIPPED_FILES:
            with pytest.raises(SystemExit) as exit_:
                module.main(["--out", str(shipped.relative_to(ROOT))])
            err = capsys.readouterr().err
            assert exit_.value.code == 2 and "is the shipped file" in err and "add --overwrite-shipped" in err
    p = cli.parser(None)
    cli.refuse_shipped(p, str(weight_files.SHIPPED_WEIGHTS), allowed=True)   # the flag lets it through
    with pytest.raises(SystemExit):
        cli.refuse_shipped(p, str(weight_files.SHIPPED_WEIGHTS), allowed=False)
    # the README's own commands never write into assets/
    assert "--out assets/" not in (ROOT / "README.md").read_text()


def test_build_workflows_help_writes_nothing(capsys):
    module = entry("tools/build_workflows.py")
    files = sorted((ROOT / "workflows").rglob("*.json"))
    before = [(f.stat().st_mtime_ns, f.read_bytes()) for f in files]
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0 and "--check" in capsys.readouterr().out
    assert [(f.stat().st_mtime_ns, f.read_bytes()) for f in files] == before


def test_build_workflows_check_finds_the_files_current_and_writes_nothing():
    """Needs ComfyUI (the builder reads the node definitions): runs where COMFYUI_PATH is set (tier 2)."""
    comfy = os.environ.get("COMFYUI_PATH")
    if not comfy or not (Path(comfy) / "comfy").is_dir():
        pytest.skip("tier 2: set COMFYUI_PATH (the builder reads ComfyUI's node definitions)")
    files = sorted((ROOT / "workflows").rglob("*.json"))
    before = [(f.stat().st_mtime_ns, f.read_bytes()) for f in files]
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "build_workflows.py"), "--check"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, "workflows/ differs from tools/build_workflows.py: rebuild it\n" + run.stdout[-2000:]
    assert [(f.stat().st_mtime_ns, f.read_bytes()) for f in files] == before


def test_queue_workflow_refuses_a_ui_file_and_an_absent_server(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    module = entry("tools/queue_workflow.py")
    with pytest.raises(SystemExit) as exit_:
        module.main(["workflows/attention_capture_shapesworld.json"])
    assert exit_.value.code == 2 and "is a graph-editor (UI) file" in capsys.readouterr().err
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(SystemExit) as exit_:
        module.main(["workflows/api/attention_capture_shapesworld_api.json", "--server", f"http://127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"no ComfyUI answers at http://127.0.0.1:{port}" in err and "Traceback" not in err


def test_figures_honour_their_flags(monkeypatch):
    """editing used to compute its reweight figure at fixed settings before looking at the flags."""
    editing = entry("attention.shapesworld.editing")
    calls = {}
    monkeypatch.setattr(cli, "load_model", lambda p, w: "model")
    for fig in ("reweight_figures", "swap_figures", "reconstruction_figures"):
        monkeypatch.setattr(editing, fig, lambda *a, _f=fig, **k: calls.setdefault(_f, (a, k)) and {})
    editing.main(["--steps", "7", "--images", "3", "--swap-images", "2", "--reweight-seeds", "1",
                  "--reweight-steps", "4"])
    assert calls["reweight_figures"] == (("model",), {"seeds": 1, "steps": 4})
    assert calls["swap_figures"] == (("model", 2, 7), {})
    assert calls["reconstruction_figures"] == (("model", 3, 7), {})


class FakeModel:
    training: dict = {}

    def __init__(self):
        self.unet = torch.nn.Identity()


def test_demo_checks_the_weights_before_creating_its_folder(tmp_path, capsys, monkeypatch):
    from safetensors.torch import save_file

    from attention.shapesworld.model import MODEL_CONFIG
    wrong = tmp_path / "wrong.safetensors"  # a valid header and config, but tensors of another model
    save_file({"unet.nothing": torch.zeros(1)}, str(wrong), metadata={"config": json.dumps(MODEL_CONFIG)})
    for weights in ("README.md", str(wrong)):
        with pytest.raises(SystemExit) as exit_:
            demo.main(["--out", str(tmp_path / "out"), "--weights", weights])
        assert exit_.value.code == 2 and "argument --weights" in capsys.readouterr().err
        assert not (tmp_path / "out").exists()


def test_an_interrupted_demo_leaves_a_linked_report(tmp_path, monkeypatch):
    from PIL import Image

    def first(model, out, save, quick):
        for _ in range(3):
            model.unet(torch.zeros(1))
        Image.new("RGB", (4, 4)).save(out / "a.png")
        return ["## First", "", "![a](a.png)", ""]

    def second(model, out, save, quick):  # forgets to link one of its images
        Image.new("RGB", (4, 4)).save(out / "b.png")
        Image.new("RGB", (4, 4)).save(out / "c.png")
        return ["## Second", "", "![b](b.png)", ""]

    def third(model, out, save, quick):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "load_model", lambda p, w: FakeModel())
    sections = (demo.Section("one", "One", first, (3, 3)), demo.Section("two", "Two", second),
                demo.Section("three", "Three", third), demo.Section("four", "Four", first))
    monkeypatch.setattr(demo, "SECTIONS", sections)
    assert demo.main(["--out", str(tmp_path)]) == 130
    report = (tmp_path / "report.md").read_text()
    assert 'Interrupted (Ctrl-C or a stop signal) during "Three"' in report and "2 of 4 sections finished" in report
    assert "| 1 | [One](#one) |" in report and '<a id="one"></a>' in report and "3 UNet evaluations" in report
    assert "![a](a.png)" in report and "![b](b.png)" in report and "![c.png](c.png)" in report
    assert "| 3 | Three | interrupted |" in report and "| 4 | Four | not run |" in report
    assert "## First" in report and "## Second" in report


def test_a_sections_log_goes_to_its_report_and_only_warnings_to_the_terminal(tmp_path, monkeypatch, caplog):
    import logging

    def talkative(model, out, save, quick):
        logging.getLogger("attention_lab.figure").info("baseline: {'1': '0.681 / 0.515'}")
        logging.getLogger("attention_lab").warning("something to see now")
        return ["## Talkative", ""]

    monkeypatch.setattr(cli, "load_model", lambda p, w: FakeModel())
    monkeypatch.setattr(demo, "SECTIONS", (demo.Section("talk", "Talk", talkative),))
    with caplog.at_level(logging.INFO):
        assert demo.main(["--out", str(tmp_path)]) == 0
    shown = [r.getMessage() for r in caplog.records]
    assert "something to see now" in shown and not any("baseline" in m for m in shown), shown
    assert any(m.startswith("[1/1] Talk: ") for m in shown), shown    # the section's result line
    report = (tmp_path / "report.md").read_text()
    assert "Section log (2 lines)" in report and "baseline: {'1': '0.681 / 0.515'}" in report
    assert "something to see now" in report
    assert not logging.getLogger("attention_lab").handlers and logging.getLogger("attention_lab").propagate


def test_every_demo_section_is_registered_and_importable():
    for section in demo.SECTIONS:   # imported by name in attention/demo/__init__.py, defined in the demo package
        assert callable(section.function) and section.function.__module__.startswith("attention.demo."), section
    assert len({s.name for s in demo.SECTIONS}) == len(demo.SECTIONS)


def test_progress_draws_a_bar_on_a_terminal_and_lines_in_a_log():
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    tty, log = Terminal(), io.StringIO()
    bar, plain = Progress("[1/2] One", 4, tty), Progress("[1/2] One", None, log)
    for _ in range(2):
        bar.hook(None, None, None)
        plain.hook(None, None, None)
    assert "\r[1/2] One  [######------------------] ~25%  1 UNet calls" in tty.getvalue()   # drawn at the 1st call
    assert log.getvalue().splitlines() == ["[1/2] One  1 UNet calls  0:00"]   # then once per 30 s, no bar
    assert bar.calls == plain.calls == 2
