"""Sample comparisons for tests of both tiers: relative to the samples' scale, never absolute."""


def rel(a, b):
    """Largest difference relative to the largest value (the tiny random models' latents are ~100)."""
    return float((a - b).abs().max() / b.abs().max())


# Samples of one computation done in another float order (batching, splitting, another loop) agree to about
# 1e-7 of their scale in float32; this bound leaves room for a loaded machine's other kernels, not for a bug.
SAME_SAMPLES = 1e-5


def assert_same_samples(a, b, tol=SAME_SAMPLES):
    """``a`` equals ``b`` relative to ``b``'s scale (an absolute tolerance fails on float order alone)."""
    r = rel(a, b)
    assert r < tol, f"samples differ by {r:.2e} of their scale (max |b| {float(b.abs().max()):.3g}), over {tol:g}"
