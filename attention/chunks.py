"""Which chunks of an attention call belong to the full frame and to a node's own prompt.

ComfyUI evaluates every conditioning entry of a sampling run as one chunk of a UNet call (``cond_or_uncond[i]``
is the kind of chunk i, ``uuids[i]`` the entry it comes from). An entry with an area (ConditioningSetArea, a
mask set to its bounds) runs on a crop of the latent, so its attention maps and features have the crop's size;
a combined entry (ConditioningCombine, an area prompt) carries another text than the node's prompt. A sampling
run publishes, in ``transformer_options[CHUNKS_KEY]``, a ``ChunkTable`` of its entries (``nodes/guided.py`` does
it for every run of a patched MODEL). ``visible`` relabels the chunks a reader or an editor must not touch as
``HIDDEN`` (neither positive 0 nor negative 1), so every controller keeps using ``AttnContext.rows(kind)``
unchanged; without a table (a caller that does not publish one, e.g. the pure-torch ShapesWorld loops) nothing
is hidden.

Shapes: ``frame`` is the latent's spatial size (h, w) of the run; areas are in latent pixels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .context import AttnContext
from .controller import AttentionController

CHUNKS_KEY = "attention_lab_chunks"      # transformer_options key of the run's ChunkTable
HIDDEN = -1                              # cond_or_uncond value of a hidden chunk


@dataclass(frozen=True)
class ChunkTable:
    frame: tuple[int, ...]               # latent spatial size of the run
    crops: frozenset                     # uuids of entries evaluated on a crop of the latent (area conditioning)
    text: frozenset | None = None        # uuids of entries carrying the node's prompt; None: no entry is marked


def is_crop(area, frame: tuple[int, ...]) -> bool:
    """Whether an entry's resolved ``area`` (sizes then offsets, latent pixels) covers less than ``frame``, as
    ``comfy.samplers.get_area_and_mult`` clips it."""
    if area is None:
        return False
    n = len(area) // 2
    sizes, offsets = list(area[:n])[-len(frame):], list(area[n:])[-len(frame):]
    return any(min(f - o, s) < f for s, o, f in zip(sizes, offsets, frame))


def relabel(kinds: list[int], extra: dict, full_frame: bool = True, text_only: bool = True) -> list[int]:
    """``kinds`` (a call's cond_or_uncond) with the chunks to leave alone set to ``HIDDEN``, read from the call's
    transformer_options ``extra``: chunks of entries evaluated on a crop (``full_frame``) and, when the run marks
    its prompt's entries, positive chunks of other entries (``text_only``). Unchanged without a table."""
    table = extra.get(CHUNKS_KEY)
    uuids = extra.get("uuids")
    if not isinstance(table, ChunkTable) or uuids is None or len(uuids) != len(kinds):
        return list(kinds)
    return [HIDDEN if (full_frame and uuid in table.crops)
            or (text_only and kind == 0 and table.text is not None and uuid not in table.text) else kind
            for kind, uuid in zip(kinds, uuids)]


def visible(ctx: AttnContext, full_frame: bool = True, text_only: bool = True) -> AttnContext:
    """``ctx`` with the chunks to leave alone relabeled ``HIDDEN`` (``relabel``)."""
    out = relabel(ctx.cond_or_uncond, ctx.extra, full_frame, text_only)
    return ctx if out == ctx.cond_or_uncond else dataclasses.replace(ctx, cond_or_uncond=out)


class ChunkFilter(AttentionController):
    """``inner`` seeing only the chunks ``visible`` leaves (e.g. a P2P controller that must edit the rows of its
    own prompt, not an area prompt combined with it). Every protocol method is forwarded with the filtered
    context; shared through deep copies like the controller it wraps."""

    def __init__(self, inner: AttentionController, full_frame: bool = False, text_only: bool = True):
        self.inner, self.full_frame, self.text_only = inner, full_frame, text_only
        self.edits_probs = inner.edits_probs
        self.edits_cond_grid = getattr(inner, "edits_cond_grid", False)

    def __deepcopy__(self, memo):
        return self

    def _ctx(self, ctx: AttnContext) -> AttnContext:
        return visible(ctx, self.full_frame, self.text_only)

    def wants_probs(self, ctx):
        return self.inner.wants_probs(self._ctx(ctx))

    def probs_rows(self, ctx):
        return self.inner.probs_rows(self._ctx(ctx))

    def observe_probs(self, probs, ctx, query_slice, rows):
        self.inner.observe_probs(probs, self._ctx(ctx), query_slice, rows)

    def edit_qkv(self, q, k, v, ctx):
        return self.inner.edit_qkv(q, k, v, self._ctx(ctx))

    def edit_probs(self, probs, ctx, query_slice):
        return self.inner.edit_probs(probs, self._ctx(ctx), query_slice)

    def edit_output(self, out, ctx):
        return self.inner.edit_output(out, self._ctx(ctx))
