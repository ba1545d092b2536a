"""Tier 1: StructureDiffusion (noun-phrase values) math, patch and ShapesWorld invariants."""

import pytest
import torch

from attention.shapesworld.model import ShapesWorldModel
from attention.shapesworld.structure import structured_patch
from attention.structure import StructuredValuePatch, aligned_values, noun_phrases, phrase_spans

PROMPT = "a red circle and a blue square on a gray background"


@pytest.fixture(scope="module")
def model():
    return ShapesWorldModel()


def test_noun_phrases_split_at_conjunctions_prepositions_and_punctuation():
    assert noun_phrases(PROMPT) == ["a red circle", "a blue square", "a gray background",
                                    "a red circle and a blue square"]
    assert noun_phrases("a cat") == []                       # the prompt itself is never a phrase
    assert noun_phrases("(red:1.2) car and a white sheep, photo") == ["red car", "a white sheep",
                                                                      "red car and a white sheep"]
    assert noun_phrases("a dog in front of a white building") == ["a dog", "a white building"]


def test_prompt_nouns_are_the_chunk_heads_nltk_tags_as_nouns():
    """MnM's default blend nouns (upstream: NLTK's NN* tags) on prompts of noun phrases."""
    from attention.structure import prompt_nouns
    assert prompt_nouns(PROMPT) == ["circle", "square", "background"]
    assert prompt_nouns("a hamburger and a cup of coffee on a wooden table") == ["hamburger", "cup", "coffee", "table"]
    assert prompt_nouns("a photo of a cat sitting on a mat, high quality") == ["photo", "cat", "mat", "quality"]
    assert prompt_nouns("(red:1.2) car and the car, 2 dogs") == ["car", "dogs"]      # once each; no numbers
    assert prompt_nouns("the") == [] and prompt_nouns("") == []


def test_phrase_spans_take_the_next_occurrence_and_refuse_extra_ones():
    occ = {"a cube": ((1, 2), (4, 5))}
    assert phrase_spans(["a cube", "a cube"], occ.__getitem__) == [(1, 2), (4, 5)]
    with pytest.raises(ValueError, match="listed 3 times but occurs 2"):
        phrase_spans(["a cube"] * 3, occ.__getitem__)


def test_aligned_values_put_each_phrase_at_its_positions_only():
    full, a, b = torch.randn(3, 8, 4, generator=torch.Generator().manual_seed(0)).unbind(0)
    out = aligned_values(full, [a, b], [(2, 3), (5,)])
    assert out.shape == (3, 8, 4)
    assert torch.equal(out[0], full)
    assert torch.equal(out[1][2:4], a[1:3]) and torch.equal(out[1][[0, 1, 4, 5, 6, 7]], full[[0, 1, 4, 5, 6, 7]])
    assert torch.equal(out[2][5], b[1]) and torch.equal(out[2][:5], full[:5])
    with pytest.raises(ValueError, match="contiguous"):
        aligned_values(full, [a], [(2, 4)])


def official_multi_align(main_seq: torch.Tensor, seq: torch.Tensor, span: tuple[int, int]) -> torch.Tensor:
    """txt2img_demo.py ``multi_align``: the phrase's tokens 1..L (after its BOS) over the prompt's tokens
    span[0] + 1 .. span[1] + 1 (span: word indices from ``get_all_nps``, shifted past the prompt's BOS)."""
    main_seq = main_seq.clone()
    start, end = span[0] + 1, span[1] + 1
    main_seq[start:end] = seq[1:1 + end - start]
    return main_seq


def official_multi_qkv(attn, x: torch.Tensor, uc: torch.Tensor, keys: torch.Tensor, values: list[torch.Tensor]):
    """attention.py ``CrossAttention.multi_qkv``: the uncond row attends to its own context; the cond row's
    output is the mean over the value sequences of softmax(q k_P^T * scale) v_i, keys from the prompt alone."""
    h = attn.heads
    q = attn.to_q(x)                                                        # (2, n, h d)
    d = q.shape[-1] // h

    def split(t):
        return t.reshape(t.shape[0], t.shape[1], h, d).transpose(1, 2)     # (b, h, n, d)
    q_uc, q_c = split(q[:1]), split(q[1:])
    out_uc = (q_uc @ split(attn.to_k(uc)).transpose(-1, -2) * d ** -0.5).softmax(-1) @ split(attn.to_v(uc))
    attn_c = (q_c @ split(attn.to_k(keys)).transpose(-1, -2) * d ** -0.5).softmax(-1)
    out_c = sum(attn_c @ split(attn.to_v(v)) for v in values) / len(values)
    out = torch.cat([out_uc, out_c]).transpose(1, 2).reshape(2, -1, h * d)
    return attn.to_out(out)


def test_structured_values_equal_the_official_multi_qkv(model):
    """What StructureDiffusion runs (the chunker's noun phrases, their spans in the prompt, the aligned mean values
    in ``StructuredValuePatch``, as the node builds them) through a cross-attention layer of the model, against
    upstream's ``align_sequence`` + ``multi_qkv`` on the same phrases: the spans of 'a red circle', 'a blue square',
    'a gray background' and 'a red circle and a blue square' are word indices (0, 3), (4, 7), (8, 11), (0, 7)."""
    patch, phrases = structured_patch(model, PROMPT)
    assert phrases == ["a red circle", "a blue square", "a gray background", "a red circle and a blue square"]
    full, uc = model.encode([PROMPT]), model.encode([""])
    seqs = [full[0]] + [official_multi_align(full[0], model.encode([p])[0], span)
                        for p, span in zip(phrases, [(0, 3), (4, 7), (8, 11), (0, 7)])]
    g = torch.Generator().manual_seed(0)
    for block in (model.unet.in3.attn.block, model.unet.mid_attn.block):
        attn = block.attn2
        x = torch.randn(2, 16, attn.to_q.in_features, generator=g)
        context = torch.cat([uc, full])
        opts = {"block": ("middle", 0), "block_index": 0, "n_heads": attn.heads}
        with torch.no_grad():
            _, ctx2, val2 = patch(x, context, context, opts)
            ours = block._attend(attn, "attn2", x, ctx2, val2, opts, {})
            theirs = official_multi_qkv(attn, x, uc, full, [s[None] for s in seqs])
        assert patch.hits > 0
        assert torch.allclose(ours, theirs, atol=1e-5)
        # the prompt alone (no phrase) is another output: the values matter here
        assert not torch.allclose(theirs, official_multi_qkv(attn, x, uc, full, [full]), atol=1e-3)


def test_patch_changes_only_rows_carrying_the_prompt_and_respects_earlier_value_edits():
    g = torch.Generator().manual_seed(3)
    key, value, other = torch.randn(3, 6, 4, generator=g).unbind(0)
    patch = StructuredValuePatch(key, value)
    ctx = torch.stack([other, key])                            # [uncond, cond]
    _, _, v = patch(None, ctx, ctx, {})
    assert torch.equal(v[0], other) and torch.equal(v[1], value)
    long = torch.stack([torch.randn(12, 4, generator=g), key.repeat(2, 1)])   # batched with a 2x longer context
    _, _, v = patch(None, long, long, {})
    assert torch.equal(v[1], value.repeat(2, 1)) and torch.equal(v[0], long[0])
    edited = ctx.clone()
    edited[1] = torch.randn(6, 4, generator=g)                # a patch before ours swapped this row's values
    _, _, v = patch(None, ctx, edited, {})
    assert torch.equal(v, edited)
    for dtype in (torch.float16, torch.bfloat16):              # the model's dtype: matched within its rounding
        low = key.to(dtype)[None]
        _, _, v = patch(None, low, low, {})
        assert torch.allclose(v[0].float(), value, atol=2e-2), dtype
    other_low = other.to(torch.bfloat16)[None]
    assert torch.equal(patch(None, other_low, other_low, {})[2], other_low)   # and nothing else


def test_no_phrase_is_the_identity_and_phrases_change_the_image(model):
    base = model.generate([PROMPT], seed=4, steps=10)
    patch, _ = structured_patch(model, PROMPT, [])
    same = model.generate([PROMPT], seed=4, steps=10, extra={"patches": {"attn2_patch": [patch]}})
    assert torch.equal(same, base)
    patch, phrases = structured_patch(model, PROMPT)
    assert phrases == noun_phrases(PROMPT)
    changed = model.generate([PROMPT], seed=4, steps=10, extra={"patches": {"attn2_patch": [patch]}})
    assert (changed - base).abs().max() > 1e-3


def test_the_first_phrase_of_a_causal_encoder_keeps_its_states(model):
    """The text encoder is causal: the first phrase alone encodes its tokens exactly as the prompt does, so only
    later phrases bring new values (as with SD's CLIP)."""
    patch, _ = structured_patch(model, PROMPT, ["a red circle", "a blue square"])
    full, value = patch.keys[0], patch.values[0]
    red, blue = model.word_positions(PROMPT, "a red circle"), model.word_positions(PROMPT, "a blue square")
    assert torch.allclose(value[list(red)], full[list(red)], atol=1e-5)
    assert not torch.allclose(value[list(blue)], full[list(blue)], atol=1e-3)
    rest = [i for i in range(full.shape[0]) if i not in red + blue]
    assert torch.allclose(value[rest], full[rest], atol=1e-6)


def test_a_phrase_not_in_the_prompt_is_refused(model):
    with pytest.raises(ValueError, match="not in the prompt"):
        structured_patch(model, PROMPT, ["a green star"])


def test_chunker_keeps_escaped_brackets_out_textual_inversions_whole_and_coordinates_or():
    """Escaped brackets are text, not words; an ``embedding:Name`` is one word with its case (also inside
    emphasis brackets); other words are lower-cased; "A or B" is a coordination like "A and B"."""
    assert noun_phrases("a \\(Red\\) cube or a (embedding:MyCat) toy, photo") == [
        "a red cube", "a embedding:MyCat toy", "a red cube or a embedding:MyCat toy"]
    assert noun_phrases("a \\(embedding:MyCat\\) toy, photo") == ["a embedding:MyCat toy"]   # not 'MyCat\\'


def test_aligned_values_refusals_name_the_sizes():
    """A phrase must fit the prompt (last position < its tokens) and its own encoding (BOS + one state per
    position); either failure alone is refused, with both sizes in the text."""
    g = torch.Generator().manual_seed(1)
    full = torch.randn(6, 9, generator=g)
    fits = torch.randn(3, 9, generator=g)                           # BOS + 2 states: exactly enough for 2 positions
    assert torch.equal(aligned_values(full, [fits], [(4, 5)])[1, 4:6], fits[1:3])
    for phrase, pos in ((fits, (5, 6)), (torch.randn(2, 9, generator=g), (1, 2)), (fits[:1], (3,))):
        with pytest.raises(ValueError) as err:
            aligned_values(full, [phrase], [pos])
        assert str(err.value) == (f"phrase positions {pos} do not fit the prompt (6 tokens) or the phrase encoding "
                                  f"({phrase.shape[0]} tokens)")


def test_patch_of_several_prompts_matching_tolerance_and_hits():
    """Keys of two prompts (p, m, c): each row takes its own prompt's values; a row matches within
    ``rtol`` x the prompt's largest |state| + 1e-6 (at 0.9 of it yes, at 1.1 no), the prompt's own scale, not
    another prompt's; a prompt of zero states still matches itself; in fp16 the tolerance is 2 eps (a row exactly
    at it matches, 1.25 x it does not); a context of another width is left alone; a value edited by an earlier
    patch in one row leaves the others to this one; ``hits`` counts the rows changed over the calls."""
    g = torch.Generator().manual_seed(4)
    keys = torch.randn(2, 5, 3, generator=g)
    keys[0, 1, 0], keys[1] = 8.0, keys[1].clamp(-3, 3)
    keys[1, 2, 2] = 4.0                                              # prompt 1's largest |state|: 4
    values = torch.randn(2, 5, 3, generator=g)
    with pytest.raises(ValueError) as err:
        StructuredValuePatch(keys, values[:, :4])
    assert str(err.value) == "key states (2, 5, 3) and value states (2, 4, 3) differ"
    patch = StructuredValuePatch(keys, values)
    assert patch.hits == 0
    tol = 1e-3 * 4.0 + 1e-6
    near, far = keys[1].clone(), keys[1].clone()
    near[0, 0] += 0.9 * tol
    far[0, 0] += 1.1 * tol
    ctx = torch.stack([keys[1], keys[0], near, far])
    _, _, v = patch(None, ctx, ctx, {})
    assert torch.equal(v[0], values[1]) and torch.equal(v[1], values[0]) and torch.equal(v[2], values[1])
    assert torch.equal(v[3], far) and patch.hits == 3
    edited = ctx.clone()
    edited[0] = 0.0                                                  # an earlier patch swapped row 0's values
    _, _, v = patch(None, ctx, edited, {})
    assert torch.equal(v[0], edited[0]) and torch.equal(v[1], values[0]) and patch.hits == 5
    wide = torch.randn(2, 5, 6, generator=g)                        # another encoder's width, same token count
    assert torch.equal(patch(None, wide, wide, {})[2], wide) and patch.hits == 5
    zero = StructuredValuePatch(torch.zeros(5, 3), values[0])
    _, _, v = zero(None, torch.zeros(1, 5, 3), torch.zeros(1, 5, 3), {})
    assert torch.equal(v[0], values[0])
    half = torch.zeros(5, 3)
    half[0, 0] = 4.0                                                 # fp16 tolerance: 2 * 2**-10 * 4 = 2**-7
    low = StructuredValuePatch(half, values[0])
    for delta, hit in ((2 ** -7, True), (1.25 * 2 ** -7, False)):
        row = half.clone()
        row[1, 1] = delta
        row = row.half()[None]
        got = low(None, row, row, {})[2]
        assert torch.equal(got[0], values[0].half()) if hit else torch.equal(got, row), delta
