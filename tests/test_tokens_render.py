"""Tier 1: word-to-token mapping and rendering."""

import pytest
import torch

from attention.render import colorize, grid, masks_from_maps, normalize, overlay, upsample
from attention.shapesworld.text import BOS, CONTEXT, EOS, ShapesTokenizer
from attention.tokens import WordNotInPromptError, find_word_tokens, plain_prompt_words, split_words


# A CLIP-like layout: BOS=1, EOS=2, pad with EOS; a 'word' may be several tokens.
def chunk(ids, length=10):
    c = [1] + ids + [2]
    return c + [2] * (length - len(c))


def test_multi_token_and_repeated_words():
    chunks = [chunk([10, 11, 12, 20, 10, 11, 12])]
    wt = find_word_tokens(chunks, [10, 11, 12], "catfish", "a catfish b catfish")
    assert wt.occurrences == ((1, 2, 3), (5, 6, 7))
    assert wt.positions == (1, 2, 3, 5, 6, 7)
    one = find_word_tokens(chunks, [10, 11, 12], "catfish", "...", occurrence=1)
    assert one.positions == (5, 6, 7)
    with pytest.raises(WordNotInPromptError, match="out of range 0..1"):
        find_word_tokens(chunks, [10, 11, 12], "catfish", "...", occurrence=2)


def test_long_prompt_positions_are_global():
    chunks = [chunk([5] * 8), chunk([6, 7])]
    assert find_word_tokens(chunks, [7], "dog", "...").positions == (10 + 2,)


def test_absent_word_lists_prompt_words():
    with pytest.raises(WordNotInPromptError) as e:
        find_word_tokens([chunk([3, 4])], [9], "horse", "a (cat:1.2) on a mat")
    msg = str(e.value)
    assert "'horse'" in msg and "['a', 'cat', 'on', 'a', 'mat']" in msg


def test_weight_syntax_and_split_words():
    assert plain_prompt_words("a (red circle:1.3) and \\(x\\)") == ["a", "red", "circle", "and", "x"]
    assert split_words(" cat, red dog ,, bike ") == ["cat", "red dog", "bike"]


def test_shapes_tokenizer_layout_weights_and_positions():
    tok = ShapesTokenizer()
    c = tok.chunks("a (red circle:1.5) and a blue square")
    assert len(c) == 1 and len(c[0]) == CONTEXT and c[0][0] == (BOS, 1.0)
    ids = [t for t, _ in c[0]]
    assert ids[8] == EOS
    assert [w for _, w in c[0][1:8]] == [1.0, 1.5, 1.5, 1.0, 1.0, 1.0, 1.0]
    pos = find_word_tokens([ids], tok.word_ids("circle"), "circle", "a red circle").positions
    assert pos == (3,)
    long = tok.chunks(" ".join(["a red circle"] * 10))
    assert len(long) == 2 and all(len(x) == CONTEXT for x in long)


def test_rendering_shapes_and_masks():
    maps = torch.zeros(2, 4, 4)
    maps[0, 0, 0] = 5.0
    maps[1] = torch.arange(16.0).view(4, 4)
    n = normalize(maps)
    assert n.min() == 0 and n.max() == 1 and n[0, 0, 0] == 1
    up = upsample(n, (16, 16))
    assert up.shape == (2, 16, 16)
    col = colorize(up)
    assert col.shape == (2, 16, 16, 3) and col.min() >= 0 and col.max() <= 1
    ov = overlay(torch.zeros(2, 16, 16, 3), up)
    assert ov.shape == (2, 16, 16, 3)
    m = masks_from_maps(n, 0.5)
    assert m[1].sum() == 8  # values 8..15 of 0..15 are >= half the range
    g = grid(col, cols=2)
    assert g.shape == (1, 16, 34, 3)
