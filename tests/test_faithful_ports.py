"""Tier 1: our ported inversion and DPL functions against the official formulas, written out here in our own words,
on identical tensors (issues 15 and 26; docs/faithful-ports.md). Each test names the upstream file it transcribes.
The attention-side ports (MnM, P2P) are in test_faithful_attention.py, StructureDiffusion's values in
test_structure.py, DPL's token initialization on the real CLIP tokenizer in test_nodes_faithful.py (tier 2).

Shape legend: z (1, c, h, w) model-space latent; x = z / sqrt(alphabar) the k-diffusion state; maps (h, w, m).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attention.dpl import DPL_SH, CrossMapRecorder, dpl_invert
from attention.dpl_losses import attend_excite_loss, gaussian_kernel
from attention.inversion import NullTextSettings, ddim_invert, null_text_optimize
from attention.schedule import sigma_to_t, simple_sigmas


# ----------------------------------------------------------------------------- a toy UNet shared by both sides
def toy_unet(z: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """eps = f(model-space latent, timestep, text): nonlinear in all three, differentiable in the text."""
    c = context.mean(dim=(1, 2)).view(-1, 1, 1, 1)
    return torch.tanh(1.3 * z + 0.4 * z.roll(1, -1) * (1 + c) + 0.002 * t.view(-1, 1, 1, 1) + c)


def comfy_eps(x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Our eps convention (ComfyUI's EPS models, ShapesWorld's model.eps): the state scaled by 1/sqrt(1 + s^2)."""
    s = sigma.reshape(1)
    return toy_unet(x / (1 + s ** 2).sqrt(), sigma_to_t(s), context)


def alphabar(sigma: torch.Tensor) -> torch.Tensor:
    return 1 / (1 + sigma ** 2)


def official_next_step(eps, a_cur, a_next, z):
    """null_text_w_ptp ``next_step`` (and DPL's inverse scheduler): DDIM from alphabar a_cur up to a_next."""
    x0 = (z - (1 - a_cur).sqrt() * eps) / a_cur.sqrt()
    return a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps


def official_prev_step(eps, a_cur, a_prev, z):
    """diffusers ``DDIMScheduler.step`` with eta 0 (the null-text notebook's ``prev_step``)."""
    x0 = (z - (1 - a_cur).sqrt() * eps) / a_cur.sqrt()
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


def official_ddim_loop(z0, sigmas, cond):
    """``ddim_loop``: the UNet sees the *current* latent, unscaled, at the *next* timestep."""
    n = len(sigmas) - 1
    out, z = [z0], z0
    for i in range(n - 1, -1, -1):
        s_cur, s_next = sigmas[i + 1], sigmas[i]
        eps = toy_unet(z, sigma_to_t(s_next.reshape(1)), cond)
        z = official_next_step(eps, alphabar(s_cur), alphabar(s_next), z)
        out.append(z)
    return out[::-1]                                   # [0] the noisiest, as ours


@pytest.fixture(scope="module")
def toy():
    g = torch.Generator().manual_seed(0)
    sigmas = simple_sigmas(8).double()
    x0 = torch.randn(1, 3, 8, 8, generator=g, dtype=torch.float64)
    cond = torch.randn(1, 6, 4, generator=g, dtype=torch.float64)
    null = torch.randn(1, 6, 4, generator=g, dtype=torch.float64) * 0.1
    return sigmas, x0, cond, null


# ----------------------------------------------------------------------------- 1. DDIM inversion input scale
def test_ddim_inversion_equals_the_official_ddim_loop(toy):
    sigmas, x0, cond, _ = toy
    ours = ddim_invert(comfy_eps, x0, sigmas, cond)
    official = official_ddim_loop(x0, sigmas, cond)                      # z-space; x0 = z0 at sigma 0
    for i, (x, z) in enumerate(zip(ours, official)):
        assert torch.allclose(x * alphabar(sigmas[i]).sqrt(), z, atol=1e-10), i
    # the former call, eps(x_current, sigma_next), shows the UNet a rescaled latent and misses the trajectory
    x, n = x0, len(sigmas) - 1
    for i in range(n - 1, -1, -1):
        x = x + comfy_eps(x, sigmas[i], cond) * (sigmas[i] - sigmas[i + 1])
    assert (x * alphabar(sigmas[0]).sqrt() - official[0]).abs().max() > 1e-3


# ----------------------------------------------------------------------------- 2. Attend-and-Excite smoothing
def official_gaussian_smoothing_weight(kernel_size=3, sigma=0.5):
    """Attend-and-Excite ``GaussianSmoothing.__init__`` (copied into DPL's pipeline): note (x - mean) / (2 std)."""
    kernel = 1
    grids = torch.meshgrid([torch.arange(kernel_size, dtype=torch.float32)] * 2, indexing="ij")
    for mgrid in grids:
        mean = (kernel_size - 1) / 2
        kernel = kernel * 1 / (sigma * math.sqrt(2 * math.pi)) * torch.exp(-(((mgrid - mean) / (2 * sigma)) ** 2))
    return kernel / kernel.sum()


def official_attend_excite_loss(maps, indices):
    """DPL ``_compute_max_attention_per_index`` + ``_compute_loss(loss_type='max')``."""
    text = torch.softmax(maps[:, :, 1:-1] * 100, dim=-1)
    weight = official_gaussian_smoothing_weight()[None, None]
    maxima = []
    for i in [j - 1 for j in indices]:
        img = F.pad(text[:, :, i][None, None], (1, 1, 1, 1), mode="reflect")
        maxima.append(F.conv2d(img, weight)[0, 0].max())
    return max(max(torch.zeros(()), 1.0 - m) for m in maxima)


def official_background_loss(maps, indices, seg):
    """DPL ``_compute_BG``: each noun's flattened map against the background mask, cosine (eps 1e-8), mean."""
    x = maps[:, :, indices].reshape(-1, len(indices)).t()
    return F.cosine_similarity(x, seg.reshape(1, -1)).mean()


def official_cosine_loss(maps, indices):
    """DPL ``_compute_cosine``: the nouns' pairwise cosine matrix by broadcasting, mean of its strict lower
    triangle."""
    x = maps[:, :, indices].reshape(-1, len(indices)).t()
    mask = torch.tril(torch.ones(len(indices), len(indices)), diagonal=-1).bool()
    return F.cosine_similarity(x[:, :, None], x.t()[None, :, :])[mask].mean()


def official_target(i: int, alpha: float, beta: float) -> float:
    """DPL ``__call__``: np.exp(-float(i) / alpha) * beta (BG: i - max_iter_to_alter, 0 in DPL.sh)."""
    return float(np.exp(-float(i) / alpha) * beta)


def test_attention_balancing_kernel_and_loss_equal_upstream():
    assert torch.allclose(gaussian_kernel(), official_gaussian_smoothing_weight(), atol=1e-7)
    assert torch.allclose(gaussian_kernel(sigma=1.0), official_gaussian_smoothing_weight(sigma=1.0), atol=1e-7)
    assert abs(float(gaussian_kernel()[1, 1]) - 0.332) < 1e-3                        # effective sigma 0.707
    true = torch.outer(*[torch.exp(-torch.arange(-1.0, 2.0) ** 2 / (2 * 0.5 ** 2))] * 2)
    assert abs(float((true / true.sum())[1, 1]) - 0.619) < 1e-3                      # a true sigma 0.5 differs
    g = torch.Generator().manual_seed(1)
    for corner in (slice(4, 8), slice(0, 3), slice(13, 16)):                          # the peak inside, at borders
        for _ in range(3):
            maps = torch.rand(16, 16, 12, generator=g) * 0.05
            maps[corner, corner, 2] += torch.rand(maps[corner, corner, 2].shape, generator=g) * 0.2
            ours = attend_excite_loss(maps, [(2,), (5,)])
            assert torch.allclose(ours, official_attend_excite_loss(maps, [2, 5]), atol=1e-6)
    maps = maps.double()                                                               # the maps' dtype is kept
    assert attend_excite_loss(maps, [(2,), (5,)]).dtype == torch.float64


def test_background_and_disjoint_losses_and_thresholds_equal_upstream():
    from attention.dpl_losses import background_loss, disjoint_loss, gradual_threshold
    g = torch.Generator().manual_seed(6)
    seg = torch.zeros(16, 16)
    seg[:, :5] = 1
    for dtype in (torch.float32, torch.float64):
        maps = (torch.rand(16, 16, 12, generator=g) * 0.05).to(dtype)                # norms under 1, as real maps
        maps[2:9, 1:6, 3] += 0.1
        for nouns in ([(2,), (3,)], [(2,), (3,), (7,)]):
            idx = [p for (p,) in nouns]
            assert torch.allclose(background_loss(maps, nouns, seg), official_background_loss(maps, idx, seg.to(dtype)),
                                  atol=1e-6)
            assert torch.allclose(disjoint_loss(maps, nouns), official_cosine_loss(maps, idx), atol=1e-6)
    with pytest.raises(ValueError, match=r"background mask \(8, 8\) and maps \(16, 16\) differ"):
        background_loss(maps, [(2,)], torch.zeros(8, 8))
    for i in (0, 7, 49):
        for alpha, beta in ((25.0, 0.3), (50.0, 0.7), (25.0, 0.9)):
            assert abs(gradual_threshold(i, alpha, beta) - official_target(i, alpha, beta)) < 1e-12


# ----------------------------------------------------------------------------- Null-Text Inversion's loop
# A second toy whose null embedding reaches the loss (a linear text term over every latent entry), so that the
# early stop fires at some steps and not at others: the threshold's value decides the result.
_P = torch.randn(32, 32, generator=torch.Generator().manual_seed(9), dtype=torch.float64) / 32 ** 0.5


def text_unet(z: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    text = (context.reshape(context.shape[0], -1) @ _P).view(z.shape)
    return 0.1 * torch.tanh(1.3 * z + 0.4 * z.roll(1, -1) + 0.002 * t.view(-1, 1, 1, 1)) + 0.2 * text


def text_eps(x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    s = sigma.reshape(1)
    return text_unet(x / (1 + s ** 2).sqrt(), sigma_to_t(s), context)


def official_null_optimization(unet, traj_z, sigmas, cond, null, guidance, inner, epsilon, restart=False,
                               lr=1e-2, keep_best=False):
    """null_text_w_ptp.ipynb ``NullInversion.null_optimization``: per step a fresh Adam on the null at
    lr 1e-2 * (1 - i / 100); each inner iteration the guided ``prev_step`` from the current latent, MSE to the
    inverted latent, zero_grad / backward / step, then stop when loss.item() < epsilon + i * 2e-5; the null
    carries over to the next step (``restart``: DPL's re-encoded "" each step instead); the next latent is
    ``get_noise_pred(latent_cur, t, False, [null, cond])``. Returns the nulls, the final latent and the
    iterations run per step. ``epsilon`` None: no early stop (DPL). ``lr``: the notebook's 1e-2 (a test of
    overshooting passes more). ``keep_best`` is the pack's option, not upstream: each step's null is the one of
    the lowest loss among those the iterations evaluated (the start included) and Adam's last, the last on a
    tie."""
    uncond, nulls, iters = null, [], []
    latent_cur = traj_z[0]
    for i in range(len(sigmas) - 1):
        uncond = (null if restart else uncond).clone().detach().requires_grad_(True)
        optimizer = torch.optim.Adam([uncond], lr=lr * (1.0 - i / 100.0))
        seen = []
        latent_prev = traj_z[i + 1]
        a_cur, a_prev = alphabar(sigmas[i]), alphabar(sigmas[i + 1])
        t = sigma_to_t(sigmas[i].reshape(1))
        with torch.no_grad():
            noise_pred_cond = unet(latent_cur, t, cond)
        for j in range(inner):  # noqa: B007  (j counts the iterations run, read after the loop as upstream)
            noise_pred_uncond = unet(latent_cur, t, uncond)
            noise_pred = noise_pred_uncond + guidance * (noise_pred_cond - noise_pred_uncond)
            loss = F.mse_loss(official_prev_step(noise_pred, a_cur, a_prev, latent_cur), latent_prev)
            seen.append((loss.item(), uncond.detach().clone()))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if epsilon is not None and loss.item() < epsilon + i * 2e-5:
                break
        iters.append(j + 1)
        if keep_best:
            with torch.no_grad():
                e_u = unet(latent_cur, t, uncond)
                last = F.mse_loss(official_prev_step(e_u + guidance * (noise_pred_cond - e_u), a_cur, a_prev,
                                                     latent_cur), latent_prev).item()
            low, kept = min(seen, key=lambda lv: lv[0])
            if last > low:
                uncond = kept.requires_grad_(True)
        nulls.append(uncond[:1].detach())
        with torch.no_grad():
            both = unet(torch.cat([latent_cur] * 2), t, torch.cat([uncond, cond]))
            e_u, e_c = both.chunk(2)
            latent_cur = official_prev_step(e_u + guidance * (e_c - e_u), a_cur, a_prev, latent_cur)
    return nulls, latent_cur, iters


@pytest.fixture(scope="module")
def text_toy():
    g = torch.Generator().manual_seed(0)
    sigmas = simple_sigmas(8).double()
    x0 = torch.randn(1, 2, 4, 4, generator=g, dtype=torch.float64)
    cond = torch.randn(1, 4, 8, generator=g, dtype=torch.float64)
    null = cond + torch.randn(1, 4, 8, generator=g, dtype=torch.float64) * 0.03
    traj = ddim_invert(text_eps, x0, sigmas, cond)
    return sigmas, x0, cond, null, traj, [x * alphabar(s).sqrt() for x, s in zip(traj, sigmas)]


def test_null_text_optimization_equals_the_official_loop(text_toy):
    """NullTextInvert's defaults (its schema: inner_steps 10, early_stop 1e-5, keep_best_null off) through
    ``null_text_optimize``, the function the node calls, against the notebook's loop on the same tensors."""
    sigmas, x0, cond, null, traj, traj_z = text_toy
    settings = NullTextSettings(guidance=7.5, inner_steps=10, epsilon=1e-5, keep_best=False)
    runs: dict[int, int] = {}
    with torch.enable_grad():
        nulls, counts, rec = null_text_optimize(text_eps, [t.clone() for t in traj], sigmas, cond, null, settings,
                                                on_inner=lambda i, j, v: runs.__setitem__(i, j + 1))
    official, z_end, iters = official_null_optimization(text_unet, traj_z, sigmas, cond, null, 7.5, 10, 1e-5)
    assert [runs[i] for i in range(len(iters))] == iters
    assert counts["inner_steps"] == counts["backward"] == sum(iters)
    assert counts["forward"] == sum(2 + n for n in iters)          # e_cond, each inner step, the guided step
    assert 10 in iters and min(iters) < 10              # the early stop fires at some steps, not at all
    for i, (ours, theirs) in enumerate(zip(nulls, official)):
        assert torch.allclose(ours, theirs, atol=1e-10), i
    assert torch.allclose(rec, z_end, atol=1e-10)                        # last sigma 0: x = z
    assert (rec - x0).abs().max() < 0.05                                   # and it does reconstruct


def test_null_text_optimization_through_a_guide_that_reads_the_prompt(text_toy):
    """NullTextInvert hands ``null_text_optimize`` ComfyUI's guide, which evaluates the prompt's row from the context
    it is given (``calc_cond_batch``), not from a precomputed eps: the optimization and the guided steps must give
    it the source prompt and use it in place of the default CFG (here its own guidance 5, the settings' 7.5 unused):
    the notebook's loop at guidance 5."""
    sigmas, x0, cond, null, traj, traj_z = text_toy

    def guide(x, sig, c, e_cond, u):
        e_u = text_eps(x, sig, u)
        return e_u + 5.0 * (text_eps(x, sig, c) - e_u)
    settings = NullTextSettings(guidance=7.5, inner_steps=4, epsilon=None)
    with torch.enable_grad():
        nulls, _, rec = null_text_optimize(text_eps, [t.clone() for t in traj], sigmas, cond, null, settings,
                                           guide=guide)
    official, z_end, _ = official_null_optimization(text_unet, traj_z, sigmas, cond, null, 5.0, 4, None)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(nulls, official))
    assert torch.allclose(rec, z_end, atol=1e-10)
    best = NullTextSettings(guidance=7.5, inner_steps=4, lr=0.3, epsilon=None, keep_best=True)   # its last check too
    with torch.enable_grad():
        nulls, _, rec = null_text_optimize(text_eps, [t.clone() for t in traj], sigmas, cond, null, best, guide=guide)
    official, z_end, _ = official_null_optimization(text_unet, traj_z, sigmas, cond, null, 5.0, 4, None, lr=0.3,
                                                    keep_best=True)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(nulls, official))


def test_keep_best_null_returns_the_lowest_loss_evaluated(text_toy):
    """The option keep_best_null (not upstream): per step the null of the lowest loss among those Adam evaluated
    (the starting one included) and the last one, the last on a tie; one more UNet evaluation per step. A
    bf16 null is optimized in float32."""
    from attention.inversion import optimize_null
    sigmas, x0, cond, null, traj, traj_z = text_toy
    i, sig, sig_next = 2, sigmas[2], sigmas[3]
    a_cur, a_prev = alphabar(sig), alphabar(sig_next)
    t = sigma_to_t(sig.reshape(1))
    x, z = traj[i], traj_z[i]
    with torch.no_grad():
        e_c = text_eps(x, sig, cond)

    def loss_of(u):
        e_u = text_unet(z, t, u)
        return F.mse_loss(official_prev_step(e_u + 7.5 * (e_c - e_u), a_cur, a_prev, z), traj_z[i + 1])
    picked_last = []
    for lr in (3e-3, 1e-2, 0.3):           # the last null is best; an earlier one; the start (Adam overshoots)
        u = null.clone().requires_grad_(True)
        opt = torch.optim.Adam([u], lr=lr)
        seen = []
        for _ in range(5):
            loss = loss_of(u)
            seen.append((loss.item(), u.detach().clone()))
            opt.zero_grad()
            loss.backward()
            opt.step()
        last = loss_of(u).item()
        best = min(range(5), key=lambda j: (seen[j][0], j))
        want = u.detach() if last <= seen[best][0] else seen[best][1]
        with torch.enable_grad():
            got, done = optimize_null(text_eps, x, sig, sig_next, e_c, traj[i + 1], null, 7.5, lr, 5, None,
                                      keep_best=True)
            plain, _ = optimize_null(text_eps, x, sig, sig_next, e_c, traj[i + 1], null, 7.5, lr, 5, None)
        assert done == 5 and torch.allclose(got, want, atol=1e-10) and torch.allclose(plain, u.detach(), atol=1e-10)
        picked_last.append(bool(torch.equal(got, plain)))
    assert picked_last == [True, False, False]
    with torch.enable_grad():
        low, _ = optimize_null(lambda x_, s_, c_: text_eps(x_, s_, c_.double()).float(), x.float(), sig.float(),
                               sig_next.float(), e_c.float(), traj[i + 1].float(), null.bfloat16(), 7.5, 1e-2, 2, None)
    assert low.dtype == torch.float32
    with torch.enable_grad():
        best, counts, _ = null_text_optimize(text_eps, [t_.clone() for t_ in traj], sigmas, cond, null,
                                             NullTextSettings(guidance=7.5, keep_best=True))
        last, _, _ = null_text_optimize(text_eps, [t_.clone() for t_ in traj], sigmas, cond, null,
                                        NullTextSettings(guidance=7.5))
        _, no_stop, _ = null_text_optimize(text_eps, [t_.clone() for t_ in traj], sigmas, cond, null,
                                           NullTextSettings(guidance=7.5, inner_steps=2, epsilon=None))
    assert counts["forward"] == 3 * (len(sigmas) - 1) + counts["inner_steps"]        # one more per step
    assert any(not torch.equal(a, b) for a, b in zip(best, last))                   # the option is passed on
    assert no_stop["inner_steps"] == 2 * (len(sigmas) - 1)                           # epsilon None: no early stop


# ----------------------------------------------------------------------------- 3. DPL's null text, restarted
def _dpl(toy, settings, eps=comfy_eps, traj=None):
    sigmas, x0, cond, null = toy[:4]
    traj = ddim_invert(eps, x0, sigmas, cond) if traj is None else traj
    with torch.enable_grad():
        return dpl_invert(eps, lambda p: p[0], [cond.clone()], CrossMapRecorder((4, 4)), traj, sigmas,
                          [(1,), (2,)], None, null, settings), traj


def test_dpl_null_text_restarts_from_the_empty_prompt_each_step(text_toy):
    """DPL ``__call__`` part 2 with every loss weight 0: each step re-encodes "" (the null restarts), a fresh
    Adam for all ``inner`` iterations (no early stop), then the guided step; the option null_carry_over is
    Null-Text Inversion's rule, the same official loop with the null carried over."""
    sigmas, x0, cond, null, traj, traj_z = text_toy
    s = dataclasses.replace(DPL_SH, lam_at=0.0, lam_bg=0.0, lam_dj=0.0,
                            null=NullTextSettings(guidance=7.5, inner_steps=4, epsilon=None))
    res, _ = _dpl(text_toy, s, text_eps, traj)
    nulls, z_end, _ = official_null_optimization(text_unet, traj_z, sigmas, cond, null, 7.5, 4, None, restart=True)
    for ours, theirs in zip(res.nulls, nulls):
        assert torch.allclose(ours, theirs, atol=1e-10)
    assert torch.allclose(res.reconstruction, z_end, atol=1e-10)          # last sigma 0: x = z
    assert res.counts["null_iters"] == 4 * (len(sigmas) - 1)
    # the options null_start = previous step and null_early_stop (NTI's 1e-5): the notebook's loop exactly
    nti_rule = dataclasses.replace(s, null_carry_over=True,
                                   null=NullTextSettings(guidance=7.5, inner_steps=10, epsilon=1e-5))
    carried, _ = _dpl(text_toy, nti_rule, text_eps, traj)
    nti, z_nti, iters = official_null_optimization(text_unet, traj_z, sigmas, cond, null, 7.5, 10, 1e-5)
    assert carried.counts["null_iters"] == sum(iters) < 10 * len(iters)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(carried.nulls, nti))
    assert torch.allclose(carried.reconstruction, z_nti, atol=1e-10)
    assert (carried.nulls[-1] - res.nulls[-1]).abs().max() > 1e-4         # the two rules differ here


def test_dpl_keep_best_null_option_returns_each_steps_best_null(text_toy):
    """DPLTokenOptimizer's keep_best_null (not upstream) in ``dpl_invert``: per step the null of the lowest loss
    evaluated (restarted from "" as DPL), one more UNet evaluation per step in the counts; with Adam overshooting
    (lr 0.3) it picks an earlier null at some steps, so the option reaches the loop (mutants ``dpl_invert`` 212,
    241 of issue 26's run)."""
    sigmas, x0, cond, null, traj, traj_z = text_toy
    settings = NullTextSettings(guidance=7.5, inner_steps=4, lr=0.3, epsilon=None, keep_best=True)
    s = dataclasses.replace(DPL_SH, lam_at=0.0, lam_bg=0.0, lam_dj=0.0, null=settings)
    res, _ = _dpl(text_toy, s, text_eps, traj)
    nulls, z_end, _ = official_null_optimization(text_unet, traj_z, sigmas, cond, null, 7.5, 4, None, restart=True,
                                                 lr=0.3, keep_best=True)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(res.nulls, nulls))
    assert torch.allclose(res.reconstruction, z_end, atol=1e-10)
    steps = len(sigmas) - 1
    assert res.counts["forward"] == (2 + 4 + 1) * steps and res.counts["null_iters"] == 4 * steps
    last, _ = _dpl(text_toy, dataclasses.replace(s, null=dataclasses.replace(settings, keep_best=False)), text_eps,
                   traj)
    assert last.counts["forward"] == (2 + 4) * steps
    assert any(not torch.allclose(a, b) for a, b in zip(res.nulls, last.nulls))     # an earlier null was kept


def test_one_token_iteration_makes_no_update_as_upstream(toy):
    """Upstream runs the token loop only ``if attn_inner_steps > 1``."""
    res, _ = _dpl(toy, dataclasses.replace(DPL_SH, attn_iters=1,
                                           null=NullTextSettings(guidance=7.5, inner_steps=1, epsilon=None)))
    assert res.counts["token_updates"] == 0 and all(m is None for m in res.maps)
    assert all(loss[:3] == (0.0, 0.0, 0.0) for loss in res.losses)             # no loss was computed
    assert all(torch.equal(p[0], toy[2]) for p in res.params)
