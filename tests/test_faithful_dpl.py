"""Tier 1: DPL's whole per-step loop (token updates on the cross-attention losses, then the null-text restart)
against a transcription of the official ``__call__`` (wangkai930418/DPL ``pipelines/null_attend_textinv_pipeline.py``;
no licence: described in our own words here) on a toy UNet whose one cross-attention layer runs through
the hook (``through_hook``) and the ``CrossMapRecorder`` the node installs (issue 26, docs/faithful-ports.md).

Shape legend: x (1, 2, 4, 4) latent; context (1, m, d) with m = 6 tokens of width d = 8; maps (4, 4, m).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from standins import through_hook

from attention.dpl import DPL_SH, CrossMapRecorder, background_at_size, dpl_invert
from attention.inversion import NullTextSettings, cfg_guide, ddim_invert
from attention.schedule import sigma_to_t, simple_sigmas

G = torch.Generator().manual_seed(11)
WQ, WK, WV = (torch.randn(8 if i else 2, 8, generator=G, dtype=torch.float64) / 2 for i in range(3))
WO = torch.randn(8, 2, generator=G, dtype=torch.float64) / 4
SIGMAS = simple_sigmas(6).double()


def attention_probs(z: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The toy layer's queries from the latent, keys/values from the text: q (1, 16, 8), probs (1, 16, m)."""
    q = z.flatten(2).transpose(1, 2) @ WQ
    return q, (q @ (context @ WK).transpose(1, 2) / 8 ** 0.5).softmax(-1)


def unet(z, t, context, layer=None):
    """eps from the model-space latent; ``layer`` runs the cross-attention (ours: through the recorder)."""
    q = z.flatten(2).transpose(1, 2) @ WQ
    out = layer(q, context @ WK, context @ WV) if layer is not None else attention_probs(z, context)[1] @ (
        context @ WV)
    text = (out @ WO).transpose(1, 2).reshape(z.shape)
    return 0.1 * torch.tanh(1.3 * z + 0.002 * t.view(-1, 1, 1, 1)) + 0.5 * text


def our_eps(recorder):
    def eps(x, sigma, context):
        s = sigma.reshape(1)
        opts = {"block": ("output", 1), "block_index": 0, "n_heads": 1, "cond_or_uncond": [0],
                "sigmas": s, "sample_sigmas": SIGMAS, "activations_shape": [1, 8, 4, 4]}
        layer = lambda q, k, v: through_hook((recorder,), True, q, k, v, opts)   # noqa: E731
        return unet(x / (1 + s ** 2).sqrt(), sigma_to_t(s), context, layer)
    return eps


def alphabar(sigma):
    return 1 / (1 + sigma ** 2)


def prev_step(eps, a_cur, a_prev, z):
    x0 = (z - (1 - a_cur).sqrt() * eps) / a_cur.sqrt()
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


def official_losses(maps, idx, seg):
    """``_compute_max_attention_per_index`` + ``_compute_loss('max')``, ``_compute_BG``, ``_compute_cosine``."""
    text = torch.softmax(maps[:, :, 1:-1] * 100, dim=-1)
    k = torch.exp(-((torch.arange(3, dtype=torch.float64) - 1) / (2 * 0.5)) ** 2)
    weight = (torch.outer(k, k) / torch.outer(k, k).sum())[None, None]
    maxima = [F.conv2d(F.pad(text[:, :, i - 1][None, None], (1, 1, 1, 1), mode="reflect"), weight)[0, 0].max()
              for i in idx]
    loss_max = max(max(torch.zeros((), dtype=maps.dtype), 1.0 - m) for m in maxima)
    x = maps[:, :, idx].reshape(-1, len(idx)).t()
    bg = F.cosine_similarity(x, seg.reshape(1, -1)).mean()
    mask = torch.tril(torch.ones(len(idx), len(idx)), diagonal=-1).bool()
    cos = F.cosine_similarity(x[:, :, None], x.t()[None, :, :])[mask].mean()
    return loss_max, bg, cos


def official_dpl(traj_z, cond0, null, seg, idx, s):
    """``__call__`` per step i: targets beta * exp(-i / alpha); if attn_inner_steps > 1, a fresh AdamW (default
    lr 1e-3, weight decay 0.01) on the placeholder embeddings, up to attn_inner_steps times: the conditional UNet
    on the current latent, the losses, stop when every loss is under its target, else backward and step; then the
    null restarts from "" and runs null_inner_steps Adam iterations (lr 1e-2 * (1 - i / 100)); the guided step."""
    cond = cond0.clone()
    z, conds, nulls, updates = traj_z[0], [], [], []
    for i in range(len(SIGMAS) - 1):
        a_cur, a_prev = alphabar(SIGMAS[i]), alphabar(SIGMAS[i + 1])
        t = sigma_to_t(SIGMAS[i].reshape(1))
        targets = [float(np.exp(-float(i) / a) * b) for a, b in ((s.alpha_at, s.beta_at), (s.alpha_bg, s.beta_bg),
                                                                  (s.alpha_dj, s.beta_dj))]
        n = 0
        if s.attn_iters > 1:
            emb = cond.clone().requires_grad_(True)
            optim = torch.optim.AdamW([emb], lr=1e-3)
            for _ in range(s.attn_iters):
                maps = attention_probs(z, emb)[1][0].reshape(4, 4, -1)
                lm, lb, lc = official_losses(maps, idx, seg)
                if lm < targets[0] and lc < targets[2] and lb < targets[1]:
                    break
                (lm * s.lam_at + lb * s.lam_bg + lc * s.lam_dj).backward()
                optim.step()
                optim.zero_grad()
                n += 1
            cond = emb.detach()
        updates.append(n)
        conds.append(cond)
        uncond = null.clone().requires_grad_(True)
        opt = torch.optim.Adam([uncond], lr=1e-2 * (1.0 - i / 100.0))
        with torch.no_grad():
            e_c = unet(z, t, cond)
        for _ in range(s.null.inner_steps):
            e_u = unet(z, t, uncond)
            loss = F.mse_loss(prev_step(e_u + s.null.guidance * (e_c - e_u), a_cur, a_prev, z), traj_z[i + 1])
            loss.backward()
            opt.step()
            opt.zero_grad()
        nulls.append(uncond.detach())
        with torch.no_grad():
            e_u = unet(z, t, uncond)
            z = prev_step(e_u + s.null.guidance * (e_c - e_u), a_cur, a_prev, z)
    return conds, nulls, updates, z


def test_dpl_token_and_null_loop_equals_the_official_call():
    """DPL.sh's recipe (fewer iterations, thresholds that let both the early break and full runs happen, L_dj weighted
    apart from L_bg) through
    ``dpl_invert`` as DPLTokenOptimizer calls it, against the official loop on the same toy."""
    g = torch.Generator().manual_seed(12)
    x0 = torch.randn(1, 2, 4, 4, generator=g, dtype=torch.float64)
    cond = torch.randn(1, 6, 8, generator=g, dtype=torch.float64)
    null = torch.randn(1, 6, 8, generator=g, dtype=torch.float64) * 0.3
    seg = torch.zeros(4, 4, dtype=torch.float64)
    seg[:, :2] = 1
    s = dataclasses.replace(DPL_SH, attn_iters=6, lam_dj=0.2, alpha_at=2.0, beta_at=0.9, alpha_bg=3.0, beta_bg=0.9,
                            alpha_dj=2.0, beta_dj=0.99, null=NullTextSettings(guidance=7.5, inner_steps=3,
                                                                              epsilon=None))
    recorder = CrossMapRecorder((4, 4))
    eps = our_eps(recorder)
    traj = ddim_invert(eps, x0, SIGMAS, cond)
    nouns = [(1,), (3,)]
    steps, inner, guided = [], [], []

    def guide(x, sigma, c, e_c, nl):                  # the papers' guidance, noting the context it is given
        guided.append(c)
        return cfg_guide(eps, s.null.guidance)(x, sigma, c, e_c, nl)
    with torch.enable_grad():
        res = dpl_invert(eps, lambda p: p[0].clone(), [cond.clone()], recorder, [t.clone() for t in traj],
                         SIGMAS.clone(), nouns, lambda size: {(4, 4): seg}[tuple(size)], null.clone(), s, steps.append,
                         lambda *a: inner.append(a), guide=guide)
    traj_z = [x * alphabar(sig).sqrt() for x, sig in zip(traj, SIGMAS)]
    conds, nulls, updates, z_end = official_dpl(traj_z, cond, null, seg, [1, 3], s)
    assert [u for *_, u in res.losses] == updates
    # what the node shows: progress per step and per inner iteration, UNet calls, the time taken
    n = len(SIGMAS) - 1
    tries = [min(u + 1, s.attn_iters) for u in updates]            # token iterations: updates, then the break
    assert steps == list(range(n))
    assert inner == [a for i in range(n)
                     for a in [(i, "tokens", j) for j in range(tries[i])] + [(i, "null", j) for j in range(3)]]
    assert res.counts["forward"] == sum(tries) + n * (2 + 3) and res.counts["backward"] == sum(updates) + n * 3
    assert 0 <= res.seconds < 600
    assert len(guided) == n * (3 + 1)                  # each null iteration and the step, through the guide
    assert all(g is not None and any(torch.equal(g, c) for c in res.conds) for g in guided)
    assert 0 < sum(updates) < s.attn_iters * len(updates) and min(updates) < s.attn_iters   # breaks and updates
    assert res.counts["token_updates"] == sum(updates) and res.map_size == (4, 4)
    for i, (ours, theirs) in enumerate(zip(res.conds, conds)):
        assert torch.allclose(ours, theirs, atol=1e-6), i
    for i, (ours, theirs) in enumerate(zip(res.nulls, nulls)):
        assert torch.allclose(ours, theirs, atol=1e-6), i
    assert torch.allclose(res.reconstruction, z_end, atol=1e-6)


@pytest.mark.parametrize("wanted, chosen", [((4, 6), (4, 6)), ((3, 5), (4, 6)), ((6, 6), (4, 6)), ((7, 12), (8, 12)),
                                            ((12, 7), (8, 12)), ((1, 1), (2, 3))])
def test_recorder_takes_the_layers_nearest_the_wanted_size(wanted, chosen):
    """Upstream reads the 16x16 layers (``aggregate_attention(res=16)``: the mean over those layers and heads of
    the cond row); on a model without that size the recorder takes the size of nearest area (ties: the larger)
    and averages the cond row's head-averaged maps of its layers."""
    from test_faithful_attention import official_probs, run_layer
    g = torch.Generator().manual_seed(13)
    heads, m = 2, 5
    recorder = CrossMapRecorder(wanted)
    recorder.armed = True
    want = {}
    for n, hw in enumerate([(8, 12), (4, 6), (4, 6), (2, 3)]):
        q = torch.randn(2, hw[0] * hw[1], heads * 4, generator=g) * 2
        k = torch.randn(2, m, heads * 4, generator=g)
        run_layer([recorder], True, ("output", n), hw, q, k, torch.zeros(2, m, heads * 4), 1, heads)
        want.setdefault(hw, []).append(official_probs(q, k, heads)[1].mean(0))      # cond row, heads averaged
    maps = recorder.take()
    assert recorder.size == chosen and not recorder.armed
    assert torch.allclose(maps, torch.stack(want[chosen]).mean(0).reshape(*chosen, m), atol=1e-6)


def test_recorder_without_cross_attention_is_refused():
    with pytest.raises(RuntimeError, match="^no cross-attention was recorded: the model has no cross-attention "
                                           "layers reachable through ComfyUI's attn2 patches$"):
        CrossMapRecorder((4, 4)).take()


def _toy_run(s, nouns, with_seg):
    g = torch.Generator().manual_seed(12)
    x0 = torch.randn(1, 2, 4, 4, generator=g, dtype=torch.float64)
    cond = torch.randn(1, 6, 8, generator=g, dtype=torch.float64)
    null = torch.randn(1, 6, 8, generator=g, dtype=torch.float64) * 0.3
    seg = torch.zeros(4, 4, dtype=torch.float64)
    seg[:, :2] = 1
    recorder = CrossMapRecorder((4, 4))
    eps = our_eps(recorder)
    traj = ddim_invert(eps, x0, SIGMAS, cond)
    with torch.enable_grad():
        return dpl_invert(eps, lambda p: p[0].clone(), [cond.clone()], recorder, traj, SIGMAS.clone(), nouns,
                          (lambda size: seg) if with_seg else None, null.clone(), s)


def test_losses_that_do_not_run_change_nothing():
    """``active_losses`` in the loop: with one noun L_at and L_dj neither run nor weigh (the paper); without a
    background mask L_bg's weight is irrelevant. The token loop runs from attn_iters 2 (upstream: ``> 1``) and
    each step keeps the maps of its last token update."""
    base = dataclasses.replace(DPL_SH, attn_iters=2, lam_at=1.0, lam_bg=1.0, lam_dj=1.0, alpha_at=2.0, beta_at=0.05,
                               alpha_bg=2.0, beta_bg=0.05, alpha_dj=2.0, beta_dj=0.05,
                               null=NullTextSettings(guidance=7.5, inner_steps=1, epsilon=None))
    runs = [_toy_run(base, [(1,)], True), _toy_run(dataclasses.replace(base, lam_at=0.0, lam_dj=0.0), [(1,)], True),
            _toy_run(base, [(1,), (3,)], False), _toy_run(dataclasses.replace(base, lam_bg=0.0), [(1,), (3,)], False)]
    for a, b in (runs[:2], runs[2:]):
        assert a.counts["token_updates"] == b.counts["token_updates"] > 0
        assert all(torch.equal(x, y) for x, y in zip(a.conds, b.conds))
        assert all(m is not None for m in a.maps)
    assert not all(torch.equal(x, y) for x, y in zip(runs[0].conds, runs[2].conds))
    faster = _toy_run(dataclasses.replace(base, lr=1e-2), [(1,)], True)     # the node's lr input reaches AdamW
    assert not all(torch.equal(x, y) for x, y in zip(runs[0].conds, faster.conds))


def test_kept_nouns_take_the_rows_of_nouns_present_with_their_token_count():
    """The editing prompt keeps a learned noun (its rows of the stacked vectors) only where it appears with the
    token count it was learned with (upstream's placeholders are whole tokens); rows count on past every noun."""
    from attention.dpl import kept_nouns
    found = {0: (2,), 1: (), 2: (5, 6), 3: (8,)}                   # noun 3 was learned as 2 tokens: dropped
    positions, rows = kept_nouns([1, 2, 2, 2], found.__getitem__)
    assert positions == [(2,), (5, 6)] and rows == [0, 3, 4]


def test_initializer_ids_map_end_of_word_tokens_to_the_word_internal_piece():
    """``tokenizer.encode(['cat', ...])`` looks each noun up as a ready token (``convert_tokens_to_ids``): the
    word-internal piece where the vocabulary has one, else the prompt's own token; no vocabulary (a word-level
    tokenizer): the ids as given. (Tier 2 checks the same with ComfyUI's SD1 tokenizer files.)"""
    from attention.dpl import initializer_ids
    vocab = {"cat": 1481, "cat</w>": 2368, "dog</w>": 1929, "<|endoftext|>": 49407, "s": 82, "s</w>": 29}
    assert initializer_ids([2368, 1929, 29, 7], vocab) == [1481, 1929, 82, 7]
    pieces = {"catsup": 5, "ca": 6}                                 # a word-internal piece stays itself
    assert initializer_ids([5], pieces) == [5]
    assert initializer_ids([2368, 1929], None) == [2368, 1929]


# ----------------------------------------------------------------------------- 4. DPL background at map size
def official_background(mask: torch.Tensor, size=(16, 16), image=(512, 512)) -> torch.Tensor:
    """_2_DDIM_inv.py: clusters nearest to the image size, rounded, saved by ToPILImage (8-bit 'L', 0/255);
    _3_dpl_inv.py ``read_segfile``: ``Image.open(...).resize((w, h))`` (Pillow's default bicubic), ``astype(bool)``.
    (Upstream's masks are 0/1; the pack's one MASK rule counts a soft value >= 0.5 as set, which ``mask`` has
    applied here.)"""
    big = F.interpolate(mask.float()[None, None], size=image, mode="nearest").round().bool()[0, 0]
    pil = Image.fromarray(big.float().mul(255).byte().numpy())
    return torch.from_numpy(np.asarray(pil.resize((size[1], size[0]))).astype(bool)).float()


def test_background_mask_at_map_size_equals_upstream():
    """Sparse blobs (so the dilated mask is neither empty nor full), square and non-square maps, a mask already at
    the image's size (image_size None), and the MASK rule's 0.5."""
    g = torch.Generator().manual_seed(2)
    for shape, size, image in (((32, 32), (16, 16), (512, 512)), ((24, 32), (12, 16), (384, 512)),
                               ((32, 32), (16, 16), (512, 512)), ((64, 48), (16, 12), None)):
        mask = (torch.rand(*shape, generator=g) > 0.97).float()
        mask = F.max_pool2d(mask[None, None], 5, 1, 2)[0, 0]                           # blobby, like clusters
        ours = background_at_size(mask, size, image)
        theirs = official_background(mask, size, image or shape)
        assert torch.equal(ours, theirs) and 0 < theirs.mean() < 1, (shape, size, image)
    soft = torch.full((32, 32), 0.5)
    soft[:, 16:] = 0.49
    assert torch.equal(background_at_size(soft, (16, 16), (512, 512)), official_background((soft >= 0.5).float()))
    square = torch.zeros(32, 32)
    square[8:24, 8:24] = 1
    # dilated: every cell touched by the bicubic kernel counts, more than an area-majority rule's
    majority = (F.adaptive_avg_pool2d(square[None, None], (16, 16))[0, 0] >= 0.5).float()
    assert background_at_size(square, (16, 16), (512, 512)).sum() > majority.sum()


def test_background_mask_upsampled_first_and_faint_ringing_counted_as_upstream():
    """Upstream resizes the 512 px mask, not the map-sized clusters: on these blobs the bicubic resize of the
    upsampled mask differs from a resize of the small one, and its ringing leaves cells of value 1 (of 255), which
    count as background (``astype(bool)``). Both are seen here, so skipping the upsampling or a threshold above 0
    fails (mutants ``background_at_size`` 9 and 38 of issue 26's run)."""
    g = torch.Generator().manual_seed(0)
    upsampling_matters = faint_cells = 0
    for _ in range(4):
        mask = (torch.rand(32, 32, generator=g) > 0.97).float()
        mask = F.max_pool2d(mask[None, None], 5, 1, 2)[0, 0]
        theirs = official_background(mask, (16, 16), (512, 512))
        assert torch.equal(background_at_size(mask, (16, 16), (512, 512)), theirs)
        small = np.asarray(Image.fromarray(mask.mul(255).byte().numpy()).resize((16, 16)))
        big = F.interpolate(mask[None, None], size=(512, 512), mode="nearest")[0, 0]
        raw = np.asarray(Image.fromarray(big.mul(255).byte().numpy()).resize((16, 16)))
        upsampling_matters += int(not np.array_equal(small > 0, raw > 0))
        faint_cells += int((raw == 1).sum())
    assert upsampling_matters and faint_cells, (upsampling_matters, faint_cells)


def test_which_losses_run():
    """DPL's losses with a weight > 0; with one noun only L_bg (nothing to balance or separate), and L_bg only
    with a background mask."""
    from attention.dpl import active_losses
    s = dataclasses.replace(DPL_SH, lam_at=1.0, lam_bg=1.0, lam_dj=1.0)
    assert active_losses(s, 2, True) == (True, True, True)
    assert active_losses(s, 1, True) == (False, True, False)
    assert active_losses(s, 2, False) == (True, False, True)
    assert active_losses(dataclasses.replace(s, lam_bg=0.0), 2, True) == (True, False, True)
    assert active_losses(dataclasses.replace(s, lam_at=0.0, lam_dj=0.0), 2, True) == (False, True, False)
