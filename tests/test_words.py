"""Tier 1: the pack's one word rule (attention/words.py) and the field failures it fixes (issue 17)."""

import numpy as np
import pytest
import torch

from attention.cluster import cluster_self_attention, label_clusters
from attention.context import AttnContext
from attention.layers import LayerId, LayerSelectionError, parse_layer_selection
from attention.p2p import EditPlan, P2PController, batch_cfg, build_plan, parse_pairs, refine_mapper, word_alpha
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


def official_get_mapper(x_seq: list[int], y_seq: list[int], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """prompt-to-prompt ``seq_aligner.get_mapper`` on token ids (``tokenizer.encode``: BOS, tokens, EOS):
    Needleman-Wunsch with gap 0, match 1, mismatch -1 (ties: left, then up, then diagonal), traceback from the
    end (diagonal: y token j maps to x token i; left: y token j is new, -1); alphas 0 for new tokens; positions
    past the target map to len(y) + 0, 1, ..."""
    nx, ny = len(x_seq), len(y_seq)
    score = np.zeros((nx + 1, ny + 1), dtype=np.int32)
    trace = np.zeros((nx + 1, ny + 1), dtype=np.int32)
    trace[0, 1:], trace[1:, 0], trace[0, 0] = 1, 2, 4
    for i in range(1, nx + 1):
        for j in range(1, ny + 1):
            left, up = score[i, j - 1], score[i - 1, j]
            diag = score[i - 1, j - 1] + (1 if x_seq[i - 1] == y_seq[j - 1] else -1)
            score[i, j] = max(left, up, diag)
            trace[i, j] = 1 if score[i, j] == left else 2 if score[i, j] == up else 3
    i, j, pairs = nx, ny, []
    while i > 0 or j > 0:
        if trace[i, j] == 3:
            i, j = i - 1, j - 1
            pairs.append((j, i))
        elif trace[i, j] == 1:
            j -= 1
            pairs.append((j, -1))
        elif trace[i, j] == 2:
            i -= 1
        else:
            break
    base = torch.tensor(pairs[::-1], dtype=torch.int64)
    alphas = torch.ones(max_len)
    alphas[:base.shape[0]] = base[:, 1].ne(-1).float()
    mapper = torch.zeros(max_len, dtype=torch.int64)
    mapper[:base.shape[0]] = base[:, 1]
    mapper[base.shape[0]:] = ny + torch.arange(max_len - ny)
    return mapper, alphas


def _unpadded(chunks):
    """(global key position, id) of each chunk's BOS .. EOS, as upstream's ``tokenizer.encode`` of the chunk."""
    out = []
    for c, chunk in enumerate(chunks):
        end = chunk.index(2, 1)                                   # the first EOS (= padding id) after BOS
        out += [(c * len(chunk) + i, t) for i, t in enumerate(chunk[:end + 1])]
    return out


@pytest.mark.parametrize("src, tgt, chunk_len", [
    ("a cat", "a fluffy cat", 12),                                                      # one chunk: upstream
    ("a quiet street and a quiet street and a cat", "a quiet street and a quiet street and a fluffy cat", 8),
    ("a cat and a dog in a garden", "a fluffy bobcat and a dog in a red garden", 8),
    ("a cat and a dog bobcat in a garden", "a cat and a dog bobcat in a red garden", 8),   # padding in chunk 1
    ("a cat and a cat in a garden", "a cat and a fluffy cat cat in a garden", 12),        # ties in the alignment
    ("a cat and a dog in a garden and a cat in a garden", "a cat and a dog in a garden and a fluffy cat in a garden",
     8),                                                                                # three chunks
])
def test_refine_mapper_equals_upstream_get_mapper(src, tgt, chunk_len):
    """The refinement P2PEditSampler plans (``build_plan`` with edit 'refine'), against ``get_mapper`` on the
    prompts' tokens. Over several chunks (issue 17 #4) the official alignment runs on the chunks' unpadded tokens
    as one sequence (BOS and EOS of each chunk included) and each index is read at its global key position;
    padding positions map to themselves, as ``get_mapper``'s tail does on one chunk."""
    s_chunks, t_chunks = tokenize(src, chunk_len), tokenize(tgt, chunk_len)
    length = chunk_len * len(t_chunks)
    assert len(s_chunks) == len(t_chunks)

    def words_of(prompt):
        return PromptWords(prompt, tokenize(prompt, chunk_len), word_ids)
    plan = build_plan(src, [tgt], "refine", 4, 0.8, {}, 0.4, {}, length, 0, words_of)
    s, t = _unpadded(s_chunks), _unpadded(t_chunks)
    mapper, alphas = official_get_mapper([i for _, i in s], [i for _, i in t], len(t))
    want_m, want_a = torch.arange(length), torch.ones(length)
    for j, (pos, _) in enumerate(t):
        want_m[pos] = s[int(mapper[j])][0] if mapper[j] != -1 else -1
        want_a[pos] = alphas[j]
    assert torch.equal(plan.refine[0], want_m) and torch.equal(plan.refine_alphas[0], want_a)
    assert 0 < want_a.sum() < length                              # new tokens are there and kept ones too
    if len(t_chunks) == 1:                                        # one chunk: get_mapper's own output exactly
        m1, a1 = official_get_mapper([i for _, i in s], [i for _, i in t], length)
        assert torch.equal(plan.refine[0], m1) and torch.equal(plan.refine_alphas[0], a1)


def test_one_chunk_refine_mapper_and_pairs_equal_upstream():
    """``refine_mapper`` (one chunk of token ids) against ``get_mapper`` on random sequences sharing tokens; a
    ``length`` under the source's or the target's token count (upstream's is 77, above both; it fails under the
    target's) keeps the first ``length`` entries, clamped to the length (the pack's guard).
    ``parse_pairs`` (P2PEditSampler's cross_replace_words / reweight) reads 'word:number' lists and refuses others."""
    g = torch.Generator().manual_seed(8)
    for _ in range(12):
        src = [1] + torch.randint(3, 9, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist() + [2]
        dst = [1] + torch.randint(3, 9, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist() + [2]
        for length in (max(len(src), len(dst)), max(len(src), len(dst)) + 3):     # upstream: 77 >= both
            mapper, alphas = refine_mapper(src, dst, length)
            want_m, want_a = official_get_mapper(src, dst, length)
            assert torch.equal(mapper, want_m) and torch.equal(alphas, want_a), (src, dst, length)
            assert mapper.dtype == want_m.dtype == torch.int64 and alphas.dtype == want_a.dtype   # an index
        short = len(dst) - 2
        mapper, alphas = refine_mapper(src, dst, short)
        want_m, want_a = official_get_mapper(src, dst, len(dst))
        assert torch.equal(mapper, want_m[:short].clamp(max=short - 1)) and torch.equal(alphas, want_a[:short])
    assert parse_pairs("red:2, big dog : -1.5", "reweight", "red:2") == {"red": 2.0, "big dog": -1.5}
    with pytest.raises(ValueError, match=r"^cross_replace_words entry 'red=2' is not 'word:number'; write e\.g\. "
                                         r"'lasagne:0\.2'$"):
        parse_pairs("red=2", "cross_replace_words", "lasagne:0.2")


def test_batch_guidance_equals_upstream_diffusion_step():
    """``batch_cfg`` (the ShapesWorld P2P loops' guide) against upstream's ``diffusion_step``: the latents twice,
    contexts [uncond, cond] in one call, ``uncond + guidance * (text - uncond)``. The toy eps reads each row's
    context, sigma and chunk label (as the controllers read cond_or_uncond)."""
    g = torch.Generator().manual_seed(9)
    x, c, u = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 5, 6, generator=g), torch.randn(3, 5, 6, generator=g)
    sigma = torch.tensor(1.7)

    def eps(xs, s, ctx, cou):
        label = torch.tensor(cou, dtype=xs.dtype).repeat_interleave(xs.shape[0] // len(cou))
        return xs * s * ctx.mean((1, 2))[:, None, None, None] + (0.3 + label[:, None, None, None]) * xs.flip(-1)
    for cfg in (1.0, 7.5):
        e_u, e_c = eps(torch.cat([x, x]), sigma, torch.cat([u, c]), [1, 0]).chunk(2)
        assert torch.allclose(batch_cfg(eps, cfg)(x, sigma, c, u), e_u + cfg * (e_c - e_u), atol=1e-6), cfg


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


def test_a_run_that_diverged_to_nan_still_matches_its_own_output():
    """A sampler whose output has NaN/inf (a broken model) is the same run, not 'another sampling run'."""
    store = AttentionStore(StoreConfig(selection=parse_layer_selection("8x12")))
    store.wants_probs(AttnContext(LayerId("middle", 0, 0), True, 8, 12, 2, [0], 1, 1.0, 0, 4))
    out = torch.ones(1, 4, 16, 24)
    out[0, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    store.finish(out)
    assert store.matches_output(out.clone()) is True
    other = out.clone()
    other[0, 1] = 2.0
    assert store.matches_output(other) is False
    other = out.clone()
    other[0, 0, 0, 0] = 1.0                               # a finite value where the run had NaN
    assert store.matches_output(other) is False


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
def official_word_inds(text: str, word_place: int) -> list[int]:
    """ptp_utils ``get_word_inds`` for a word index, on this file's tokenizer: the word's token positions after
    BOS (upstream decodes the tokens back to text to find them; here each word's tokens are known)."""
    pos, out = 1, []
    for i, w in enumerate(text.split(" ")):
        n = len(VOCAB.get(w, [99]))
        if i == word_place:
            out = list(range(pos, pos + n))
        pos += n
    return out


def official_replacement_mapper(x: str, y: str, max_len: int) -> torch.Tensor:
    """seq_aligner ``get_replacement_mapper_`` (same word count; swapped words of equal token counts, where
    upstream's tail ``mapper[j, j]`` is right)."""
    wx, wy = x.split(" "), y.split(" ")
    replace = [i for i in range(len(wy)) if wy[i] != wx[i]]
    src, dst = [official_word_inds(x, i) for i in replace], [official_word_inds(y, i) for i in replace]
    mapper = np.zeros((max_len, max_len))
    i = j = cur = 0
    while i < max_len and j < max_len:
        if cur < len(src) and src[cur][0] == i:
            if len(src[cur]) == len(dst[cur]):
                mapper[src[cur], dst[cur]] = 1
            else:
                for t in dst[cur]:
                    mapper[src[cur], t] = 1 / len(dst[cur])
            i, j, cur = i + len(src[cur]), j + len(dst[cur]), cur + 1
        elif cur < len(src):
            mapper[i, j] = 1
            i, j = i + 1, j + 1
        else:
            mapper[j, j] = 1
            i, j = i + 1, j + 1
    return torch.from_numpy(mapper).float()


def official_time_words_alpha(prompts: list[str], steps: int, default: float, words: dict, max_len: int):
    """ptp_utils ``get_time_words_attention_alpha`` with ``update_alpha_time_word`` (bounds (0, end) for a float)."""
    alpha = torch.zeros(steps + 1, len(prompts) - 1, max_len)

    def update(bounds, b, inds=None):
        start, end = int(bounds[0] * alpha.shape[0]), int(bounds[1] * alpha.shape[0])
        inds = torch.arange(max_len) if inds is None else inds
        alpha[:start, b, inds] = 0
        alpha[start:end, b, inds] = 1
        alpha[end:, b, inds] = 0
    for b in range(len(prompts) - 1):
        update((0.0, default), b)
    for word, end in words.items():
        for b, p in enumerate(prompts[1:]):
            inds = [k for i, w in enumerate(p.split(" ")) if w == word for k in official_word_inds(p, i)]
            if inds:
                update((0.0, end), b, inds)
    return alpha


def test_replace_plan_and_cross_replace_alphas_equal_upstream():
    """P2P Edit Sampler's replace plan (``build_plan``: the word-swap mapper, per-word cross-replace windows)
    against ``get_replacement_mapper`` and ``get_time_words_attention_alpha``, one- and two-token swaps."""
    src = "a cat and a bobcat in a garden"
    targets = ["a tiger and a bobcat in a garden", "a cat and a catfish in a red"]
    plan = build_plan(src, targets, "replace", 10, 0.8, {"tiger": 0.3, "catfish": 0.55}, 0.4, {}, 12, 0, pw)
    assert plan.kind == ["replace", "replace"]
    for b, tgt in enumerate(targets):
        assert torch.equal(plan.replace[b], official_replacement_mapper(src, tgt, 12)), tgt
    want = official_time_words_alpha([src] + targets, 10, 0.8, {"tiger": 0.3, "catfish": 0.55}, 12)
    assert torch.equal(plan.alpha, want)
    assert not torch.equal(want[:, 0], want[:, 1])           # the per-word windows differ between the edits
