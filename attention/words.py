"""How the pack matches the words a user types to the tokens of a prompt: the one rule of every node.

Every option that names words (P2P blend/reweight/cross-replace words, Attention Map View, Self-Attention
Cluster, prompt mixing's object/preserve words, DPL nouns, StructureDiffusion phrases, grounding words) goes
through ``PromptWords``:

1. **Emphasis.** The prompt is split the way ComfyUI's tokenizer weights it (``comfy/sd1_clip.py``
   ``token_weights``, ``escape_important``; GPL-3.0 ComfyUI, re-implemented here and tested equal against it
   in tier 2): ``(word:1.2)``, ``(word)`` (x1.1), nested ``((word))``, ``\\(`` / ``\\)`` literal
   parentheses. Weights never move tokens, so the words inside are matched. ``[word]`` is plain text to
   ComfyUI (no de-emphasis); its brackets are punctuation and the word inside matches.
2. **Words.** Each weighted segment is split into words (letters/digits, inner ``'`` and ``-`` kept:
   ``don't``, ``red-haired``); punctuation belongs to no word. A textual inversion ``embedding:name`` is one
   word, as ComfyUI's tokenizer reads it (``comfy/sd1_clip.py`` ``tokenize_with_weights``: the identifier at the
   start of a segment or after a space or newline, the name up to the next space, trailing commas dropped):
   its token ids are its vectors (-1 each), so it owns exactly the key positions of its vectors; an embedding
   the tokenizer did not find has no tokens and is no word of the prompt. Each word is tokenized alone and located in
   the prompt's tokens in order, so it owns all its tokens (multi-token words) and positions are global keys
   over every 77-token chunk (chunk ``c`` position ``p`` is key ``c * chunk_len + p``, as ComfyUI
   concatenates long prompts).
3. **Matching.** A user word or phrase is split the same way; it matches a run of consecutive prompt words
   with the same case-folded text ("Tiger" matches "tiger": for CLIP, which lower-cases, their ids are the same;
   for T5's case-sensitive SentencePiece pieces the prompt's own pieces, "▁Tiger", are the keys); never part of
   a word: "cat" does not match "bobcat" or "cats".
4. **Unknown words** raise ``WordNotInPromptError`` naming the word, what it was for and the prompt's words.
5. **Several text encoders in one context** (``ContextWords``): SD3 concatenates its CLIP-L/G part (77 tokens
   per chunk) and its T5 part along the token axis; a word's keys are its positions in each part, offset by
   where that part starts. A word found in no part is refused as in 4.

SentencePiece (T5): a word alone tokenizes as it does after a space in the prompt ("▁cat"); a word glued to the
preceding character ("cat,dog": "dog" without "▁") is not found and is refused by name, never mismatched.

Pure Python; the caller passes the prompt's token chunks and a ``word -> token ids`` function (ComfyUI's
tokenizers in ``nodes/common.py``, ShapesWorld's in ``attention/shapesworld``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

WordIdsFn = Callable[[str], list[int]]       # one word alone -> its token ids, no BOS/EOS/padding
EMBEDDING_PREFIX = "embedding:"              # ComfyUI's textual-inversion identifier (SDTokenizer)
EMBEDDING_WORD = r"(?:^|(?<=[ \n]))embedding:[^\s,]+"   # one word: the identifier and its name
_WORD = re.compile(EMBEDDING_WORD + r"|\w+(?:['\u2019-]\w+)*")
_LIT_OPEN, _LIT_CLOSE = "\0\2", "\0\1"        # escaped parentheses while parsing, as ComfyUI marks them


class WordNotInPromptError(ValueError):
    pass


# ---- emphasis (ComfyUI's weight syntax) ----------------------------------------------------------

def _top_level(text: str) -> list[str]:
    """Split into plain runs and top-level '(...)' groups (an unclosed '(' runs to the end)."""
    out, cur, depth = [], "", 0
    for ch in text:
        if ch == "(":
            if depth == 0 and cur:
                out.append(cur)
                cur = ""
            cur += ch
            depth += 1
        elif ch == ")":
            depth -= 1
            cur += ch
            if depth == 0:
                out.append(cur)
                cur = ""
        else:
            cur += ch
    if cur:
        out.append(cur)
    return out


def _segments(text: str, weight: float) -> list[tuple[str, float]]:
    out = []
    for part in _top_level(text):
        if len(part) >= 2 and part[0] == "(" and part[-1] == ")":
            inner, w = part[1:-1], weight * 1.1
            colon = inner.rfind(":")
            if colon > 0:
                try:
                    w = float(inner[colon + 1:])
                    inner = inner[:colon]
                except ValueError:
                    pass
            out += _segments(inner, w)
        else:
            out.append((part, weight))
    return out


def emphasis_segments(prompt: str) -> list[tuple[str, float]]:
    """``prompt`` as (text, weight) segments, parsed as ComfyUI's tokenizer parses it.

    'a (cat:1.2) and ((dog))' -> [('a ', 1.0), ('cat', 1.2), (' and ', 1.0), ('dog', 1.21)];
    '\\(' and '\\)' are literal parentheses in the text."""
    text = prompt.replace("\\)", _LIT_CLOSE).replace("\\(", _LIT_OPEN)
    return [(t.replace(_LIT_CLOSE, ")").replace(_LIT_OPEN, "("), w) for t, w in _segments(text, 1.0)]


def text_words(text: str) -> list[str]:
    """The words of a prompt or phrase as written, emphasis removed: 'A (Tiger:1.2), ok' -> ['A', 'Tiger', 'ok']."""
    return [w for seg, _ in emphasis_segments(text) for w in _WORD.findall(seg)]


def is_embedding(word: str) -> bool:
    """True for a textual-inversion word ``embedding:name``."""
    return word.startswith(EMBEDDING_PREFIX) and len(word) > len(EMBEDDING_PREFIX)


def split_word_list(text: str) -> list[str]:
    """'cat, red dog ,bicycle' -> ['cat', 'red dog', 'bicycle'] (phrases allowed)."""
    return [w.strip() for w in (text or "").split(",") if w.strip()]


def parse_word_values(text: str, what: str, example: str) -> dict[str, float]:
    """'word:1.5, red dog:-1' -> {'word': 1.5, 'red dog': -1.0}; an entry that is not 'word:number' is refused."""
    out = {}
    for part in split_word_list(text):
        m = re.fullmatch(r"(.+?)\s*:\s*(-?\d*\.?\d+)", part)
        if not m:
            raise ValueError(f"{what} entry {part!r} is not 'word:number'; write e.g. '{example}'")
        out[m.group(1).strip()] = float(m.group(2))
    return out


# ---- words of a tokenized prompt -------------------------------------------------------------------

@dataclass(frozen=True)
class Word:
    text: str                        # as written in the prompt, e.g. 'Tiger'
    ids: tuple[int, ...]             # token ids of the word alone
    positions: tuple[int, ...]       # its global key positions in the prompt


class _Lookup:
    """What every word list of a prompt answers: the positions of a phrase, or an error naming it."""

    prompt: str

    @property
    def names(self) -> list[str]:
        raise NotImplementedError

    def occurrences(self, phrase: str) -> list[tuple[int, ...]]:
        raise NotImplementedError

    def _error(self, phrase: str, what: str) -> WordNotInPromptError:
        return WordNotInPromptError(
            f"{what} {phrase!r} is not in the prompt {self.prompt!r}; its words are {self.names} (matched "
            f"ignoring case and (word:weight) emphasis, whole words only). Fix the word or the prompt.")

    def contains(self, phrase: str) -> bool:
        return bool(self.occurrences(phrase))

    def positions(self, phrase: str, what: str = "word", occurrence: int | None = None) -> tuple[int, ...]:
        """Key positions of ``phrase`` (all occurrences, or the ``occurrence``-th, 0-based).

        Raises ``WordNotInPromptError`` naming the phrase, ``what`` it is for and the prompt's words."""
        if not text_words(phrase):
            raise WordNotInPromptError(f"{what} {phrase!r} has no word in it; give a word of the prompt "
                                       f"{self.names}")
        occ = self.occurrences(phrase)
        if not occ:
            raise self._error(phrase, what)
        if occurrence is not None:
            if not 0 <= occurrence < len(occ):
                raise WordNotInPromptError(
                    f"{what} {phrase!r} occurs {len(occ)} time(s) in the prompt; occurrence {occurrence} is out of "
                    f"range 0..{len(occ) - 1}")
            occ = [occ[occurrence]]
        return tuple(p for o in occ for p in o)


class PromptWords(_Lookup):
    """The words of one prompt with their token positions; ``positions``/``occurrences`` match user words.

    ``chunks``: the prompt's token ids per chunk as the model sees them (BOS, tokens, EOS, padding; a
    non-integer token such as an embedding vector as -1). ``word_ids``: a word alone -> its ids."""

    def __init__(self, prompt: str, chunks: list[list[int]], word_ids: WordIdsFn):
        self.prompt, self.chunks, self._word_ids = prompt, [list(c) for c in chunks], word_ids
        self._cache: dict[str, tuple[int, ...]] = {}
        flat = [t for c in self.chunks for t in c]
        words, cursor = [], 0
        for w in text_words(prompt):
            ids = self.ids(w)
            n = len(ids)
            hit = next((p for p in range(cursor, len(flat) - n + 1) if n and tuple(flat[p:p + n]) == ids), None)
            if hit is None:       # e.g. an 'embedding:name' (vectors, not ids): it cannot be matched
                continue
            words.append(Word(w, ids, tuple(range(hit, hit + n))))
            cursor = hit + n
        self.words = words

    def ids(self, word: str) -> tuple[int, ...]:
        if word not in self._cache:
            self._cache[word] = tuple(self._word_ids(word))
        return self._cache[word]

    @property
    def names(self) -> list[str]:
        return [w.text for w in self.words]

    def occurrences(self, phrase: str) -> list[tuple[int, ...]]:
        """Key positions of every occurrence of ``phrase`` (one or more words), in order; [] when absent."""
        want = [w.casefold() for w in text_words(phrase)]
        if not want or any(not self.ids(w) for w in text_words(phrase)):
            return []
        n, out = len(want), []
        for i in range(len(self.words) - n + 1):
            run = self.words[i:i + n]
            if all(w.text.casefold() == t for w, t in zip(run, want)):
                out.append(tuple(p for w in run for p in w.positions))
        return out


class ContextWords(_Lookup):
    """The words of one prompt over a context made of several encoders' parts: ``parts`` are (the part's
    ``PromptWords``, the key offset where the part starts). Same interface as ``PromptWords``; an occurrence's
    positions are its keys in every part."""

    def __init__(self, prompt: str, parts: list[tuple[PromptWords, int]]):
        self.prompt, self.parts = prompt, list(parts)

    @property
    def names(self) -> list[str]:
        return max((pw.names for pw, _ in self.parts), key=len, default=[])

    def occurrences(self, phrase: str) -> list[tuple[int, ...]]:
        """Per occurrence (the most any part has), its keys in every part that has that occurrence."""
        per_part = [[tuple(p + off for p in o) for o in pw.occurrences(phrase)] for pw, off in self.parts]
        n = max((len(o) for o in per_part), default=0)
        return [tuple(sorted(p for occ in per_part if i < len(occ) for p in occ[i])) for i in range(n)]


def locate_words(pw: PromptWords | ContextWords, words_text: str,
                 what: str = "word") -> tuple[list[str], list[tuple[int, ...]]]:
    """The words/phrases of a comma-separated list and their key positions in ``pw``'s prompt."""
    names = split_word_list(words_text)
    if not names:
        raise ValueError(f"no {what}s given ({words_text!r}); write words of the prompt, comma separated, "
                         f"e.g. 'cat, bicycle' (the prompt's words: {pw.names})")
    return names, [pw.positions(n, what) for n in names]
