"""Tier 1: our ported functions against the official formulas, written out here in our own words, on identical
tensors (issue 15; docs/faithful-ports.md). Each test names the upstream file it transcribes.

Shape legend: z (1, c, h, w) model-space latent; x = z / sqrt(alphabar) the k-diffusion state; maps (h, w, m).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from attention.dpl import DPL_SH, CrossMapRecorder, background_at_size, dpl_invert
from attention.dpl_losses import attend_excite_loss, gaussian_kernel
from attention.inversion import NullTextSettings, ddim_invert, null_text_optimize
from attention.p2p import self_replace_limit
from attention.schedule import sigma_to_t, simple_sigmas


# ----------------------------------------------------------------------------- a toy UNet shared by both sides
def toy_unet(z: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """eps = f(model-space latent, timestep, text): nonlinear in all three, differentiable in the text."""
    c = context.mean(dim=(1, 2)).view(-1, 1, 1, 1)
    return torch.tanh(1.3 * z + 0.4 * z.roll(1, -1) * (1 + c) + 0.002 * t.view(-1, 1, 1, 1) + c)


def comfy_eps(x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Our eps convention (ComfyUI's EPS models, ShapesWorld's model.eps): the state scaled by 1/sqrt(1 + s^2)."""
    s = sigma.reshape(1)
    return toy_unet(x / (1 + s ** 2).sqrt(), sigma_to_t(s), context)


def alphabar(sigma: torch.Tensor) -> torch.Tensor:
    return 1 / (1 + sigma ** 2)


def official_next_step(eps, a_cur, a_next, z):
    """null_text_w_ptp ``next_step`` (and DPL's inverse scheduler): DDIM from alphabar a_cur up to a_next."""
    x0 = (z - (1 - a_cur).sqrt() * eps) / a_cur.sqrt()
    return a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps


def official_prev_step(eps, a_cur, a_prev, z):
    """diffusers ``DDIMScheduler.step`` with eta 0 (the null-text notebook's ``prev_step``)."""
    x0 = (z - (1 - a_cur).sqrt() * eps) / a_cur.sqrt()
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


def official_ddim_loop(z0, sigmas, cond):
    """``ddim_loop``: the UNet sees the *current* latent, unscaled, at the *next* timestep."""
    n = len(sigmas) - 1
    out, z = [z0], z0
    for i in range(n - 1, -1, -1):
        s_cur, s_next = sigmas[i + 1], sigmas[i]
        eps = toy_unet(z, sigma_to_t(s_next.reshape(1)), cond)
        z = official_next_step(eps, alphabar(s_cur), alphabar(s_next), z)
        out.append(z)
    return out[::-1]                                   # [0] the noisiest, as ours


@pytest.fixture(scope="module")
def toy():
    g = torch.Generator().manual_seed(0)
    sigmas = simple_sigmas(8).double()
    x0 = torch.randn(1, 3, 8, 8, generator=g, dtype=torch.float64)
    cond = torch.randn(1, 6, 4, generator=g, dtype=torch.float64)
    null = torch.randn(1, 6, 4, generator=g, dtype=torch.float64) * 0.1
    return sigmas, x0, cond, null


# ----------------------------------------------------------------------------- 1. DDIM inversion input scale
def test_ddim_inversion_equals_the_official_ddim_loop(toy):
    sigmas, x0, cond, _ = toy
    ours = ddim_invert(comfy_eps, x0, sigmas, cond)
    official = official_ddim_loop(x0, sigmas, cond)                      # z-space; x0 = z0 at sigma 0
    for i, (x, z) in enumerate(zip(ours, official)):
        assert torch.allclose(x * alphabar(sigmas[i]).sqrt(), z, atol=1e-10), i
    # the former call, eps(x_current, sigma_next), shows the UNet a rescaled latent and misses the trajectory
    x, n = x0, len(sigmas) - 1
    for i in range(n - 1, -1, -1):
        x = x + comfy_eps(x, sigmas[i], cond) * (sigmas[i] - sigmas[i + 1])
    assert (x * alphabar(sigmas[0]).sqrt() - official[0]).abs().max() > 1e-3


# ----------------------------------------------------------------------------- 2. Attend-and-Excite smoothing
def official_gaussian_smoothing_weight(kernel_size=3, sigma=0.5):
    """Attend-and-Excite ``GaussianSmoothing.__init__`` (copied into DPL's pipeline): note (x - mean) / (2 std)."""
    kernel = 1
    grids = torch.meshgrid([torch.arange(kernel_size, dtype=torch.float32)] * 2, indexing="ij")
    for mgrid in grids:
        mean = (kernel_size - 1) / 2
        kernel = kernel * 1 / (sigma * math.sqrt(2 * math.pi)) * torch.exp(-(((mgrid - mean) / (2 * sigma)) ** 2))
    return kernel / kernel.sum()


def official_attend_excite_loss(maps, indices):
    """DPL ``_compute_max_attention_per_index`` + ``_compute_loss(loss_type='max')``."""
    text = torch.softmax(maps[:, :, 1:-1] * 100, dim=-1)
    weight = official_gaussian_smoothing_weight()[None, None]
    maxima = []
    for i in [j - 1 for j in indices]:
        img = F.pad(text[:, :, i][None, None], (1, 1, 1, 1), mode="reflect")
        maxima.append(F.conv2d(img, weight)[0, 0].max())
    return max(max(torch.zeros(()), 1.0 - m) for m in maxima)


def test_attention_balancing_kernel_and_loss_equal_upstream():
    assert torch.allclose(gaussian_kernel(), official_gaussian_smoothing_weight(), atol=1e-7)
    assert abs(float(gaussian_kernel()[1, 1]) - 0.332) < 1e-3                        # effective sigma 0.707
    assert abs(float(gaussian_kernel(upstream=False)[1, 1]) - 0.619) < 1e-3           # a true sigma 0.5
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        maps = torch.rand(16, 16, 12, generator=g) * 0.05
        maps[4:8, 4:8, 2] += torch.rand(4, 4, generator=g) * 0.2
        ours = attend_excite_loss(maps, [(2,), (5,)])
        assert torch.allclose(ours, official_attend_excite_loss(maps, [2, 5]), atol=1e-6)


# ----------------------------------------------------------------------------- 3. DPL's null text, restarted
def official_dpl_null_loop(traj_z, sigmas, cond, null_text, guidance, inner):
    """DPL ``__call__`` part 2 with every loss weight 0: each step re-encodes "" (``null_text``), a fresh Adam at
    lr 1e-2 * (1 - i / 100) for ``inner`` iterations (no early stop), MSE to the inverted latent, then the step."""
    z, nulls = traj_z[0], []
    for i in range(len(sigmas) - 1):
        a_cur, a_prev = alphabar(sigmas[i]), alphabar(sigmas[i + 1])
        t = sigma_to_t(sigmas[i].reshape(1))
        with torch.no_grad():
            e_c = toy_unet(z, t, cond)
        u = null_text.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([u], lr=1e-2 * (1.0 - i / 100.0))
        for _ in range(inner):
            e_u = toy_unet(z, t, u)
            rec = official_prev_step(e_u + guidance * (e_c - e_u), a_cur, a_prev, z)
            loss = F.mse_loss(rec, traj_z[i + 1])
            loss.backward()
            opt.step()
            opt.zero_grad()
        nulls.append(u.detach())
        with torch.no_grad():
            e_u = toy_unet(z, t, u)
            z = official_prev_step(e_u + guidance * (e_c - e_u), a_cur, a_prev, z)
    return nulls, z


def _dpl(toy, settings):
    sigmas, x0, cond, null = toy
    traj = ddim_invert(comfy_eps, x0, sigmas, cond)
    with torch.enable_grad():
        return dpl_invert(comfy_eps, lambda p: p[0], [cond.clone()], CrossMapRecorder((4, 4)), traj, sigmas,
                          [(1,), (2,)], None, null, settings), traj


def test_dpl_null_text_restarts_from_the_empty_prompt_each_step(toy):
    sigmas, _, cond, null = toy
    s = dataclasses.replace(DPL_SH, lam_at=0.0, lam_bg=0.0, lam_dj=0.0,
                            null=NullTextSettings(guidance=7.5, inner_steps=4, epsilon=None))
    res, traj = _dpl(toy, s)
    traj_z = [x * alphabar(sig).sqrt() for x, sig in zip(traj, sigmas)]
    nulls, z_end = official_dpl_null_loop(traj_z, sigmas, cond, null, 7.5, 4)
    for ours, theirs in zip(res.nulls, nulls):
        assert torch.allclose(ours, theirs, atol=1e-9)
    assert torch.allclose(res.reconstruction, z_end, atol=1e-9)            # last sigma 0: x = z
    # the option: NTI's rule, the previous step's null carried over, is null_text_optimize exactly
    carried, _ = _dpl(toy, dataclasses.replace(s, null_carry_over=True))
    with torch.enable_grad():
        nti, _, _ = null_text_optimize(comfy_eps, traj, sigmas, cond, null, s.null)
    assert all(torch.allclose(a, b, atol=1e-9) for a, b in zip(carried.nulls, nti))
    assert (carried.nulls[-1] - res.nulls[-1]).abs().max() > 1e-4


def test_one_token_iteration_makes_no_update_as_upstream(toy):
    """Upstream runs the token loop only ``if attn_inner_steps > 1``."""
    res, _ = _dpl(toy, dataclasses.replace(DPL_SH, attn_iters=1,
                                           null=NullTextSettings(guidance=7.5, inner_steps=1, epsilon=None)))
    assert res.counts["token_updates"] == 0 and all(m is None for m in res.maps)
    assert all(torch.equal(p[0], toy[2]) for p in res.params)


# ----------------------------------------------------------------------------- 4. DPL background at map size
def official_background(mask32: torch.Tensor, size: int = 16, image: int = 512) -> torch.Tensor:
    """_2_DDIM_inv.py: clusters nearest to 512, rounded, saved by ToPILImage (8-bit 'L', 0/255); _3_dpl_inv.py
    ``read_segfile``: ``Image.open(...).resize((16, 16))`` (Pillow's default bicubic), ``astype(bool)``."""
    big = F.interpolate(mask32.float()[None, None], size=image, mode="nearest").round().bool()[0, 0]
    pil = Image.fromarray(big.float().mul(255).byte().numpy())
    return torch.from_numpy(np.asarray(pil.resize((size, size))).astype(bool)).float()


def test_background_mask_at_map_size_equals_upstream():
    g = torch.Generator().manual_seed(2)
    for _ in range(4):
        mask = (torch.rand(32, 32, generator=g) > 0.5).float()
        mask = F.max_pool2d(mask[None, None], 5, 1, 2)[0, 0]                           # blobby, like clusters
        ours = background_at_size(mask, (16, 16), (512, 512))
        assert torch.equal(ours, official_background(mask))
    square = torch.zeros(32, 32)
    square[8:24, 8:24] = 1
    # dilated: every cell touched by the bicubic kernel counts, more than the majority rule's
    assert background_at_size(square, (16, 16), (512, 512)).sum() > background_at_size(square, (16, 16),
                                                                                        rule="majority").sum()


# ----------------------------------------------------------------------------- 8. P2P self-attention size limit
def test_self_attention_limit_is_16_generated_32_inverted_at_512px():
    assert self_replace_limit((64, 64), inverted=False) == 16 ** 2      # prompt-to-prompt_stable.ipynb
    assert self_replace_limit((64, 64), inverted=True) == 32 ** 2       # null_text_w_ptp.ipynb


# ----------------------------------------------------------------------------- 6. MnM self-attention injection
def _store_with(cross_heads: torch.Tensor, self_map: torch.Tensor | None = None, self_hw: int = 0,
                cross_hw: int = 0):
    """An AttentionStore holding one cross layer (heads, n, m) of item 0 and optionally one self layer."""
    from attention.layers import LayerId
    from attention.store import AttentionStore, StoreConfig, _Accum
    store = AttentionStore(StoreConfig(keep_heads=True))
    h = w = cross_hw or int(round(cross_heads.shape[1] ** 0.5))
    lid = LayerId("output", 3, 0)
    store.cross[lid] = _Accum(cross_heads.mean(0)[None].clone(), 1, h, w)
    store.cross_heads[lid] = _Accum(cross_heads[None].clone(), 1, h, w)
    if self_map is not None:
        store.self_[LayerId("input", 1, 0)] = _Accum(self_map[None].clone(), 1, self_hw, self_hw)
    return store, lid


def official_injection_mask(cross: torch.Tensor, preserve: list[int], obj: int, threshold: float) -> torch.Tensor:
    """local-prompt-mixing ``mask_self_attn_patches``: one min-max over (heads, n, m), any head over threshold."""
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
    from attention.prompt_mixing import injection_masks
    g = torch.Generator().manual_seed(3)
    for threshold in (0.05, 0.2, 0.5):
        cross = torch.softmax(torch.randn(8, 64, 10, generator=g) * 2, -1)        # (heads, n, m)
        store, lid = _store_with(cross)
        ours = injection_masks(store, [(4,), (6,)], (2,), threshold)[lid]
        assert torch.equal(ours, official_injection_mask(cross, [4, 6], 2, threshold)), threshold
        # the head mean (our former rule) gives another mask on these maps
        mean_store, _ = _store_with(cross)
        mean_store.cross_heads.clear()
        assert not torch.equal(injection_masks(mean_store, [(4,), (6,)], (2,), threshold)[lid], ours)


# ----------------------------------------------------------------------------- 7. MnM foreground at the blend
def official_background_mask(clusters: np.ndarray, cross: np.ndarray, nouns: list[tuple[int, str]],
                             obj_word_index: int, background_nouns: list[str], threshold: float) -> np.ndarray:
    """``Segmentor.cluster2noun`` + ``get_background_mask`` given the clusters: cross (r/2, r/2, m) maps, nouns
    (word index, word) of the prompt; 1 = foreground (kept from the variation), 0 = taken from the original."""
    label = {}
    maps = cross[:, :, [i + 1 for i, _ in nouns]]
    norm = np.zeros_like(maps).repeat(2, axis=0).repeat(2, axis=1)
    for i in range(maps.shape[-1]):
        m = maps[:, :, i].repeat(2, axis=0).repeat(2, axis=1)
        norm[:, :, i] = (m - np.abs(m.min())) / m.max()
    k = int(clusters.max()) + 1
    for c in range(k):
        cm = (clusters == c).astype(np.float64)
        scores = [(cm * norm[:, :, i]).sum() / cm.sum() for i in range(len(nouns))]
        label[c] = nouns[int(np.argmax(scores))] if max(scores) > threshold else "BG"
    obj_segments = [c for c in label if label[c][0] == obj_word_index]
    bg_segments = [c for c in label if label[c] == "BG" or label[c][1] in background_nouns]
    mask = clusters.copy()
    for c in range(k):
        mask[clusters == c] = 0 if (c in bg_segments and c not in obj_segments) else 1
    return mask


def test_blend_foreground_keeps_every_noun_as_upstream():
    from attention.cluster import cluster_self_attention
    from attention.prompt_mixing import MixSettings, foreground
    g = torch.Generator().manual_seed(4)
    r, m = 8, 8
    # words: 1 'cat' (object), 3 'dog', 5 'garden' of "a cat and dog in garden" style token positions
    yy, xx = torch.meshgrid(torch.arange(r // 2).float(), torch.arange(r // 2).float(), indexing="ij")
    cross = torch.rand(r // 2, r // 2, m, generator=g) * 0.05
    cross[..., 1] += torch.exp(-((yy - 0.5) ** 2 + (xx - 0.5) ** 2))
    cross[..., 3] += torch.exp(-((yy - 3) ** 2 + (xx - 3) ** 2))
    cross[..., 5] += (yy >= 2).float() * (xx < 2).float()
    feats = torch.randn(r * r, 4, generator=g) + cross.repeat_interleave(2, 0).repeat_interleave(2, 1).reshape(
        r * r, m)[:, [1, 3, 5, 0]] * 6
    self_map = torch.softmax(feats @ feats.T, -1)
    store, _ = _store_with(cross.reshape(1, -1, m), self_map, r, r // 2)
    s = MixSettings(self_size=r, cross_size=r // 2, clusters=5, cluster_threshold=0.3)
    clusters = cluster_self_attention(self_map, 5, seed=1).numpy()
    nouns = [(0, "cat"), (2, "dog"), (4, "garden")]                       # NLTK word index, word
    for bg_nouns in ([], ["garden"], ["cat", "garden"]):
        ours = foreground(store, 0, [(1,), (3,), (5,)], s, frozenset(i for i, (_, w) in enumerate(nouns)
                                                                    if w in bg_nouns), obj=0)
        theirs = official_background_mask(clusters, cross.numpy(), nouns, 0, bg_nouns, 0.3)
        assert np.array_equal(ours.numpy().astype(np.int64), theirs), bg_nouns
    # every noun labels: a noun left out of the list loses its clusters to the blend
    only_obj = foreground(store, 0, [(1,)], s)
    assert only_obj.sum() < foreground(store, 0, [(1,), (3,), (5,)], s, obj=0).sum()


# ----------------------------------------------------------------------------- 5. DPL token initialization
def test_token_initialization_takes_the_word_internal_piece_as_upstream():
    """``_3_dpl_inv.py``: ``tokenizer.encode(['cat', 'dog'], add_special_tokens=False)`` on a list of strings is
    ``convert_tokens_to_ids`` of each string: the vocabulary entry without the end-of-word mark (unk if none)."""
    from attention.dpl import initializer_ids
    unk = 49407
    vocab = {"cat": 1481, "cat</w>": 2368, "dog": 1929, "dog</w>": 1929 + 5000, "zebra</w>": 22548,
             "<|endoftext|>": unk}

    def official(words):
        return [vocab.get(w, unk) for w in words]
    prompt_ids = [vocab["cat</w>"], vocab["dog</w>"]]                   # the prompt's own tokens of 'cat', 'dog'
    assert initializer_ids(prompt_ids, vocab) == official(["cat", "dog"]) == [1481, 1929]
    # a noun with no word-internal piece: upstream starts from the unknown token, we keep the prompt's token
    assert official(["zebra"]) == [unk] and initializer_ids([22548], vocab) == [22548]
    assert initializer_ids(prompt_ids, None) == prompt_ids                   # word-level vocabularies: unchanged


# ----------------------------------------------------------------------------- 6. MnM proxy suggestion
def official_topk_similar(encode, template, base_word, vocab, k):
    """``prompt_utils.get_topk_similar_words``: pooled features of ``template`` with each vocabulary word and with
    the base word, L2-normalized; vocabulary words by descending cosine (numpy argsort, flipped), first k."""
    ref = encode([template.format(word=base_word)])
    ref = ref / ref.norm(p=2, dim=-1, keepdim=True)
    feats = encode([template.format(word=w) for w in vocab])
    feats = feats / feats.norm(p=2, dim=-1, keepdim=True)
    order = np.flip(feats.matmul(ref.view(-1, 1)).numpy().reshape(-1).argsort())
    return [vocab[i] for i in order[:k]]


def official_proxy_words(encode, prompt_template, obj, vocab, variations):
    """``prompt_utils.get_proxy_words``: alphabetic entries of two letters or more; 50 closest by 'a photo of a
    {word}', then the closest by the prompt; the object word is put first when it is not already."""
    vocab = [w for w in vocab if w.isalpha() and len(w) > 1]
    short = official_topk_similar(encode, "a photo of a {word}", obj, vocab, 50)
    words = official_topk_similar(encode, prompt_template, obj, short, variations)
    return words if words[0] == obj else [obj] + words


def test_proxy_suggestion_equals_upstream_ranking():
    """Ours (the ranking the node runs, with the vocabulary's features computed inline or looked up as from the
    cache) against upstream's, on a random text encoder whose pooled features depend on every character."""
    from attention.prompt_mixing import suggest_proxies
    g = torch.Generator().manual_seed(6)
    table, pos = torch.randn(128, 16, generator=g), torch.randn(64, 16, generator=g)

    def encode(texts):                                  # (n, 16) pooled features, nonlinear in the text
        rows = [torch.tanh(sum(table[ord(c) % 128] * (1 + pos[i % 64]) for i, c in enumerate(t))) for t in texts]
        return torch.stack(rows) + 0.1
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["".join(letters[int(j)] for j in torch.randint(0, 26, (int(n),), generator=g))
             for n in torch.randint(2, 7, (400,), generator=g)] + ["x", "a1", "b-c"]      # the last 3 are dropped
    vocab = list(dict.fromkeys(vocab))
    prompt = "a cat sitting on a mat"
    theirs = official_proxy_words(encode, "a {word} sitting on a mat", "cat", vocab, 4)
    assert theirs[0] == "cat" and len(theirs) == 5             # the object is not in this vocabulary
    cached = {w: encode([f"a photo of a {w}"])[0] for w in vocab}
    for features in (None, lambda ws: torch.stack([cached[w] for w in ws])):
        assert suggest_proxies(encode, vocab, prompt, "cat", 4, vocab_features=features) == theirs[1:]
    # upstream keeps the object word among the candidates (then returns it plus count - 1 others); we skip it
    with_obj = vocab + ["cat"]
    assert suggest_proxies(encode, with_obj, prompt, "cat", 4) == theirs[1:]
