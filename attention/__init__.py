"""Attention Lab core: pure torch/numpy attention control, no ComfyUI imports.

Everything in this package works on plain tensors and dictionaries, so it runs the
same way inside ComfyUI (through ``nodes/``) and outside it (the ShapesWorld demo,
the tests, the benchmarks).
"""

import logging

logger = logging.getLogger("attention_lab")
