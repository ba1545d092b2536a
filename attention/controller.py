"""The controller protocol: every method of the pack is a controller on attention layers.

A controller sees each attention call of the layers it is installed on, with q, k, v
(already projected, heads not split; see ``explicit.py`` for the legend) and an
``AttnContext``. Controllers compose in order on one layer:

1. ``edit_qkv``   each controller may swap keys/values/queries (prompt mixing,
                  StructureDiffusion values) and passes them to the next one;
2. ``wants_probs`` if a controller that edits probabilities (Prompt-to-Prompt) wants them,
                  they are computed explicitly in query chunks and every such
                  controller's ``edit_probs`` runs on each chunk in order (readers
                  observe the edited result); otherwise the fast attention function
                  (or the patch that was on the layer before us) produces the output
                  and read-only controllers (``edits_probs = False``, e.g. capture)
                  get the probabilities of just the rows they ask for through
                  ``observe_probs`` - so a capture never changes the output;
3. ``edit_output`` a last look at the (b, n, h*d) output before ``to_out``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .context import AttnContext, context_from_extra_options
from .explicit import attention_with_probs, probs_chunks, sdpa_attention

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


class AttentionController:
    """Base class: the identity controller. Subclasses override what they need."""

    edits_probs = True  # False for controllers that only read the probabilities

    def wants_probs(self, ctx: AttnContext) -> bool:
        return False

    def probs_rows(self, ctx: AttnContext) -> list[int] | None:
        """Rows of the attention batch a reader needs (None = all)."""
        return None

    def observe_probs(self, probs: torch.Tensor, ctx: AttnContext, query_slice: slice, rows: list[int]) -> None:
        """Read-only look at probabilities (len(rows), h, n_chunk, m) of batch ``rows``."""

    def edit_qkv(self, q, k, v, ctx: AttnContext):
        return q, k, v

    def edit_probs(self, probs: torch.Tensor, ctx: AttnContext, query_slice: slice) -> torch.Tensor:
        return probs

    def edit_output(self, out: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        return out


def run_attention(q, k, v, ctx: AttnContext, controllers: Sequence[AttentionController],
                  base: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Run one attention call through ``controllers``; ``base(q, k, v)`` is the fast path."""
    for c in controllers:
        q, k, v = c.edit_qkv(q, k, v, ctx)
    active = [c for c in controllers if c.wants_probs(ctx)]
    editors = [c for c in active if c.edits_probs]
    readers = [c for c in active if not c.edits_probs]
    if editors:
        all_rows = list(range(q.shape[0]))

        def hook(probs, sl):
            for c in editors:
                probs = c.edit_probs(probs, ctx, sl)
            for c in readers:
                c.observe_probs(probs, ctx, sl, all_rows)
            return probs
        out = attention_with_probs(q, k, v, ctx.heads, hook)
    else:
        out = base(q, k, v)
        if readers:
            _observe(q, k, ctx, readers)
    for c in controllers:
        out = c.edit_output(out, ctx)
    return out


def _observe(q, k, ctx: AttnContext, readers: list[AttentionController]) -> None:
    wanted = set()
    for c in readers:
        r = c.probs_rows(ctx)
        wanted |= set(range(q.shape[0]) if r is None else r)
    rows = sorted(wanted)
    with torch.no_grad():
        if rows == list(range(rows[0], rows[-1] + 1)):  # one contiguous block (the usual cond chunk)
            qs, ks = q.detach()[rows[0]:rows[-1] + 1], k.detach()[rows[0]:rows[-1] + 1]
        else:
            idx = torch.tensor(rows, device=q.device)
            qs, ks = q.detach().index_select(0, idx), k.detach().index_select(0, idx)
        for sl, probs in probs_chunks(qs, ks, ctx.heads):
            for c in readers:
                c.observe_probs(probs, ctx, sl, rows)


class ControlledAttention:
    """An attn1/attn2 replace patch with ComfyUI's signature ``fn(q, k, v, extra_options)``.

    ``previous`` is the replace patch that was on this layer before (another pack's); it
    stays the fast path, so stacking packs keeps both effects unless one of our
    controllers needs explicit probabilities on that call. ``attention_fn(q, k, v, heads)``
    is the fast kernel (ComfyUI's optimized attention inside ComfyUI, SDPA outside).
    Instances are immutable and survive ``copy.deepcopy`` of model options as themselves,
    so a store reached through them stays the one the user wired.
    """

    def __init__(self, controllers: Sequence[AttentionController], is_cross: bool,
                 previous: Callable | None = None, attention_fn: AttentionFn | None = None):
        self.controllers = tuple(controllers)
        self.is_cross = is_cross
        self.previous = previous
        self.attention_fn = attention_fn or sdpa_attention

    def __deepcopy__(self, memo):
        return self

    def with_controller(self, controller: AttentionController) -> "ControlledAttention":
        return ControlledAttention(self.controllers + (controller,), self.is_cross,
                                   self.previous, self.attention_fn)

    def __call__(self, q, k, v, extra_options):
        ctx = context_from_extra_options(extra_options, self.is_cross, q)
        if self.previous is not None:
            prev = self.previous
            base = lambda q_, k_, v_: prev(q_, k_, v_, extra_options)  # noqa: E731
        else:
            fn, heads = self.attention_fn, ctx.heads
            base = lambda q_, k_, v_: fn(q_, k_, v_, heads)  # noqa: E731
        return run_attention(q, k, v, ctx, self.controllers, base)


def chain_patch(existing: Callable | None, controller: AttentionController, is_cross: bool,
                attention_fn: AttentionFn | None = None) -> ControlledAttention:
    """The patch to install on a layer that currently has ``existing`` (ours, foreign or none)."""
    if isinstance(existing, ControlledAttention):
        return existing.with_controller(controller)
    return ControlledAttention((controller,), is_cross, previous=existing, attention_fn=attention_fn)
