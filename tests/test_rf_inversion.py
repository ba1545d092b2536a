"""Rectified-flow inversion (attention/rf_inversion.py): the ported update rules against FireFlow's official loops
written out here in our own words, and reconstruction on an exact flow field."""

from __future__ import annotations

import pytest
import torch

from attention.rf_inversion import SOLVERS, evaluations, rf_invert, rf_reconstruct, rf_solve, velocity_from_denoiser


def field(counter: list | None = None):
    """A nonlinear velocity field (x, t) -> v of x's shape, counting its calls."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 4, generator=g, dtype=torch.float64) * 0.3

    def v(x, t):
        if counter is not None:
            counter.append(float(t))
        return torch.tanh(torch.einsum("ij,bjhw->bihw", w, x)) * (1 + t) + torch.sin(3 * t) * x
    return v


def official_loop(model, img, timesteps: list[float], inverse: bool, strategy: str):
    """FireFlow's ``denoise`` / ``denoise_fireflow`` (src/flux/sampling.py at 98588a6), re-typed: the time list is
    reversed for an inversion; Euler moves by (t_prev - t_curr) * pred; FireFlow reuses the last midpoint velocity
    as the next step's starting one and moves by (t_prev - t_curr) * pred_mid."""
    if inverse:
        timesteps = timesteps[::-1]
    next_step_velocity = None
    for t_curr, t_prev in zip(timesteps[:-1], timesteps[1:]):
        if strategy == "reflow":
            img = img + (t_prev - t_curr) * model(img, torch.tensor(t_curr, dtype=img.dtype))
            continue
        if next_step_velocity is None:
            pred = model(img, torch.tensor(t_curr, dtype=img.dtype))
        else:
            pred = next_step_velocity
        img_mid = img + (t_prev - t_curr) / 2 * pred
        pred_mid = model(img_mid, torch.tensor(t_curr + (t_prev - t_curr) / 2, dtype=img.dtype))
        next_step_velocity = pred_mid
        img = img + (t_prev - t_curr) * pred_mid
    return img


def schedule(n: int) -> torch.Tensor:
    """Flux's shifted schedule (upstream get_schedule, mu 0.5 + shift): descending from 1 to 0, float64."""
    t = torch.linspace(1, 0, n + 1, dtype=torch.float64)
    mu = 0.8
    out = torch.zeros_like(t)
    out[:-1] = torch.exp(torch.tensor(mu)) / (torch.exp(torch.tensor(mu)) + (1 / t[:-1] - 1))
    return out


@pytest.mark.parametrize("solver,strategy", [("euler", "reflow"), ("fireflow", "fireflow")])
@pytest.mark.parametrize("inverse", [True, False])
def test_update_rules_equal_the_official_loops(solver, strategy, inverse):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 3, 5, generator=g, dtype=torch.float64)
    sig = schedule(7)
    ours = (rf_invert(field(), x, sig, solver)[0] if inverse else rf_reconstruct(field(), x, sig, solver))
    theirs = official_loop(field(), x, sig.tolist(), inverse, strategy)
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-12), float((ours - theirs).abs().max())


@pytest.mark.parametrize("solver", SOLVERS)
def test_evaluation_count_is_the_official_one(solver):
    calls: list = []
    rf_solve(field(calls), torch.zeros(1, 4, 2, 2, dtype=torch.float64), schedule(6), solver)
    assert len(calls) == evaluations(solver, 6) == (6 if solver == "euler" else 7)


def test_trajectory_is_in_sampling_order():
    x = torch.randn(1, 4, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    sig = schedule(5)
    traj = rf_invert(field(), x, sig, "fireflow")
    assert len(traj) == 6 and torch.equal(traj[-1], x)
    assert torch.allclose(rf_solve(field(), x, sig.flip(0), "fireflow")[-1], traj[0], atol=0, rtol=0)


def test_velocity_from_denoiser_is_the_const_velocity_and_floors_sigma_zero():
    g = torch.Generator().manual_seed(3)
    x0_true, v_true = torch.randn(1, 4, 2, 2, generator=g), torch.randn(1, 4, 2, 2, generator=g)
    seen = []

    def denoiser(x, s):            # a CONST model predicting v_true: x0 = x - sigma * v
        seen.append(float(s.reshape(-1)[0]))
        return x - s.view(-1, 1, 1, 1) * v_true
    v = velocity_from_denoiser(denoiser, 1e-3)
    assert torch.allclose(v(x0_true, torch.tensor(0.4)), v_true, atol=1e-5)
    assert torch.allclose(v(x0_true, torch.tensor(0.0)), v_true, atol=1e-2)
    assert seen == pytest.approx([0.4, 1e-3])
    with pytest.raises(ValueError, match="sigma_floor is 0"):
        velocity_from_denoiser(denoiser, 0.0)


def gaussian_flow(mu: torch.Tensor, s: float):
    """The exact rectified-flow velocity of data N(mu, s^2 I) against N(0, I) noise, x_t = (1 - t) x0 + t n:
    v = E[n - x0 | x_t], linear in x, nonlinear in t."""
    def v(x, t):
        t = torch.as_tensor(t, dtype=x.dtype)
        var = (1 - t) ** 2 * s * s + t * t
        r = x - (1 - t) * mu
        return t / var * r - (mu + (1 - t) * s * s / var * r)
    return v


def test_inversion_reconstructs_and_fireflow_beats_euler_at_equal_evaluations():
    g = torch.Generator().manual_seed(4)
    mu = torch.randn(1, 4, 6, 10, generator=g, dtype=torch.float64)    # non-square
    x0 = mu + 0.5 * torch.randn(1, 4, 6, 10, generator=g, dtype=torch.float64)
    v = gaussian_flow(mu, 0.5)
    err = {}
    for solver, steps in [("euler", 9), ("fireflow", 8)]:           # 9 evaluations each way
        assert evaluations(solver, steps) == 9
        sig = schedule(steps)
        traj = rf_invert(v, x0, sig, solver)
        err[solver] = float((rf_reconstruct(v, traj[0], sig, solver) - x0).abs().max())
    assert err["fireflow"] < err["euler"] / 4, err
    many = schedule(200)
    rec = rf_reconstruct(v, rf_invert(v, x0, many, "fireflow")[0], many, "fireflow")
    assert float((rec - x0).abs().max()) < 1e-3


def test_unknown_solver_is_refused_by_name():
    with pytest.raises(ValueError, match="'heun' is not one of"):
        rf_solve(field(), torch.zeros(1, 4, 1, 1), schedule(2), "heun")
