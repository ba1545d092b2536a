"""Prompt-to-Prompt on DiT joint attention (Flux double/single blocks, SD3's MMDiT joint blocks; issue 29).

Upstream (google/prompt-to-prompt, Apache-2.0, the commit named in ``p2p.py``) edits a UNet's separate softmaxes:
the cross-attention (image queries over text keys) of the edits takes the source's through the word-swap /
refine mappers and the equalizer, blended by the per-word alphas of the step; the self-attention (image over
image) of the edits is the source's during the self-replace window. A DiT has one joint softmax per block over
[text keys, image keys], so both edits are blocks of one row:

    row of an image-grid query:  [ prefix | text keys (T') | image-grid keys (N) | other image keys ]
                                           ^ cross edit      ^ self injection

Shape legend (einops style): probs (b, h, n_chunk, L) joint probabilities of the joint queries ``query_slice``;
rows of image-grid queries ``n``; text keys ``m`` (= the plan's length, or r whole copies); grid keys ``N``;
edits ``k``. Batch convention as ``p2p.py``: item 0 of the cond rows is the source, items 1..k the edits.

The same formula as the UNet controller (``P2PController.cross_edit``: ``replace_cross`` then the alpha blend) is
applied to the image->text block, the source's image->image block is copied into the edits' rows during the
window, and then (``rows``):

* ``"renormalize"`` (default): each edited row is scaled back to the sum it had before the edit (the softmax's 1,
  up to float rounding), so the joint softmax's rows sum to 1 again (the source's text mass and the edit's own
  image mass need not add to 1; reweighting raises the row's sum and the scaling spreads that over the whole row,
  so a word's weight grows relative to every other key). Scaling to the row's own sum rather than dividing by the
  new sum keeps an unchanged row bit-identical (the factor is exactly 1), so an identical target reproduces the
  source row bit for bit;
* ``"slice"``: upstream's semantics kept literally: the slices are replaced and the row is left as it is (its sum
  may differ from 1, as an upstream reweighted row does).

Not edited: the rows of text queries (upstream has no such rows; they stay the edit's own), the MMDiT register
(prefix) keys and image tokens after the grid (reference tokens), which stay the edit's own in an edited row.
Step from the sigma (``ctx.step``); a call in which no edit is due (past ``cross_replace_steps`` with no
self-injection) runs the model's own attention kernel, untouched.
"""

from __future__ import annotations

from .context import AttnContext
from .p2p import EditPlan, P2PController

JOINT_ROWS = ("renormalize", "slice")


class JointP2PController(P2PController):
    """``P2PController`` that also edits DiT joint attention (``ctx.joint`` set by ``joint.dit_call``); on UNet
    layers it is the UNet controller unchanged."""

    edits_cond_grid = True      # only the image-grid query rows of the cond chunks change (joint.py's fast path)

    def __init__(self, plan: EditPlan, steps: int, rows: str = "renormalize"):
        if rows not in JOINT_ROWS:
            raise ValueError(f"joint rows {rows!r} is not one of {list(JOINT_ROWS)}")
        super().__init__(plan, steps)
        self.rows = rows

    def cross_due(self, step: int) -> bool:
        """Whether any edit's cross-attention takes the source's at ``step`` (a zero alpha leaves it as it is)."""
        return bool(self.plan.alpha[min(step, self.plan.alpha.shape[0] - 1)].any())

    def self_due(self, ctx: AttnContext) -> bool:
        lo, hi = self.plan.self_replace
        in_window = int(lo * self.steps) <= ctx.step < int(hi * self.steps)
        return in_window and ctx.height * ctx.width <= self.plan.self_max_tokens

    def wants_probs(self, ctx: AttnContext) -> bool:
        if ctx.joint is None:
            return super().wants_probs(ctx)
        if 0 not in ctx.cond_or_uncond or ctx.items < 2 or ctx.step is None:
            return False
        return self.cross_due(ctx.step) or self.self_due(ctx)

    def edit_probs(self, probs, ctx: AttnContext, query_slice: slice):
        if ctx.joint is None:
            return super().edit_probs(probs, ctx, query_slice)
        layout = ctx.joint
        g, t = layout.grid_tokens(), layout.text_keys()
        lo, hi = max(query_slice.start, g.start), min(query_slice.stop, g.stop)
        if lo >= hi:                                           # no image-grid query in this chunk
            return probs
        q = slice(lo - query_slice.start, hi - query_slice.start)
        cross, inject = self.cross_due(ctx.step), self.self_due(ctx)
        for start, item in ctx.rows(0):
            if item != 0:
                continue
            k = min(ctx.items - 1, len(self.plan.kind))
            rows = probs[start:start + 1 + k, :, q]            # (1+k, h, n, L), a view
            base, edits = rows[0], rows[1:]
            mass = edits.sum(-1, keepdim=True) if self.rows == "renormalize" else None
            new_text = self.cross_edit(base[..., t], edits[..., t], ctx.step) if cross else None
            if new_text is not None:
                edits[..., t] = new_text
            if inject:
                edits[..., g] = base[..., g]
            if mass is not None:
                edits.mul_(mass / edits.sum(-1, keepdim=True))
        return probs
