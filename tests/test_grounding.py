"""Tier 1: the grounding head of Li et al. 2023 (attention/grounding.py, its files in grounding_head_file.py) and its
ShapesWorld protocol.

Upstream formulas (Lipurple/Grounded-Diffusion 5680115, no licence: described in our words, not copied) are
written out here and fed the same tensors as our functions.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from attention.grounding import (
    GroundingLayoutError,
    HeadConfig,
    TrainBatch,
    build_head,
    grounding_loss,
    stack_queries,
    template_text,
    train_head,
    word_query,
)
from attention.grounding_head_file import (
    GroundingHeadFileError,
    HeadMeta,
    check_compatible,
    check_query_mode,
    load_head,
    save_head,
)

SMALL = {"widths": (4, 6, 8), "dim": 32, "heads": 4, "ffn": 64, "layers": 2}
# shipped head (400 steps, 384 + 192 same-colour scenes): 0.805 / 0.737 here; oracle-threshold cross-attention
# 0.647 / 0.618. Same-colour scenes: 0.649 / 0.599 against 0.511 / 0.520.
SEEN_GATE, UNSEEN_GATE = 0.7, 0.6
SAME_COLOUR_UNSEEN_GATE = 0.45


def gen(seed):
    return torch.Generator().manual_seed(seed)


def levels(b, channels=(12, 10, 8), sizes=(4, 8, 16), seed=0):
    g = gen(seed)
    return [torch.randn(b, c, s, s, generator=g) for c, s in zip(channels, sizes)]


def small_head(seed=0, **kw):
    cfg = HeadConfig((12, 10, 8), 16, **{**SMALL, **kw})
    return build_head(cfg, seed).eval()


# ---------------------------------------------------------------------------------------------- equality with upstream

def upstream_seg_block(block, x):
    """``SegBlock.forward`` (eval): batch norm on the stored statistics, ReLU, 3x3 conv, batch norm, ReLU, 3x3 conv,
    plus the 1x1 shortcut conv when the width changes. Upstream's batch norm has no affine parameters and eps 1e-4;
    ours has affine parameters (1 and 0 until trained) and eps 1e-5 - a named departure, passed in here."""
    def bn(t, m):
        return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, False, 0.1, m.eps)
    def conv(t, c):
        return F.conv2d(t, c.weight, c.bias, padding=1)           # c.weight: the spectrally normalized weight
    h = conv(F.relu(bn(x, block.bn1)), block.conv1)
    h = conv(F.relu(bn(h, block.bn2)), block.conv2)
    sc = x if isinstance(block.shortcut, torch.nn.Identity) else F.conv2d(x, block.shortcut.weight,
                                                                             block.shortcut.bias)
    return h + sc


def upstream_prepare_features(head, lv):
    """``Segmodule._prepare_features`` for four sizes (SD at 512 px: 8, 16, 32, 64): the low, mid and high groups
    bilinearly resized to twice their size (16, 32, 64) before their 1x1 convs; the low map resized again to 32;
    coarse to fine: concat, SegBlock, resize to the next size; the highest group joins at its own size."""
    up = lambda x, s: F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)   # noqa: E731
    conv1x1 = lambda x, i: F.conv2d(x, head.project[i].weight)                               # noqa: E731
    low, mid, high, top = lv                                      # native sizes n, 2n, 4n, 8n
    n = low.shape[-1]
    low_feat = up(conv1x1(up(low, 2 * n), 0), 4 * n)              # low_feature_size, then mid_feature_size
    mid_feat = upstream_seg_block(head.fuse[0], torch.cat([low_feat, conv1x1(up(mid, 4 * n), 1)], 1))
    mid_feat = up(mid_feat, 8 * n)                                # high_feature_size
    high_feat = upstream_seg_block(head.fuse[1], torch.cat([mid_feat, conv1x1(up(high, 8 * n), 2)], 1))
    return upstream_seg_block(head.fuse[2], torch.cat([high_feat, conv1x1(top, 3)], 1))


def test_fusion_equals_upstream_four_level_formula():
    """Our per-pixel embedding (coarse -> fine, any number of levels) on four levels of sizes 2, 4, 8, 16 against
    ``_prepare_features`` written out with the head's weights: upstream resizes each group before its 1x1 conv,
    ours after (both linear, so equal)."""
    cfg = HeadConfig((6, 5, 4, 3), 16, dim=32, heads=4, ffn=64)
    head = build_head(cfg, 1).eval()
    with torch.no_grad():
        for block in head.fuse:                                  # non-trivial statistics and affine parameters
            for bn in (block.bn1, block.bn2):
                bn.running_mean.uniform_(-0.5, 0.5, generator=gen(20))
                bn.running_var.uniform_(0.5, 2.0, generator=gen(21))
                bn.weight.uniform_(0.5, 1.5, generator=gen(22))
                bn.bias.uniform_(-0.2, 0.2, generator=gen(23))
        lv = levels(2, (6, 5, 4, 3), (2, 4, 8, 16), seed=3)
        expected = upstream_prepare_features(head, lv)
        assert expected.shape == (2, 16 + 32 + 64 + 128, 16, 16)
        torch.testing.assert_close(head.pixel_embedding(lv), expected, atol=1e-5, rtol=1e-5)


def upstream_mask_embeddings(head, pixels, q_text):
    """``Segmodule.forward`` between the per-pixel embedding and the masks, for one image: 4x4 patches by unfold,
    ``to_k``/``to_q`` without bias, the pre-norm decoder layers (self-attention, cross-attention on the patch
    tokens, ReLU FFN; no positional encoding), the 3-layer ReLU MLP. Ours adds a final LayerNorm after the
    decoder (nn.TransformerDecoder's ``norm``) and bias terms in the attention projections, where upstream's
    ``nn.MultiheadAttention(..., bias=False)`` has none: named departures, their parameters passed in here."""
    def mha(m, x, mem):
        d, h = x.shape[-1], m.num_heads
        wq, wk, wv = m.in_proj_weight.chunk(3)
        bq, bk, bv = m.in_proj_bias.chunk(3)
        split = lambda t: t.reshape(t.shape[0], h, d // h).transpose(0, 1)                   # noqa: E731
        att = (split(x @ wq.T + bq) @ split(mem @ wk.T + bk).transpose(-1, -2) / (d // h) ** 0.5).softmax(-1)
        return (att @ split(mem @ wv.T + bv)).transpose(0, 1).reshape(x.shape[0], d) @ m.out_proj.weight.T \
            + m.out_proj.bias
    patches = F.unfold(pixels[None], 4, stride=4)[0].T                     # (patches, E*16)
    mem = patches @ head.to_k.weight.T
    t = q_text @ head.to_q.weight.T
    for layer in head.decoder.layers:
        t = t + mha(layer.self_attn, layer.norm1(t), layer.norm1(t))
        t = t + mha(layer.multihead_attn, layer.norm2(t), mem)
        t = t + layer.linear2(F.relu(layer.linear1(layer.norm3(t))))
    t = head.decoder.norm(t)
    lin = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    return lin[2](F.relu(lin[1](F.relu(lin[0](t)))))


def test_logits_equal_upstream_upsample_then_dot_product():
    """Upstream upsamples the per-pixel embedding to the output size, then takes the dot product with each mask
    embedding (decoder and MLP written out above, one image at a time: upstream's flattened batch is a defect we
    fix); ours takes the dot product first, then upsamples the logits."""
    head = small_head()
    lv = levels(2)
    per_image = [torch.randn(3, 16, generator=gen(1)), torch.randn(2, 16, generator=gen(2))]
    q, mask = stack_queries(per_image)
    with torch.no_grad():
        ours = head(lv, q, mask, out_size=(40, 40))
        pixels = head.pixel_embedding(lv)
        for b, words in enumerate(per_image):
            emb = upstream_mask_embeddings(head, pixels[b], words)
            big = F.interpolate(pixels[b:b + 1], size=(40, 40), mode="bilinear", align_corners=False)[0]
            upstream = torch.einsum("dhw,nd->nhw", big, emb)
            torch.testing.assert_close(ours[b, :len(words)], upstream, atol=1e-4, rtol=1e-4)


def upstream_class_embedding(encode, tokenize, class_name, prefix="a photograph of a "):
    """train.py: the states of prefix + class, tokens 1 + len(tokenize(prefix)) .. len(tokenize(text)) (5.. for
    upstream's prefix, four tokens after BOS), averaged when the class has several tokens."""
    text = prefix + class_name
    states = encode(text)                                        # (L, T) with BOS at 0
    start = 1 + len(tokenize(prefix))
    return states[start:len(tokenize(text)) + 1].mean(0)


def test_word_query_equals_upstream_template_slice(model):
    """The grounding figure's template queries (``template_vectors``, ShapesWorld's in-vocabulary template
    "a {word}") against upstream's slice of the template prompt's states. The node's path with SD's CLIP and
    upstream's own template is checked in tier 2 (test_nodes_faithful.py)."""
    from attention.shapesworld.grounding_data import TEMPLATE, template_vectors
    ours = template_vectors(model, TEMPLATE)
    prefix = TEMPLATE.split("{word}")[0]
    for word in ("circle", "square", "red"):
        theirs = upstream_class_embedding(lambda t: model.encode([t])[0].cpu(),
                                          lambda t: model.tokenizer.word_ids(t), word, prefix)
        torch.testing.assert_close(ours[word], theirs)
    assert template_text("dog") == "a photograph of a dog"
    with pytest.raises(ValueError, match="placeholder"):
        template_text("dog", "a photo of a dog")
    with pytest.raises(ValueError, match="no token positions"):
        word_query(torch.zeros(77, 16), [])


def test_loss_equals_upstream_bce_summed_over_classes_over_batch():
    """Upstream: BCEWithLogitsLoss (mean over pixels) per prompted class, summed, divided by the batch size;
    a class the detector missed adds nothing."""
    logits = torch.randn(2, 3, 8, 8, generator=gen(5))
    targets = (torch.rand(2, 3, 8, 8, generator=gen(6)) > 0.5).float()
    valid = torch.tensor([[True, True, False], [True, False, False]])
    bce = torch.nn.BCEWithLogitsLoss()
    expected = sum(bce(logits[b, c], targets[b, c]) for b in range(2) for c in range(3) if valid[b, c]) / 2
    torch.testing.assert_close(grounding_loss(logits, targets, valid), expected)
    nan = logits.clone()
    nan[1, 2] = float("nan")      # a padding query's logits never reach the loss
    torch.testing.assert_close(grounding_loss(nan, targets, valid), expected)


# ---------------------------------------------------------------------------------------------- invariants

def test_batch_independence_fixes_upstream_flattened_batch():
    """Image 0's logits do not change when image 1's features and words change (upstream flattens the batch,
    so its queries attend to every image's tokens), and equal a batch-1 run."""
    head = small_head()
    lv = levels(3, seed=7)
    q, mask = stack_queries([torch.randn(2, 16, generator=gen(8)), torch.randn(3, 16, generator=gen(9)),
                             torch.randn(1, 16, generator=gen(10))])
    with torch.no_grad():
        base = head(lv, q, mask)
        lv2 = [x.clone() for x in lv]
        for x in lv2:
            x[1] = torch.randn(x[1].shape, generator=gen(11))
        q2 = q.clone()
        q2[1] = torch.randn(q2[1].shape, generator=gen(12))
        changed = head(lv2, q2, mask)
        alone = head([x[:1] for x in lv], q[:1, :2], None)
    torch.testing.assert_close(changed[0], base[0])
    torch.testing.assert_close(changed[2, :1], base[2, :1])
    assert not torch.allclose(changed[1], base[1])
    torch.testing.assert_close(alone[0], base[0, :2], atol=1e-5, rtol=1e-5)


def test_word_order_equivariance_and_padding():
    head = small_head()
    lv = levels(1, seed=13)
    q = torch.randn(1, 4, 16, generator=gen(14))
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        out = head(lv, q)
        out_p = head(lv, q[:, perm])
        padded = head(lv, torch.cat([q, torch.zeros(1, 2, 16)], 1),
                      torch.tensor([[True] * 4 + [False] * 2]))
    torch.testing.assert_close(out_p, out[:, perm], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded[:, :4], out, atol=1e-5, rtol=1e-5)


def test_variants_one_level_prior_and_no_spectral_norm():
    one = build_head(HeadConfig((8,), 16, dim=32, heads=4, ffn=64), 0).eval()
    assert one(levels(2, (8,), (8,)), torch.randn(2, 3, 16)).shape == (2, 3, 8, 8)
    pri = small_head(prior_channels=1, spectral_norm=False)
    lv, q = levels(2), torch.randn(2, 2, 16)
    with torch.no_grad():
        a = pri(lv, q, prior=torch.zeros(2, 2, 1, 4, 4))
        b = pri(lv, q, prior=torch.ones(2, 2, 1, 4, 4))
    assert a.shape == (2, 2, 16, 16) and not torch.allclose(a, b)
    with pytest.raises(ValueError, match="prior map"):
        pri(lv, q)


# ---------------------------------------------------------------------------------------------- files, layout errors

def feats(family="shapesworld", context_dim=16, channels=(12, 10, 8), concat=True, t=1):
    return SimpleNamespace(levels=levels(1, channels), family=family, context_dim=context_dim,
                           concat_uncond=concat, timestep=t, blocks=())


def test_save_load_round_trip(tmp_path):
    head = small_head(seed=3)
    meta = HeadMeta.for_features(feats(), query="prompt", template="a {word}", seen_words=("circle", "square"),
                                 training={"steps": 5, "lr": 1e-3})
    path = save_head(tmp_path / "h.safetensors", head, meta)
    loaded, meta2 = load_head(path)
    assert meta2 == meta and loaded.config == head.config
    lv, q = levels(2, seed=4), torch.randn(2, 3, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(lv, q), head(lv, q))
    with pytest.raises(FileExistsError, match="overwrite"):
        save_head(path, head, meta, overwrite=False)
    assert not list(tmp_path.glob(".*tmp"))
    with pytest.raises(GroundingHeadFileError, match="does not exist"):
        load_head(tmp_path / "none.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(GroundingHeadFileError, match="not a readable"):
        load_head(tmp_path / "bad.safetensors")
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(GroundingHeadFileError, match="not an Attention Lab grounding head"):
        load_head(tmp_path / "other.safetensors")


@pytest.mark.parametrize("kw, word", [({"family": "sd1"}, "sd1"), ({"context_dim": 768}, "768"),
                                      ({"channels": (12, 10, 9)}, "(12, 10, 9)"), ({"concat": False}, "cond only")])
def test_layout_mismatch_names_both_sides(kw, word):
    meta = HeadMeta.for_features(feats())
    with pytest.raises(GroundingLayoutError) as e:
        check_compatible(meta, feats(**kw), name="head X")
    text = str(e.value)
    assert "head X was trained on shapesworld features (context width 16" in text and word in text
    check_compatible(meta, feats(t=200))          # another timestep only warns
    with pytest.raises(GroundingLayoutError, match="'prompt' queries"):
        check_query_mode(HeadMeta.for_features(feats(), query="template"), "prompt")


def test_head_refuses_other_channels_and_query_width():
    head = small_head()
    with pytest.raises(GroundingLayoutError, match=r"channels \(12, 10, 8\).*channels \(12, 10, 7\)"):
        head(levels(1, (12, 10, 7)), torch.randn(1, 2, 16))
    with pytest.raises(GroundingLayoutError, match=r"\(batch, words, 16\)"):
        head(levels(1), torch.randn(1, 2, 768))


# ---------------------------------------------------------------------------------------------- training

def test_training_works_on_a_copy_and_interruption_leaves_the_head(tmp_path):
    head = small_head()
    before = {k: v.clone() for k, v in head.state_dict().items()}
    lv = levels(2, seed=20)
    q, mask = stack_queries([torch.randn(2, 16, generator=gen(21))] * 2)
    batch = TrainBatch(lv, q, (torch.rand(2, 2, 16, 16, generator=gen(22)) > 0.5).float(), mask)

    def stop(step, steps, loss):
        if step == 2:
            raise KeyboardInterrupt("interrupted")
    with pytest.raises(KeyboardInterrupt):
        train_head(head, lambda i: batch, 5, lr=1e-3, progress=stop)
    result = train_head(head, lambda i: batch, 3, lr=1e-3)
    for k, v in head.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert result.steps == 3 and len(result.losses) == 3 and not result.head.training
    with torch.inference_mode():          # ComfyUI's executor runs nodes in inference mode
        train_head(head, lambda i: batch, 1, lr=1e-3)
    with pytest.raises(ValueError, match="steps"):
        train_head(head, lambda i: batch, 0)


# ---------------------------------------------------------------------------------------------- ShapesWorld

@pytest.fixture(scope="module")
def model():
    from attention.shapesworld.model import ShapesWorldModel
    torch.set_num_threads(1)
    return ShapesWorldModel()


def test_overfits_one_scene(model):
    from attention.shapesworld import grounding_data as D
    from attention.shapesworld import grounding_eval as E
    pool = D.build_pool(model, D.exact_examples(5, 2)[1:2], seed=0)      # two objects
    templates = D.template_vectors(model)
    head = build_head(HeadConfig(pool.meta.channels, 128, **E.HEAD), 0)
    batch = D.batch_of(pool, [0], "prompt", templates)
    trained = train_head(head, lambda i: batch, 150, lr=3e-3).head
    _, masks = trained.segment(batch.levels, batch.queries, batch.valid, (32, 32))
    for n in range(2):
        t = batch.targets[0, n].bool()
        iou = float((masks[0, n] & t).sum() / (masks[0, n] | t).sum())
        assert iou > 0.95, (n, iou)


def test_queries_template_covers_every_object_of_its_shape_prompt_its_own(model):
    from attention.shapesworld import grounding_data as D
    from attention.shapesworld import grounding_eval as E
    from attention.shapesworld.world import SceneSpec, ShapesWorld
    scene = ShapesWorld(seed=3).sample(SceneSpec([("red", "circle"), ("blue", "circle"), ("green", "square")]))
    masks = torch.stack([ob.mask for ob in scene.objects])
    ex = D.Example(scene.caption, [(o.colour, o.shape) for o in scene.objects], masks, torch.ones(3, dtype=bool),
                   masks)
    pool = D.build_pool(model, [(scene.image, ex)], seed=0)
    templates = D.template_vectors(model)
    tq = D.example_queries(pool, 0, "template", templates)
    assert tq.words == ["circle", "square"] and tq.objects == [[0, 1], [2]]
    assert torch.equal(tq.targets[0], masks[0] | masks[1])
    torch.testing.assert_close(tq.vectors[0], templates["circle"])
    pq = D.example_queries(pool, 0, "prompt", templates, colours=True)
    assert pq.words == ["circle", "circle", "square", "red", "blue", "green"]
    assert pool.shape_pos[0][0] != pool.shape_pos[0][1]          # each circle is its own occurrence
    assert not torch.allclose(pq.vectors[0], pq.vectors[1])
    assert torch.equal(pq.targets[1], masks[1])
    score = E.Score()
    for w, objs, target in zip(pq.words[:3], pq.objects, pq.targets):
        score.add(w, target, target, E.others_of(ex, objs))
    s = score.summary(("star", "diamond"))
    assert s["seen"] == 1.0 and s["leak"] == 0.0


def test_train_asset_refuses_to_overwrite(tmp_path):
    from attention.shapesworld import grounding_asset as A
    path = tmp_path / "head.safetensors"
    path.write_bytes(b"shipped")
    with pytest.raises(FileExistsError, match="--force"):
        A.train_asset(None, path)
    assert path.read_bytes() == b"shipped"


def test_committed_head_quality_gates(model):
    """The shipped head (split 1: unseen star, diamond) on 48 fresh scenes: seen words above the oracle-threshold
    cross-attention baseline of the same UNet call; unseen words above a floor; on 24 same-colour scenes seen words
    above that baseline too (docs/grounding.md has the figure)."""
    from attention.shapesworld import grounding_asset as A
    from attention.shapesworld import grounding_data as D
    from attention.shapesworld import grounding_eval as E
    head, meta = A.load_asset()
    assert (meta.family, meta.query, meta.timestep, meta.concat_uncond) == ("shapesworld", "prompt", 1, True)
    assert set(meta.seen_words) == {"circle", "square", "triangle", "cross"}
    test = D.build_pool(model, D.exact_examples(90_000, 48), seed=9)
    got = E.score_head(head, test, "prompt", D.template_vectors(model)).summary(D.SPLITS[0])
    base = E.score_masks(test, E.crossattn_masks(test, E.best_threshold(test))).summary(D.SPLITS[0])
    assert got["seen"] > max(SEEN_GATE, base["seen"]), (got, base)
    assert got["unseen"] > UNSEEN_GATE, (got, base)
    same = D.build_pool(model, D.exact_examples(91_000, 24, same_colour=True), seed=9)   # colour names no object
    got = E.score_head(head, same, "prompt", D.template_vectors(model)).summary(D.SPLITS[0])
    base = E.score_masks(same, E.crossattn_masks(same, E.best_threshold(same))).summary(D.SPLITS[0])
    assert got["seen"] > base["seen"] and got["unseen"] > SAME_COLOUR_UNSEEN_GATE, (got, base)
