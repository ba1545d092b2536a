"""Tier 2: what P2P Edit Sampler's edit 'auto' picks on SD3, whose context holds a CLIP-L/G part and a T5 part.

A reviewer saw SD3 log a word swap ("cat" -> "tiger", same word count) as ``refine``. The reason is T5's
SentencePiece: "tiger" is 3 pieces (``▁``, ``t``, ``iger``) where "cat" is one (``▁cat``), while CLIP-L/G read both as
one token. 'auto' picks ``replace`` only when every swapped word keeps its token count in every part (replace maps
token to token; upstream's mapper misaligns the tokens after a count change, docs/faithful-ports.md), so refine is
the intended choice here, and the log now says why. A swap of equal counts in both parts ("cat" -> "dog") is a
replace."""

import logging

import pytest
import torch
from comfy_env import comfy_or_skip, encode

pack = comfy_or_skip()

from attention_lab.attention.p2p import build_plan  # noqa: E402
from attention_lab.nodes.common import prompt_words  # noqa: E402
from attention_lab.nodes.p2p import P2PEditSampler, words_fn  # noqa: E402

SRC = "a photo of a cat riding a red bicycle"
DOG = "a photo of a dog riding a red bicycle"
TIGER = "a photo of a tiger riding a red bicycle"


def plan(clip, targets, edit="auto"):
    return build_plan(SRC, targets, edit, 4, 0.8, {}, 0.4, {}, 77 + 256, 0, words_fn(clip))


def swapped(clip, target):
    """Per part of the context: (source word, its token count, target word, its token count) of the swapped word."""
    src, tgt = prompt_words(clip, SRC), prompt_words(clip, target)
    return [[(s.text, len(s.positions), d.text, len(d.positions)) for s, d in zip(sp.words, dp.words)
             if s.text != d.text] for (sp, _), (dp, _) in zip(src.parts, tgt.parts)]


def test_the_swap_is_uneven_only_in_the_t5_part(sd3):
    _, clip = sd3
    assert swapped(clip, DOG) == [[("cat", 1, "dog", 1)], [("cat", 1, "dog", 1)]]
    assert swapped(clip, TIGER) == [[("cat", 1, "tiger", 1)], [("cat", 1, "tiger", 3)]]   # CLIP-L/G, then T5


def test_auto_picks_replace_for_even_swaps_and_refine_for_uneven_ones(sd3, caplog):
    _, clip = sd3
    with caplog.at_level(logging.INFO, logger="attention_lab"):
        p = plan(clip, [SRC, DOG, TIGER])
    assert p.kind == ["replace", "replace", "refine"]
    said = [r.getMessage() for r in caplog.records if "chose refine" in r.getMessage()]
    assert said == [f"P2P edit 'auto' chose refine for {TIGER!r}: swapped words of different token counts ('cat' "
                    "1, 'tiger' 3 in part 2 of 2); replace maps token to token (docs/faithful-ports.md)"]
    # the even swap's replace maps cat's key onto dog's in both parts: CLIP position 5 and T5 position 77 + 5
    assert p.replace[1][5, 5] == 1 and p.replace[1][82, 82] == 1 and torch.equal(p.replace[0], torch.eye(77 + 256))
    with pytest.raises(ValueError, match=r"\[\('cat', 'tiger'\)\] have different token counts"):
        plan(clip, [TIGER], edit="replace")


def test_the_node_logs_the_kinds_it_runs(sd3, caplog):
    model, clip = sd3
    with caplog.at_level(logging.INFO, logger="attention_lab"), torch.inference_mode():
        P2PEditSampler.execute(model, clip, SRC, f"{DOG}\n{TIGER}", encode(clip, ""),
                               {"samples": torch.zeros(1, 16, 8, 8)}, edit="auto", seed=3, steps=2, cfg=1.0,
                               scheduler="simple", cross_replace_steps=0.8, cross_replace_words="",
                               self_replace_steps=0.4, reweight="", blend_words="", blend_threshold=0.3,
                               blend_start=0.2)
    assert any("2 edits (replace, refine)" in r.getMessage() for r in caplog.records)
