"""Dynamic Prompt Learning (Wang et al. 2023): per-step noun token embeddings against cross-attention leakage.

Ported from the official code, https://github.com/wangkai930418/DPL (main-branch commit
233afcb7b08c942d98056c271df95d20890170a7, unchanged in these files at b3d30f7b3cc23fda661e7daab0a24a049c705910:
``DPL.sh`` for the defaults, the ``__call__`` loop of
``pipelines/null_attend_textinv_pipeline.py`` for the procedure). The repository states no licence, so the
procedure is reimplemented here and only its numbers are kept. Along the inverted trajectory, for each
sampling step i = 0 (noisiest) .. N-1:

1. thresholds beta * exp(-i / alpha) for L_at, L_bg, L_dj (``dpl_losses.py``);
2. when ``attn_iters`` > 1 (upstream quirk, kept: with 1 the token loop does not run at all), up to
   ``attn_iters`` times: encode the prompt with the current noun token embeddings (before the text
   transformer), one conditional UNet evaluation on the current latent that records the cross-attention maps at
   the map size with gradients, the losses; stop as soon as every loss is under its threshold, else one AdamW
   step (a fresh optimizer per sampling step, lr 1e-3 and torch's default weight decay 0.01, as upstream).
   The embeddings carry over to the next step. With one noun only L_bg applies (L_at and L_dj need two);
3. the step's context from the final embeddings, then null-text optimization on it (a fresh Adam,
   lr 1e-2 * (1 - i / 100), ``null.inner_steps`` iterations; upstream runs all 51, no early stop). Upstream
   re-encodes the negative prompt ("") every step, so each step's null starts from that encoding again
   (``null_carry_over=False``, the default); NTI's rule, starting from the previous step's optimized null, is
   the option ``null_carry_over=True``;
4. the guided DDIM step with that null, which the next step continues from (as Null-Text Inversion).

Shape legend:
    x (1, c, h, w) latent      context (1, m, d)      maps (mh, mw, m) layer- and head-averaged, cond row
    params: the learnable token embeddings, any shapes; ``encode(params)`` -> context with gradients
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .context import AttnContext
from .controller import AttentionController
from .dpl_losses import attend_excite_loss, background_loss, disjoint_loss, gradual_threshold
from .inversion import EpsFn, GuideFn, NullTextSettings, cfg_guide, ddim_step, optimize_null

ADAMW_WEIGHT_DECAY = 0.01      # torch.optim.AdamW's default, which upstream uses


@dataclass
class DPLSettings:
    lam_at: float          # loss weights
    lam_bg: float
    lam_dj: float
    alpha_at: float        # threshold decay (steps)
    alpha_bg: float
    alpha_dj: float
    beta_at: float         # threshold at the first step
    beta_bg: float
    beta_dj: float
    attn_iters: int        # most token updates per sampling step
    lr: float              # AdamW learning rate of the tokens
    null: NullTextSettings
    null_carry_over: bool = False   # False: each step's null starts from null_init (upstream DPL); True: NTI's rule

    def thresholds(self, i: int) -> tuple[float, float, float]:
        return (gradual_threshold(i, self.alpha_at, self.beta_at), gradual_threshold(i, self.alpha_bg, self.beta_bg),
                gradual_threshold(i, self.alpha_dj, self.beta_dj))


# The official recipe (DPL.sh); the argparse defaults of _3_dpl_inv.py switch DPL off (all weights 0).
DPL_SH = DPLSettings(lam_at=1.0, lam_bg=0.05, lam_dj=0.05, alpha_at=25.0, alpha_bg=50.0, alpha_dj=25.0,
                     beta_at=0.3, beta_bg=0.7, beta_dj=0.9, attn_iters=21, lr=1e-3,
                     null=NullTextSettings(guidance=7.5, inner_steps=51, lr=1e-2, epsilon=None))


class CrossMapRecorder(AttentionController):
    """While armed, keeps the cond rows' cross-attention probabilities with their gradients, head-averaged,
    at one map size (the first armed call sees every size and picks the one nearest to ``wanted``)."""

    def __init__(self, wanted: tuple[int, int]):
        self.wanted = wanted
        self.size: tuple[int, int] | None = None
        self.armed = False
        self._parts: dict = {}              # (layer, (h, w)) -> list of (rows, n_chunk, m) chunks

    def __deepcopy__(self, memo):
        return self

    def wants_probs(self, ctx: AttnContext) -> bool:
        return self.armed and ctx.is_cross and (self.size is None or (ctx.height, ctx.width) == self.size)

    def edit_probs(self, probs: torch.Tensor, ctx: AttnContext, query_slice: slice) -> torch.Tensor:
        rows = [r for r, _ in ctx.rows(0)]
        if rows:
            self._parts.setdefault((ctx.layer, (ctx.height, ctx.width)), []).append(probs[rows].mean(1))
        return probs

    def take(self) -> torch.Tensor:
        """(mh, mw, m): the recorded maps of item 0 averaged over layers; disarms and clears."""
        self.armed = False
        parts, self._parts = self._parts, {}
        if self.size is None:
            sizes = sorted({s for _, s in parts})
            if not sizes:
                raise RuntimeError("no cross-attention was recorded: the model has no cross-attention layers "
                                   "reachable through ComfyUI's attn2 patches")
            self.size = min(sizes, key=lambda s: (abs(s[0] * s[1] - self.wanted[0] * self.wanted[1]), -s[0]))
        maps = [torch.cat(chunks, dim=1)[0] for (_, s), chunks in parts.items() if s == self.size]
        h, w = self.size
        return torch.stack(maps).mean(0).reshape(h, w, -1)


@dataclass
class DPLResult:
    params: list[list[torch.Tensor]]      # per step: the learned embeddings (detached)
    conds: list[torch.Tensor]             # per step: the context they give (1, m, d)
    nulls: list[torch.Tensor]             # per step: null embeddings (1, m, d)
    maps: list[torch.Tensor | None]       # per step: maps of the final token update (mh, mw, m), None if none ran
    losses: list[tuple[float, float, float, int]]   # per step: L_at, L_bg, L_dj where it stopped, updates made
    reconstruction: torch.Tensor          # the final guided state (1, c, h, w)
    counts: dict = field(default_factory=dict)
    map_size: tuple[int, int] | None = None
    seconds: float = 0.0


def kept_nouns(counts: list[int], find: Callable[[int], tuple[int, ...]]) -> tuple[list[tuple[int, ...]], list[int]]:
    """Which learned nouns a prompt keeps, as the official editing script's placeholders: ``find(k)`` gives noun
    k's key positions in the prompt (() when absent); a noun is kept when it has its learned token count there.
    Returns the kept nouns' positions and their rows in the stacked (S, d) learned vectors."""
    positions, rows, start = [], [], 0
    for k, count in enumerate(counts):
        pos = find(k)
        if len(pos) == count:
            positions.append(pos)
            rows += list(range(start, start + count))
        start += count
    return positions, rows


def initializer_ids(ids: list[int], vocab: dict | None) -> list[int]:
    """Upstream's initializer tokens: ``_3_dpl_inv.py`` passes the noun list to ``tokenizer.encode``, which
    treats a list of strings as ready tokens, so 'cat' is looked up as the word-internal BPE piece ``cat``
    (1481), not the end-of-word token ``cat</w>`` (2368) that the prompt uses. Each end-of-word token is mapped
    to its word-internal counterpart where the vocabulary has one (else kept); word-level vocabularies: unchanged."""
    if vocab is None:
        return list(ids)
    names = {i: w for w, i in vocab.items()}
    out = []
    for t in ids:
        w = names.get(t, "")
        out.append(vocab.get(w[:-4], t) if w.endswith("</w>") else t)
    return out


def background_at_size(mask: torch.Tensor, size: tuple[int, int],
                       image_size: tuple[int, int] | None = None) -> torch.Tensor:
    """A (H, W) background mask (1 = background) as {0, 1} at the map ``size`` (mh, mw), as the official
    ``_2_DDIM_inv.py`` / ``_3_dpl_inv.py``: the mask (>= 0.5) is nearest-upsampled to ``image_size`` (the image's
    pixel size; None = keep its size), written as an 8-bit 0/255 image, resized to the map size with Pillow's
    default (bicubic) filter, and every nonzero cell counts as background - a dilated mask, since bicubic ringing
    leaves small positive values next to the background."""
    m = (mask.float() >= 0.5).float()[None, None]
    if image_size is not None and tuple(m.shape[-2:]) != tuple(image_size):
        m = F.interpolate(m, size=tuple(image_size), mode="nearest")
    pixels = (m[0, 0] * 255).to(torch.uint8).cpu().numpy()
    small = Image.fromarray(pixels).resize((size[1], size[0]), Image.BICUBIC)
    return torch.from_numpy(np.asarray(small) > 0).float()


def active_losses(s: DPLSettings, n_nouns: int, has_background: bool) -> tuple[bool, bool, bool]:
    """Which of L_at, L_bg, L_dj run: weighted, and with one noun only L_bg (the paper)."""
    return s.lam_at > 0 and n_nouns > 1, s.lam_bg > 0 and has_background, s.lam_dj > 0 and n_nouns > 1


def dpl_invert(eps: EpsFn, encode: Callable[[list[torch.Tensor]], torch.Tensor], params0: list[torch.Tensor],
               recorder: CrossMapRecorder, trajectory: list[torch.Tensor], sigmas: torch.Tensor,
               nouns: list[tuple[int, ...]], background: Callable[[tuple[int, int]], torch.Tensor] | None,
               null_init: torch.Tensor, s: DPLSettings,
               on_step: Callable[[int], None] | None = None,
               on_inner: Callable[[int, str, int], None] | None = None, eps_null: EpsFn | None = None,
               guide: GuideFn | None = None) -> DPLResult:
    """The DPL inversion of ``trajectory`` (from ``ddim_invert``). ``eps`` must be differentiable in its
    context and pass through ``recorder``; ``background(size)`` gives the mask (mh, mw) at the map size.
    ``eps_null`` evaluates the null contexts (default ``eps``; SDXL: the null rows' own pooled embedding);
    ``guide`` combines cond and null (default ``cfg_guide(eps_null, s.null.guidance)``)."""
    eps_null = eps_null or eps
    guide = guide or cfg_guide(eps_null, s.null.guidance)
    t0 = time.time()
    n = len(sigmas) - 1
    use = active_losses(s, len(nouns), background is not None)
    params = [p.detach().clone().requires_grad_(True) for p in params0]
    x = trajectory[0].detach()
    null = null_init.detach().clone()
    out = DPLResult([], [], [], [], [], x)
    counts = {"forward": 0, "backward": 0, "token_updates": 0, "null_iters": 0}
    bg = None
    for i in range(n):
        sig, sig_next = sigmas[i], sigmas[i + 1]
        thr = s.thresholds(i)
        maps, values, updates = None, (0.0, 0.0, 0.0), 0
        if any(use) and s.attn_iters > 1:             # upstream: ``if attn_inner_steps > 1``
            opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=ADAMW_WEIGHT_DECAY)
            for j in range(s.attn_iters):
                recorder.armed = True
                eps(x, sig, encode(params))
                maps = recorder.take()
                counts["forward"] += 1
                if background is not None and bg is None:
                    bg = background(recorder.size).to(maps)
                zero = maps.new_zeros(())
                losses = (attend_excite_loss(maps, nouns) if use[0] else zero,
                          background_loss(maps, nouns, bg) if use[1] else zero,
                          disjoint_loss(maps, nouns) if use[2] else zero)
                values = tuple(float(v.detach()) for v in losses)
                if on_inner is not None:
                    on_inner(i, "tokens", j)
                if all(v < t for v, t in zip(values, thr)):
                    break
                total = s.lam_at * losses[0] + s.lam_bg * losses[1] + s.lam_dj * losses[2]
                opt.zero_grad(set_to_none=True)
                total.backward()
                opt.step()
                updates += 1
                counts["backward"] += 1
            maps = maps.detach()
        counts["token_updates"] += updates
        with torch.no_grad():
            cond = encode(params).detach()
            e_cond = eps(x, sig, cond)
        inner = None if on_inner is None else (lambda j, v, i=i: on_inner(i, "null", j))
        threshold = None if s.null.epsilon is None else s.null.epsilon + i * 2e-5
        start = null if s.null_carry_over else null_init
        null, done = optimize_null(eps_null, x, sig, sig_next, e_cond, trajectory[i + 1].detach(), start,
                                   s.null.guidance,
                                   s.null.lr * (1.0 - i / 100.0), s.null.inner_steps, threshold, inner,
                                   s.null.keep_best, guide, cond)
        counts["forward"] += 2 + done + int(s.null.keep_best)
        counts["backward"] += done
        counts["null_iters"] += done
        with torch.no_grad():
            x = ddim_step(x, guide(x, sig, cond, e_cond, null), sig, sig_next)
        out.params.append([p.detach().clone() for p in params])
        out.conds.append(cond)
        out.nulls.append(null.clone())
        out.maps.append(maps)
        out.losses.append((*values, updates))
        if on_step is not None:
            on_step(i)
    out.reconstruction = x
    out.counts = counts
    out.map_size = recorder.size
    out.seconds = time.time() - t0
    return out
