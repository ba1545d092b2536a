"""Words of the grounding nodes: one text line per image, a word's token positions, word query embeddings."""

from __future__ import annotations

import torch

from ..attention.grounding import template_text, word_query
from ..attention.words import text_words
from .common import encode_prompt, prompt_words, token_key, word_ids


def lines_per_image(text: str, count: int, what: str) -> list[str]:
    """One line per image, or one line for all ``count`` images."""
    lines = [ln.strip() for ln in (text or "").strip().splitlines()]
    if len(lines) == 1:
        return lines * count
    if len(lines) != count:
        raise ValueError(f"{len(lines)} lines of {what} for {count} images; give one line for all images or "
                         f"exactly one line per image")
    return lines


def check_word_known(clip, word: str, key: str) -> list[int]:
    """Token ids of ``word``; raises when the tokenizer drops it or maps it to an unknown token."""
    ids = word_ids(clip, word, key)
    if not ids:
        raise ValueError(f"word {word!r} tokenizes to nothing (the tokenizer drops it); use a word the text "
                         "encoder knows")
    try:
        names = [str(n) for _, n in clip.tokenizer.untokenize([(i, 1.0) for i in ids])]
    except Exception:  # noqa: BLE001 - a tokenizer without untokenize: nothing more to check
        names = []
    if any("<unk>" in n or "<|unk" in n for n in names):
        raise ValueError(f"word {word!r} is not in the text encoder's vocabulary (it becomes an unknown token); "
                         "use a word the text encoder knows")
    return ids


def positions_in(clip, prompt: str, word: str) -> tuple[int, ...]:
    """Key positions of ``word`` (every occurrence) in ``prompt`` by the pack's one word rule
    (``attention/words.py``: whole words, case as the tokenizer sees it, emphasis, ``embedding:name`` as one
    word); a word the tokenizer drops or does not know is refused first, naming the prompt's words."""
    pw = prompt_words(clip, prompt)
    try:
        check_word_known(clip, word, token_key(clip))
    except ValueError as e:   # name the words the user can pick from
        raise ValueError(f"{e}; the prompt {prompt!r} has the words {text_words(prompt)}") from None
    return pw.positions(word, "word")


class QueryEncoder:
    """Word query embeddings (T,) from a CLIP, cached: 'prompt' = the word's states in its prompt (ours),
    'template' = the word's states in the template prompt (upstream: "a photograph of a {word}")."""

    def __init__(self, clip, mode: str, template: str):
        self.clip, self.mode, self.template = clip, mode, template
        self._states: dict[str, torch.Tensor] = {}
        self._queries: dict[tuple[str, str], torch.Tensor] = {}

    def states(self, text: str) -> torch.Tensor:
        if text not in self._states:
            self._states[text] = encode_prompt(self.clip, text)[0][0][0].float().cpu()   # (L, T)
        return self._states[text]

    def __call__(self, prompt: str, word: str) -> torch.Tensor:
        text = template_text(word, self.template) if self.mode == "template" else prompt
        key = (text, word)
        if key not in self._queries:
            self._queries[key] = word_query(self.states(text), positions_in(self.clip, text, word))
        return self._queries[key]
