"""ShapesWorld tokenizer and text encoder (plain torch).

The tokenizer is word level with CLIP's layout: ``[BOS, words..., EOS, PAD...]`` padded
to ``CONTEXT`` tokens, so word positions are found the same way as for SD's CLIP.
ComfyUI's weight syntax ``(word:1.2)`` is accepted: the weight is returned per token.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .world import BACKGROUNDS, COLOURS, SHAPES

CONTEXT = 24
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
WORDS = sorted(set(["a", "an", "and", "on", "background", ",", "the", "with", "of", "image", "photo"]
                   + list(SHAPES) + list(COLOURS) + list(BACKGROUNDS)))
VOCAB = SPECIALS + WORDS
PAD, BOS, EOS, UNK = 0, 1, 2, 3
_TOKEN = re.compile(r"[a-z]+|,")
_SEGMENT = re.compile(r"\(([^()]*?):\s*(-?\d*\.?\d+)\s*\)|\(([^():]*)\)")


class ShapesTokenizer:
    vocab = VOCAB
    context = CONTEXT
    index = {w: i for i, w in enumerate(VOCAB)}

    def word_ids(self, text: str) -> list[int]:
        """Ids of the words of ``text``, no specials (unknown words map to <unk>)."""
        return [self.index.get(w, UNK) for w in _TOKEN.findall(text.lower())]

    def weighted_ids(self, text: str) -> list[tuple[int, float]]:
        """Ids with ComfyUI-style weights: '(red circle:1.3)' weights both words, '(x)' is 1.1."""
        out: list[tuple[int, float]] = []
        pos = 0
        for m in _SEGMENT.finditer(text):
            out += [(i, 1.0) for i in self.word_ids(text[pos:m.start()])]
            if m.group(1) is not None:
                out += [(i, float(m.group(2))) for i in self.word_ids(m.group(1))]
            else:
                out += [(i, 1.1) for i in self.word_ids(m.group(3))]
            pos = m.end()
        out += [(i, 1.0) for i in self.word_ids(text[pos:])]
        return out

    def chunks(self, text: str) -> list[list[tuple[int, float]]]:
        """CLIP-like chunks of ``CONTEXT`` tokens: BOS, up to CONTEXT-2 words, EOS, padding."""
        ids = self.weighted_ids(text)
        step = CONTEXT - 2
        pieces = [ids[i:i + step] for i in range(0, len(ids), step)] or [[]]
        out = []
        for piece in pieces:
            chunk = [(BOS, 1.0)] + piece + [(EOS, 1.0)]
            chunk += [(PAD, 1.0)] * (CONTEXT - len(chunk))
            out.append(chunk)
        return out

    def encode_batch(self, texts: list[str]) -> torch.Tensor:
        """(B, CONTEXT) ids of the first chunk of each text (training and the demo)."""
        return torch.tensor([[t for t, _ in self.chunks(x)[0]] for x in texts], dtype=torch.long)


class TextEncoder(nn.Module):
    """A small causal transformer, CLIP style: token + position embedding, pre-LN blocks."""

    def __init__(self, width: int = 128, layers: int = 3, heads: int = 4, vocab: int = len(VOCAB),
                 context: int = CONTEXT):
        super().__init__()
        self.width, self.context = width, context
        self.token_embedding = nn.Embedding(vocab, width)
        self.position_embedding = nn.Parameter(torch.zeros(context, width))
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.01)
        self.register_buffer("causal", torch.triu(torch.full((context, context), float("-inf")), 1),
                             persistent=False)

    def forward_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, L, width) token embeddings (before the transformer) -> (B, L, width) context."""
        n = embeddings.shape[1]
        x = embeddings + self.position_embedding[:n]
        x = self.blocks(x, mask=self.causal[:n, :n], is_causal=True)
        return self.final_norm(x)

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding table (the layer learnable-token methods such as DPL splice into)."""
        return self.token_embedding

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.forward_embeddings(self.token_embedding(ids))
