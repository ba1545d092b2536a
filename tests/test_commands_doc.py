"""docs/commands.md lists every command line of the pack: each module under attention/ with a top-level ``main``
has a row in its "Every command" table (``python -m <module>``), runs as ``python -m`` (a ``__main__`` guard or
``__main__.py``) and answers ``--help`` with exit status 0; every ``python -m`` command the doc shows parses."""

from __future__ import annotations

import ast
import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ROOT / "docs" / "commands.md"


def every_command_table() -> str:
    """The text of docs/commands.md's "## Every command" section."""
    doc = COMMANDS.read_text()
    start = doc.index("\n## Every command\n")
    end = doc.find("\n## ", start + 1)
    return doc[start:end if end > 0 else None]


def command_modules() -> list[str]:
    """Dotted names of the modules under attention/ that define a top-level ``main`` function."""
    names = []
    for path in sorted((ROOT / "attention").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        if not any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body):
            continue
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    return names


def test_the_scan_finds_the_known_commands():
    names = command_modules()
    assert {"attention.demo", "attention.shapesworld.train", "attention.shapesworld.classifier",
            "attention.shapesworld.null_precision", "attention.shapesworld.flow_train"} <= set(names)


@pytest.mark.parametrize("name", command_modules())
def test_every_command_has_a_row_and_answers_help(name, capsys):
    table = every_command_table()
    assert f"python -m {name}`" in table or f"python -m {name} " in table, (
        f"docs/commands.md has no row for `python -m {name}`: add one to its 'Every command' table")
    path = ROOT / Path(*name.split("."))
    runnable = (path / "__main__.py").is_file() if path.is_dir() else \
        'if __name__ == "__main__":' in path.with_suffix(".py").read_text()
    assert runnable, f"{name} has a main() but `python -m {name}` would not call it"
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(name).main(["--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("usage: ")


def doc_commands() -> list[tuple[str, list[str]]]:
    """(module, arguments) of every ``python -m attention...`` command written in docs/commands.md; an optional
    part written ``[--flag value]`` counts as given."""
    found = re.findall(r"python -m (attention[\w.]*)([^`]*)`", COMMANDS.read_text())
    return [(name, shlex.split(args.replace("[", " ").replace("]", " "))) for name, args in found]


@pytest.mark.parametrize("name, argv", doc_commands(), ids=[" ".join([n, *a]) for n, a in doc_commands()])
def test_every_command_in_the_doc_parses(name, argv, monkeypatch):
    monkeypatch.chdir(ROOT)               # the doc's commands run from the repository root
    module = importlib.import_module(name)
    assert name in command_modules(), f"docs/commands.md shows `python -m {name}`, which has no main()"
    assert hasattr(module, "build_parser"), f"{name} builds its parser inside main(): give it a build_parser()"
    module.build_parser().parse_args(argv)   # argparse exits with status 2 on a flag or value it refuses
