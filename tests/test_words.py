"""Tier 1: the pack's one word rule (attention/words.py) and the field failures it fixes (issue 17)."""

import pytest
import torch

from attention.cluster import cluster_self_attention, label_clusters
from attention.context import AttnContext
from attention.layers import LayerId, LayerSelectionError, parse_layer_selection
from attention.p2p import EditPlan, P2PController, refine_mapper, refine_mapper_chunks, word_alpha
from attention.store import AttentionStore, StoreConfig
from attention.words import (
    ContextWords,
    PromptWords,
    WordNotInPromptError,
    emphasis_segments,
    locate_words,
    parse_word_values,
    text_words,
)

# A CLIP-like word tokenizer: lower-cases, some words are two tokens, BOS 1, EOS 2 (pads with EOS).
VOCAB = {"a": [10], "cat": [11], "and": [12], "dog": [13], "in": [14], "garden": [15], "tiger": [16],
         "fluffy": [17], "bobcat": [18, 11], "catfish": [11, 19], ",": [20], "red": [21], "quiet": [22],
         "street": [23]}


def word_ids(word):
    out = []
    for w in text_words(word.lower()):
        out += VOCAB.get(w, [99])
    return out


def tokenize(prompt, length=12):
    """Chunks like ComfyUI's: BOS, up to length-2 tokens, EOS, padding; a word never split across chunks."""
    ids = []
    for seg, _ in emphasis_segments(prompt):
        for piece in seg.replace(",", " , ").split():
            ids.append(VOCAB[","] if piece == "," else word_ids(piece))
    chunks, cur = [], []
    for w in ids:
        if len(cur) + len(w) > length - 2:
            chunks.append(cur)
            cur = []
        cur += w
    chunks.append(cur)
    return [[1] + c + [2] * (length - 1 - len(c)) for c in chunks]


def pw(prompt):
    return PromptWords(prompt, tokenize(prompt), word_ids)


def test_emphasis_is_parsed_as_comfyui_does():
    assert emphasis_segments("a (cat:1.2) and ((dog))") == [("a ", 1.0), ("cat", 1.2), (" and ", 1.0),
                                                            ("dog", pytest.approx(1.21))]
    assert emphasis_segments("(a (red cat:1.5) x:0.8)") == [("a ", 0.8), ("red cat", 1.5), (" x", 0.8)]
    assert emphasis_segments("a \\(cat\\) [dog]") == [("a (cat) [dog]", 1.0)]
    assert emphasis_segments("(time: noon)") == [("time: noon", pytest.approx(1.1))]  # not a number: kept
    assert text_words("A (Tiger:1.2), [dog] \\(x\\) don't red-haired") == ["A", "Tiger", "dog", "x", "don't",
                                                                           "red-haired"]


def test_case_emphasis_and_brackets_match_the_words_inside():
    plain = pw("a cat and a dog in a garden")
    for prompt in ("A Cat and a dog in a garden", "a (cat:1.2) and a dog in a garden", "a ((CAT)) and a dog",
                   "a [cat] and a dog", "a \\(cat\\) and a dog"):
        assert pw(prompt).positions("cat") == plain.positions("cat"), prompt
        assert pw(prompt).positions("Cat") == plain.positions("cat"), prompt
    assert plain.positions("(cat:1.5)") == (2,)          # the user's word may carry emphasis too


def test_whole_words_multi_token_words_and_phrases():
    p = pw("a bobcat and a catfish and a red cat")
    assert p.occurrences("cat") == [p.words[-1].positions]   # never inside 'bobcat' or 'catfish'
    assert p.positions("bobcat") == (2, 3) and p.positions("catfish") == (6, 7)
    assert p.positions("red cat") == p.positions("red") + p.positions("cat")
    assert pw("a cat and a cat").positions("cat", occurrence=1) == (5,)
    with pytest.raises(WordNotInPromptError, match="out of range 0..1"):
        pw("a cat and a cat").positions("cat", occurrence=2)


def test_long_prompt_positions_are_global_across_chunks():
    prompt = "a quiet street and a quiet street and a red cat"
    chunks = tokenize(prompt, length=8)
    assert len(chunks) == 2
    assert pw_at(prompt, 8).positions("cat") == (8 + chunks[1][1:].index(11) + 1,)
    assert pw_at(prompt, 8).positions("red cat") == (8 + 4, 8 + 5)


def pw_at(prompt, length):
    return PromptWords(prompt, tokenize(prompt, length), word_ids)


def test_unknown_word_names_the_word_what_it_is_for_and_the_prompts_words():
    with pytest.raises(WordNotInPromptError) as e:
        pw("A Tiger and a dog").positions("tigr", "reweight word")
    msg = str(e.value)
    assert "reweight word 'tigr'" in msg and "['A', 'Tiger', 'and', 'a', 'dog']" in msg
    with pytest.raises(ValueError, match="no nouns given"):
        locate_words(pw("a cat"), " , ", "noun")
    assert parse_word_values("Tiger:2, red cat:-1", "reweight", "x:2") == {"Tiger": 2.0, "red cat": -1.0}
    with pytest.raises(ValueError, match="not 'word:number'"):
        parse_word_values("tiger=2", "reweight", "tiger:2")


def test_refine_over_two_chunks_aligns_the_second_chunk():
    """Issue 17 #4: '... and a cat' -> '... and a fluffy cat' in the second chunk."""
    src = "a quiet street and a quiet street and a cat"
    tgt = "a quiet street and a quiet street and a fluffy cat"
    s, t = tokenize(src, 8), tokenize(tgt, 8)
    assert len(s) == len(t) == 2
    mapper, alphas = refine_mapper_chunks(s, t, 16)
    fluffy, cat_t = 8 + t[1].index(17), 8 + t[1].index(11)
    cat_s = 8 + s[1].index(11)
    assert alphas[fluffy] == 0 and alphas[cat_t] == 1 and mapper[cat_t] == cat_s
    assert alphas[8] == 1 and mapper[8] == 8                      # the second chunk's BOS
    # one chunk: exactly the upstream mapper on the unpadded tokens
    a, b = tokenize("a cat"), tokenize("a fluffy cat")
    m1, a1 = refine_mapper_chunks(a, b, 12)
    m0, a0 = refine_mapper(a[0][:4], b[0][:5], 12)
    assert torch.equal(m1, m0) and torch.equal(a1, a0)


def test_p2p_edit_on_a_context_repeated_for_a_longer_negative_equals_the_plain_edit():
    """Issue 17 #5: a negative of 2 chunks makes the batch's contexts 2x longer (repeated, as ComfyUI)."""
    g = torch.Generator().manual_seed(0)
    L, n, h = 6, 4, 2
    plan = EditPlan(kind=["replace"], replace=torch.eye(L)[None].roll(1, -1), refine=None, refine_alphas=None,
                    equalizer=torch.rand(1, L, generator=g) + 0.5, alpha=word_alpha(4, 1, L, (0.0, 1.0), {}),
                    self_replace=(0.0, 0.0), self_max_tokens=0)
    ctl = P2PController(plan, 4)
    probs = torch.rand(2, h, n, L, generator=g).softmax(-1)
    ctx = AttnContext(LayerId("input", 1, 0), True, 2, 2, h, [0], 2, 1.0, 1, 4)
    one = ctl.edit_probs(probs.clone(), ctx, slice(0, n))
    twice = ctl.edit_probs(torch.cat([probs, probs], -1) / 2, ctx, slice(0, n))
    assert torch.allclose(twice[..., :L] * 2, one, rtol=1e-6) and torch.allclose(twice[..., L:] * 2, one, rtol=1e-6)


def test_non_square_self_attention_is_clustered_at_its_aspect():
    """Issue 17 #6: a 16x24 latent gives 4x6 maps: clusters keep that shape."""
    h, w = 4, 6
    left = torch.zeros(h, w)
    left[:, :3] = 1
    feats = torch.stack([left.flatten(), 1 - left.flatten()], 1)
    attn = (feats @ feats.T + 0.01).softmax(-1)
    labels = cluster_self_attention(attn, 2, seed=0, hw=(h, w))
    assert labels.shape == (h, w) and (labels[:, :3] == labels[0, 0]).all() and (labels[:, 3:] != labels[0, 0]).all()
    res = label_clusters(labels, left[None], 0.5)
    assert res.resolution == (h, w) and torch.equal(res.word_mask(0), left)


def test_capture_size_matching_no_layer_is_refused_naming_the_sizes():
    """Issue 17 #8: layers '16' on a 16x24 latent (maps 16x24, 8x12)."""
    store = AttentionStore(StoreConfig(selection=parse_layer_selection("16")))
    for layer, hw in ((LayerId("input", 1, 0), (16, 24)), (LayerId("middle", 0, 0), (8, 12))):
        assert not store.wants_probs(AttnContext(layer, True, *hw, 2, [0], 1, 1.0, 0, 4))
    with pytest.raises(LayerSelectionError, match=r"'16' matches no attention layer.*\['16x24', '8x12'\]"):
        store.wants_probs(AttnContext(LayerId("input", 1, 0), True, 16, 24, 2, [0], 1, 1.0, 1, 4))
    ok = AttentionStore(StoreConfig(selection=parse_layer_selection("8x12")))
    ok.wants_probs(AttnContext(LayerId("middle", 0, 0), True, 8, 12, 2, [0], 1, 1.0, 0, 4))
    ok.finish(torch.ones(1, 4, 16, 24))
    assert ok.matches_output(torch.ones(1, 4, 16, 24)) and ok.matches_output(torch.zeros(1, 4, 16, 24)) is False


# A T5-like SentencePiece tokenizer: case-sensitive pieces with the word-start mark, no BOS, EOS 1, pad 0.
PIECES = {"\u2581a": 5, "\u2581cat": 6, "\u2581Cat": 7, "\u2581and": 8, "\u2581dog": 9, "\u2581red": 10,
          "\u2581bicycle": 11, "\u2581Bi": 12, "cycle": 13, ",": 14, "dog": 15, "\u2581on": 16, "\u2581grass": 17}


def t5_word(text):
    """SentencePiece on whitespace-separated words: each word gets the word-start mark, a piece after a comma inside
    a word does not ('cat,dog': '\u2581cat', ',', 'dog'); 'Bicycle' is two pieces."""
    out = []
    for w in text.split():
        for i, part in enumerate(w.split(",")):
            if i:
                out.append(PIECES[","])
            if not part:
                continue
            if part == "Bicycle":
                out += [PIECES["\u2581Bi"], PIECES["cycle"]]
            else:
                out.append(PIECES.get(("" if i else "\u2581") + part, 99))
    return out


def t5_chunks(prompt, min_length=16):
    ids = [t for seg, _ in emphasis_segments(prompt) for t in t5_word(seg)] + [1]
    return [ids + [0] * (min_length - len(ids))]


def t5_pw(prompt):
    return PromptWords(prompt, t5_chunks(prompt), t5_word)


def test_t5_pieces_case_emphasis_and_no_bos():
    p = t5_pw("a Cat and a (red Bicycle:1.3)")
    assert p.positions("cat") == p.positions("Cat") == p.positions("CAT") == (1,)   # the prompt's own piece
    assert p.positions("bicycle") == (5, 6)                                          # two pieces, one word
    assert p.positions("red bicycle") == (4, 5, 6) and p.positions("a") == (0, 3)
    with pytest.raises(WordNotInPromptError, match=r"'dog' is not in the prompt.*\['a', 'Cat'"):
        p.positions("dog")
    glued = t5_pw("a cat,dog on grass")        # 'dog' glued to the comma has no word-start mark: refused
    assert glued.positions("grass") == (5,)
    with pytest.raises(WordNotInPromptError, match="'dog'"):
        glued.positions("dog")


def test_context_words_find_a_word_in_each_part():
    """SD3's context: a CLIP part (12 keys per chunk here, BOS first) then a T5 part; keys offset by the part."""
    prompt = "a cat and a dog"
    clip_part = pw(prompt)
    offset = sum(len(c) for c in clip_part.chunks)
    cw = ContextWords(prompt, [(clip_part, 0), (t5_pw(prompt), offset)])
    assert cw.positions("cat") == (2, offset + 1)
    assert cw.positions("a") == (1, offset, 4, offset + 3)      # by occurrence, each in both parts
    assert cw.positions("a", occurrence=1) == (4, offset + 3)
    assert cw.names == ["a", "cat", "and", "a", "dog"]
    with pytest.raises(WordNotInPromptError, match="'tiger' is not in the prompt"):
        cw.positions("tiger")
    names, positions = locate_words(cw, "dog, cat")
    assert positions == [(5, offset + 4), (2, offset + 1)]


def test_dit_layer_selection_terms():
    ids = [LayerId("double", i, 0) for i in range(19)] + [LayerId("single", i, 0) for i in range(38)]
    sel = parse_layer_selection("double.15-18, single.0")
    sel.validate_ids(ids)
    assert {lid for lid in ids if sel.matches(lid, 64, 64)} == {LayerId("double", i, 0) for i in range(15, 19)} | {
        LayerId("single", 0, 0)}
    assert sum(parse_layer_selection("single").matches(lid, 8, 8) for lid in ids) == 38
    with pytest.raises(LayerSelectionError, match="double.0.0"):
        parse_layer_selection("input.1").validate_ids(ids)
