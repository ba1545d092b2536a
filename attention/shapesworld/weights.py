"""ShapesWorld weights files: where the shipped ones are, whether a file is one, and the fix to suggest.

Standard library only (the file's header is read without torch), so a command line can refuse a bad
``--weights`` before torch or a model is loaded; ``model.py`` raises ``WeightsError`` with the same fixes.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "assets"
SHIPPED_WEIGHTS = ASSETS / "shapesworld.safetensors"
SHIPPED_CLASSIFIER = ASSETS / "shapes_classifier.safetensors"
SHIPPED_FLOW = ASSETS / "shapesworld_flow.safetensors"
SHIPPED_GROUNDING = ASSETS / "shapesworld_grounding.safetensors"
# every weights file in assets/: no training command's --out may replace one without --overwrite-shipped
SHIPPED_FILES = (SHIPPED_WEIGHTS, SHIPPED_CLASSIFIER, SHIPPED_FLOW, SHIPPED_GROUNDING)


class WeightsError(RuntimeError):
    """A ShapesWorld weights file that is missing, corrupt or of another model; the message names the fix."""


def same_file(path: Path, other: Path) -> bool:
    """Whether two paths name the same file (False where either cannot be resolved)."""
    try:
        return path.resolve() == other.resolve()
    except OSError:
        return False


def is_shipped(path: Path) -> bool:
    """Whether ``path`` is one of the files shipped in assets/ (``SHIPPED_FILES``)."""
    return any(same_file(path, shipped) for shipped in SHIPPED_FILES)


def shown_path(path: Path) -> str:
    """The path as the user would type it: relative to the current directory when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def safetensors_metadata(path: Path) -> dict:
    """The ``__metadata__`` of a safetensors file, read from its header only (no tensors, no torch).

    Raises ValueError when the file is not a safetensors file."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        (size,) = struct.unpack("<Q", head)
        if not 2 <= size <= min(100_000_000, path.stat().st_size - 8):
            raise ValueError("no safetensors header")
        try:
            header = json.loads(f.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError("no safetensors header") from None
    if not isinstance(header, dict):
        raise ValueError("no safetensors header")
    return header.get("__metadata__") or {}


def _git_restore(path: Path) -> str:
    rel = path.resolve().relative_to(REPO)
    inside = Path.cwd().resolve() == REPO
    return f"git checkout -- {rel}" if inside else f"git -C {REPO} checkout -- {rel}"


def weights_fix(path: Path | str) -> str:
    """What to do about a bad ShapesWorld weights file: restore (the shipped file only) or pick another."""
    path = Path(path)
    if same_file(path, SHIPPED_WEIGHTS):
        return (f"restore the shipped file with `{_git_restore(SHIPPED_WEIGHTS)}`, or retrain into a new file with "
                f"`python -m attention.shapesworld.recipe --out shapesworld_recipe.safetensors` (106 minutes on 2 CPU "
                f"cores) and pass --weights shapesworld_recipe.safetensors")
    return (f"give the path of a ShapesWorld weights file (written by attention.shapesworld.train or .recipe), "
            f"or use the shipped {shown_path(SHIPPED_WEIGHTS)} (the default: no --weights flag, or an empty weights "
            f"widget in ComfyUI)")


def weights_problem(path: Path | str, fix: str | None = None) -> str | None:
    """Why ``path`` is not a usable ShapesWorld weights file, with a fix that fits the path (or ``fix``);
    None if usable."""
    path = Path(path)
    fix = fix or weights_fix(path)
    if path.is_dir():
        return f"{path} is a folder, not a weights file: {fix}"
    if not path.is_file():
        return f"{path} does not exist: {fix}"
    try:
        meta = safetensors_metadata(path)
    except (OSError, ValueError) as e:
        return f"{path} is not a safetensors file ({e}): {fix}"
    try:
        config = json.loads(meta["config"])
    except (KeyError, TypeError, json.JSONDecodeError):
        return f"{path} is a safetensors file without a ShapesWorld model config: {fix}"
    return unet_config_problem(path, config, fix)


def unet_config_problem(path: Path | str, config, fix: str) -> str | None:
    """Why a parsed ``config`` is not a ShapesWorld UNet's (a ShapesWorld-Flow or grounding-head file has its own
    config), or None."""
    if isinstance(config, dict) and "channels" in config and "text_width" in config:
        return None
    if isinstance(config, dict) and "flux" in config:
        return (f"{path} is a ShapesWorld-Flow weights file (the Flux-class transformer), not a ShapesWorld UNet "
                f"file: load it with the ShapesWorld-Flow Loader or a flow command's --weights; here {fix}")
    return f"{path} holds no ShapesWorld UNet config (no 'channels' / 'text_width'; another kind of file?): {fix}"
