"""Test setup: the repo root on sys.path; tier-2 fixtures find ComfyUI through COMFYUI_PATH."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402

# OMP_NUM_THREADS, when set, wins (the shared machine's rule; mutmut forks test processes, which a pool of
# intra-op threads would deadlock); else two threads at most.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="module")
def sd():
    """Tier 2: a tiny SD1.5 MODEL and CLIP (tests/comfy_env.py), made under inference mode as in ComfyUI's
    executor (the weights are inference tensors). One per test module."""
    from comfy_env import tiny_clip, tiny_sd15
    with torch.inference_mode():
        return tiny_sd15(), tiny_clip()


@pytest.fixture(scope="module")
def flux():
    """Tier 2: a tiny random guidance-distilled Flux MODEL and its CLIP (tests/comfy_env.py), under inference mode.
    Modules that need another Flux (no guidance embedding, tensors made outside inference mode) define their own."""
    from comfy_env import tiny_flux, tiny_flux_clip
    with torch.inference_mode():
        return tiny_flux(guidance_embed=True), tiny_flux_clip()


@pytest.fixture(scope="module")
def sd3():
    """Tier 2: a tiny random SD3 MODEL and its CLIP-L/G + T5 CLIP (tests/comfy_env.py), under inference mode."""
    from comfy_env import tiny_sd3, tiny_sd3_clip
    with torch.inference_mode():
        return tiny_sd3(), tiny_sd3_clip()
