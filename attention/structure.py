"""StructureDiffusion (Feng et al. 2022, "Training-Free Structured Diffusion Guidance for Compositional
Text-to-Image Synthesis"): the cross-attention values of every noun phrase, encoded on its own.

Ported from the official code, https://github.com/weixi-feng/Structured-Diffusion-Guidance (MIT licence):
``structured_stable_diffusion/modules/attention.py`` ``CrossAttention.multi_qkv`` (commit
a54bf5ec9150893869c548e9273857ee203ce17c) and ``scripts/txt2img_demo.py`` ``get_all_nps`` / ``align_sequence``
(master-branch commit 773b2ba068c6cc60443d5d747a725413c8c9d46f, where both functions are as first
committed; an earlier header cited 1d77f2f0, a commit not on master); the code here is ours. The default mode
of the official demo (no ``--conjunction``), on every cross-attention layer (``struct_attn=True`` in every
SpatialTransformer) and at every step:

* the prompt P and each of its noun phrases NP_1..NP_k are encoded separately by the text encoder;
* for each phrase a copy of P's states in which the phrase's tokens are replaced by the phrase's own encoding
  (tokens 1..L of it, after BOS) at the phrase's positions in P: ``align_sequence``;
* keys come from P alone; the conditional output is the mean over the k + 1 value sequences
  [P, aligned_1, .., aligned_k] of ``softmax(Q K_P^T) V_i``. The unconditional row is untouched.

Attention is linear in its values and ``to_v`` is linear, so that mean equals attention with the values
projected from the mean of the k + 1 sequences: the patch below swaps the pre-projection value context of the
rows that carry P for that mean (``attn2_patch``, ComfyUI's hook for separate key and value contexts), which
keeps every attention function, replace patch and optimisation of the model working.

Noun phrases: upstream parses the prompt with Stanza's constituency parser (every NP of more than one word, the
coordinations "A and B" included). No parser model can be downloaded here, so ``noun_phrases`` is a rule-based
chunker that splits at conjunctions, prepositions and punctuation and keeps the chunks of two words or more and
the coordinations of two such chunks; users can list the phrases themselves instead. The same chunks give
``prompt_nouns`` (each chunk's head word), which prompt mixing's blend uses in place of upstream's NLTK noun tags.
A textual inversion ``embedding:name`` is one word of a phrase (its name kept as written), as in every word list
of the pack (``words.py``).

Shape legend:
    context, value (b, m, c): pre-projection text states per attention row, m tokens of width c
    full (m, c): the prompt's states       phrase (m_p, c): one phrase encoded alone, BOS first
"""

from __future__ import annotations

import re
from typing import Callable

import torch

from .words import EMBEDDING_WORD, is_embedding

# Words that end a noun phrase (no part-of-speech tagger offline): conjunctions, prepositions, linking verbs, and
# the participles prompts most often put after a noun ("a cat sitting on a mat": the phrase is "a cat").
_BREAK = frozenset("""
and or but nor while with without on in at under over above below behind beside besides near next to of by
from into onto inside outside between among against along across around through toward towards for beneath
underneath atop upon via is are was were be being has have had who which that where
sitting standing lying holding wearing walking running riding eating playing flying looking
""".split())
# Words that are never the head noun of a phrase: determiners, possessives, quantifiers, number words.
_NOT_NOUN = frozenset("""
a an the this these those some any each every no my your his her its our their many few several much more most
one two three four five six seven eight nine ten very
""".split())
_WORD = re.compile(EMBEDDING_WORD + r"|[\w'-]+|[,.;:!?]")     # a textual inversion 'embedding:name' is one word
_WEIGHT = re.compile(r":\s*-?\d*\.?\d+\s*\)")


def _chunks(prompt: str) -> tuple[list[str], list[tuple[int, int]]]:
    """The prompt's lower-cased words (an ``embedding:name`` keeps its case; punctuation as words of its own) and
    the [start, end) spans of the runs between break words and punctuation; (word:weight) emphasis and
    parentheses are dropped."""
    text = _WEIGHT.sub(" ", prompt).replace("\\(", " ").replace("\\)", " ")
    # a textual inversion keeps its name's case; '[' stays text before 'embedding:' as in ComfyUI's tokenizer
    words = [w if is_embedding(w) else w.lower() for w in _WORD.findall(re.sub(r"[(){}]", " ", text))]
    spans: list[tuple[int, int]] = []
    start = 0
    for i, w in enumerate(words + ["."]):
        if w in _BREAK or not w[0].isalnum():
            if i > start:
                spans.append((start, i))
            start = i + 1
    return words, spans


def noun_phrases(prompt: str) -> list[str]:
    """Noun-phrase candidates of ``prompt`` in order: chunks of 2+ words between break words and punctuation,
    then each "A and B" whose sides are both such chunks. The prompt itself is never returned."""
    words, spans = _chunks(prompt)
    chunks = [(a, b) for a, b in spans if b - a >= 2]
    phrases = [" ".join(words[a:b]) for a, b in chunks]
    for (a1, b1), (a2, b2) in zip(chunks, chunks[1:]):
        if b1 + 1 == a2 and words[b1] in ("and", "or"):
            phrases.append(" ".join(words[a1:b2]))
    full = " ".join(w for w in words if w[0].isalnum())
    return [p for p in phrases if p != full]


def prompt_nouns(prompt: str) -> list[str]:
    """The nouns of ``prompt``, once each, in order: the head (last word) of every chunk of ``_chunks`` that is not
    a determiner or a number. Stands in for NLTK's part-of-speech tags (upstream MnM's ``Segmentor``, every word
    tagged NN*) on prompts of noun phrases: "a hamburger with a cup of coffee on the table" gives hamburger, cup,
    coffee, table as NLTK does. It misses a noun that modifies another ("coffee cup": cup only) and takes an
    adjective or verb that ends a chunk for a noun; list the nouns by hand for such prompts."""
    words, spans = _chunks(prompt)
    out: list[str] = []
    for _, b in spans:
        head = words[b - 1]
        if head not in _NOT_NOUN and not head.isdigit() and head not in out:
            out.append(head)
    return out


def phrase_spans(phrases: list[str],
                 occurrences: Callable[[str], tuple[tuple[int, ...], ...]]) -> list[tuple[int, ...]]:
    """Key positions of each phrase: ``occurrences(phrase)`` lists every occurrence in the prompt; a phrase
    listed twice takes its next occurrence each time ("a red cube and a red cube")."""
    used: dict[str, int] = {}
    out = []
    for p in phrases:
        occ = occurrences(p)
        k = used.get(p, 0)
        if k >= len(occ):
            raise ValueError(f"noun phrase {p!r} is listed {k + 1} times but occurs {len(occ)} time(s) in the prompt; "
                             f"list it once per occurrence")
        used[p] = k + 1
        out.append(occ[k])
    return out


def aligned_values(full: torch.Tensor, phrases: list[torch.Tensor], spans: list[tuple[int, ...]]) -> torch.Tensor:
    """(1 + k, m, c): ``full`` and, per phrase, ``full`` with the phrase's own states at its positions.

    ``spans[i]``: the contiguous key positions of phrase i in the prompt (its L tokens), filled from tokens
    1..L of ``phrases[i]`` (after its BOS), as upstream's ``multi_align``."""
    out = [full]
    for states, pos in zip(phrases, spans):
        if not pos or list(pos) != list(range(pos[0], pos[0] + len(pos))):
            raise ValueError(f"phrase positions {pos} are not one contiguous run of tokens")
        if pos[-1] >= full.shape[0] or len(pos) + 1 > states.shape[0]:
            raise ValueError(f"phrase positions {pos} do not fit the prompt ({full.shape[0]} tokens) or the "
                             f"phrase encoding ({states.shape[0]} tokens)")
        seq = full.clone()
        seq[pos[0]:pos[-1] + 1] = states[1:1 + len(pos)].to(full)
        out.append(seq)
    return torch.stack(out)


class StructuredValuePatch:
    """An ``attn2_patch``: rows whose key context is one of the prompts' states get its mean aligned values.

    ``keys`` (p, m, c) or (m, c): each prompt's states as the model receives them; ``values``, same shape: the
    mean of each prompt's ``aligned_values``. A row matches a prompt when its context equals that prompt's
    states (repeated when ComfyUI batched it with a longer context) and its value is still its context, so a
    value edit of a patch before this one wins.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, rtol: float = 1e-3):
        if keys.shape != values.shape:
            raise ValueError(f"key states {tuple(keys.shape)} and value states {tuple(values.shape)} differ")
        self.keys = keys if keys.dim() == 3 else keys[None]
        self.values = values if values.dim() == 3 else values[None]
        self.rtol = rtol
        self.hits = 0          # rows changed so far (the node warns when a sampling run changed none)
        self._on: dict = {}

    def __deepcopy__(self, memo):
        return self

    def _states(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = (like.device, like.dtype)
        if k not in self._on:
            self._on[k] = (self.keys.to(like), self.values.to(like))
        return self._on[k]

    def matching(self, context: torch.Tensor, value: torch.Tensor) -> tuple[list[int], list[int]]:
        """(rows, prompt index per row) of the rows to change."""
        m, c = self.keys.shape[1:]
        if context.shape[1] % m or context.shape[2] != c:
            return [], []
        keys, _ = self._states(context)
        reps = context.shape[1] // m
        rows = context.reshape(context.shape[0], reps, m, c)
        diff = (rows[:, :, None] - keys[None, None]).abs().amax(dim=(-1, -2)).amax(dim=1)    # (b, p)
        rtol = max(self.rtol, 2 * torch.finfo(context.dtype).eps)         # the model's dtype rounds the states
        tol = rtol * keys.abs().amax(dim=(-1, -2)) + 1e-6                                      # (p,)
        best = diff.argmin(dim=1)
        ok = (diff.gather(1, best[:, None])[:, 0] <= tol[best])
        if value is not context:                     # an earlier patch may have swapped some rows' values
            ok &= (value == context).flatten(1).all(dim=1)
        hit = ok.nonzero()[:, 0].tolist()
        return hit, best[hit].tolist()

    def __call__(self, n, context, value, extra_options):
        rows, which = self.matching(context, value)
        if not rows:
            return n, context, value
        _, values = self._states(context)
        self.hits += len(rows)
        value = value.clone()
        value[rows] = values[which].repeat(1, context.shape[1] // self.keys.shape[1], 1)
        return n, context, value
