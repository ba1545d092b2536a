"""Tier 1: Prompt-to-Prompt's cross-attention edits and LocalBlend against google/prompt-to-prompt
(``prompt-to-prompt_stable.ipynb`` / ``null_text_w_ptp.ipynb``: ``AttentionControlEdit.forward``,
``AttentionReplace``, ``AttentionRefine``, ``AttentionReweight``, ``get_equalizer``, ``LocalBlend``), the official
formulas written out below in our own words. Our side is the code path P2PEditSampler runs: ``build_plan`` from
the prompts' words, ``P2PController`` inside ``ChunkFilter`` through the pack's attention hook (the override the node
installs), an ``AttentionStore`` chained after it on the cross layers, and ``LocalBlend`` built from
``blend_positions`` as the node builds it. The official side computes the attention probabilities itself from
the same q and k.

Shape legend: rows = [uncond x (1+k), cond x (1+k)]; probs (rows, heads, n, m); m = 12 keys (the tokenizer of
tests/test_words.py: BOS, words, EOS, padding); k edits.

Long because the second part (the plan, batch layouts and LocalBlend off its usual sizes, found by mutation
testing) reuses the first part's transcription of the official controller, so they stay in one file.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from standins import through_hook
from test_faithful_attention import SIGMAS, official_probs, run_layer
from test_words import (
    official_get_mapper,
    official_replacement_mapper,
    official_time_words_alpha,
    official_word_inds,
    pw,
    tokenize,
)

from attention.chunks import ChunkFilter
from attention.context import AttnContext
from attention.layers import LayerId
from attention.p2p import (
    LocalBlend,
    P2PController,
    blend_positions,
    build_plan,
    eos_index,
    replace_mapper,
    self_replace_limit,
)
from attention.store import AttentionStore, StoreConfig

STEPS, HEADS, M = 10, 2, 12


def official_inds(prompt: str, word: str) -> list[int]:
    """``ptp_utils.get_word_inds(text, word: str)``: the token positions of every occurrence of ``word``."""
    return [t for i, w in enumerate(prompt.split(" ")) if w == word for t in official_word_inds(prompt, i)]


def official_equalizer(text: str, values: dict[str, float]) -> torch.Tensor:
    """``get_equalizer``: ones (1, max_len), the tokens of each word set to its value."""
    eq = torch.ones(1, M)
    for word, val in values.items():
        eq[:, official_inds(text, word)] = val
    return eq


class OfficialEdit:
    """``AttentionControlEdit.forward`` on the cond half of the batch (``AttentionControl.__call__`` edits
    ``attn[h // 2:]`` only), with ``replace_cross_attention`` of AttentionReplace (``kind`` 'replace', mapper
    (k, m, m)), AttentionRefine ('refine', mapper (k, m) indices, alphas (k, m)) and, when ``equalizer`` is
    given, AttentionReweight wrapping it as ``make_controller`` does (prev_controller's result times the
    equalizer). ``cross_alpha``: get_time_words_attention_alpha (steps+1, k, m)."""

    def __init__(self, kind, mapper, cross_alpha, alphas=None, equalizer=None):
        self.kind, self.mapper, self.alphas, self.equalizer = kind, mapper, alphas, equalizer
        self.cross_alpha = cross_alpha[:, :, None, None, :]               # upstream's (steps+1, k, 1, 1, m)

    def replace_cross_attention(self, attn_base, att_replace):
        if self.kind == "replace":
            out = torch.einsum("hpw,bwn->bhpn", attn_base, self.mapper)
        else:
            a = self.alphas.reshape(self.alphas.shape[0], 1, 1, self.alphas.shape[1])
            out = attn_base[:, :, self.mapper].permute(2, 0, 1, 3) * a + att_replace * (1 - a)
        if self.equalizer is not None:
            out = out[None, :, :, :] * self.equalizer[:, None, None, :]     # (1, k, h, p, n) as upstream
        return out

    def forward(self, attn, cur_step):
        """attn (batch_size * h, n, m) of the cond rows -> the same, edited (cross-attention branch)."""
        bsz = self.cross_alpha.shape[1] + 1
        h = attn.shape[0] // bsz
        attn = attn.reshape(bsz, h, *attn.shape[1:]).clone()
        attn_base, attn_replace = attn[0], attn[1:]
        alpha_words = self.cross_alpha[cur_step]
        new = self.replace_cross_attention(attn_base, attn_replace) * alpha_words + (1 - alpha_words) * attn_replace
        attn[1:] = new.reshape(attn_replace.shape)    # torch's setitem drops upstream's leading 1 of the reweight
        return attn.reshape(bsz * h, *attn.shape[2:])


def official_layer(official: OfficialEdit, q, k, step):
    """Probabilities (rows, heads, n, m) of one cross-attention call of the official pipeline."""
    probs = official_probs(q, k, HEADS)
    half = probs.shape[0] // 2
    cond = official.forward(probs[half:].reshape(-1, *probs.shape[2:]), step)
    return torch.cat([probs[:half], cond.reshape(half, HEADS, *probs.shape[2:])])


def identity_values(rows: int) -> torch.Tensor:
    """v with each head's values the identity (rows, m, heads * m): the layer's output is its probabilities."""
    return torch.eye(M).repeat(1, HEADS).expand(rows, M, HEADS * M).clone()


def ours_layer(controllers, q, k, step, block=("input", 4), hw=(2, 3)):
    """Probabilities (rows, heads, n, m) after the node's patch (read back through identity values)."""
    out = run_layer(controllers, True, block, hw, q, k, identity_values(q.shape[0]), step, HEADS)
    return out.reshape(q.shape[0], q.shape[1], HEADS, M).transpose(1, 2)


def qk(g, rows, n, scale=2.0):
    return (torch.randn(rows, n, HEADS * 4, generator=g) * scale, torch.randn(rows, M, HEADS * 4, generator=g) * scale)


def check_edit(plan, official, k, seed):
    """Our patch and the official forward agree at every step, inside and past the cross-replace windows; the
    edit changes the maps somewhere (so the comparison is not of two unedited maps)."""
    ctl = ChunkFilter(P2PController(plan, STEPS))
    g = torch.Generator().manual_seed(seed)
    changed = False
    for step in range(STEPS):
        q, kk = qk(g, 2 * (1 + k), 6)
        ours = ours_layer([ctl], q, kk, step)
        want = official_layer(official, q, kk, step)
        assert torch.allclose(ours, want, atol=1e-6), step
        changed |= not torch.allclose(want, official_probs(q, kk, HEADS), atol=1e-4)
    assert changed


CROSS_WORDS = {"tiger": 0.3, "catfish": 0.55}


def test_replace_edit_equals_upstream_attention_replace():
    """Word swaps (one- and two-token words, two edits) with per-word cross-replace ends: AttentionReplace's
    ``einsum('hpw,bwn->bhpn', attn_base, mapper)`` blended by the words' alphas."""
    src = "a cat and a bobcat in a garden"
    targets = ["a tiger and a bobcat in a garden", "a cat and a catfish in a red"]
    plan = build_plan(src, targets, "replace", STEPS, 0.6, CROSS_WORDS, 0.0, {}, M, 0, pw)
    mapper = torch.stack([official_replacement_mapper(src, t, M) for t in targets])
    official = OfficialEdit("replace", mapper, official_time_words_alpha([src] + targets, STEPS, 0.6, CROSS_WORDS, M))
    check_edit(plan, official, 2, 0)


def official_refinement(src: str, targets: list[str]):
    """``get_refinement_mapper``: ``get_mapper`` of the source against each target, stacked."""
    s = tokenize(src)[0]
    s = s[:s.index(2, 1) + 1]
    out = []
    for t in targets:
        tt = tokenize(t)[0]
        out.append(official_get_mapper(s, tt[:tt.index(2, 1) + 1], M))
    return torch.stack([m for m, _ in out]), torch.stack([a for _, a in out])


def test_refine_edit_equals_upstream_attention_refine():
    """Added words (a one-token adjective, a two-token word, a phrase at the end): AttentionRefine's
    ``attn_base[:, :, mapper]`` blended with the edit's own maps by the alignment's alphas."""
    src = "a cat and a dog"
    targets = ["a fluffy cat and a dog", "a cat and a bobcat dog in a garden"]
    plan = build_plan(src, targets, "refine", STEPS, 0.8, {}, 0.0, {}, M, 0, pw)
    mapper, alphas = official_refinement(src, targets)
    assert 0 < alphas.sum() < alphas.numel()
    official = OfficialEdit("refine", mapper, official_time_words_alpha([src] + targets, STEPS, 0.8, {}, M), alphas)
    check_edit(plan, official, 2, 1)


@pytest.mark.parametrize("kind, src, tgt, values", [
    ("replace", "a cat and a dog", "a cat and a dog", {"dog": 3.0, "cat": -1.0}),   # the stable notebook's reweight
    ("replace", "a cat and a dog", "a tiger and a dog", {"tiger": 2.5}),            # on a replace
    ("refine", "a cat and a dog", "a fluffy bobcat and a dog", {"fluffy": 0.2, "bobcat": 4.0}),  # on a refine
])
def test_reweight_equals_upstream_attention_reweight(kind, src, tgt, values):
    """AttentionReweight with ``get_equalizer(prompts[1], words, values)``, on top of the edit ``make_controller``
    gives it (for equal prompts the replace mapper is the identity: the stable notebook's reweight alone)."""
    plan = build_plan(src, [tgt], "auto", STEPS, 0.8, {}, 0.0, values, M, 0, pw)
    assert plan.kind == [kind]
    alpha = official_time_words_alpha([src, tgt], STEPS, 0.8, {}, M)
    eq = official_equalizer(tgt, values)
    if kind == "replace":
        official = OfficialEdit("replace", official_replacement_mapper(src, tgt, M)[None], alpha, equalizer=eq)
    else:
        mapper, alphas = official_refinement(src, [tgt])
        official = OfficialEdit("refine", mapper, alpha, alphas, equalizer=eq)
    check_edit(plan, official, 1, 2)


def test_reweight_of_two_edits_takes_each_targets_equalizer():
    """Two reweighted edits whose word sits at different positions: upstream's ``make_controller`` has one edit
    and builds the equalizer from ``prompts[1]``; with several targets ``build_plan`` builds ``get_equalizer`` of
    each target, and each edit is multiplied by its own (AttentionReweight's formula, one equalizer row per edit)."""
    src = "a cat and a dog"
    targets = ["a cat and a fluffy dog", "a fluffy cat and a dog"]
    values = {"fluffy": 3.0}
    plan = build_plan(src, targets, "refine", STEPS, 0.8, {}, 0.0, values, M, 0, pw)
    mapper, alphas = official_refinement(src, targets)
    eq = torch.cat([official_equalizer(t, values) for t in targets])
    assert not torch.equal(eq[0], eq[1])
    official = OfficialEdit("refine", mapper, official_time_words_alpha([src] + targets, STEPS, 0.8, {}, M), alphas,
                            equalizer=eq)
    check_edit(plan, official, 2, 4)


def test_replace_controller_applies_a_general_mapper_as_upstream_einsum():
    """``build_plan``'s word-swap mappers are identities (equal token counts, refused otherwise), so the plans
    above cannot tell ``einsum('hpw,bwn->bhpn')`` from another contraction. AttentionReplace's formula on a
    plan whose mappers are random row-stochastic matrices (two edits), through the same patch."""
    g = torch.Generator().manual_seed(6)
    mapper = torch.rand(2, M, M, generator=g).softmax(-1)
    plan = build_plan("a cat and a dog", ["a tiger and a dog", "a cat and a fluffy"], "replace", STEPS, 0.6, {}, 0.0,
                      {}, M, 0, pw)
    plan.replace = mapper
    official = OfficialEdit("replace", mapper, official_time_words_alpha(
        ["a cat and a dog", "a tiger and a dog", "a cat and a fluffy"], STEPS, 0.6, {}, M))
    check_edit(plan, official, 2, 5)


def test_local_blend_on_the_edited_maps_equals_upstream():
    """LocalBlend as P2PEditSampler wires it (words -> ``blend_positions``, maps of the latent/4 layers, start
    ``int(blend_start * steps)``) on a store chained after the editor, against upstream's ``LocalBlend``: the
    attention store's sums of the cond rows' maps of the 16x16-type layers (upstream stores the map after the
    edit wrote into it, so the edits' maps are the edited ones), per prompt the words' ``get_word_inds``, the
    mask of ``get_mask`` and ``x_t[:1] + mask * (x_t - x_t[:1])`` once ``counter > start_blend``. Five steps of
    a 32x32 latent: layers of 16x16, 8x8 (three) and 4x4."""
    src, tgt = "a cat and a dog in a garden", "a tiger and a dog in a garden"
    plan = build_plan(src, [tgt], "replace", STEPS, 0.2, {}, 0.0, {}, M, 0, pw)   # edited maps in steps 0 and 1
    ctl = ChunkFilter(P2PController(plan, STEPS))
    store = AttentionStore(StoreConfig(capture_self=False))
    store.reset()
    latent, threshold, blend_start = (32, 32), 0.8, 0.2      # 0.8: random maps leave pixels out of the mask
    blend = LocalBlend(store, blend_positions([src, tgt], ["cat", "tiger"], pw),
                       (max(latent[0] // 4, 1), max(latent[1] // 4, 1)), threshold, int(blend_start * STEPS))
    official = OfficialEdit("replace", official_replacement_mapper(src, tgt, M)[None],
                            official_time_words_alpha([src, tgt], STEPS, 0.2, {}, M))
    alpha_layers = torch.zeros(2, 1, 1, 1, 1, M)
    for i, (p, words) in enumerate(((src, ("cat",)), (tgt, ("tiger",)))):
        for w in words:
            alpha_layers[i, :, :, :, :, official_inds(p, w)] = 1
    start_blend, counter = int(blend_start * STEPS), 0
    sums: dict = {}
    g = torch.Generator().manual_seed(3)
    layers = [(("input", 1), (16, 16)), (("input", 4), (8, 8)), (("middle", 0), (4, 4)), (("output", 0), (8, 8)),
              (("output", 1), (8, 8))]
    blended, own = 0, False
    for step in range(5):
        for block, hw in layers:
            q, kk = qk(g, 4, hw[0] * hw[1], 3.0)
            ours = ours_layer([ctl, store], q, kk, step, block, hw)
            want = official_layer(official, q, kk, step)
            assert torch.allclose(ours, want, atol=1e-6)
            if hw == (8, 8):                                            # upstream's down_cross[2:4] + up_cross[:3]
                sums[block] = sums.get(block, 0) + want[2:]             # cond rows (2, heads, 64, m)
        x = torch.randn(2, 4, *latent, generator=g)
        counter += 1
        if counter > start_blend:
            maps = torch.cat([sums[b].reshape(2, -1, 1, 8, 8, M) for b in sorted(sums)], 1)
            maps = (maps * alpha_layers).sum(-1).mean(1)
            maps = F.max_pool2d(maps, (3, 3), (1, 1), padding=(1, 1))
            mask = F.interpolate(maps, size=latent)
            mask = mask / mask.max(2, keepdim=True)[0].max(3, keepdim=True)[0]
            mask = mask.gt(threshold)
            mask = (mask[:1] + mask).float()
            want_x = x[:1] + mask * (x - x[:1])
            assert 0 < mask[1].mean() < 1
            own |= not torch.equal(mask[0], mask[1])                    # the edit's own pixels count somewhere
            blended += 1
        else:
            want_x = x
        assert torch.allclose(blend(step, x), want_x, atol=1e-6), step
    assert blended == 3 and own


# ----------------------------------------------------------------------------- the plan, the batch and the hooks
# What the equality tests above leave open (found by mutation testing, docs/faithful-ports.md): the refusals, the
# choice of edit, the batch layouts ComfyUI may send, and LocalBlend off its usual sizes.
def test_plan_and_blend_refusals_repeat_the_bad_value_and_the_fix():
    src, targets = "a cat and a dog", ["a tiger and a dog", "a cat and a fluffy dog"]
    listed = "; ".join(f"{t!r}: {pw(t).names}" for t in targets)

    def refused(match, **kw):
        args = dict(source=src, targets=targets, edit="auto", steps=STEPS, cross_steps=0.8, cross_words={},
                    self_steps=0.4, reweight={}, length=M, self_max_tokens=0, words_of=pw)
        args.update(kw)
        with pytest.raises(ValueError, match=match):
            build_plan(**args)
    refused(r"^edit 'swap' is not one of \['auto', 'replace', 'refine'\]$", edit="swap")
    for what, kw in (("reweight", "reweight"), ("cross_replace_words", "cross_words")):
        refused("^" + re.escape(f"{what} word 'zebra' is in none of the target prompts ({listed}); it applies to "
                                "words of the target prompts (matched ignoring case and (word:weight) emphasis). Fix "
                                "the word or the prompts.") + "$", **{kw: {"zebra": 2.0}})
    refused("^" + re.escape("replace needs prompts with the same number of words: 'a cat and a dog' has 5, "
                            "'a cat and a fluffy dog' has 6; use edit 'refine' or 'auto'") + "$", edit="replace")
    refused("^" + re.escape("replace swaps token by token, but [('cat', 'catfish')] have different token counts in "
                            "this tokenizer; use edit 'refine' (or 'auto', which picks it)") + "$",
            targets=["a catfish and a tiger"], edit="replace")                  # dog -> tiger: equal counts, fine
    prompts = ["a cat", "a tiger"]
    with pytest.raises(ValueError, match="^" + re.escape(
            "blend words ['zebra'] are in none of the prompts ('a cat': ['a', 'cat']; 'a tiger': ['a', 'tiger']); use "
            "words of the source or target prompts (matched ignoring case and (word:weight) emphasis)") + "$"):
        blend_positions(prompts, ["cat", "zebra"], pw)
    plan = build_plan("a cat", ["a tiger"], "auto", STEPS, 0.8, {}, 0.4, {}, M, 0, pw)
    q, kk = qk(torch.Generator().manual_seed(0), 4, 6)
    with pytest.raises(ValueError, match="^cross-attention has 10 keys but the edit plan 12; the prompts and the "
                                         "negative must be whole 77-token chunks of one another$"):
        run_layer([P2PController(plan, STEPS)], True, ("input", 4), (2, 3), q, kk[:, :10], kk[:, :10], 1, HEADS)


@pytest.mark.parametrize("edit, src, tgt, kind", [
    ("auto", "a cat and a dog", "a tiger and a dog", "replace"),       # word swap of equal token counts
    ("auto", "a cat and a dog", "a fluffy cat and a dog", "refine"),   # an added word
    ("auto", "a cat and a dog", "a catfish and a dog", "refine"),      # a swap of 1 -> 2 tokens
    ("refine", "a cat and a dog", "a tiger and a dog", "refine"),      # an explicit edit is kept
    ("replace", "a cat and a dog", "a cat and a dog", "replace"),
])
def test_edit_kind_follows_make_controller(edit, src, tgt, kind):
    """``is_replace_controller`` of the notebooks: replace for equal word (and token) counts, else refine."""
    assert build_plan(src, [tgt], edit, STEPS, 0.8, {}, 0.4, {}, M, 0, pw).kind == [kind]


def official_replacement_mapper_tokens(src: list[int], dst: list[int], max_len: int) -> torch.Tensor:
    """seq_aligner ``get_replacement_mapper_``'s loop for one swapped word at token positions ``src`` -> ``dst``
    (its ratio 1/len(dst) spread for different counts; its tail ``mapper[j, j]``)."""
    mapper = torch.zeros(max_len, max_len)
    i = j = cur = 0
    while i < max_len and j < max_len:
        if cur < 1 and src[0] == i:
            if len(src) == len(dst):
                mapper[src, dst] = 1
            else:
                for t in dst:
                    mapper[src, t] = 1 / len(dst)
            i, j, cur = i + len(src), j + len(dst), cur + 1
        elif cur < 1:
            mapper[i, j] = 1
            i, j = i + 1, j + 1
        else:
            mapper[j, j] = 1
            i, j = i + 1, j + 1
    return mapper


@pytest.mark.parametrize("src, dst", [((2,), (2, 3)), ((2, 3), (2,))])
def test_replace_mapper_of_different_token_counts(src, dst):
    """``replace_mapper`` off the node's path (build_plan refuses such swaps): upstream's rows up to the swapped
    word (its tokens spread 1/len over the target's), then the later tokens shifted by the count change, where
    upstream's tail ``mapper[j, j]`` misaligns them (docs/faithful-ports.md)."""
    ours = replace_mapper([src], [dst], 8)
    theirs = official_replacement_mapper_tokens(list(src), list(dst), 8)
    s, d, end = list(src), list(dst), src[-1] + 1
    assert torch.equal(ours[:s[0]], theirs[:s[0]])                          # before the swap
    assert torch.equal(ours[s][:, d], theirs[s][:, d]) and ours[s].sum() == len(s)   # the swap's spread
    shift = len(dst) - len(src)
    for i in range(end, 8):
        want = torch.zeros(8)
        if i + shift < 8:
            want[i + shift] = 1
        assert torch.equal(ours[i], want), i


def test_wants_probs_on_the_calls_upstream_edits():
    """Only sampling calls with a cond chunk and a source plus edits, cross layers always, self layers up to the
    size limit from step 0 to ``int(self_replace_steps * steps)``."""
    plan = build_plan("a cat", ["a tiger"], "auto", STEPS, 0.8, {}, 0.4, {}, M, 16, pw)
    ctl = P2PController(plan, STEPS)
    lid = LayerId("input", 1, 0)

    def wants(cross, cou, items, step, hw=(4, 4)):
        return ctl.wants_probs(AttnContext(lid, cross, *hw, HEADS, cou, items, 1.0, step, STEPS))
    assert wants(True, [1, 0], 2, 1) and wants(True, [0], 2, 1) and wants(True, [0, 1], 3, 9)
    assert not wants(True, [1], 2, 1) and not wants(True, [1, 0], 1, 1) and not wants(True, [1, 0], 2, None)
    assert wants(False, [1, 0], 2, 0) and wants(False, [1, 0], 2, 3)
    assert not wants(False, [1, 0], 2, 4) and not wants(False, [1, 0], 2, 0, (4, 5))


def layer_call(controllers, is_cross, q, k, step, cou, hw=(2, 3)):
    """One attention call with ComfyUI's ``cond_or_uncond`` ``cou`` (a chunk of rows per entry)."""
    opts = {"block": ("input", 4), "block_index": 0, "n_heads": HEADS, "cond_or_uncond": cou,
            "sigmas": SIGMAS[step].reshape(1), "sample_sigmas": SIGMAS,
            "activations_shape": [q.shape[0], q.shape[-1], *hw]}
    v = identity_values(q.shape[0]) if is_cross else torch.eye(q.shape[1]).repeat(1, HEADS).expand(
        q.shape[0], -1, -1).clone()
    out = through_hook(controllers, is_cross, q, k, v, opts)
    return out.reshape(q.shape[0], q.shape[1], HEADS, -1).transpose(1, 2)


@pytest.mark.parametrize("cou", [[0, 1], [1, 0, 0], [0, 0, 1]])
@pytest.mark.parametrize("is_cross", [True, False])
def test_every_cond_chunk_is_edited_in_any_batch_order(cou, is_cross):
    """ComfyUI may put the cond chunk first or batch several cond entries: each cond chunk is edited as
    upstream's cond half (AttentionControlEdit.forward, cross and self branches), the uncond chunks never."""
    src, tgt = "a cat and a dog", "a fluffy cat and a dog"
    plan = build_plan(src, [tgt], "refine", STEPS, 0.8, {}, 0.4, {}, M, 64, pw)
    mapper, alphas = official_refinement(src, [tgt])
    official = OfficialEdit("refine", mapper, official_time_words_alpha([src, tgt], STEPS, 0.8, {}, M), alphas)
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2 * len(cou), 6, HEADS * 4, generator=g) * 2
    k = torch.randn(2 * len(cou), M if is_cross else 6, HEADS * 4, generator=g) * 2
    ours = layer_call([ChunkFilter(P2PController(plan, STEPS))], is_cross, q, k, 1, cou)
    probs = official_probs(q, k, HEADS)
    want = probs.clone()
    for c, kind in enumerate(cou):
        if kind == 0:
            chunk = probs[2 * c:2 * c + 2]
            if is_cross:
                want[2 * c:2 * c + 2] = official.forward(chunk.reshape(-1, 6, M), 1).reshape(chunk.shape)
            else:                                 # replace_self_attention: the source's map (under the size limit)
                want[2 * c + 1] = chunk[0]
    assert torch.allclose(ours, want, atol=1e-6)


def two_edits_official_one():
    """A refine plan of two edits and upstream's controller of the source and the FIRST edit only (a batch with
    fewer items than the plan has edits): (plan, official)."""
    src, targets = "a cat and a dog", ["a fluffy cat and a dog", "a cat and a dog in a garden"]
    plan = build_plan(src, targets, "refine", STEPS, 0.8, {}, 0.4, {}, M, 0, pw)
    mapper, alphas = official_refinement(src, targets[:1])
    official = OfficialEdit("refine", mapper, official_time_words_alpha([src] + targets[:1], STEPS, 0.8, {}, M),
                            alphas)
    return plan, official


def test_a_batch_with_fewer_items_than_edits_edits_those_it_has():
    """A plan of two edits on a batch of the source and one edit: that edit is the plan's first."""
    plan, official = two_edits_official_one()
    q, kk = qk(torch.Generator().manual_seed(8), 4, 6)
    assert torch.allclose(ours_layer([P2PController(plan, STEPS)], q, kk, 2), official_layer(official, q, kk, 2),
                          atol=1e-6)


def local_blend_store(sizes, seed):
    store = AttentionStore(StoreConfig(capture_self=False))
    store.reset()
    g = torch.Generator().manual_seed(seed)
    for n, hw in enumerate(sizes):
        q, kk = qk(g, 4, hw[0] * hw[1], 3.0)
        run_layer([store], True, ("output", n), hw, q, kk, torch.zeros(4, M, HEADS * 4), 0, HEADS)
    return store


@pytest.mark.parametrize("wanted, chosen", [((4, 6), (4, 6)), ((3, 5), (4, 6)), ((6, 3), (8, 12)), ((9, 9), (8, 12)),
                                            ((1, 1), (2, 3))])
def test_local_blend_takes_the_nearest_captured_size(wanted, chosen):
    """The node asks for latent / 4 (upstream's 16x16 at 512 px); when no layer has that size the nearest height
    is taken (ties: the larger). The mask is then the one of the layers of that size."""
    store = local_blend_store([(8, 12), (4, 6), (4, 6), (2, 3)], 10)
    words = [[2], [3, 5]]
    blend = LocalBlend(store, words, wanted, 0.5, 0)
    got = blend.mask((16, 24))
    assert blend.size == chosen
    exact = LocalBlend(store, words, chosen, 0.5, 0)
    assert torch.equal(got, exact.mask((16, 24)))
    assert {i.layer for i in store.layers(True) if (i.height, i.width) == chosen} == set(blend.layers)


def test_local_blend_edge_cases_as_upstream():
    """An item without blend words (the word only in the source) has no own pixels (its alpha_layers row is 0);
    threshold 1 keeps no pixel (``gt``); the hook keeps the latent's dtype and publishes its mask, none before."""
    store = local_blend_store([(4, 4), (4, 4)], 11)
    blend = LocalBlend(store, [[2], []], (4, 4), 0.5, 0)
    assert blend.last_mask is None
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(12)).half()
    out = blend(0, x)
    assert out.dtype == torch.float16 and blend.last_mask is not None
    m = blend.last_mask
    assert torch.equal(m[1], m[0]) and 0 < m[0].mean() < 1                 # the source's mask only
    assert torch.equal(out, (x[:1] + m.half() * (x - x[:1])))
    assert LocalBlend(store, [[2], [3]], (4, 4), 1.0, 0).mask((8, 8)).sum() == 0


def test_eos_and_self_replace_limit_on_edge_sizes():
    """The end of an empty prompt (BOS, EOS, padding) is index 1; the self-attention limit of odd, flat and tiny
    latents: (h // div) * (w // div), at least 1 x 1 (div 4 generated, 2 inverted)."""
    assert eos_index([1, 2, 2, 2]) == 1 and eos_index([1, 5, 6, 2]) == 3
    assert self_replace_limit((30, 34), False) == 7 * 8
    assert self_replace_limit((64, 96), True) == 32 * 48
    assert self_replace_limit((4, 64), False) == 1 * 16 and self_replace_limit((64, 2), True) == 32 * 1
