"""Shared argparse pieces for the pack's command lines: typed values with ranges, files in and out.

Standard library only (the ShapesWorld weights checks come from ``shapesworld/weights.py``, standard
library only too), so a bad flag is refused before torch or a model is loaded. Every refusal has
one form, printed by argparse after the usage line, exit status 2, no traceback::

    editing.py: error: argument --steps: -5 is out of range: give an integer >= 2

i.e. the flag, the bad value, the valid range and the fix. Types check one value (``int_range``,
``float_range``, ``weights_file``, ``output_file``, ``output_dir``, ``existing_file``); checks that need
two flags (``refuse_shipped``) run right after parsing, through ``parser.error``, in the same form.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .shapesworld.weights import ASSETS, SHIPPED_WEIGHTS, is_shipped, shown_path, weights_problem

OVERWRITE_FLAG = "--overwrite-shipped"


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the module docstring's layout and appends each option's default to its help (unless the help
    already tells it, or there is none to tell: a flag, or None)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("default" in text or default is None or default is False or default == "" or not action.option_strings
                or default is argparse.SUPPRESS or isinstance(default, list)):
            return text
        return f"{text} (default: {default})"


def parser(description: str | None, module: str | None = None) -> argparse.ArgumentParser:
    """An ArgumentParser with the pack's formatter (docstring as written, defaults shown); ``module``: the
    dotted name run with ``python -m``, shown in usage and errors (default: the script's file name)."""
    prog = f"python -m {module}" if module else None
    return argparse.ArgumentParser(prog=prog, description=description, formatter_class=Formatter)


def _bounds(kind: str, lo, hi, lo_open: bool = False, hi_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f"{kind} in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{kind} {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{kind} {'<' if hi_open else '<='} {hi}"
    return kind


def int_range(lo: int | None = None, hi: int | None = None, multiple_of: int | None = None):
    """argparse type: an integer in [lo, hi] (either end may be None = unbounded), optionally a multiple."""
    want = _bounds("an integer", lo, hi) + (f", a multiple of {multiple_of}" if multiple_of else "")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer: give {want}") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi) or (
                multiple_of and value % multiple_of):
            raise argparse.ArgumentTypeError(f"{value} is out of range: give {want}")
        return value
    parse.__name__ = want
    return parse


def float_range(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False):
    """argparse type: a finite float between lo and hi (closed ends unless ``lo_open`` / ``hi_open``)."""
    want = _bounds("a number", lo, hi, lo_open, hi_open)

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number: give {want}") from None
        bad = value != value or value in (float("inf"), float("-inf"))
        if lo is not None:
            bad |= value <= lo if lo_open else value < lo
        if hi is not None:
            bad |= value >= hi if hi_open else value > hi
        if bad:
            raise argparse.ArgumentTypeError(f"{text} is out of range: give {want}")
        return value
    parse.__name__ = want
    return parse


def device(text: str) -> str:
    """argparse type: a torch device name (cpu, cuda, cuda:N, mps); availability is torch's to check."""
    head, _, index = text.partition(":")
    if head not in ("cpu", "cuda", "mps") or (index and not index.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: give cpu, cuda, cuda:N or mps")
    return text


def weights_file(text: str) -> str:
    """argparse type: an existing ShapesWorld weights file (header checked; tensors are loaded later)."""
    problem = weights_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def existing_file(text: str) -> str:
    """argparse type: a file that exists."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder: give the path of a file")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text} does not exist: check the path (relative to {Path.cwd()})")
    return text


def _writable_parent(path: Path, what: str) -> None:
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{path} cannot be created: {parent} is a file, not a folder; "
                                         f"give {what} under an existing folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{path} cannot be created: {parent} is not writable; "
                                         f"give {what} in a folder you can write to")


def output_file(text: str) -> str:
    """argparse type: a file to write: not a folder, in an existing folder that is writable."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder: give a file name, e.g. {path / 'out.safetensors'}")
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text} is not writable: give another file name")
    parent = path.absolute().parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text} cannot be written: its folder {parent} does not exist "
                                         f"(or is a file): create the folder first, or give a file in an existing one")
    _writable_parent(path, "a file")
    return text


def output_dir(text: str) -> str:
    """argparse type: a folder to write into (created later, after the other checks): not a file, creatable."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder: give a new or existing folder name")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise argparse.ArgumentTypeError(f"{text} is not writable: give a folder you can write to")
        return text
    _writable_parent(path, "the folder")
    return text


def add_overwrite_shipped(p: argparse.ArgumentParser) -> None:
    p.add_argument(OVERWRITE_FLAG, action="store_true",
                   help=f"allow --out to replace a file shipped in {shown_path(ASSETS)}/ (every figure in the docs was "
                        f"measured on the shipped files; `git checkout` restores them)")


def refuse_shipped(p: argparse.ArgumentParser, out: str, allowed: bool, flag: str = "--out") -> None:
    """parser.error unless ``out`` is a new file or ``allowed`` (the --overwrite-shipped flag) is set."""
    if is_shipped(Path(out)) and not allowed:
        p.error(f"argument {flag}: {out} is the shipped file (the docs' figures were measured on it): give a new "
                f"file name, or add {OVERWRITE_FLAG} to replace it on purpose")


def load_model(p: argparse.ArgumentParser, weights: str | None = None):
    """The ShapesWorld model from ``weights`` (default: the shipped file), or parser.error with the reason."""
    from .shapesworld.model import ShapesWorldModel, WeightsError
    try:
        return ShapesWorldModel(weights) if weights else ShapesWorldModel()
    except WeightsError as e:
        p.error(f"argument --weights: {e}")


def add_weights(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", type=weights_file, default=None, metavar="FILE",
                   help=f"ShapesWorld weights file (default: the shipped {shown_path(SHIPPED_WEIGHTS)})")


def add_threads(p: argparse.ArgumentParser, default: int = 0) -> None:
    p.add_argument("--threads", type=int_range(0), default=default,
                   help="torch CPU threads; 0 = torch's own choice, usually one per core" + (
                       " (default)" if default == 0 else ""))


def set_threads(n: int) -> None:
    if n:
        import torch
        torch.set_num_threads(n)


def given(p: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The dests of the options written on the command line (parsed again over a namespace of markers)."""
    marker = object()
    ns = argparse.Namespace(**{a.dest: marker for a in p._actions if a.dest != argparse.SUPPRESS})
    parsed = p.parse_args(argv, ns)
    return {k for k, v in vars(parsed).items() if v is not marker}


def refuse_unused(p: argparse.ArgumentParser, argv: list[str] | None, unused: tuple[str, ...], when: str,
                  fix: str) -> None:
    """parser.error when an option that is ignored ``when`` ... was given (so no flag is silently dropped);
    ``fix`` may name the option as {flag}."""
    for dest in sorted(given(p, argv) & set(unused)):
        flag = next(a.option_strings[-1] for a in p._actions if a.dest == dest)
        p.error(f"argument {flag}: not used {when}: {fix.format(flag=flag)}")
