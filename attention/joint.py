"""DiT joint attention through the attention hook: Flux's double/single blocks, SD3/3.5's MMDiT joint blocks.

Shape legend (einops style):
    b  attention batch (chunks x items)     h  heads          d  head dim
    L  joint tokens = T text + I image      N  image grid tokens = gh * gw (I >= N: e.g. Flux Kontext's
                                               reference tokens follow the grid; they are not mapped)
    q, k, v: (b, h, L, d) (Flux: ``skip_reshape``) or (b, L, h*d) (SD3; its v is (b, L, h, d))
    cross view: probs of image-grid queries over the prompt's text keys   (b, h, n_chunk, T - prefix)
    self view:  probs of image-grid queries over image-grid keys          (b, h, n_chunk, N)

Both views are slices of the one joint softmax (rows sum to 1 over text + image keys), computed from the q, k the
model hands to attention (after Flux's RoPE), so a capture sees exactly what the model attends with; the output
stays the model's kernel's (bit-identical image).

Contract for a DiT model (ComfyUI's ``Flux`` and ``MMDiT``, and a pure-torch twin such as ShapesWorld-Flow):

* the joint attention of each block goes through ``transformer_options["optimized_attention_override"]``, called
  as ComfyUI's ``wrap_attn`` calls it (``hook.call_attention``): ``override(func, q, k, v, heads, ...,
  transformer_options=to)``, with q, k after any positional rotation;
* the block is named by ``to[BLOCK_KEY]`` (a ``JointBlock``; our ``patches_replace["dit"]`` proxies set it in
  ComfyUI, the only way to tell SD3's blocks apart), else by ``to["block_type"]`` ("double" / "single") and
  ``to["block_index"]`` (Flux sets them);
* the token layout comes from ``to[BLOCK_KEY].layout``, else from ``to[LAYOUT_KEY]``: a ``JointLayout`` for the
  whole call that a pure-torch caller sets (text tokens, image grid, text first or not in double blocks; single
  blocks are text first, as in Flux);
* a call whose length is not T + I (SD3.5's second, image-only attention in its first blocks) is not observed.

In ComfyUI, ``DitBlockProxy`` objects are put into that call's ``patches_replace["dit"]`` by the APPLY_MODEL
wrapper (``nodes/common.py``), each in front of whatever replace the block had (called with the same arguments).
A pure-torch model that honours ``patches_replace["dit"]`` as Flux does gets the same per call from
``dit_options(hook, info, layout, concept_streams)``.
The controller protocol on DiT layers (``dit_call``): readers get the image-grid rows' views; editors (issue 28
part 2: P2P, MnM on DiT) get the joint q, k, v and the joint probabilities with ``ctx.joint``, the output then
being computed from the edited probabilities. The pack's nodes put only readers on DiT layers so far.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from .calls import kernel_except, split_args, warn_once
from .context import AttnContext, batch_and_step
from .explicit import DEFAULT_CHUNK_ELEMENTS, query_chunks
from .layers import LayerId

LAYOUT_KEY = "attention_lab_joint"
BLOCK_KEY = "attention_lab_block"


@dataclass(frozen=True)
class JointLayout:
    """Where text and image tokens sit in a joint attention sequence."""
    txt: int                    # T: text tokens (with any ``prefix`` tokens)
    grid: tuple[int, int]       # (gh, gw): the image token grid
    img: int | None = None      # I: image tokens, the grid first (None: gh * gw)
    txt_first: bool = True      # Flux/SD3: text then image; False: a double block with ``flipped_img_txt``
    prefix: int = 0             # tokens before the prompt's keys in the text part (MMDiT register tokens)

    @property
    def n_img(self) -> int:
        return self.grid[0] * self.grid[1] if self.img is None else self.img

    @property
    def length(self) -> int:
        return self.txt + self.n_img

    def text_keys(self) -> slice:
        """The prompt's keys (the conditioning's tokens, in order) in the joint sequence."""
        start = 0 if self.txt_first else self.n_img
        return slice(start + self.prefix, start + self.txt)

    def grid_tokens(self) -> slice:
        start = self.txt if self.txt_first else 0
        return slice(start, start + self.grid[0] * self.grid[1])

    def split(self, x: torch.Tensor, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(text part, image-grid part) of a joint tensor along ``dim``."""
        t, g = self.text_keys(), self.grid_tokens()
        return x.narrow(dim, t.start, t.stop - t.start), x.narrow(dim, g.start, g.stop - g.start)


@dataclass
class JointBlock:
    """What the override needs to know of the block it is called in (set per block by ``DitBlockProxy``)."""
    kind: str                        # "double" | "single"
    index: int
    layout: JointLayout
    concepts: tuple = ()             # ``concept_attention.ConceptCall``s when concept maps are recorded


@dataclass(frozen=True)
class DitInfo:
    """A DiT model's block table, read from the model by the glue."""
    family: str                      # "flux" | "mmdit"
    double: int                      # double (Flux) / joint (SD3) blocks
    single: int                      # single-stream blocks (0 for SD3)
    patch: int                       # latent pixels per token side
    flipped: tuple[bool, ...] = ()   # per double block: image tokens first (``flipped_img_txt``)
    prefix: int = 0                  # MMDiT register tokens before the context

    def layer_ids(self) -> list[LayerId]:
        return [LayerId("double", i, 0) for i in range(self.double)] + \
               [LayerId("single", i, 0) for i in range(self.single)]

    def grid(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        p = self.patch
        return ((latent_hw[0] + p // 2) // p, (latent_hw[1] + p // 2) // p)


def joint_heads(t: torch.Tensor, heads: int, skip_reshape: bool) -> torch.Tensor:
    """(b, h, L, d) view of q, k or v in either of ComfyUI's layouts: (b, h, L, d) with ``skip_reshape``, else
    (b, L, h*d) or (b, L, h, d) (SD3's MMDiT hands v unflattened; ComfyUI's kernels view it as (b, L, h, d) too)."""
    if skip_reshape:
        return t
    return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


def _mask4(mask: torch.Tensor | None) -> torch.Tensor | None:
    if mask is None:
        return None
    while mask.dim() < 4:
        mask = mask.unsqueeze(0 if mask.dim() == 2 else 1)
    return mask


def joint_probs(qh: torch.Tensor, kh: torch.Tensor, layout: JointLayout, mask: torch.Tensor | None = None,
                max_elements: int = DEFAULT_CHUNK_ELEMENTS):
    """Yield (query slice of the grid, probs (b, h, n_chunk, L)) of the image-grid queries over all keys."""
    b, h, _, d = qh.shape
    g = layout.grid_tokens()
    q_img = qh[:, :, g].float() * d ** -0.5
    kt = kh.float().transpose(-1, -2)
    mask = _mask4(mask)
    for sl in query_chunks(b, h, g.stop - g.start, kt.shape[-1], max_elements):
        logits = q_img[:, :, sl] @ kt
        if mask is not None:
            m = mask[..., g.start + sl.start:g.start + sl.stop, :]
            logits = logits.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else logits + m.float()
        yield sl, logits.softmax(dim=-1)


def dit_context(layer: LayerId, is_cross: bool, layout: JointLayout, heads: int, rows: int, to: dict,
                batch: tuple | None = None) -> AttnContext:       # batch: batch_and_step(to, rows), if known
    cou, items, sigma, step, n_steps = batch or batch_and_step(to, rows)
    gh, gw = layout.grid
    return AttnContext(layer=layer, is_cross=is_cross, height=gh, width=gw, heads=heads, cond_or_uncond=cou,
                       items=items, sigma=sigma, step=step, n_steps=n_steps, extra=to, joint=layout)


def locate_block(to: dict) -> JointBlock | None:
    """The block and layout of a DiT attention call, from the keys of the contract above (None: unknown)."""
    jb = to.get(BLOCK_KEY)
    if jb is not None:
        return jb
    kind, index, layout = to.get("block_type"), to.get("block_index"), to.get(LAYOUT_KEY)
    if kind not in ("double", "single") or index is None or layout is None:
        return None
    return JointBlock(kind, int(index), layout if kind == "double" else replace(layout, txt_first=True))


def dit_call(hook, func: Callable, args: tuple, kwargs: dict, to: dict):
    """The override's path for a DiT attention call (the controller protocol on DiT layers, for readers and for
    part 2's editors):

    * ``edit_qkv(q, k, v, ctx)``: the joint q, k, v as (b, h, L, d) (after RoPE), ``ctx`` the cross view's context
      with ``ctx.joint`` the layout; returns the same layout;
    * an editor (``edits_probs``) whose ``wants_probs(ctx)`` is true gets ``edit_probs(probs, ctx, query_slice)``
      with the joint probabilities (b, h, n_chunk, L) of the joint queries ``query_slice``; the output is then
      computed explicitly from the edited probabilities (plus another override's difference, as ``run_attention``);
      when every editor of the call sets ``edits_cond_grid`` (it edits only the image-grid query rows of the
      positive chunks: P2P) only those are computed explicitly, on the kernel's output (``_explicit_cond_grid``);
    * readers get the image-grid rows' views of the probabilities (edited ones when an editor ran);
    * ``edit_output(out, ctx)``: the joint output (b, L, h*d).
    Without an editor the output is the model's kernel's, untouched."""
    jb = locate_block(to)
    if jb is None:
        if to.get("block_type") in ("double", "single"):
            warn_once(("layout", to.get("block_type")), "attention hook: a DiT block called attention without a "
                      "token layout (%s or %s); it is not observed", BLOCK_KEY, LAYOUT_KEY)
        return hook.forward(func, args, kwargs)
    q, k, v, heads, mask, skip, skip_out = split_args(args, kwargs)
    layer, layout = LayerId(jb.kind, jb.index, 0), jb.layout
    controllers = tuple(dict.fromkeys(hook.controllers(layer, True) + hook.controllers(layer, False)))
    if (q.shape[2] if skip else q.shape[1]) != layout.length or not (jb.concepts or controllers):
        return hook.forward(func, args, kwargs)     # not this block's joint attention, or nothing to do
    batch = batch_and_step(to, q.shape[0])
    contexts = {c: dit_context(layer, c, layout, heads, q.shape[0], to, batch) for c in (True, False)}
    given = tuple(joint_heads(t, heads, skip) for t in (q, k, v))
    qh, kh, vh = given
    for c in controllers:
        qh, kh, vh = c.edit_qkv(qh, kh, vh, contexts[True])
    if any(a is not b for a, b in zip((qh, kh, vh), given)):
        args = tuple(t if skip else t.transpose(1, 2).flatten(2) for t in (qh, kh, vh)) + tuple(args[3:])
    editors = [c for c in controllers if c.edits_probs and c.wants_probs(contexts[True])]
    readers = {c: [r for r in hook.controllers(layer, c) if not r.edits_probs and r.wants_probs(contexts[c])]
               for c in (True, False)}
    if editors and all(getattr(c, "edits_cond_grid", False) for c in editors) and _cond_only(readers, contexts):
        out = _explicit_cond_grid(hook, func, args, kwargs, (qh, kh, vh), mask, layout, contexts, editors, readers,
                                  skip_out)
    elif editors:
        out = _explicit(qh, kh, vh, mask, layout, contexts, editors, readers, skip_out)
        if hook.previous is not None:
            out = out + (hook.forward(func, args, kwargs) - func(*args, **kwargs))
    else:
        out = hook.forward(func, args, kwargs)
        if readers[True] or readers[False]:
            _observe(qh, kh, mask, layout, contexts, readers)
    if jb.concepts:
        for call in jb.concepts:
            call.attend(qh, kh, vh, out, layout, contexts[True])
    for c in controllers:
        out = c.edit_output(out, contexts[True])
    return out


def _explicit(qh, kh, vh, mask, layout: JointLayout, contexts: dict, editors: list, readers: dict,
              skip_out: bool) -> torch.Tensor:
    """Joint attention with edited probabilities, query chunk by query chunk; output in the kernel's layout."""
    b, h, n, d = qh.shape
    out = torch.empty(b, h, n, vh.shape[-1], dtype=qh.dtype, device=qh.device)
    kt, m = kh.float().transpose(-1, -2), _mask4(mask)
    t, g = layout.text_keys(), layout.grid_tokens()
    rows = list(range(b))
    for sl in query_chunks(b, h, n, kt.shape[-1], DEFAULT_CHUNK_ELEMENTS):
        logits = qh[:, :, sl].float() @ kt * d ** -0.5
        if m is not None:
            mm = m[..., sl, :]
            logits = logits.masked_fill(~mm, float("-inf")) if mm.dtype == torch.bool else logits + mm.float()
        probs = logits.softmax(dim=-1)
        for c in editors:
            probs = c.edit_probs(probs, contexts[True], sl)
        lo, hi = max(sl.start, g.start), min(sl.stop, g.stop)
        if lo < hi:                                          # this chunk's image-grid rows, for the readers
            grid_rows, gsl = slice(lo - sl.start, hi - sl.start), slice(lo - g.start, hi - g.start)
            for r in readers[True]:
                r.observe_probs(probs[:, :, grid_rows, t], contexts[True], gsl, rows)
            for r in readers[False]:
                r.observe_probs(probs[:, :, grid_rows, g], contexts[False], gsl, rows)
        out[:, :, sl] = (probs.to(vh.dtype) @ vh)
    return out if skip_out else out.transpose(1, 2).reshape(b, n, -1)


def _cond_rows(ctx: AttnContext) -> tuple[list[int], list[int]]:
    """(chunks, attention-batch rows) of the call's positive chunks."""
    chunks = [i for i, c in enumerate(ctx.cond_or_uncond) if c == 0]
    return chunks, [i * ctx.items + b for i in chunks for b in range(ctx.items)]


def _cond_only(readers: dict, contexts: dict) -> bool:
    """Whether every reader wants only rows of the positive chunks (what ``_explicit_cond_grid`` computes)."""
    rows = set(_cond_rows(contexts[True])[1])
    return all((got := r.probs_rows(contexts[c])) is not None and set(got) <= rows
               for c, rs in readers.items() for r in rs)


def _explicit_cond_grid(hook, func, args, kwargs, qkv: tuple, mask, layout: JointLayout, contexts: dict,
                        editors: list, readers: dict, skip_out: bool) -> torch.Tensor:
    """The editors' path when every editor says it edits only the image-grid query rows of the positive chunks
    (``edits_cond_grid``, e.g. Prompt-to-Prompt): the model's kernel gives the output of every other row and query
    (``calls.kernel_except``: it never computes those rows' grid queries; with another override or a mask it runs
    on the whole call, the override included), then those rows' image-grid queries are computed from the edited
    probabilities (plus another override's difference there, as ``_explicit``). Editors see a context of the
    positive chunks only (``cond_or_uncond`` all 0, ``uuids`` cut to match) and probabilities (rows, h, n_chunk, L)
    of joint queries ``query_slice``; readers see the rows they asked for. Cost: the kernel on the rest plus the
    explicit softmax of cond rows x grid queries, instead of every row and query."""
    ctx = contexts[True]
    chunks, rows = _cond_rows(ctx)
    if not rows:
        return hook.forward(func, args, kwargs)
    g = layout.grid_tokens()
    out = kernel_except(func, args, kwargs, rows, g) if hook.previous is None and mask is None else \
        hook.forward(func, args, kwargs)
    qh, kh, vh = qkv
    idx = torch.tensor(rows, device=qh.device)
    uuids = ctx.extra.get("uuids")
    extra = ctx.extra if uuids is None or len(uuids) != len(ctx.cond_or_uncond) else \
        {**ctx.extra, "uuids": [uuids[i] for i in chunks]}
    sub = replace(ctx, cond_or_uncond=[0] * len(chunks), extra=extra)
    q, k, v = (x.index_select(0, idx) for x in (qh, kh, vh))
    m = _mask4(mask)
    if m is not None and m.shape[0] > 1:
        m = m.index_select(0, idx)
    b, h, _, d = q.shape
    t, n = layout.text_keys(), g.stop - g.start
    res = torch.empty(b, h, n, v.shape[-1], dtype=qh.dtype, device=qh.device)
    kt = k.float().transpose(-1, -2)
    for sl in query_chunks(b, h, n, kt.shape[-1], DEFAULT_CHUNK_ELEMENTS):
        joint_sl = slice(g.start + sl.start, g.start + sl.stop)
        logits = q[:, :, joint_sl].float() @ kt * d ** -0.5
        if m is not None:
            mm = m[..., joint_sl, :]
            logits = logits.masked_fill(~mm, float("-inf")) if mm.dtype == torch.bool else logits + mm.float()
        probs = logits.softmax(dim=-1)
        for c in editors:
            probs = c.edit_probs(probs, sub, joint_sl)
        for r in readers[True]:
            r.observe_probs(probs[..., t], contexts[True], sl, rows)
        for r in readers[False]:
            r.observe_probs(probs[..., g], contexts[False], sl, rows)
        res[:, :, sl] = probs.to(v.dtype) @ v
    if not skip_out:
        res = res.transpose(1, 2).reshape(b, n, -1)
    if hook.previous is not None:          # another override's difference to plain attention on these rows
        plain = func(*args, **kwargs)
        diff = (out - plain).index_select(0, idx)
        res = res + (diff[:, :, g] if skip_out else diff[:, g])
    if skip_out:
        out[idx, :, g.start:g.stop] = res
    else:
        out[idx, g.start:g.stop] = res
    return out


def _observe(qh, kh, mask, layout: JointLayout, contexts: dict, readers: dict) -> None:
    wanted = set()
    for c, rs in readers.items():
        for r in rs:
            got = r.probs_rows(contexts[c])
            wanted |= set(range(qh.shape[0]) if got is None else got)
    rows = sorted(wanted)
    idx = torch.tensor(rows, device=qh.device)
    qs, ks = qh.detach().index_select(0, idx), kh.detach().index_select(0, idx)
    m = None if mask is None else _mask4(mask)
    if m is not None and m.shape[0] > 1:
        m = m.index_select(0, idx)
    t, g = layout.text_keys(), layout.grid_tokens()
    with torch.no_grad():
        for sl, probs in joint_probs(qs, ks, layout, m):
            for r in readers[True]:
                r.observe_probs(probs[..., t], contexts[True], sl, rows)
            for r in readers[False]:
                r.observe_probs(probs[..., g], contexts[False], sl, rows)


class DitCall:
    """Per model call: the call's token layout (text length from the context, grid from the latent) and, when
    concept maps are recorded, the concepts' residual streams (``concept_attention.ConceptStream``)."""

    def __init__(self, info: DitInfo, layout: JointLayout, concepts=()):
        self.info, self.layout, self.concepts = info, layout, list(concepts)

    def __deepcopy__(self, memo):
        return self

    def block_layout(self, kind: str, index: int, args: dict) -> JointLayout:
        if kind == "double":
            txt, img = args.get("txt"), args.get("img")
            if txt is not None and img is not None:
                self.layout = replace(self.layout, txt=int(txt.shape[1]), img=int(img.shape[1]))
            flipped = index < len(self.info.flipped) and self.info.flipped[index]
            return replace(self.layout, txt_first=not flipped)
        return replace(self.layout, txt_first=True)


class DitBlockProxy:
    """``patches_replace["dit"][(kind + "_block", i)]`` for one call: tells the override its block and layout (a
    copy of the block's transformer_options with ``BLOCK_KEY``), runs the concept stream around a double block,
    and calls the replace the block had (``previous``) or the block itself."""

    attention_lab_opaque = True

    def __init__(self, kind: str, index: int, call: DitCall, previous: Callable | None = None):
        self.kind, self.index, self.call, self.previous = kind, index, call, previous

    def __call__(self, args: dict, extra: dict) -> dict:
        layout = self.call.block_layout(self.kind, self.index, args)
        streams = self.call.concepts if self.kind == "double" else []
        calls = tuple(s.prepare(self.index) for s in streams)
        block = JointBlock(self.kind, self.index, layout, calls)
        to = args.get("transformer_options") or {}
        args = {**args, "transformer_options": {**to, BLOCK_KEY: block}}
        out = self.previous(args, extra) if self.previous is not None else extra["original_block"](args)
        for stream, call in zip(streams, calls):
            stream.advance(self.index, call)
        return out


def with_dit_blocks(to: dict, info: DitInfo, call: DitCall) -> dict:
    """``to`` for one model call with a ``DitBlockProxy`` in front of every block (the MODEL's options, and any
    replace another pack put on a block, are kept: the proxy calls it)."""
    replace_ = dict(to.get("patches_replace") or {})
    dit = dict(replace_.get("dit") or {})
    for lid in info.layer_ids():
        key = (f"{lid.kind}_block", lid.number)
        prev = dit.get(key)
        dit[key] = DitBlockProxy(lid.kind, lid.number, call, prev)
    replace_["dit"] = dit
    return {**to, "patches_replace": replace_}


def dit_options(hook, info: DitInfo, layout: JointLayout, concepts=()) -> dict:
    """transformer_options entries for one call of a pure-torch Flux-style model (ShapesWorld-Flow's twin) that
    honours ComfyUI's contract: the hook as the override, a block proxy on every block and the call's layout (what
    ``nodes/common.py`` prepares per call in ComfyUI). ``concepts``: ``concept_attention.ConceptStream``s of this
    call. Merge with ``hook.merge_options``."""
    return {**with_dit_blocks({}, info, DitCall(info, layout, concepts)), "optimized_attention_override": hook,
            "attention_lab_hook": hook, LAYOUT_KEY: layout}
