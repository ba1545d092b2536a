"""Tier 1: Prompt-to-Prompt on DiT joint attention (attention/p2p_joint.py) against an independent transcription of
upstream's AttentionReplace / AttentionRefine / AttentionReweight and AttentionControlEdit.forward
(google/prompt-to-prompt, prompt-to-prompt_stable.ipynb at 9c472e44aa1b607da59fea94820f7be9480ec545), applied to
the image->text block of the joint probabilities, with the source's image->image block injected in the window."""

import pytest
import torch

from attention.context import AttnContext
from attention.joint import JointLayout
from attention.layers import LayerId
from attention.p2p import EditPlan, word_alpha
from attention.p2p_joint import JointP2PController

H, M, GRID, PREFIX = 2, 7, (2, 3), 1
LAYOUT = JointLayout(txt=PREFIX + M, grid=GRID, img=GRID[0] * GRID[1] + 2, prefix=PREFIX)   # 2 reference tokens
STEPS = 10


def upstream_cross(attn_base, att_replace, kinds, mappers, refine_mappers, refine_alphas, equalizer, alpha_words):
    """Upstream, written out: attn_base (h, p, n), att_replace (b, h, p, n); mappers (b, n, n) (replace),
    refine_mappers (b, n) and refine_alphas (b, n) (refine); equalizer (b, n) or None; alpha_words (b, n)."""
    outs = []
    for b, kind in enumerate(kinds):
        if kind == "replace":                                   # AttentionReplace.replace_cross_attention
            out = torch.einsum("hpw,bwn->bhpn", attn_base, mappers[b:b + 1])[0]
        else:                                                   # AttentionRefine.replace_cross_attention
            base_replace = attn_base[:, :, refine_mappers[b:b + 1]].permute(2, 0, 1, 3)[0]
            a = refine_alphas[b].reshape(1, 1, -1)
            out = base_replace * a + att_replace[b] * (1 - a)
        if equalizer is not None:                               # AttentionReweight on top (prev_controller)
            out = out[None] * equalizer[b:b + 1, None, None, :]
            out = out[0]
        outs.append(out)
    new = torch.stack(outs)
    a = alpha_words[:, None, None, :]                           # AttentionControlEdit.forward, is_cross
    return new * a + (1 - a) * att_replace


def plan(seed=0, equalize=True, cross=0.6, self_steps=0.3):
    g = torch.Generator().manual_seed(seed)
    perm = torch.eye(M)[torch.randperm(M, generator=g)]
    refine = torch.randint(0, M, (M,), generator=g)
    ref_alpha = (torch.rand(M, generator=g) > 0.3).float()
    eq = torch.rand(2, M, generator=g) * 3 if equalize else None
    return EditPlan(kind=["replace", "refine"], replace=torch.stack([perm, torch.eye(M)]),
                    refine=torch.stack([torch.arange(M), refine]),
                    refine_alphas=torch.stack([torch.ones(M), ref_alpha]),
                    equalizer=eq, alpha=word_alpha(STEPS, 2, M, (0.0, cross), {(1, 2): (0.0, 0.9)}),
                    self_replace=(0.0, self_steps), self_max_tokens=GRID[0] * GRID[1])


def joint_probs(rows, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, H, LAYOUT.length, LAYOUT.length, generator=g).softmax(-1)


def ctx(step, items=3, cou=(1, 0)):
    return AttnContext(layer=LayerId("single", 0, 0), is_cross=True, height=GRID[0], width=GRID[1], heads=H,
                       cond_or_uncond=list(cou), items=items, sigma=None, step=step, n_steps=STEPS, joint=LAYOUT)


def reference(probs, p: EditPlan, step, rows_mode, items=3, cond_chunk=1):
    out = probs.clone()
    g, t = LAYOUT.grid_tokens(), LAYOUT.text_keys()
    s = cond_chunk * items
    base, edits = probs[s, :, g], probs[s + 1:s + items, :, g]
    lo, hi = p.self_replace
    new = edits.clone()
    new[..., t] = upstream_cross(base[..., t], edits[..., t], p.kind, p.replace, p.refine, p.refine_alphas,
                                 p.equalizer, p.alpha[step])
    if int(lo * STEPS) <= step < int(hi * STEPS):               # AttentionControlEdit.replace_self_attention
        new[..., g] = base[..., g].unsqueeze(0).expand_as(new[..., g])
    if rows_mode == "renormalize":                            # back to the row's sum before the edit (1)
        new = new / new.sum(-1, keepdim=True) * edits.sum(-1, keepdim=True)
    out[s + 1:s + items, :, g] = new
    return out


def ours(probs, p, step, rows_mode, chunk=5):
    c = JointP2PController(p, STEPS, rows_mode)
    out = probs.clone()
    for start in range(0, LAYOUT.length, chunk):               # query chunks, as joint._explicit hands them
        sl = slice(start, min(start + chunk, LAYOUT.length))
        out[:, :, sl] = c.edit_probs(out[:, :, sl].clone(), ctx(step), sl)
    return out


@pytest.mark.parametrize("rows_mode", ["renormalize", "slice"])
@pytest.mark.parametrize("step", [0, 2, 5, 8])
@pytest.mark.parametrize("equalize", [True, False])
def test_joint_edit_equals_upstream_formula_on_the_image_to_text_block(rows_mode, step, equalize):
    p = plan(equalize=equalize)
    probs = joint_probs(6)
    got, want = ours(probs, p, step, rows_mode), reference(probs, p, step, rows_mode)
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-5), float((got - want).abs().max())
    g = LAYOUT.grid_tokens()
    assert torch.equal(got[:4], probs[:4])                     # the negative chunk and the source row
    assert torch.equal(got[:, :, :g.start], probs[:, :, :g.start])   # text queries: untouched
    assert torch.equal(got[:, :, g.stop:], probs[:, :, g.stop:])     # reference-token queries: untouched
    if rows_mode == "renormalize":
        assert torch.allclose(got.sum(-1), torch.ones(6, H, LAYOUT.length), atol=1e-6)
    if step < 6 and equalize:
        assert not torch.allclose(got[4:], probs[4:])          # the edit does change the edits' rows


def test_identical_target_is_the_source_row_and_nothing_is_due_after_the_windows():
    p = plan(equalize=False)
    p.replace[:] = torch.eye(M)
    p.refine_alphas[:] = 1
    p.refine[1] = torch.arange(M)
    probs = joint_probs(6)
    probs[4:] = probs[3]                                       # targets identical to the source
    got = ours(probs, p, 1, "renormalize")
    assert torch.equal(got[4:], probs[3:4].expand(2, -1, -1, -1))   # bit-identical: the scale is exactly 1
    c = JointP2PController(p, STEPS)
    assert c.wants_probs(ctx(1)) and c.wants_probs(ctx(5))     # cross window (0.6) and per-word end (0.9)
    assert not c.wants_probs(ctx(9))                           # no edit due: the model's own kernel runs
    assert not c.wants_probs(ctx(1, items=1))                  # no edit rows
    assert not c.wants_probs(ctx(1, cou=(1,), items=6))        # only negative rows
    with pytest.raises(ValueError, match="not one of"):
        JointP2PController(p, STEPS, "clip")


def test_on_shapesworld_flow_identical_target_is_the_source_bit_for_bit_and_a_swap_edits():
    """Through the pack's hook on the pure-torch twin (joint.dit_options), the path of the figure command."""
    from attention.shapesworld.flow_model import DEFAULT_FLOW_WEIGHTS, ShapesWorldFlowModel
    from attention.shapesworld.flow_p2p_figures import SOURCE, TARGETS, edit
    if not DEFAULT_FLOW_WEIGHTS.is_file():
        pytest.skip("no shipped ShapesWorld-Flow weights")
    model = ShapesWorldFlowModel()
    sigmas = model.sigmas(6)
    x_T = model.noise(1, 0) * sigmas[0]
    out = edit(model, x_T, sigmas, 4.0, [SOURCE, TARGETS[0]])
    plain = edit(model, x_T, sigmas, 4.0, [SOURCE, TARGETS[0]], hooked=False)
    assert torch.equal(out[1], out[0])
    assert (out[0] - plain[0]).abs().max() < 1e-5                  # the source row is plain sampling
    assert (out[2] - out[0]).abs().max() > 0.2                     # the swap edits
    assert (out[2] - plain[2]).abs().max() > 0.05                  # and differs from the target prompt alone


def test_cond_grid_fast_path_equals_the_full_explicit_path(monkeypatch):
    """joint._explicit_cond_grid (kernel output, then the cond rows' grid queries from the edited probabilities)
    gives the samples of joint._explicit (every row and query explicit), with CFG's negative rows in the batch."""
    from attention.shapesworld.flow_model import DEFAULT_FLOW_WEIGHTS, ShapesWorldFlowModel
    from attention.shapesworld.flow_p2p_figures import TARGETS, edit
    if not DEFAULT_FLOW_WEIGHTS.is_file():
        pytest.skip("no shipped ShapesWorld-Flow weights")
    model = ShapesWorldFlowModel()
    sigmas = model.sigmas(5)
    x_T = model.noise(1, 2) * sigmas[0]
    fast = edit(model, x_T, sigmas, 3.0, TARGETS, blend=True)
    monkeypatch.setattr(JointP2PController, "edits_cond_grid", False)
    full = edit(model, x_T, sigmas, 3.0, TARGETS, blend=True)
    assert (fast - full).abs().max() < 1e-5


def test_localblend_mask_of_the_fast_path_equals_the_explicit_one(monkeypatch):
    """LocalBlend on the DiT as the node and the figure wire it: its store narrowed to the blend words' keys and
    filled from joint._explicit_cond_grid (cond rows' grid queries only) and joint._observe (steps past the edit
    windows) gives, at every step, the mask of a store that keeps every key filled by joint._explicit (every row
    and query explicit): the same mask bit for bit, and the same word maps to float rounding (5e-6: the explicit
    path's probabilities come from another matmul order)."""
    from attention.p2p import LocalBlend
    from attention.shapesworld.flow_model import DEFAULT_FLOW_WEIGHTS, ShapesWorldFlowModel
    from attention.shapesworld.flow_p2p_figures import TARGETS, edit
    from attention.store import AttentionStore
    if not DEFAULT_FLOW_WEIGHTS.is_file():
        pytest.skip("no shipped ShapesWorld-Flow weights")
    model = ShapesWorldFlowModel()
    sigmas = model.sigmas(6)                    # cross-replace ends at step 4: steps 4 and 5 are read by _observe
    x_T = model.noise(1, 0) * sigmas[0]
    masks: dict = {"fast": [], "explicit": []}
    call = LocalBlend.__call__

    def record(name):
        def hook(self, i, x):
            out = call(self, i, x)
            masks[name].append(None if self.last_mask is None else self.last_mask.clone())
            return out
        return hook
    runs = {}
    for name in ("fast", "explicit"):
        if name == "explicit":
            monkeypatch.setattr(JointP2PController, "edits_cond_grid", False)
            monkeypatch.setattr(AttentionStore, "keep_keys", lambda self, keys: False)
        monkeypatch.setattr(LocalBlend, "__call__", record(name))
        keep: dict = {}
        edit(model, x_T, sigmas, 4.0, TARGETS, blend=True, keep=keep)
        runs[name] = keep["blend"]
    fast, full = runs["fast"], runs["explicit"]
    assert fast.store.config.keys is not None and full.store.config.keys is None
    assert len(masks["fast"]) == 6 and masks["fast"][-1] is not None and 0 < masks["fast"][-1][1].mean() < 1
    assert all(a is None and b is None or torch.equal(a, b) for a, b in zip(masks["fast"], masks["explicit"]))
    cols = list(fast.store.config.keys)
    for lid in full.store.cross:
        assert (fast.store.layer_map(lid) - full.store.layer_map(lid)[..., cols]).abs().max() < 5e-6


@pytest.mark.parametrize("skip_reshape, skip_out", [(True, False), (False, False), (True, True)])
def test_kernel_except_is_the_whole_calls_output_outside_the_skipped_rows_and_queries(skip_reshape, skip_out):
    """calls.kernel_except (the fast path's kernel: every row and query but the cond rows' grid queries) equals, bit
    for bit with PyTorch's SDPA, the kernel on the whole call there, in Flux's (b, h, L, d) and SD3's (b, L, h*d)
    layouts and both output layouts; its gaps are left for the caller. A mask is refused."""
    import torch.nn.functional as F

    from attention.calls import kernel_except

    def kernel(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False):
        if not skip_reshape:
            q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return out if skip_output_reshape else out.transpose(1, 2).flatten(2)

    g = torch.Generator().manual_seed(5)
    b, h, L, d, heads = 6, 2, 13, 4, 2
    qkv = [torch.randn(b, h, L, d, generator=g) for _ in range(3)]
    if not skip_reshape:
        qkv = [t.transpose(1, 2).flatten(2) for t in qkv]
    args, kwargs = (*qkv, heads), dict(skip_reshape=skip_reshape, skip_output_reshape=skip_out)
    full = kernel(*args, **kwargs)
    grid = slice(4, 10)                                   # text 0..3, grid 4..9, 3 reference tokens after it
    for rows in ([3, 4, 5], list(range(b))):              # CFG's positive chunk; guidance-distilled: every row
        got = kernel_except(kernel, args, kwargs, rows, grid)
        keep = torch.ones_like(full, dtype=torch.bool)
        if skip_out:
            keep[rows, :, grid] = False
        else:
            keep[rows, grid] = False
        assert int((~keep).sum()) == len(rows) * 6 * full[0].numel() // L
        assert got.shape == full.shape and torch.equal(got[keep], full[keep])
    with pytest.raises(ValueError, match="no attention mask"):
        kernel_except(kernel, args, {**kwargs, "mask": torch.ones(L, L)}, rows, grid)
