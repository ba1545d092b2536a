"""Sample comparisons for tests of both tiers: relative to the samples' scale, never absolute."""

import os


def rel(a, b):
    """Largest difference relative to the largest value (the tiny random models' latents are ~100)."""
    return float((a - b).abs().max() / b.abs().max())


# Samples of one computation done in another float order (batching, splitting, another loop) agree to about
# 1e-7 of their scale in float32; this bound leaves room for a loaded machine's other kernels, not for a bug.
SAME_SAMPLES = 1e-5

# Tier 2 on a GPU (ATTENTION_LAB_COMFY_DEVICE=cuda; TF32 off, see comfy_env): cuBLAS/cuDNN pick kernels per batch
# size and shape, so the two ways of a comparison take different summation orders; measured on an H200: up to
# 2.7e-5 of the scale where the CPU stays under 1e-5. Every bound is widened by GPU_SLACK there, still orders of
# magnitude under what a wrong row, step or patch gives (1e-2 and up).
DEVICE_ENV = "ATTENTION_LAB_COMFY_DEVICE"


def requested_device() -> str:
    """ATTENTION_LAB_COMFY_DEVICE as given ("cpu" when unset or empty); comfy_env validates it."""
    return os.environ.get(DEVICE_ENV, "cpu").strip().lower() or "cpu"


ON_GPU = requested_device() == "cuda"
GPU_SLACK = 10.0


def bound(tol: float) -> float:
    """``tol`` on the CPU, ``tol * GPU_SLACK`` in a GPU run of tier 2."""
    return tol * GPU_SLACK if ON_GPU else tol


def assert_same_samples(a, b, tol=SAME_SAMPLES):
    """``a`` equals ``b`` relative to ``b``'s scale (an absolute tolerance fails on float order alone)."""
    r, tol = rel(a, b), bound(tol)
    assert r < tol, f"samples differ by {r:.2e} of their scale (max |b| {float(b.abs().max()):.3g}), over {tol:g}"
