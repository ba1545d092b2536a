"""Tier 2: NullTextInvert's Direct Inversion mode (Ju et al., "PnP Inversion", ICLR 2024) feeding P2PEditSampler
in ComfyUI (tiny SD1.5 and ShapesWorld). The formulas are checked against upstream's in tests/test_direct_inversion.py;
here: the node path keeps them inside ComfyUI's sampler.

Upstream corrects only the source branch; the target branches are plain guided DDIM from x_T under the source's
attention, so an identical target does NOT equal the source here (it does with null-text inversion).
"""

import torch
from comfy_env import (
    assert_same_samples,
    comfy_or_skip,
    encode,
    rel,
    sample,
    tiny_sdxl,
    tiny_sdxl_clip,
)

pack = comfy_or_skip()

from attention_lab.nodes.inversion import NullTextInvert  # noqa: E402
from attention_lab.nodes.p2p import P2PEditSampler  # noqa: E402
from attention_lab.nodes.shapesworld import load_shapesworld  # noqa: E402

SRC = "a cat and a dog in a garden"



def invert(model, clip, latent, mode, steps=4, prompt=SRC, guidance=7.5):
    with torch.inference_mode():
        return NullTextInvert.execute(model, clip, prompt, mode, steps, guidance, "simple", 3, 1e-5,
                                      latent={"samples": latent}).result


def p2p(model, clip, targets, latent, inversion, source=SRC, steps=4, **kw):
    args = dict(edit="auto", seed=1, steps=steps, cfg=7.5, scheduler="simple", cross_replace_steps=0.8,
                cross_replace_words="", self_replace_steps=0.4, reweight="", blend_words="", blend_threshold=0.3,
                blend_start=0.2)
    args.update(kw)
    with torch.inference_mode():
        return P2PEditSampler.execute(model, clip, source, "\n".join(targets), encode(clip, ""),
                                      {"samples": latent}, inversion=inversion, **args).result


def test_direct_source_row_reconstructs_and_only_the_source_is_corrected(sd):
    model, clip = sd
    with torch.inference_mode():
        image = sample(model, encode(clip, SRC), encode(clip, ""), torch.zeros(1, 4, 16, 16), cfg=7.5,
                       sampler="euler", steps=4, seed=3, scheduler="simple")
    inv, rec = invert(model, clip, image, "direct")
    assert inv.mode == "direct" and len(inv.offsets) == 4 and inv.unet_forward == 12 and inv.unet_backward == 0
    assert max(float(o.abs().max()) for o in inv.offsets) > 1e-3           # guidance 7.5 leaves the trajectory
    assert_same_samples(rec["samples"], image)                               # the offset pass lands on the image
    out = p2p(model, clip, [SRC, "a tiger and a dog in a garden"], image, inv)[0]["samples"]
    assert_same_samples(out[0], image[0])                                    # the edit's source row is the image
    assert rel(out[1], out[0]) > 1e-3, rel(out[1], out[0])                   # the identical target is not corrected
    # without attention injection the target row is plain guided DDIM from x_T with the empty null: the source
    # row of a plain DDIM inversion's edit (a correction of every row, upstream's add-target ablation, fails this)
    free = dict(cross_replace_steps=0.0, self_replace_steps=0.0)
    direct = p2p(model, clip, [SRC], image, inv, **free)[0]["samples"]
    inv_d, _ = invert(model, clip, image, "ddim")
    plain = p2p(model, clip, [SRC], image, inv_d, **free)[0]["samples"]
    assert_same_samples(direct[1], plain[0])
    assert_same_samples(direct[0], image[0])
    assert rel(plain[0], image[0]) > 1e-3                                    # ... which is not the image


def test_shapesworld_direct_swap_changes_only_inside_the_blend_mask():
    model, clip, _ = load_shapesworld()
    src = "a red circle and a blue square on a gray background"
    tgt = "a red triangle and a blue square on a gray background"
    lat = torch.zeros(1, 3, 32, 32)
    image = p2p(model, clip, [src], lat, None, source=src, steps=20, cfg=5.0)[0]["samples"][:1]
    inv, rec = invert(model, clip, image, "direct", steps=20, prompt=src, guidance=5.0)
    assert_same_samples(rec["samples"], image)
    out, mask = p2p(model, clip, [tgt], image, inv, source=src, steps=20, blend_words="circle, triangle")
    o = out["samples"]
    assert_same_samples(o[0], image[0])
    changed = (o[1] - o[0]).abs().amax(0) > 0.1
    assert changed.any() and mask.shape == (1, 32, 32)
    assert not (changed & (mask[0] < 0.5)).any()          # outside the last LocalBlend mask the edit is the image


def test_direct_edit_under_a_noise_mask_keeps_every_row_outside_it(sd):
    model, clip = sd
    image = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5)) * 20.0
    inv, _ = invert(model, clip, image, "direct")
    left = torch.zeros(1, 128, 128)
    left[..., :64] = 1.0                                                   # pixels; the latent's left half
    with torch.inference_mode():
        out = P2PEditSampler.execute(model, clip, SRC, "a tiger and a dog in a garden", encode(clip, ""),
                                     {"samples": image, "noise_mask": left}, inversion=inv, **dict(
                                         edit="auto", seed=1, steps=4, cfg=7.5, scheduler="simple",
                                         cross_replace_steps=0.8, cross_replace_words="", self_replace_steps=0.4,
                                         reweight="", blend_words="", blend_threshold=0.3,
                                         blend_start=0.2)).result[0]["samples"]
    outside = torch.zeros_like(image[0], dtype=torch.bool)
    outside[..., 8:] = True
    for row in out:                       # the source row too: its last offset is masked (else image + offset)
        assert rel(row[outside], image[0][outside]) < 1e-5, rel(row[outside], image[0][outside])
    assert_same_samples(out[0], image[0])                       # inside, the offsets make the source the image
    assert rel(out[1][~outside], image[0][~outside]) > 1e-2


def test_sdxl_direct_source_row_is_the_image():
    """SDXL: the offset pass and the edit guide with the empty prompt's own pooled output (its negative entry)."""
    with torch.inference_mode():
        model, clip = tiny_sdxl(), tiny_sdxl_clip()
        image = sample(model, encode(clip, SRC), encode(clip, ""), torch.zeros(1, 4, 16, 16), cfg=7.5,
                       sampler="euler", steps=3, seed=2, scheduler="simple")
    inv, rec = invert(model, clip, image, "direct", steps=3)
    assert_same_samples(rec["samples"], image)
    out = p2p(model, clip, ["a tiger and a dog in a garden"], image, inv, steps=3, blend_words="cat, tiger")
    o = out[0]["samples"]
    assert_same_samples(o[0], image[0])
    assert torch.isfinite(o).all() and rel(o[1], o[0]) > 1e-3
