"""Raw token-subsequence search in a tokenized prompt (the words a user types go through ``words.py``).

The caller supplies the prompt's token chunks (e.g. ComfyUI's ``clip.tokenize(prompt)``,
one list of ids per 77-token chunk, BOS first) and the ids of the word alone without
special tokens. Positions are global key indices: chunk ``c`` position ``p`` is key
``c * chunk_len + p``, which is how ComfyUI concatenates long prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

from .words import WordNotInPromptError, split_word_list, text_words

__all__ = ["WordNotInPromptError", "WordTokens", "find_subsequence", "find_word_tokens", "plain_prompt_words",
           "split_words"]


@dataclass(frozen=True)
class WordTokens:
    word: str
    positions: tuple[int, ...]      # every key index of every occurrence, in order
    occurrences: tuple[tuple[int, ...], ...]  # positions grouped by occurrence


split_words = split_word_list


def plain_prompt_words(prompt: str) -> list[str]:
    """The words of a prompt, lower-cased, with ComfyUI's weight syntax '(word:1.2)' and escapes removed."""
    return [w.lower() for w in text_words(prompt)]


def find_subsequence(chunk: list[int], needle: list[int]) -> list[int]:
    n = len(needle)
    return [i for i in range(len(chunk) - n + 1) if chunk[i:i + n] == needle]


def find_word_tokens(prompt_chunks: list[list[int]], word_ids: list[int], word: str,
                     prompt: str, occurrence: int | None = None) -> WordTokens:
    """Positions of ``word`` (already tokenized as ``word_ids``) in the prompt's chunks.

    ``occurrence`` (0-based) picks one of several occurrences; None keeps all of them.
    Raises ``WordNotInPromptError`` that lists the prompt's words.
    """
    if not word_ids:
        raise WordNotInPromptError(f"word {word!r} tokenizes to nothing; give a word of the prompt "
                                   f"{plain_prompt_words(prompt)}")
    occ: list[tuple[int, ...]] = []
    offset = 0
    for chunk in prompt_chunks:
        for start in find_subsequence(list(chunk), list(word_ids)):
            occ.append(tuple(offset + start + j for j in range(len(word_ids))))
        offset += len(chunk)
    if not occ:
        raise WordNotInPromptError(
            f"word {word!r} is not in the prompt {prompt!r}; its words are "
            f"{plain_prompt_words(prompt)}. Fix the word list or the prompt.")
    if occurrence is not None:
        if not 0 <= occurrence < len(occ):
            raise WordNotInPromptError(
                f"word {word!r} occurs {len(occ)} time(s) in the prompt; occurrence {occurrence} "
                f"is out of range 0..{len(occ) - 1}")
        occ = [occ[occurrence]]
    return WordTokens(word, tuple(p for o in occ for p in o), tuple(occ))
