"""Prompts whose noun tokens are learnable embeddings, encoded by ComfyUI's own CLIP (for DPL).

A ComfyUI token list entry whose first item is a tensor is spliced in as that token's input embedding
(``comfy/sd1_clip.py`` ``process_tokens``; ../shared/comfyui-notes.md section 5.4), so the learnable vectors
go through the real text transformer. ``autograd_safe_clip`` makes that differentiable inside a node: normal
copies of inference-mode weights, and an out-of-place forward on each ``CLIPLayer`` instance (the stock one
adds its residuals in place, which autograd refuses); both are undone on exit.

Shapes: per token key (SD1 'l', SDXL 'l' and 'g', ...) one tensor (S, d_key): S = all noun tokens in order.
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from dataclasses import dataclass

import comfy.clip_model
import torch

from ..attention.dpl import initializer_ids, kept_nouns
from ..attention.tokens import WordNotInPromptError
from .common import word_positions
from .unet_calls import autograd_safe


@dataclass
class NounTokens:
    """Where the nouns sit in a prompt and their learnable vectors."""

    nouns: list[str]
    positions: list[tuple[int, ...]]          # key positions per noun (global, chunk * chunk_len + index)
    keys: list[str]                           # token keys of the CLIP, e.g. ['g', 'l']


@dataclass
class DPLTokens:
    """What a DPL inversion carries for the editors: the learned vectors of every step."""

    nouns: list[str]
    counts: list[int]                         # tokens per noun
    keys: list[str]
    values: list[list[torch.Tensor]]          # per step, per key: (S, d_key)


def _table(clip, key: str) -> torch.nn.Module:
    holder = getattr(clip.cond_stage_model, f"clip_{key}", None)
    transformer = getattr(holder, "transformer", None)
    if transformer is None or not hasattr(transformer, "get_input_embeddings"):
        raise TypeError(f"cannot reach the token embedding table of this CLIP ({type(clip.cond_stage_model).__name__},"
                        f" token key {key!r}); DPL needs an SD1.x/SD2.x/SDXL CLIP or ShapesWorld's")
    return transformer.get_input_embeddings()


def _check_weights(tokens: dict, prompt: str) -> None:
    for chunks in tokens.values():
        if any(t[1] != 1.0 for c in chunks for t in c):
            raise ValueError(f"the prompt {prompt!r} uses (word:weight) emphasis; learnable tokens need plain "
                             f"weights (ComfyUI applies emphasis in place, which breaks gradients). Remove it.")


def locate(clip, prompt: str, nouns_text: str) -> NounTokens:
    """The nouns' token positions in ``prompt`` (errors name missing words)."""
    if not nouns_text.strip():
        raise ValueError("no nouns given: list the nouns of the prompt whose attention DPL should sharpen, comma "
                         "separated, e.g. 'cat, dog'")
    nouns, positions = word_positions(clip, prompt, nouns_text, "noun")
    tokens = clip.tokenize(prompt)
    _check_weights(tokens, prompt)
    return NounTokens(nouns, positions, sorted(tokens))


def _slots(tokens: dict, key: str, positions: list[int]) -> list[tuple[int, int]]:
    length = len(tokens[key][0])
    return [(p // length, p % length) for p in positions]


TOKEN_INITS = ("word-internal piece (official)", "prompt token")


def _bpe_vocab(clip, key: str) -> dict | None:
    """The BPE vocabulary (string -> id) behind token key ``key``, or None for word-level tokenizers."""
    holder = getattr(clip.tokenizer, f"clip_{key}", None)
    inner = getattr(holder, "tokenizer", None)
    return inner.get_vocab() if inner is not None and hasattr(inner, "get_vocab") else None


def initial_values(clip, prompt: str, nt: NounTokens, init: str = TOKEN_INITS[0]) -> list[torch.Tensor]:
    """Per key, (S, d) copies of the nouns' starting token embeddings (float32). ``init``: upstream's word-internal
    pieces (``attention.dpl.initializer_ids``; default) or the prompt's own tokens (this pack's earlier start).
    A textual inversion noun (``embedding:name``) starts from its own vectors under either init (upstream has
    no inversions; ours)."""
    if init not in TOKEN_INITS:
        raise ValueError(f"token init {init!r} is not one of {list(TOKEN_INITS)}")
    tokens = clip.tokenize(prompt)
    flat = [p for pos in nt.positions for p in pos]
    out = []
    for key in nt.keys:
        entries = [tokens[key][c][i][0] for c, i in _slots(tokens, key, flat)]
        ids = [t if isinstance(t, int) else -1 for t in entries]          # -1: an embedding vector
        if init == TOKEN_INITS[0]:
            ids = initializer_ids(ids, _bpe_vocab(clip, key))
        table = _table(clip, key)
        with torch.no_grad():
            rows = table.weight[torch.tensor([max(i, 0) for i in ids], device=table.weight.device)].detach()
            rows = rows.float().clone()
            for r, t in enumerate(entries):
                if not isinstance(t, int):
                    rows[r] = (t.get("data") if isinstance(t, dict) else t).reshape(-1).to(rows)
        out.append(rows)
    return out


def splice(clip, prompt: str, positions: list[tuple[int, ...]], keys: list[str], values: list[torch.Tensor]) -> dict:
    """``clip.tokenize(prompt)`` with the tokens at ``positions`` replaced by rows of ``values`` (per key)."""
    tokens = clip.tokenize(prompt)
    flat = [p for pos in positions for p in pos]
    for key, v in zip(keys, values):
        chunks = [list(c) for c in tokens[key]]
        for row, (c, i) in enumerate(_slots(tokens, key, flat)):
            chunks[c][i] = (v[row], 1.0) + tuple(chunks[c][i][2:])
        tokens[key] = chunks
    return tokens


def encode(clip, tokens: dict) -> torch.Tensor:
    """(1, m, d) context of a token dict, as CLIPTextEncode's."""
    return clip.encode_from_tokens(tokens)


def encode_with_learned(clip, prompt: str, learned: DPLTokens, step: int) -> torch.Tensor:
    """The context of ``prompt`` with the learned vectors of ``step`` for each noun it contains (a noun the
    edit replaced keeps its ordinary embedding), as the official editing script's placeholder tokens."""
    def find(k: int) -> tuple[int, ...]:
        try:
            return word_positions(clip, prompt, learned.nouns[k])[1][0]
        except WordNotInPromptError:
            return ()
    positions, sel = kept_nouns(learned.counts, find)
    if not positions:
        return encode(clip, clip.tokenize(prompt))
    values = [v[sel] for v in learned.values[step]]
    return encode(clip, splice(clip, prompt, positions, learned.keys, values))


def _out_of_place_forward(self, x, mask=None, optimized_attention=None):
    x = x + self.self_attn(self.layer_norm1(x), mask, optimized_attention)
    return x + self.mlp(self.layer_norm2(x))


@contextmanager
def autograd_safe_clip(clip):
    """Gradients flow through the CLIP's text model to spliced token vectors; everything restored on exit."""
    layers = [m for m in clip.cond_stage_model.modules() if isinstance(m, comfy.clip_model.CLIPLayer)]
    try:
        for m in layers:
            m.forward = types.MethodType(_out_of_place_forward, m)
        with autograd_safe(clip.cond_stage_model):
            yield
    finally:
        for m in layers:
            m.__dict__.pop("forward", None)
