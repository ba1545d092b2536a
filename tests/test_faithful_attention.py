"""Tier 1: the attention-side ports against the official formulas, written out here in our own words, on identical
tensors that reach our code the way a sampling run does: through the pack's attention hook (the override the
nodes install), the ``AttentionStore`` that accumulates what it sees, and the functions the nodes call on the store
(docs/faithful-ports.md, issue 26). The official side computes its attention probabilities itself from the same
q and k, so the store's accumulation is under test too.

Shape legend: q (rows, n, heads * d), k (rows, m, heads * d); probs (heads, n, m); rows = [uncond, cond] x items.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from standins import through_hook

from attention.p2p import P2PController, build_plan, self_replace_limit
from attention.prompt_mixing import MixSettings, blend_labels, foreground, injection_masks
from attention.schedule import simple_sigmas
from attention.store import AttentionStore, StoreConfig, word_maps

SIGMAS = simple_sigmas(10)
PROMPT = "a red circle and a blue square on a gray background"


@pytest.fixture(scope="module")
def model():
    from attention.shapesworld.model import ShapesWorldModel
    return ShapesWorldModel()


def run_layer(controllers, is_cross, block, hw, q, k, v, step, heads):
    """One attention call of layer ``block`` (feature map ``hw``) at schedule step ``step``, as a UNet makes it:
    ComfyUI's extra_options, cond_or_uncond [uncond, cond]; returns the output (rows, n, heads * d)."""
    opts = {"block": block, "block_index": 0, "n_heads": heads, "cond_or_uncond": [1, 0],
            "sigmas": SIGMAS[step].reshape(1), "sample_sigmas": SIGMAS,
            "activations_shape": [q.shape[0], q.shape[-1], *hw]}
    return through_hook(controllers, is_cross, q, k, v, opts)


def official_probs(q, k, heads):
    """(rows, heads, n, m): softmax(q k^T / sqrt(d)) per head, heads split as ``b n (h d) -> (b h) n d``."""
    b, n, inner = q.shape
    d = inner // heads
    qh = q.reshape(b, n, heads, d).transpose(1, 2)
    kh = k.reshape(b, k.shape[1], heads, d).transpose(1, 2)
    return (qh @ kh.transpose(-1, -2) * d ** -0.5).softmax(-1)


# ----------------------------------------------------------------------------- MnM self-attention injection
def official_injection_mask(cross: torch.Tensor, preserve: list[int], obj: int, threshold: float) -> torch.Tensor:
    """local-prompt-mixing ``PromptMixing.mask_self_attn_patches`` (remove_obj_from_self_mask on) on the
    original's step-averaged per-head map of the layer (``AttentionStore.get_average_attention``): one min-max
    over (heads, n, m), a pixel where any head exceeds the threshold, object pixels removed."""
    norm = cross - cross.min()
    norm = norm / norm.max()
    n = cross.shape[1]
    mask = torch.zeros(n, n)
    for tk in preserve:
        pix = torch.unique((norm[:, :, tk] > threshold).nonzero(as_tuple=True)[1])
        mask[pix, :] = 1
        mask[:, pix] = 1
    obj_pix = torch.unique((norm[:, :, obj] > threshold).nonzero(as_tuple=True)[1])
    mask[obj_pix, :] = 0
    mask[:, obj_pix] = 0
    return mask


def test_injection_mask_equals_upstream():
    """PromptMixSampler's first pass: a store with keep_heads (StoreConfig as the node builds it) fills from three
    steps of a cross-attention layer; ``injection_masks`` on it against the official mask of the averaged heads."""
    g = torch.Generator().manual_seed(3)
    heads, d, n, m, hw = 4, 8, 64, 10, (8, 8)
    block = ("output", 3)
    calls = [(torch.randn(2, n, heads * d, generator=g) * 2, torch.randn(2, m, heads * d, generator=g) * 2)
             for _ in range(3)]
    v = torch.randn(2, m, heads * d, generator=g)
    stores = {}
    for keep in (True, False):
        store = AttentionStore(StoreConfig(self_max_tokens=32 * 32, keep_heads=keep))
        store.reset()
        for step, (q, k) in enumerate(calls):
            run_layer([store], True, block, hw, q, k, v, step, heads)
        store.finish()
        stores[keep] = store
    cross = torch.stack([official_probs(q, k, heads)[1] for q, k in calls]).mean(0)     # cond row: (heads, n, m)
    for threshold in (0.05, 0.2, 0.5):
        ours = injection_masks(stores[True], [(4,), (6,)], (2,), threshold, 32 * 32)
        theirs = official_injection_mask(cross, [4, 6], 2, threshold)
        assert len(ours) == 1 and torch.equal(next(iter(ours.values())), theirs), threshold
        assert 0 < theirs.sum() < n * n
        # the head mean (a store without heads) gives another mask on these maps
        assert not torch.equal(next(iter(injection_masks(stores[False], [(4,), (6,)], (2,), threshold).values())),
                               theirs)


def test_injection_mask_layers_flat_maps_and_exact_thresholds_equal_upstream():
    """The parts of ``mask_self_attn_patches`` the test above cannot see: flat maps (a large minimum, which the
    min-max removes), the strict ``>`` at the ends of the range (threshold 0: the minimum's pixel is not a
    word's; threshold 1: no pixel is), and which layers get a mask (every captured layer up to ``max_tokens``,
    wherever it sits among bigger ones). Maps of a store without heads (one head: the mean)."""
    g = torch.Generator().manual_seed(9)
    heads, d, m = 2, 4, 6
    store = AttentionStore(StoreConfig(self_max_tokens=32 * 32, keep_heads=False))
    store.reset()
    calls = {}
    for block, hw in ((("input", 1), (8, 8)), (("output", 3), (4, 4))):
        q = torch.randn(2, hw[0] * hw[1], heads * d, generator=g) * 0.3          # near-uniform attention
        k = torch.randn(2, m, heads * d, generator=g)
        run_layer([store], True, block, hw, q, k, torch.zeros(2, m, heads * d), 0, heads)
        calls[block] = official_probs(q, k, heads)[1].mean(0, keepdim=True)     # cond row, heads averaged
    store.finish()
    small = [lid for lid in store.cross if lid.kind == "output"]
    assert list(injection_masks(store, [(1,)], (2,), 0.5, 16)) == small          # 8x8 (64 tokens) skipped
    cross = calls[("output", 3)]                                                   # (1, 16, m)
    assert cross.min() > 0.05                                                      # flat: the min-max matters
    lo, hi = int(cross.flatten().argmin() % m), int(cross.flatten().argmax() % m)   # tokens of the min, the max
    for preserve, obj, threshold in (([(1,), (3,)], (2,), 0.5), ([(0,)], (5,), 0.2), ([(lo,)], (lo,), 0.0),
                                     ([(hi,)], (hi,), 1.0), ([((lo + 1) % m,)], (lo,), 0.0)):
        ours = injection_masks(store, preserve, obj, threshold, 16)[small[0]]
        theirs = official_injection_mask(cross, [p[0] for p in preserve], obj[0], threshold)
        assert torch.equal(ours, theirs), (preserve, obj, threshold)


def test_blend_labels_default_nouns_names_and_refusals(model):
    """``blend_labels`` called as a library function: the defaults are the node's (every noun, no background
    noun), a listed ``nouns`` replaces the finder, each entry keeps its word, and a word not in the prompt is
    refused saying what it was given as."""
    pw = model.prompt_words(PROMPT)
    assert blend_labels(pw, "circle") == blend_labels(pw, "circle", "", "")
    assert blend_labels(pw, "circle").names == ["circle", "square", "background"]
    listed = blend_labels(pw, "square", "circle", "square")
    assert listed.names == ["circle", "square"] and listed.obj == 1 and listed.background == frozenset({1})
    from attention.words import WordNotInPromptError
    with pytest.raises(WordNotInPromptError, match="^object word 'hexagon' is not in the prompt"):
        blend_labels(pw, "hexagon")
    for nouns, bg in (("hexagon", ""), ("", "hexagon")):
        with pytest.raises(WordNotInPromptError, match="^noun 'hexagon' is not in the prompt"):
            blend_labels(pw, "circle", nouns, bg)


# ----------------------------------------------------------------------------- MnM foreground at the blend
def official_segments(self_attn: np.ndarray, k: int) -> np.ndarray:
    """``Segmentor.cluster``: np.random.seed(1), then KMeans(n_clusters, n_init=10) on the (n, n) map's rows."""
    state = np.random.get_state()
    try:
        np.random.seed(1)
        return KMeans(n_clusters=k, n_init=10).fit(self_attn).labels_
    finally:
        np.random.set_state(state)


def official_background_mask(clusters: np.ndarray, cross: np.ndarray, nouns: list[tuple[int, str]],
                             obj_token_index: int, background_nouns: list[str], threshold: float) -> np.ndarray:
    """``Segmentor.cluster2noun`` + ``get_background_mask``: cross (r/2, r/2, m); nouns: NLTK's (word index, word)
    of every NN* word; 1 = foreground (kept from the variation), 0 = taken from the original."""
    label = {}
    maps = cross[:, :, [i + 1 for i, _ in nouns]]
    norm = np.zeros_like(maps).repeat(2, axis=0).repeat(2, axis=1)
    for i in range(maps.shape[-1]):
        mp = maps[:, :, i].repeat(2, axis=0).repeat(2, axis=1)
        norm[:, :, i] = (mp - np.abs(mp.min())) / mp.max()
    k = int(clusters.max()) + 1
    for c in range(k):
        cm = np.zeros_like(clusters)
        cm[clusters == c] = 1
        scores = [(cm * norm[:, :, i]).sum() / cm.sum() for i in range(len(nouns))]
        label[c] = nouns[int(np.argmax(np.array(scores)))] if max(scores) > threshold else "BG"
    obj_segments = [c for c in label if label[c][0] == obj_token_index - 1]
    bg_segments = [c for c in label if label[c] == "BG" or label[c][1] in background_nouns]
    mask = clusters.copy()
    for c in range(k):
        mask[clusters == c] = 0 if (c in bg_segments and c not in obj_segments) else 1
    return mask


def test_blend_foreground_with_the_default_nouns_equals_upstream(model):
    """PromptMixSampler's blend with its default ``nouns`` (empty: every noun of the prompt) on ShapesWorld's
    tokenizer: the self (8x8) and cross (4x4) layers reach the store as attention calls; the official side clusters
    with its own KMeans call and labels with NLTK's nouns of the prompt (circle, square, background: NN)."""
    g = torch.Generator().manual_seed(4)
    r, m = 8, 24
    pw = model.prompt_words(PROMPT)
    yy, xx = torch.meshgrid(torch.arange(r // 2).float(), torch.arange(r // 2).float(), indexing="ij")
    target = torch.rand(r // 2, r // 2, m, generator=g) * 0.05 + 0.01
    target[..., 3] += torch.exp(-((yy - 0.5) ** 2 + (xx - 0.5) ** 2))           # circle
    target[..., 7] += torch.exp(-((yy - 3) ** 2 + (xx - 3) ** 2))               # square
    target[..., 11] += (yy >= 2).float() * (xx < 2).float()                      # background
    # a cross layer whose probabilities are ``target``: q = log target, k = identity scaled by sqrt(d)
    q_c = target.reshape(1, -1, m).log().expand(2, -1, -1).contiguous()
    k_c = (torch.eye(m) * m ** 0.5)[None].expand(2, -1, -1).contiguous()
    up = target.repeat_interleave(2, 0).repeat_interleave(2, 1).reshape(r * r, m)
    feats = torch.randn(r * r, 4, generator=g) + up[:, [3, 7, 11, 0]] * 6
    q_s = feats[None].expand(2, -1, -1).contiguous()
    store = AttentionStore(StoreConfig(self_max_tokens=32 * 32, keep_heads=True))
    store.reset()
    # a 2x2 cross layer where the circle is everywhere: upstream reads the 16x16 (here 4x4) layers only
    q_mid = (torch.full((4, m), 0.01) + torch.eye(m)[3]).log()[None].expand(2, -1, -1).contiguous()
    for step in range(2):
        run_layer([store], True, ("output", 3), (r // 2, r // 2), q_c, k_c, torch.zeros(2, m, m), step, 1)
        run_layer([store], True, ("middle", 0), (2, 2), q_mid, k_c, torch.zeros(2, m, m), step, 1)
        run_layer([store], False, ("input", 1), (r, r), q_s, q_s * 2, torch.zeros(2, r * r, 4), step, 1)
    store.finish()
    self_map = official_probs(q_s, q_s * 2, 1)[1, 0].numpy()
    cross = official_probs(q_c, k_c, 1)[1, 0].reshape(r // 2, r // 2, m).numpy()
    clusters = official_segments(self_map, 5)
    s = MixSettings(self_size=r, cross_size=r // 2, clusters=5, cluster_threshold=0.3)
    nltk_nouns = [(2, "circle"), (6, "square"), (10, "background")]      # word index, word (NLTK: NN)
    seen = set()
    for background_nouns in ("", "background", "circle, background"):
        labels = blend_labels(pw, "circle", "", background_nouns)          # the node's default nouns
        ours = foreground(store, 0, labels.positions, s, labels.background, labels.obj)
        theirs = official_background_mask(clusters.reshape(r, r), cross, nltk_nouns, 3,
                                          [w.strip() for w in background_nouns.split(",") if w.strip()], 0.3)
        assert ours.dtype == torch.float32 and np.array_equal(ours.numpy().astype(np.int64), theirs), background_nouns
        seen.add(int(theirs.sum()))
    assert len(seen) > 1                              # the background nouns change the mask on these maps
    # the former default (object word only) loses the other nouns' clusters to the blend
    only_obj = foreground(store, 0, [pw.positions("circle")], s, frozenset(), 0)
    assert only_obj.sum() < foreground(store, 0, labels.positions, s, frozenset(), labels.obj).sum()
    # a store without self (or cross) maps is refused, naming which maps are missing
    for cfg, what in ((StoreConfig(capture_self=False), "self-attention"), (StoreConfig(capture_cross=False),
                                                                            "cross-attention")):
        partial = AttentionStore(cfg)
        partial.reset()
        run_layer([partial], True, ("output", 3), (r // 2, r // 2), q_c, k_c, torch.zeros(2, m, m), 0, 1)
        run_layer([partial], False, ("input", 1), (r, r), q_s, q_s * 2, torch.zeros(2, r * r, 4), 0, 1)
        with pytest.raises(ValueError, match=f"^no {what} maps were captured"):
            foreground(partial, 0, labels.positions, s, labels.background, labels.obj)


# ----------------------------------------------------------------------------- P2P self-attention size limit
@pytest.mark.parametrize("inverted", [False, True])
def test_self_attention_limit_is_16_generated_32_inverted_at_512px(model, inverted):
    """SD at 512 px (a 64x64 latent): ``prompt-to-prompt_stable.ipynb`` replaces an edit's self-attention with the
    source's on layers with ``att_replace.shape[2] <= 16 ** 2`` query pixels, ``null_text_w_ptp.ipynb`` on
    ``<= 32 ** 2``. The plan is built as P2PEditSampler builds it (``self_replace_limit(latent, inverted)``) and the
    controller sees self-attention calls of 8x8, 16x16 and 32x32 layers inside the self-replace window."""
    official_limit = (32 if inverted else 16) ** 2
    src, tgt = "a red circle", "a red triangle"
    plan = build_plan(src, [tgt], "auto", 10, 0.8, {}, 0.4, {}, 24, self_replace_limit((64, 64), inverted),
                      model.prompt_words)
    ctl = P2PController(plan, 10)
    g = torch.Generator().manual_seed(5)
    for side in (8, 16, 32):
        n = side * side
        q, k, v = (torch.randn(4, n, 4, generator=g) for _ in range(3))        # [uncond src, edit, cond src, edit]
        out = run_layer([ctl], False, ("input", 1), (side, side), q, k, v, 1, 1)
        probs = official_probs(q, k, 1)
        replaced = n <= official_limit
        edit_probs = probs[2] if replaced else probs[3]
        assert torch.allclose(out[3], edit_probs[0] @ v[3], atol=1e-5), (side, inverted)
        assert torch.allclose(out[:3], torch.stack([probs[i, 0] @ v[i] for i in range(3)]), atol=1e-5)
        # outside the window (step 4 of 10 with self_replace_steps 0.4): nothing is replaced
        late = run_layer([ctl], False, ("input", 1), (side, side), q, k, v, 4, 1)
        assert torch.allclose(late[3], probs[3, 0] @ v[3], atol=1e-5)


# ----------------------------------------------------------------------------- P2P LocalBlend
def test_local_blend_equals_upstream_mask():
    """``LocalBlend`` (P2P Edit Sampler's after-step hook) on a store filled through the hook (``through_hook``) against
    the null-text notebook's ``LocalBlend.get_mask`` / ``__call__``: each item's blend words' maps summed over the
    words, averaged over the 16x16-type layers and heads (ours: the store's mean over steps; upstream sums the
    steps, which the max-normalization cancels), 3x3 max-pool, nearest resize to the latent, divided by the max,
    over the threshold, the source's mask added; x = x_src + mask * (x - x_src) from ``start_blend`` on."""
    from attention.p2p import LocalBlend
    g = torch.Generator().manual_seed(8)
    heads, d, m = 2, 4, 8
    words = [[2], [3, 5]]                                             # source: one word; edit: a two-token word
    store = AttentionStore(StoreConfig(capture_self=False))
    store.reset()
    probs = []
    for step in range(2):
        for block in (("input", 4), ("output", 1)):
            q = torch.randn(4, 16, heads * d, generator=g) * 2            # [uncond src, edit, cond src, edit]
            k = torch.randn(4, m, heads * d, generator=g) * 2
            run_layer([store], True, block, (4, 4), q, k, torch.zeros(4, m, heads * d), step, heads)
            probs.append(official_probs(q, k, heads)[2:])                 # cond rows: (2, heads, 16, m)
        run_layer([store], True, ("middle", 0), (2, 2), torch.randn(4, 4, heads * d, generator=g),
                  torch.randn(4, m, heads * d, generator=g), torch.zeros(4, m, heads * d), step, heads)
    store.finish()
    maps = torch.stack(probs, 1)                                          # (2, layers x steps, heads, 16, m)
    alpha = torch.zeros(2, m)
    for b, w in enumerate(words):
        alpha[b, w] = 1
    per = (maps * alpha[:, None, None, None, :]).sum(-1).mean((1, 2)).reshape(2, 1, 4, 4)
    pooled = F.max_pool2d(per, (3, 3), (1, 1), padding=(1, 1))
    mask = F.interpolate(pooled, size=(8, 8))
    mask = mask / mask.amax((2, 3), keepdim=True)
    mask = mask.gt(0.8)
    mask = (mask[:1] + mask).float()
    x = torch.randn(2, 3, 8, 8, generator=g)
    blend = LocalBlend(store, words, (4, 4), 0.8, start=1)
    assert torch.equal(blend(0, x), x)                                   # before start_blend: untouched
    ours = blend(1, x)
    assert torch.allclose(ours, x[:1] + mask * (x - x[:1]), atol=1e-6)
    assert 0 < mask[1].mean() < 1


# ----------------------------------------------------------------------------- the attention store's averages
class _PassThroughEditor:
    """An editor that changes nothing: its presence makes the layer compute every row's probabilities, so the
    store reads the cond rows out of the whole batch (what happens next to P2P or MnM's injection)."""

    edits_probs = True

    def wants_probs(self, ctx):
        return True

    def edit_qkv(self, q, k, v, ctx):
        return q, k, v

    def edit_probs(self, probs, ctx, query_slice):
        return probs

    def edit_output(self, out, ctx):
        return out


def test_store_averages_equal_upstream_attention_store():
    """``AttentionStore`` filled through the hook (``through_hook``) (two 8x8 cross layers, one of them next to an
    editor, a 4x4 cross layer and an 8x8 self layer; three steps; a batch of two images) against upstream's
    ``AttentionStore.get_average_attention`` + ``aggregate_attention``: per layer the cond rows' probabilities summed
    over the steps and divided by their number, then the layers of one size concatenated on the head axis and
    averaged. ``word_maps`` (SelfAttnCluster, MnM's labels) is a word's tokens averaged on that."""
    g = torch.Generator().manual_seed(9)
    heads, d, m = 2, 4, 7
    store = AttentionStore(StoreConfig(self_max_tokens=32 * 32, keep_heads=True))
    store.reset()
    layers = [(("input", 4), (8, 8), True, False), (("output", 1), (8, 8), True, True),
              (("middle", 0), (4, 4), True, False), (("input", 1), (8, 8), False, False)]
    sums: dict = {}
    for step in range(3):
        for block, hw, cross, editor in layers:
            n = hw[0] * hw[1]
            q = torch.randn(4, n, heads * d, generator=g) * 2
            k = torch.randn(4, m if cross else n, heads * d, generator=g) * 2
            controllers = [_PassThroughEditor(), store] if editor else [store]
            run_layer(controllers, cross, block, hw, q, k, torch.zeros_like(k), step, heads)
            probs = official_probs(q, k, heads)[2:]                      # cond rows of both images
            sums[block] = sums.get(block, 0) + probs
    store.finish()
    avg = {b: v / 3 for b, v in sums.items()}                            # get_average_attention: (2, heads, n, m)

    def aggregate(blocks, res):
        out = torch.cat([avg[b].reshape(2, heads, res, res, -1) for b in blocks], dim=1)
        return out.sum(1) / out.shape[1]
    big = aggregate([("input", 4), ("output", 1)], 8)
    assert torch.allclose(store.aggregate((8, 8), cross=True), big, atol=1e-6)
    assert torch.allclose(store.aggregate((4, 4), cross=True), aggregate([("middle", 0)], 4), atol=1e-6)
    assert torch.allclose(store.aggregate((8, 8), cross=False), aggregate([("input", 1)], 8), atol=1e-6)
    assert torch.allclose(word_maps(store, [(2,), (3, 5)], (8, 8), item=1),
                          torch.stack([big[1, ..., 2], big[1, ..., [3, 5]].mean(-1)]), atol=1e-6)
    from attention.layers import LayerId
    for block in (("input", 4), ("output", 1), ("middle", 0)):
        assert torch.allclose(store.layer_heads(LayerId(block[0], block[1], 0)), avg[block], atol=1e-6)
    assert store.resolutions(cross=True) == [(8, 8), (4, 4)] and store.steps_recorded == {0, 1, 2}
