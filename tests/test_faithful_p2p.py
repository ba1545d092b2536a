"""Tier 1: Prompt-to-Prompt's cross-attention edits and LocalBlend against google/prompt-to-prompt
(``prompt-to-prompt_stable.ipynb`` / ``null_text_w_ptp.ipynb``: ``AttentionControlEdit.forward``,
``AttentionReplace``, ``AttentionRefine``, ``AttentionReweight``, ``get_equalizer``, ``LocalBlend``), the official
formulas written out below in our own words. Our side is the code path P2PEditSampler runs: ``build_plan`` from
the prompts' words, ``P2PController`` inside ``ChunkFilter`` inside ``ControlledAttention`` (the patch the node
installs), an ``AttentionStore`` chained after it on the cross layers, and ``LocalBlend`` built from
``blend_positions`` as the node builds it. The official side computes the attention probabilities itself from
the same q and k.

Shape legend: rows = [uncond x (1+k), cond x (1+k)]; probs (rows, heads, n, m); m = 12 keys (the tokenizer of
tests/test_words.py: BOS, words, EOS, padding); k edits.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_faithful_attention import official_probs, run_layer
from test_words import (
    official_get_mapper,
    official_replacement_mapper,
    official_time_words_alpha,
    official_word_inds,
    pw,
    tokenize,
)

from attention.chunks import ChunkFilter
from attention.p2p import LocalBlend, P2PController, blend_positions, build_plan
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
