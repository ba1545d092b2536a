"""AttentionStore: head-averaged attention maps of the cond rows, summed on the fly.

Memory is one running sum per selected layer and batch item, independent of the number
of steps. Shapes:
    cross[layer]: (items, n, m)   n = h*w query pixels, m = text tokens (77*k)
    self[layer]:  (items, n, n)   only for layers with n <= self_max_tokens
    cross_heads[layer]: (items, heads, n, m)   only with ``keep_heads`` (MnM's injection mask needs the heads)
    with ``keys`` set, m is len(keys): only those key positions of the cross maps are kept (``key_index``)
    concepts[layer]: (items, n, C)   ConceptAttention maps of C concepts (DiT double blocks, ``concept_attention``)
Maps are averaged over heads, over the calls in the step range and over the positive
conditioning chunks (several positive entries are averaged together). Only chunks of the full frame are
recorded: an area entry, which ComfyUI evaluates on a crop of the latent, is left out, and where the run marks
a node's own prompt entries only those count (``chunks.visible``). On DiT blocks the cross and self maps are
the image queries' rows of the joint softmax over the text and image-grid keys (``joint.py``).
Reading methods take ``cross``: True (cross maps), False (self maps) or "concept" (concept maps).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from . import logger
from .chunks import HIDDEN, visible
from .context import AttnContext
from .controller import AttentionController
from .layers import LayerId, LayerInfo, LayerSelection, LayerSelectionError, describe, parse_layer_selection

# transformer_options flag of helper evaluations (optimization steps) that stores must not record
QUIET_KEY = "attention_lab_quiet"


@dataclass
class _Accum:
    total: torch.Tensor      # (items, n, m) float32 running sum
    count: int = 0           # number of (call, cond chunk) contributions
    height: int = 0
    width: int = 0


@dataclass
class StoreConfig:
    selection: LayerSelection = field(default_factory=lambda: parse_layer_selection("all"))
    capture_cross: bool = True
    capture_self: bool = True
    self_max_tokens: int = 32 * 32     # self-attention only at 32x32 or smaller unless raised
    step_start: float = 0.0            # fraction of the schedule, inclusive
    step_end: float = 1.0              # fraction of the schedule, exclusive
    device: str = "cpu"                # where the sums live
    keep_heads: bool = False           # also sum cross maps per head, for layers with n <= self_max_tokens
    concepts: tuple[str, ...] = ()     # ConceptAttention concept names (DiT double blocks)
    concept_embeddings: torch.Tensor | None = None   # (C, context width): each concept's token, encoded alone
    keys: tuple[int, ...] | None = None                # cross maps: only these key positions (ascending); None: all


class AttentionStore(AttentionController):
    def __init__(self, config: StoreConfig | None = None):
        self.config = config or StoreConfig()
        self._lock = threading.Lock()
        self.reset()

    def __deepcopy__(self, memo):
        return self  # one store per capture node, also through downstream MODEL clones

    # ------------------------------------------------------------------ lifecycle
    def reset(self) -> None:
        with self._lock:
            self.cross: dict[LayerId, _Accum] = {}
            self.self_: dict[LayerId, _Accum] = {}
            self.cross_heads: dict[LayerId, _Accum] = {}
            self.concepts: dict[LayerId, _Accum] = {}
            self.steps_recorded: set[int] = set()
            self.n_steps: int | None = None
            self.items: int | None = None
            self.runs = getattr(self, "runs", 0) + 1
            self.finished = False
            self.sizes_seen: dict[LayerId, tuple[int, int]] = {}   # cross layers of this run: (h, w)
            self._checked = False
            self.run_output: torch.Tensor | None = None   # the LATENT this run produced (when known)

    def keep_keys(self, keys) -> bool:
        """Keep only the key positions ``keys`` of the cross maps from now on (a reader that needs a few words'
        columns, LocalBlend: the maps of the other keys are then never reduced nor stored). Only on a store that
        has recorded nothing and keeps every key; returns whether the store was narrowed (else it is unchanged)."""
        keys = tuple(sorted({int(k) for k in keys}))
        if not keys or keys[0] < 0 or self.config.keys is not None or not self.empty:
            return False
        self.config = replace(self.config, keys=keys)
        return True

    def key_index(self, positions) -> list[int]:
        """Indices in the cross maps' last dimension of the key ``positions`` (themselves when every key is kept).
        Raises IndexError for a position the store does not keep."""
        keys = self.config.keys
        if keys is None:
            return list(positions)
        where = {k: i for i, k in enumerate(keys)}
        missing = [p for p in positions if p not in where]
        if missing:
            raise IndexError(f"token positions {missing} are not among the keys {list(keys)} this store keeps")
        return [where[p] for p in positions]

    def _narrow(self, probs: torch.Tensor) -> torch.Tensor:
        """The kept keys of cross probabilities (..., m): a view for a run of consecutive keys."""
        keys = self.config.keys
        if keys[-1] >= probs.shape[-1]:
            raise IndexError(f"the store keeps key positions {list(keys)} but the attention has {probs.shape[-1]} "
                             f"keys; was it set up for a different prompt?")
        if keys[-1] - keys[0] + 1 == len(keys):
            return probs[..., keys[0]:keys[-1] + 1]
        return probs.index_select(-1, torch.tensor(keys, device=probs.device))

    def finish(self, output=None) -> None:
        """End of a sampling run; ``output``: the samples it produced (a tensor), which ties the maps to them."""
        self.check_selection()
        self.run_output = output.detach().float().cpu().clone() if isinstance(output, torch.Tensor) else None
        self.finished = True

    def check_selection(self) -> None:
        """Refuse a layer selection term that matches no layer at this run's latent size (e.g. '16' on a
        16x24 latent), naming the sizes that exist. Runs once per run, after the first UNet call."""
        if self._checked or not self.sizes_seen:
            return
        self._checked = True
        infos = [LayerInfo(lid, h, w) for lid, (h, w) in self.sizes_seen.items()]
        for term in self.config.selection.terms:
            if term.size is not None and not any(term.matches(i.layer, i.height, i.width) for i in infos):
                sizes = sorted({(i.height, i.width) for i in infos}, reverse=True)
                raise LayerSelectionError(
                    f"Attention Capture layers term {term.text!r} matches no attention layer at this latent size; "
                    f"the layers' feature sizes here are {['%dx%d' % hw for hw in sizes]} ({describe(infos)}). "
                    f"Use one of those sizes, block ids, or 'all'.")

    @property
    def empty(self) -> bool:
        return not self.cross and not self.self_ and not self.concepts

    def nbytes(self) -> int:
        return sum(a.total.numel() * a.total.element_size()
                   for d in (self.cross, self.self_, self.concepts) for a in d.values())

    def _table(self, cross) -> dict:
        if cross == "concept":
            return self.concepts
        return self.cross if cross else self.self_

    # ------------------------------------------------------------------ controller
    def _in_range(self, ctx: AttnContext) -> bool:
        p = ctx.progress
        if p is None:
            return True
        c = self.config
        return c.step_start <= p < c.step_end or (c.step_end >= 1.0 and p >= c.step_start)

    def records(self, ctx: AttnContext) -> bool:
        """Whether this call is one the store records at all: positive rows, not a quiet helper call, in range."""
        return 0 in visible(ctx).cond_or_uncond and not ctx.extra.get(QUIET_KEY) and self._in_range(ctx)

    def wants_concepts(self, ctx: AttnContext) -> bool:
        return bool(self.config.concepts) and self.records(ctx) and \
            self.config.selection.matches(ctx.layer, ctx.height, ctx.width)

    def observe_concepts(self, scores: torch.Tensor, ctx: AttnContext, rows: list[int]) -> None:
        """Concept maps (len(rows), C, n) of the positive ``rows`` (all of them) of one DiT block call."""
        ctx = visible(ctx)
        cond = [r for r, _ in ctx.rows(0)]
        pos = {r: i for i, r in enumerate(rows)}
        got = scores.index_select(0, torch.tensor([pos[r] for r in cond], device=scores.device))
        got = got.view(-1, ctx.items, *got.shape[1:]).sum(0).transpose(1, 2)       # (items, n, C)
        with self._lock:
            acc = self.concepts.get(ctx.layer)
            if acc is None or acc.total.shape != got.shape:
                acc = _Accum(torch.zeros(*got.shape, device=self.config.device), 0, ctx.height, ctx.width)
                self.concepts[ctx.layer] = acc
            acc.total += got.to(acc.total.device, torch.float32)
            acc.count += len(cond) // ctx.items
            if ctx.step is not None:
                self.steps_recorded.add(ctx.step)
                self.n_steps = ctx.n_steps
            self.items = ctx.items

    def wants_probs(self, ctx: AttnContext) -> bool:
        c = self.config
        ctx = visible(ctx)
        if all(kind == HIDDEN for kind in ctx.cond_or_uncond):   # a crop's call (area conditioning)
            return False
        if ctx.is_cross:
            if ctx.layer in self.sizes_seen and not self._checked:   # a layer again: one UNet call seen whole
                self.check_selection()
            self.sizes_seen.setdefault(ctx.layer, (ctx.height, ctx.width))
        if ctx.is_cross and not c.capture_cross:
            return False
        if not ctx.is_cross and (not c.capture_self or ctx.height * ctx.width > c.self_max_tokens):
            return False
        if 0 not in ctx.cond_or_uncond or ctx.extra.get(QUIET_KEY):
            return False
        return self._in_range(ctx) and c.selection.matches(ctx.layer, ctx.height, ctx.width)

    edits_probs = False  # a capture only reads: the output stays the fast kernel's

    def probs_rows(self, ctx: AttnContext) -> list[int]:
        return [r for r, _ in visible(ctx).rows(0)]

    def observe_probs(self, probs: torch.Tensor, ctx: AttnContext, query_slice: slice, rows: list[int]) -> None:
        ctx = visible(ctx)
        cond = [r for r, _ in ctx.rows(0)]
        if ctx.is_cross and self.config.keys is not None:
            probs = self._narrow(probs)                                     # (rows, h, n_chunk, len(keys))
        if rows != cond:  # probabilities of every row (an editor ran): pick the cond rows
            pos = {r: i for i, r in enumerate(rows)}
            probs = probs.index_select(0, torch.tensor([pos[r] for r in cond], device=probs.device))
        mean_heads = probs.detach().mean(dim=1)                            # (cond rows, n_chunk, m)
        n_cond_chunks = len(cond) // ctx.items
        if n_cond_chunks > 1:
            mean_heads = mean_heads.view(-1, ctx.items, *mean_heads.shape[1:]).sum(0)  # (items, n_chunk, m)
        target = self.cross if ctx.is_cross else self.self_
        with self._lock:
            acc = target.get(ctx.layer)
            n, m = ctx.height * ctx.width, probs.shape[-1]
            if acc is None or acc.total.shape != (ctx.items, n, m):
                if acc is not None:
                    logger.warning("attention store: layer %s changed shape %s -> %s; restarting its sum",
                                   ctx.layer, tuple(acc.total.shape), (ctx.items, n, m))
                acc = _Accum(torch.zeros(ctx.items, n, m, device=self.config.device),
                             0, ctx.height, ctx.width)
                target[ctx.layer] = acc
            acc.total[:, query_slice] += mean_heads.to(acc.total.device, torch.float32)
            if ctx.is_cross and self.config.keep_heads and n <= self.config.self_max_tokens:
                per_head = probs.detach().view(-1, ctx.items, *probs.shape[1:]).sum(0)   # (items, h, n_chunk, m)
                hacc = self.cross_heads.get(ctx.layer)
                if hacc is None or hacc.total.shape != (ctx.items, per_head.shape[1], n, m):
                    hacc = _Accum(torch.zeros(ctx.items, per_head.shape[1], n, m, device=self.config.device),
                                  0, ctx.height, ctx.width)
                    self.cross_heads[ctx.layer] = hacc
                hacc.total[:, :, query_slice] += per_head.to(hacc.total.device, torch.float32)
                if query_slice.start == 0:
                    hacc.count += n_cond_chunks
            if query_slice.start == 0:
                acc.count += n_cond_chunks
                if ctx.step is not None:
                    self.steps_recorded.add(ctx.step)
                    self.n_steps = ctx.n_steps
                self.items = ctx.items

    # ------------------------------------------------------------------ reading
    def layers(self, cross: bool | str = True) -> list[LayerInfo]:
        return [LayerInfo(lid, a.height, a.width) for lid, a in sorted(self._table(cross).items())]

    def layer_map(self, layer: LayerId, cross: bool | str = True) -> torch.Tensor:
        """Mean map of one layer: (items, h*w, m) (m: keys, or concepts)."""
        acc = self._table(cross)[layer]
        return acc.total / max(acc.count, 1)

    def layer_heads(self, layer: LayerId) -> torch.Tensor | None:
        """Mean cross map of one layer per head: (items, heads, h*w, m), or None (not kept)."""
        acc = self.cross_heads.get(layer)
        return None if acc is None else acc.total / max(acc.count, 1)

    def resolutions(self, cross: bool | str = True) -> list[tuple[int, int]]:
        return sorted({(i.height, i.width) for i in self.layers(cross)}, reverse=True)

    def aggregate(self, size: tuple[int, int] | None = None, cross: bool | str = True,
                  layers: set[LayerId] | None = None) -> torch.Tensor:
        """Average of the layers at ``size`` (all captured layers, resized to the largest, if None).

        Returns (items, h, w, m).
        """
        infos = [i for i in self.layers(cross) if layers is None or i.layer in layers]
        if size is not None:
            infos = [i for i in infos if (i.height, i.width) == tuple(size)]
        if not infos:
            what = "concept" if cross == "concept" else ("cross" if cross else "self")
            raise ValueError(f"no captured {what}-attention layer at size {size}; "
                             f"captured sizes: {self.resolutions(cross)}")
        th, tw = size or max(((i.height, i.width) for i in infos), key=lambda s: s[0] * s[1])
        if not cross:  # self maps of different sizes have different key counts: never mix them
            infos = [i for i in infos if (i.height, i.width) == (th, tw)]
        total = None
        for info in infos:
            m = self.layer_map(info.layer, cross)                       # (items, n, m)
            items, _, mt = m.shape
            grid = m.view(items, info.height, info.width, mt)
            if (info.height, info.width) != (th, tw):
                grid = F.interpolate(grid.permute(0, 3, 1, 2), size=(th, tw), mode="bilinear",
                                     align_corners=False).permute(0, 2, 3, 1)
            total = grid if total is None else total + grid
        return total / len(infos)

    def matches_output(self, samples: torch.Tensor) -> bool | None:
        """Whether ``samples`` are the LATENT of the run these maps come from (None: that run's output is
        unknown, e.g. our inversion loops). Compared relative to the samples' scale."""
        if self.run_output is None:
            return None
        got = samples.detach().float().cpu()
        if tuple(got.shape) != tuple(self.run_output.shape):
            return False
        finite = self.run_output[self.run_output.isfinite()]
        scale = float(finite.abs().max().clamp(min=1e-6)) if finite.numel() else 1e-6
        # NaN/inf where the run had them count as equal: a run that diverged is still this run.
        return bool(torch.allclose(got, self.run_output, rtol=0.0, atol=1e-5 * scale, equal_nan=True))


def word_maps(store: AttentionStore, positions: list[tuple[int, ...]], size: tuple[int, int] | None,
              item: int = 0, cross: bool | str = True) -> torch.Tensor:
    """Cross-attention of each word (mean over its tokens) at ``size``: (n_words, h, w); with ``cross="concept"``
    the concept maps, ``positions`` then being concept indices."""
    agg = store.aggregate(size, cross=cross)                         # (items, h, w, m)
    if not 0 <= item < agg.shape[0]:
        raise IndexError(f"batch item {item} is out of range 0..{agg.shape[0] - 1} of the captured batch")
    m = agg.shape[-1]
    out = []
    for pos in positions:
        bad = [p for p in pos if p >= m] if cross is not True or store.config.keys is None else []
        if bad:
            raise IndexError(f"token positions {bad} are beyond the {m} keys that were captured; was the "
                             f"store filled with a different prompt?")
        cols = store.key_index(pos) if cross is True else list(pos)
        out.append(agg[item, :, :, cols].mean(-1))
    return torch.stack(out)
