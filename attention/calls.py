"""ComfyUI's attention call as the override receives it: its arguments, and one warning per kind of call the hook
leaves alone. Shared by ``hook.py`` (UNet calls) and ``joint.py`` (DiT calls)."""

from __future__ import annotations

import torch

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


def kernel_except(func, args: tuple, kwargs: dict, rows: list[int], skip: slice):
    """``func(*args, **kwargs)`` (the model's attention kernel) for every row and query of the call but the queries
    ``skip`` of the attention-batch ``rows``, which are left unset for the caller to fill: the other rows whole in
    one call, the other queries of ``rows`` in another (keys and values whole). q: (b, h, L, d) with
    ``skip_reshape``, else (b, L, ...); the output in the kernel's layout, (b, h, L, d) with
    ``skip_output_reshape``, else (b, L, h*d). Each row and query of an attention kernel depends only on its own
    query and the keys: the pieces are the whole call's values (bit for bit for PyTorch's SDPA on CPU, to float
    rounding for a kernel that tiles the queries differently). No mask (its query rows would need cutting too)."""
    q, k, v = args[:3]
    _, _, _, _, mask, skip_reshape, skip_out = split_args(args, kwargs)
    if mask is not None:
        raise ValueError("kernel_except takes no attention mask")
    qdim, length, b = (2 if skip_reshape else 1), q.shape[2 if skip_reshape else 1], q.shape[0]
    keep = [i for i in range(length) if not skip.start <= i < skip.stop]
    if not keep or not rows:                                      # nothing to leave out, or nothing else
        return func(*args, **kwargs)
    others = [r for r in range(b) if r not in set(rows)]
    ridx, kidx = torch.tensor(rows, device=q.device), torch.tensor(keep, device=q.device)
    rest = args[3:]
    part = func(q.index_select(0, ridx).index_select(qdim, kidx), k.index_select(0, ridx), v.index_select(0, ridx),
                *rest, **kwargs)                                  # the rows' other queries
    out = part.new_empty((b, part.shape[1], length, part.shape[3]) if skip_out else (b, length, part.shape[2]))
    if others:
        oidx = torch.tensor(others, device=q.device)
        out.index_copy_(0, oidx, func(q.index_select(0, oidx), k.index_select(0, oidx), v.index_select(0, oidx),
                                      *rest, **kwargs))
    view = out.transpose(1, 2) if skip_out else out               # (b, L, ...) either way
    view[ridx[:, None], kidx[None, :]] = part.transpose(1, 2) if skip_out else part
    return out
