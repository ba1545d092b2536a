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
                  (or another pack's attention that was on the layer before us) produces the output
                  and read-only controllers (``edits_probs = False``, e.g. capture)
                  get the probabilities of just the rows they ask for through
                  ``observe_probs`` - so a capture never changes the output;
3. ``edit_output`` a last look at the (b, n, h*d) output before ``to_out``.

How the controllers reach a model's attention calls: ``hook.py`` (UNets) and ``joint.py`` (DiT models).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .context import AttnContext
from .explicit import attention_with_probs, probs_chunks

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


QKVFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def run_attention(q, k, v, ctx: AttnContext, controllers: Sequence[AttentionController], base: QKVFn,
                  plain: QKVFn | None = None) -> torch.Tensor:
    """Run one attention call through ``controllers``; ``base(q, k, v)`` is the fast path.

    ``plain(q, k, v)``: plain attention, given when ``base`` is another pack's attention (its replace function or
    override). A call on which a controller edits probabilities then returns ``edited + (base - plain)``: the
    other pack's contribution is kept as its difference to plain attention (exact when it adds a term, as
    IPAdapter-style packs do)."""
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
        if plain is not None:
            out = out + (base(q, k, v) - plain(q, k, v))
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
