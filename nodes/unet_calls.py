"""Helpers around the model for our loops: gradients through inference-mode weights, text contexts.

Every model evaluation goes through ComfyUI's sampler (``guided.py``); nothing here calls the model. ComfyUI runs
every node under ``torch.inference_mode`` with inference-tensor weights; the null-text and DPL optimizations
need gradients with respect to the text context, so ``autograd_safe`` temporarily swaps a module's inference
tensors for normal copies (../shared/comfyui-notes.md section 6, fix 1) and always restores them.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch


@contextmanager
def autograd_safe(module: torch.nn.Module):
    """Inside: gradients flow through ``module`` (its weights stay frozen). Restored on exit."""
    swapped = []
    with torch.inference_mode(False):
        try:
            for mod in module.modules():
                for store in ("_parameters", "_buffers"):
                    table = getattr(mod, store)
                    for name, t in list(table.items()):
                        if t is not None and t.is_inference():
                            copy = t.clone()
                            table[name] = torch.nn.Parameter(copy, requires_grad=False) if store == "_parameters" \
                                else copy
                            swapped.append((table, name, t))
            with torch.enable_grad():
                yield
        finally:
            for table, name, t in reversed(swapped):
                table[name] = t


def fit_context(context: torch.Tensor, length: int) -> torch.Tensor:
    """A (1, m, d) text context repeated to ``length`` tokens, a multiple of m (an empty prompt next to a long
    one). Repeating a whole context leaves attention unchanged, which is how ComfyUI batches contexts of
    different lengths; cutting would not, so a length that is not a multiple is refused."""
    if context.shape[1] == length:
        return context
    if length % context.shape[1]:
        raise ValueError(f"cannot repeat a {context.shape[1]}-token context to {length} tokens")
    return context.repeat(1, length // context.shape[1], 1)


def common_length(contexts: list[torch.Tensor]) -> int:
    """The token count every context repeats to when batched together (their least common multiple, as
    ComfyUI's CONDCrossAttn.concat): a negative longer than the prompts keeps all its chunks."""
    return math.lcm(*(int(c.shape[1]) for c in contexts))
