"""Test setup: the repo root on sys.path; tier-2 fixtures find ComfyUI through COMFYUI_PATH."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

# OMP_NUM_THREADS, when set, wins (the shared machine's rule; mutmut forks test processes, which a pool of
# intra-op threads would deadlock); else two threads at most.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or min(2, os.cpu_count() or 1)))
