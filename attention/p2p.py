"""Prompt-to-Prompt editing controllers (Hertz et al. 2022): replace, refine, reweight, LocalBlend.

Ported from https://github.com/google/prompt-to-prompt (Apache-2.0; ``prompt-to-prompt_stable.ipynb``,
``null_text_w_ptp.ipynb`` at main-branch commit 9c472e44aa1b607da59fea94820f7be9480ec545, ``seq_aligner.py``,
``ptp_utils.py``): the same mappers (word swap by token, refinement by global alignment with gap 0,
match 1, mismatch -1), per-word cross-replace alphas over the steps, self-attention replacement for
steps in ``self_replace_steps``, an equalizer for reweighting that can sit on a replace/refine edit,
and LocalBlend (summed cross-attention of chosen words, 3x3 max-pool, max-normalized, threshold
0.3, union with the source's mask, from ``start_blend`` of the steps on). Our code, their math.

Long because the port's mappers, plan, controller, LocalBlend and batch sampler read together
against the notebook. DiT joint attention: ``p2p_joint.py``.

Batch convention: item 0 is the source, items 1..k the edits; only cond rows are edited, as upstream.
Shapes (einops legend): probs (rows, h, n, m) with m text tokens; mapper (k, m, m) for replace,
(k, m) indices for refine; alphas (k, m); equalizer (k, m); word alpha (steps+1, k, m).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from . import logger
from .context import AttnContext
from .controller import AttentionController
from .layers import LayerId
from .rf_inversion import SOLVERS, fireflow_step
from .words import PromptWords, Word, WordNotInPromptError, parse_word_values

# ---- token alignment (seq_aligner) -------------------------------------------------------------

def global_align(x: list[int], y: list[int]) -> list[tuple[int, int]]:
    """Needleman-Wunsch (gap 0, match 1, mismatch -1): for each y token, its x index or -1."""
    nx, ny = len(x), len(y)
    score = [[0] * (ny + 1) for _ in range(nx + 1)]
    back = [[0] * (ny + 1) for _ in range(nx + 1)]
    for j in range(1, ny + 1):
        back[0][j] = 1
    for i in range(1, nx + 1):
        back[i][0] = 2
    back[0][0] = 4
    for i in range(1, nx + 1):
        for j in range(1, ny + 1):
            left, up = score[i][j - 1], score[i - 1][j]
            diag = score[i - 1][j - 1] + (1 if x[i - 1] == y[j - 1] else -1)
            best = max(left, up, diag)
            score[i][j] = best
            back[i][j] = 1 if best == left else 2 if best == up else 3
    i, j, pairs = nx, ny, []
    while i > 0 or j > 0:
        if back[i][j] == 3:
            i, j = i - 1, j - 1
            pairs.append((j, i))
        elif back[i][j] == 1:
            j -= 1
            pairs.append((j, -1))
        elif back[i][j] == 2:
            i -= 1
        else:
            break
    return pairs[::-1]


def refine_mapper(src: list[int], dst: list[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``src``/``dst``: token ids with BOS/EOS (not padded). Returns mapper (length,) and alphas (length,)."""
    pairs = global_align(src, dst)
    mapper = torch.zeros(length, dtype=torch.long)
    alphas = torch.ones(length)
    for j, (_, i) in enumerate(pairs[:length]):
        mapper[j] = i
        alphas[j] = float(i != -1)
    n = len(pairs)
    if n < length:
        mapper[n:] = len(dst) + torch.arange(length - n)
    return mapper.clamp(max=length - 1), alphas


def replace_mapper(src_words: list[tuple[int, ...]], dst_words: list[tuple[int, ...]], length: int) -> torch.Tensor:
    """(length, length) token map for a word swap: the tokens of source word i map onto those of target
    word i (one to one for equal counts, spread evenly otherwise); all other tokens map to themselves
    (shifted after a swap that changes the token count)."""
    mapper = torch.zeros(length, length)
    changed = {s[0]: (s, d) for s, d in zip(src_words, dst_words)}
    i = j = 0
    while i < length and j < length:
        if i in changed:
            s, d = changed[i]
            if len(s) == len(d):
                mapper[list(s), list(d)] = 1.0
            else:
                for t in d:
                    mapper[list(s), t] = 1.0 / len(d)
            i, j = i + len(s), j + len(d)
        else:
            mapper[i, j] = 1.0
            i, j = i + 1, j + 1
    return mapper


def word_alpha(steps: int, edits: int, length: int, default: tuple[float, float],
               per_word: dict[tuple[int, int], tuple[float, float]]) -> torch.Tensor:
    """(steps+1, edits, length) 1 where the edit's cross-attention takes the source's.

    ``per_word``: {(edit index, token position): (start, end)} overrides, as fractions of the steps.
    """
    alpha = torch.zeros(steps + 1, edits, length)

    def put(b, tokens, bounds):
        start, end = int(bounds[0] * (steps + 1)), int(bounds[1] * (steps + 1))
        alpha[:, b, tokens] = 0
        alpha[start:end, b, tokens] = 1
    for b in range(edits):
        put(b, slice(None), default)
    for (b, t), bounds in per_word.items():
        put(b, [t], bounds)
    return alpha


# ---- the editing controller ----------------------------------------------------------------------

@dataclass
class EditPlan:
    kind: list[str]                          # per edit: "replace" | "refine"
    replace: torch.Tensor | None             # (k, m, m) for replace edits (identity elsewhere)
    refine: torch.Tensor | None              # (k, m) indices for refine edits
    refine_alphas: torch.Tensor | None       # (k, m)
    equalizer: torch.Tensor | None           # (k, m) reweight factors, 1 = unchanged
    alpha: torch.Tensor                      # (steps+1, k, m)
    self_replace: tuple[float, float]        # fractions of the steps
    self_max_tokens: int                     # self-attention replaced only on layers up to this size


class P2PController(AttentionController):
    """Edits items 1..k of the cond rows from item 0 (the source), per upstream's AttentionControlEdit."""

    edits_probs = True

    def __init__(self, plan: EditPlan, steps: int):
        self.plan, self.steps = plan, steps

    def wants_probs(self, ctx: AttnContext) -> bool:
        if 0 not in ctx.cond_or_uncond or ctx.items < 2 or ctx.step is None:
            return False
        if ctx.is_cross:
            return True
        lo, hi = self.plan.self_replace
        in_window = int(lo * self.steps) <= ctx.step < int(hi * self.steps)
        return ctx.height * ctx.width <= self.plan.self_max_tokens and in_window

    def replace_cross(self, base: torch.Tensor, edits: torch.Tensor) -> torch.Tensor:
        """base (h, n, m), edits (k, h, n, m) -> (k, h, n, m) from the source's map (the plan's first k edits)."""
        p, k = self.plan, edits.shape[0]
        if all(kind == "replace" for kind in p.kind[:k]):      # every map is the mapped source's: no copy first
            out = torch.stack([torch.einsum("hpw,wn->hpn", base, p.replace[b].to(base)) for b in range(k)])
            return out if p.equalizer is None else out * p.equalizer[:k].to(base)[:, None, None, :]
        out = edits.clone()
        for b, kind in enumerate(p.kind[:k]):
            if kind == "replace":
                out[b] = torch.einsum("hpw,wn->hpn", base, p.replace[b].to(base))
            else:
                a = p.refine_alphas[b].to(base)
                out[b] = base[:, :, p.refine[b].to(base.device)] * a + edits[b] * (1 - a)
        if p.equalizer is not None:
            out = out * p.equalizer[:k].to(base)[:, None, None, :]
        return out

    def cross_edit(self, base: torch.Tensor, edits: torch.Tensor, step: int) -> torch.Tensor:
        """Upstream ``AttentionControlEdit.forward``'s cross branch: base (h, n, m) the source's cross-attention,
        edits (k, h, n, m) the edits'; returns the edits' new maps, replace/refine/reweight blended by the step's
        word alphas (m: the plan's length, or r whole copies of it: a context repeated r times in the batch)."""
        h, n, m = base.shape
        k, length = edits.shape[0], self.plan.alpha.shape[-1]
        if m % length:
            raise ValueError(f"cross-attention has {m} keys but the edit plan {length}; the prompts and the "
                             f"negative must be whole 77-token chunks of one another")
        r = m // length     # the context repeated r times (a longer negative in the batch, as ComfyUI)
        base, edits = base.reshape(h, n * r, length), edits.reshape(k, h, n * r, length)
        alpha = self.plan.alpha[min(step, self.plan.alpha.shape[0] - 1), :k]
        new = self.replace_cross(base, edits)
        if bool(alpha.all()):       # new * 1 + edits * 0 is new (up to the sign of an exact zero): skip the blend
            return new.reshape(k, h, n, m)
        alpha = alpha.to(edits)[:, None, None, :]
        return (new * alpha + edits * (1 - alpha)).reshape(k, h, n, m)

    def edit_probs(self, probs, ctx: AttnContext, query_slice: slice):
        for start, item in ctx.rows(0):
            if item != 0:
                continue
            k = min(ctx.items - 1, len(self.plan.kind))
            base, edits = probs[start], probs[start + 1:start + 1 + k]
            if ctx.is_cross:
                probs[start + 1:start + 1 + k] = self.cross_edit(base, edits, ctx.step)
            else:
                probs[start + 1:start + 1 + k] = base.expand_as(edits)
        return probs


# ---- LocalBlend --------------------------------------------------------------------------------

class LocalBlend:
    """After-step hook: edits change only where the chosen words' attention is (source or edit).

    ``store``: an AttentionStore on the cross-attention layers (mean maps so far; upstream sums, the
    max-normalization makes that the same); ``words``: per batch item, the token positions of its
    blend words; the maps are those of the layers at ``size`` (upstream: the 16x16 layers of SD 1.x
    at 512 px, i.e. a quarter of the latent), or the nearest captured size. A store that has recorded nothing
    yet is narrowed to the blend words' keys (``AttentionStore.keep_keys``): the words' columns are all the mask
    reads, so the other keys' maps are never reduced nor kept (the same mask, bit for bit).
    """

    def __init__(self, store, words: list[list[int]], size: tuple[int, int], threshold: float = 0.3,
                 start: int = 0):
        self.store, self.words, self.size = store, words, size
        self.threshold, self.start = threshold, start
        self.layers: list[LayerId] = []
        self.last_mask: torch.Tensor | None = None
        if hasattr(store, "keep_keys"):
            store.keep_keys(p for w in words for p in w)

    def _resolve(self) -> None:
        sizes = self.store.resolutions(cross=True)
        if self.size not in sizes:
            self.size = min(sizes, key=lambda s: (abs(s[0] - self.size[0]), -s[0]))
        self.layers = [i.layer for i in self.store.layers(cross=True) if (i.height, i.width) == self.size]

    def mask(self, hw: tuple[int, int]) -> torch.Tensor:
        if not self.layers:
            self._resolve()
        avg = self.store.aggregate(self.size, cross=True, layers=set(self.layers))  # (items, h, w, m)
        cols = [self.store.key_index(w) if hasattr(self.store, "key_index") else list(w) for w in self.words]
        if all(c == cols[0] for c in cols) and cols[0]:                          # the same keys in every item
            per_item = avg[..., cols[0]].sum(-1)                                  # (items, h, w)
        else:
            per_item = torch.stack([avg[b, ..., c].sum(-1) if c else torch.zeros(self.size)
                                    for b, c in enumerate(cols)])                 # (items, h, w)
        pooled = F.max_pool2d(per_item[:, None], 3, 1, 1)
        up = F.interpolate(pooled, size=hw, mode="nearest")
        up = up / up.amax((2, 3), keepdim=True).clamp(min=1e-12)
        m = up > self.threshold
        return (m[:1] | m).float()                                                # (items, 1, H, W)

    def __call__(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if i < self.start or self.store.empty:
            return x
        m = self.mask(tuple(x.shape[-2:])).to(x)
        self.last_mask = m
        return x[:1] + m * (x - x[:1])


# ---- plans from prompts (tokenizer-agnostic) --------------------------------------------------

WordsFn = Callable[[str], PromptWords]      # prompt -> its words and token chunks (attention/words.py's rule)
EDITS = ("auto", "replace", "refine")


def eos_index(ids: list[int]) -> int:
    """Index of the end of the prompt: the first repeat of the padding id (the last id)."""
    last = ids[-1]
    return next((i for i in range(1, len(ids)) if ids[i] == last), len(ids) - 1)


def _unpadded(chunks: list[list[int]]) -> list[tuple[int, int]]:
    """(global key position, id) of every token up to each chunk's end token (BOS, words, EOS; no padding)."""
    out, offset = [], 0
    for c in chunks:
        out += [(offset + i, c[i]) for i in range(eos_index(c) + 1)]
        offset += len(c)
    return out


def refine_mapper_chunks(src: list[list[int]], dst: list[list[int]], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``refine_mapper`` over every chunk of a long prompt: the unpadded tokens of all chunks (each chunk's
    BOS and EOS included) are aligned as one sequence; padding maps to itself. One chunk: ``refine_mapper``."""
    s, d = _unpadded(src), _unpadded(dst)
    mapper = torch.arange(length)
    alphas = torch.ones(length)
    for j, i in global_align([t for _, t in s], [t for _, t in d]):
        pos = d[j][0]
        if pos < length:
            mapper[pos] = s[i][0] if i != -1 else -1
            alphas[pos] = float(i != -1)
    return mapper.clamp(max=length - 1), alphas


def _parts(pw) -> list:
    """The ``PromptWords`` of each part of a prompt's context (one, or SD3's CLIP-L/G then T5: ``ContextWords``),
    their words' positions global (offset by the part's start)."""
    if not hasattr(pw, "parts"):
        return [pw]
    return [_Shifted(p, off) for p, off in pw.parts]


@dataclass
class _Shifted:
    inner: PromptWords
    offset: int

    @property
    def words(self) -> list[Word]:
        return [Word(w.text, w.ids, tuple(p + self.offset for p in w.positions)) for w in self.inner.words]


def refine_mapper_parts(src, dst, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``refine_mapper_chunks`` per part of the context (SD3: its CLIP-L/G part, then its T5 part, each aligned
    on its own), placed at the part's offset; one part: ``refine_mapper_chunks``. src, dst: PromptWords or
    ContextWords of the source and the target."""
    if not hasattr(src, "parts"):
        return refine_mapper_chunks(src.chunks, dst.chunks, length)
    mapper, alphas = torch.arange(length), torch.ones(length)
    for (sp, off), (dp, _) in zip(src.parts, dst.parts):
        n = min(sum(len(c) for c in sp.chunks), length - off)
        if n <= 0:
            continue
        m, a = refine_mapper_chunks(sp.chunks, dp.chunks, n)
        mapper[off:off + n], alphas[off:off + n] = m + off, a
    return mapper, alphas


def parse_pairs(text: str, what: str, example: str) -> dict[str, float]:
    """'word:1.5, other:-1' -> {'word': 1.5, 'other': -1.0}."""
    return parse_word_values(text, what, example)


def _same(a: Word, b: Word) -> bool:
    return a.text.casefold() == b.text.casefold() and a.ids == b.ids


def _check_in_targets(word: str, what: str, tws: list[PromptWords]) -> None:
    if not any(tw.contains(word) for tw in tws):
        listed = "; ".join(f"{tw.prompt!r}: {tw.names}" for tw in tws)
        raise WordNotInPromptError(
            f"{what} word {word!r} is in none of the target prompts ({listed}); it applies to words of the target "
            f"prompts (matched ignoring case and (word:weight) emphasis). Fix the word or the prompts.")


def self_replace_limit(latent_hw: tuple[int, int], inverted: bool) -> int:
    """Most query tokens of a self-attention layer whose maps an edit replaces, as upstream: the notebook for
    generated images (``prompt-to-prompt_stable.ipynb``) replaces up to 16x16 at 512 px (latent / 4), the
    null-text notebook for inverted images up to 32x32 (latent / 2). latent_hw: (h, w) of the latent."""
    div = 2 if inverted else 4
    return max(latent_hw[0] // div, 1) * max(latent_hw[1] // div, 1)


def build_plan(source: str, targets: list[str], edit: str, steps: int, cross_steps: float,
               cross_words: dict[str, float], self_steps: float, reweight: dict[str, float], length: int,
               self_max_tokens: int, words_of: WordsFn) -> EditPlan:
    """The edit plan of upstream's ``make_controller``: replace (same word count) or refine per target,
    an equalizer when ``reweight`` is given, per-word cross-replace ends. ``length``: the prompts' key
    count (77 per chunk). Words of ``reweight``/``cross_words`` apply to the targets containing them; one
    in no target is refused."""
    if edit not in EDITS:
        raise ValueError(f"edit {edit!r} is not one of {list(EDITS)}")
    sw = words_of(source)
    tws = [words_of(t) for t in targets]
    for word in reweight:
        _check_in_targets(word, "reweight", tws)
    for word in cross_words:
        _check_in_targets(word, "cross_replace_words", tws)
    kinds, replace, refine, ref_alpha, eq, per_word = [], [], [], [], [], {}
    for b, (tgt, tw) in enumerate(zip(targets, tws)):
        parts = list(zip(_parts(sw), _parts(tw)))
        pairs = [(s, d, n) for n, (sp, dp) in enumerate(parts) for s, d in zip(sp.words, dp.words)]
        same_len = all(len(sp.words) == len(dp.words) for sp, dp in parts)
        diff = [(s.positions, d.positions) for s, d, _ in pairs if not _same(s, d)]
        uneven = [(s, d, n) for s, d, n in pairs if not _same(s, d) and len(s.positions) != len(d.positions)]
        kind = ("replace" if same_len and not uneven else "refine") if edit == "auto" else edit
        if kind == "replace" and not same_len:
            raise ValueError(f"replace needs prompts with the same number of words: {source!r} has "
                             f"{len(_parts(sw)[0].words)}, {tgt!r} has {len(_parts(tw)[0].words)}; use edit "
                             f"'refine' or 'auto'")
        if kind == "replace" and uneven:
            raise ValueError(f"replace swaps token by token, but {[(s.text, d.text) for s, d, _ in uneven]} have "
                             f"different token counts in this tokenizer; use edit 'refine' (or 'auto', which picks it)")
        if edit == "auto" and same_len and uneven:   # e.g. SD3's T5: 'tiger' is 3 pieces, 'cat' 1
            logger.info("P2P edit 'auto' chose refine for %r: swapped words of different token counts (%s); replace "
                        "maps token to token (docs/faithful-ports.md)", tgt, "; ".join(
                            f"{s.text!r} {len(s.positions)}, {d.text!r} {len(d.positions)} in part {n + 1} of "
                            f"{len(parts)}" for s, d, n in uneven))
        kinds.append(kind)
        if kind == "replace":
            replace.append(replace_mapper([x for x, _ in diff], [y for _, y in diff], length))
            refine.append(torch.arange(length))
            ref_alpha.append(torch.ones(length))
        else:
            m, a = refine_mapper_parts(sw, tw, length)
            refine.append(m)
            ref_alpha.append(a)
            replace.append(torch.eye(length))
        factors = torch.ones(length)
        for word, f in reweight.items():
            for occ in tw.occurrences(word):
                factors[list(occ)] = f
        eq.append(factors)
        for word, end in cross_words.items():
            for occ in tw.occurrences(word):
                per_word.update({(b, t): (0.0, end) for t in occ})
    return EditPlan(kind=kinds, replace=torch.stack(replace), refine=torch.stack(refine),
                    refine_alphas=torch.stack(ref_alpha), equalizer=torch.stack(eq) if reweight else None,
                    alpha=word_alpha(steps, len(targets), length, (0.0, cross_steps), per_word),
                    self_replace=(0.0, self_steps), self_max_tokens=self_max_tokens)


def blend_positions(prompts: list[str], names: list[str], words_of: WordsFn) -> list[list[int]]:
    """Per prompt, the token positions of the blend words it contains (a word in none of them is refused)."""
    pws = [words_of(p) for p in prompts]
    missing = [n for n in names if not any(pw.contains(n) for pw in pws)]
    if missing:
        listed = "; ".join(f"{pw.prompt!r}: {pw.names}" for pw in pws)
        raise WordNotInPromptError(
            f"blend words {missing} are in none of the prompts ({listed}); use words of the source or target "
            f"prompts (matched ignoring case and (word:weight) emphasis)")
    return [[p for n in names for occ in pw.occurrences(n) for p in occ] for pw in pws]


# ---- the batch sampler -------------------------------------------------------------------------

BatchEps = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, list], torch.Tensor]  # (x, sigma, ctx, cou) -> eps
# (x (rows, c, h, w), sigma, conds (rows, m, d), null (rows, m, d)) -> the guided eps of the rows
BatchGuide = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def batch_cfg(eps: BatchEps, cfg: float) -> BatchGuide:
    """Classifier-free guidance of a batch, cond and null rows in one call: e_u + cfg * (e_c - e_u)."""
    def guide(x, sigma, c, u):
        e_c, e_u = eps(torch.cat([x, x]), sigma, torch.cat([c, u]), [0, 1]).chunk(2)
        return e_u + cfg * (e_c - e_u)
    return guide


@torch.no_grad()
def p2p_sample(eps: BatchEps | None, x_T: torch.Tensor, sigmas: torch.Tensor, conds: torch.Tensor | list[torch.Tensor],
               nulls: list[torch.Tensor] | torch.Tensor, cfg: float, after_step=None, on_step=None,
               guide: BatchGuide | None = None, solver: str = "euler") -> torch.Tensor:
    """DDIM (eta 0) on the batch [source, edits] from one x_T (1, c, h, w); ``conds`` (1+k, m, d), or one such
    batch per step (a DPL inversion's per-step tokens); ``nulls``: one (1, m, d) null per step (an inversion)
    or a single negative context. ``guide`` (default ``batch_cfg(eps, cfg)``) gives the rows' guided eps; the
    nodes pass one that runs ComfyUI's sampling path, where ``nulls`` may be None (the guide's own negative).
    ``solver``: "euler" (DDIM in sigma space; on a rectified-flow model eps is the velocity, so this is the Euler
    step) or "fireflow" (``rf_inversion.fireflow_step``: retraces a FireFlow inversion of a flow model, N + 1
    evaluations; the reused midpoint velocity is the one before ``after_step``)."""
    if solver not in SOLVERS:
        raise ValueError(f"solver {solver!r} is not one of {SOLVERS}")
    guide = guide or batch_cfg(eps, cfg)
    k1 = (conds[0] if isinstance(conds, list) else conds).shape[0]
    x = x_T.expand(k1, -1, -1, -1).clone()
    v_next = None
    for i in range(len(sigmas) - 1):
        c = conds[i] if isinstance(conds, list) else conds
        u = None if nulls is None else (nulls[i] if isinstance(nulls, list) else nulls).to(c).expand(k1, -1, -1)
        if solver == "fireflow":
            x, v_next = fireflow_step(lambda x_, s_, c=c, u=u: guide(x_, s_, c, u), x, sigmas[i], sigmas[i + 1],
                                      v_next)
        else:
            x = x + guide(x, sigmas[i], c, u) * (sigmas[i + 1] - sigmas[i])
        if after_step is not None:
            x = after_step(i, x)
        if on_step is not None:
            on_step(i)
    return x
