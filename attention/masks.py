"""The one rule for every MASK a node of the pack takes: its layout, and its size against the image.

Mask sources hand out one thing in several layouts: ComfyUI's own MASK is (B, H, W) (or (H, W) from some
nodes), background removers and segmenters often give (B, 1, H, W) (a channel axis, torch's image layout) or
(B, H, W, 1) (ComfyUI's IMAGE layout with one channel). ``mask_batch`` turns those four into (B, H, W) float32
and refuses everything else at the node that received it, naming the node, the input and the shape, so a bad
mask never reaches a dataset, a loss or a sampler.

Size: a mask is drawn for an image, so only its aspect ratio must agree; each node then resizes it by its own
method (the dataset to a whole multiple of the latent grid, DPL by upstream's bicubic rule, SpaText by area per
attention layer). ``check_aspect`` accepts a mask whose aspect ratio (width / height) is within
``ASPECT_TOLERANCE`` (2 %, relative) of the image's and refuses it beyond, with both sizes, both ratios and the
tolerance in the message. 2 % lets a mask drawn a few pixels off the image size through (190x128 for
192x128 is 1.0 % off: one pixel per 96) while a mask of another shape (512x512 for a 768x512 image, 33 % off),
which would be stretched over the wrong objects, is refused.

Shape legend:
    B masks, H x W pixels (any size); h x w: the image's latent (or pixel) size
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ASPECT_TOLERANCE = 0.02          # |mask aspect / image aspect - 1| allowed before a mask is refused


class MaskLayoutError(ValueError):
    pass


def mask_batch(mask: torch.Tensor, node: str, name: str) -> torch.Tensor:
    """(B, H, W) float32 from a MASK in any layout that means one thing: (H, W), (B, H, W), (B, 1, H, W),
    (B, H, W, 1). Anything else raises ``MaskLayoutError`` naming ``node``, the input ``name`` and the shape."""
    if not isinstance(mask, torch.Tensor):
        raise MaskLayoutError(f"{node}: '{name}' must be a MASK (a tensor), got {type(mask).__name__}; connect a "
                              f"MASK output (e.g. Load Image's MASK, Convert Image to Mask)")
    shape = tuple(mask.shape)
    m = mask
    if m.ndim == 2:
        m = m[None]
    elif m.ndim == 4 and shape[1] == 1:
        m = m[:, 0]
    elif m.ndim == 4 and shape[3] == 1:
        m = m[..., 0]
    if m.ndim != 3:
        hint = ("; that is an IMAGE's layout (B, H, W, channels): convert it with Convert Image to Mask"
                if m.ndim == 4 and shape[3] in (3, 4) else "")
        raise MaskLayoutError(f"{node}: '{name}' has shape {shape}; a MASK must be (H, W), (B, H, W), (B, 1, H, W) "
                              f"or (B, H, W, 1){hint}")
    if 0 in m.shape:
        raise MaskLayoutError(f"{node}: '{name}' has shape {shape}, which holds no pixels; connect a non-empty MASK")
    return m.float()


def aspect_error(mask_hw: tuple[int, int], image_hw: tuple[int, int],
                 tolerance: float = ASPECT_TOLERANCE) -> float | None:
    """The relative aspect difference |(W/H) / (w/h) - 1| when it exceeds ``tolerance``, else None."""
    (mh, mw), (h, w) = mask_hw, image_hw
    off = abs((mw * h) / (mh * w) - 1.0)
    return off if off > tolerance else None


def check_aspect(mask_hw: tuple[int, int], image_hw: tuple[int, int], node: str, name: str, image: str = "image",
                 tolerance: float = ASPECT_TOLERANCE) -> None:
    """Refuse a mask whose aspect ratio is more than ``tolerance`` (relative) off the image's; the message gives
    both sizes (W x H), both ratios, the difference and the tolerance. ``image`` names what the mask is compared
    with (e.g. "latent (in latent pixels)")."""
    off = aspect_error(mask_hw, image_hw, tolerance)
    if off is None:
        return
    (mh, mw), (h, w) = mask_hw, image_hw
    raise ValueError(f"{node}: '{name}' is {mw}x{mh} (aspect {mw / mh:.3f}) but the {image} is {w}x{h} (aspect "
                     f"{w / h:.3f}): {100 * off:.1f} % off, beyond the {100 * tolerance:.0f} % the pack resizes "
                     f"over. Make the mask from this image (at its size or any size of its aspect ratio)")


def fit_to_grid(masks: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) masks of an aspect within tolerance of ``grid_hw``'s, resized (nearest) to the whole multiple
    k * grid_hw with k = round(H / h) (at least 1), so that they have exactly the grid's aspect; masks of
    exactly that aspect are returned as they are."""
    (mh, mw), (h, w) = masks.shape[-2:], grid_hw
    if mh * w == mw * h:
        return masks
    k = max(1, round(mh / h))
    return F.interpolate(masks[:, None].float(), size=(k * h, k * w), mode="nearest")[:, 0]
