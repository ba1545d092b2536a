"""ComfyUI's attention call as the override receives it: its arguments, and one warning per kind of call the hook
leaves alone. Shared by ``hook.py`` (UNet calls) and ``joint.py`` (DiT calls)."""

from __future__ import annotations

from . import logger

_warned: set = set()


def warn_once(key, msg: str, *args) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(msg, *args)


def split_args(args: tuple, kwargs: dict):
    """(q, k, v, heads, mask, skip_reshape, skip_output_reshape) of a call with ComfyUI's attention signature
    ``(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False, **kw)``."""
    q, k, v = args[:3]
    heads = args[3] if len(args) > 3 else kwargs["heads"]
    mask = args[4] if len(args) > 4 else kwargs.get("mask")
    skip = args[6] if len(args) > 6 else kwargs.get("skip_reshape", False)
    skip_out = args[7] if len(args) > 7 else kwargs.get("skip_output_reshape", False)
    return q, k, v, int(heads), mask, bool(skip), bool(skip_out)
