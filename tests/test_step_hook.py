"""Tier 1: StepBoundaryHook runs an after-step hook on any sampler's state (attention/sampling.py)."""

import torch

from attention.sampling import StepBoundaryHook, sample_euler


def toy_denoiser(x, sigma):
    """A smooth x0 prediction that depends on the state and the sigma (rows independent)."""
    return torch.tanh(x * 0.3) * (1 + 0.1 * sigma.view(-1, 1, 1, 1))


def blend(i, x):
    """A LocalBlend-like hook: row 1 takes row 0 outside the left half from step 2 on."""
    if i < 2:
        return x
    m = torch.zeros_like(x[:1])
    m[..., :2] = 1
    return x[:1] + torch.cat([torch.ones_like(m), m]) * (x - x[:1])


def k_euler(model, x, sigmas):
    """k-diffusion's Euler sampler, as a ComfyUI sampler function calls the model (our words)."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * x.new_ones(x.shape[0]))
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x


def sigmas_and_x():
    g = torch.Generator().manual_seed(0)
    sig = torch.tensor([14.6, 6.0, 2.5, 1.0, 0.4, 0.0])
    x = torch.randn(1, 2, 4, 4, generator=g).expand(2, -1, -1, -1).clone() * sig[0]
    x[1, :, :, 3] += 3.0                              # the rows differ from the start
    return sig, x


def test_hooked_sampler_equals_our_loop_with_after_step():
    sig, x = sigmas_and_x()
    ours = sample_euler(toy_denoiser, x.clone(), sig, blend)
    hooked = StepBoundaryHook(toy_denoiser, sig, blend)
    theirs = hooked.finish(k_euler(hooked, x.clone(), sig))
    assert torch.allclose(ours, theirs, atol=1e-6)
    plain = k_euler(toy_denoiser, x.clone(), sig)
    assert not torch.allclose(plain, theirs, atol=1e-3)      # the hook did something


def test_hook_runs_once_per_step_and_on_the_final_sample_when_the_model_never_sees_the_state():
    sig, x = sigmas_and_x()
    seen = []

    def record(i, x_):
        seen.append(i)
        return blend(i, x_)
    hooked = StepBoundaryHook(toy_denoiser, sig, record)

    def rescaling_sampler(model, x, sigmas):            # the model sees a copy (UniPC-like)
        for i in range(len(sigmas) - 1):
            denoised = model(x * 1.0, sigmas[i] * x.new_ones(x.shape[0]))
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        return x
    out = hooked.finish(rescaling_sampler(hooked, x.clone(), sig))
    assert seen == list(range(len(sig) - 1))             # every step's hook once, in order
    outside = torch.zeros_like(out[0], dtype=torch.bool)
    outside[..., 2:] = True
    assert torch.equal(out[1][outside], out[0][outside])  # the final sample is blended


def test_wrapped_denoiser_attributes_stay_readable():
    class Den:
        inner_model = "inner"

        def __call__(self, x, sigma):
            return x
    assert StepBoundaryHook(Den(), torch.tensor([1.0, 0.0]), blend).inner_model == "inner"
