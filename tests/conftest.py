"""Test setup: the repo root on sys.path; tier-2 fixtures find ComfyUI through COMFYUI_PATH."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))
