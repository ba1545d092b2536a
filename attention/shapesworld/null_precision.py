"""Null-text inversion with a half-precision UNet on ShapesWorld: upstream's last Adam null against the null of the
lowest loss evaluated (``NullTextSettings.keep_best``, the ``keep_best_null`` input of NullTextInvert and
DPLTokenOptimizer; off by default, as upstream).

ComfyUI computes a UNet in fp16 on most GPUs: fp16 weights, the latent, timestep embedding and text context cast
to fp16, the output cast back to float32 (``model_base.apply_model``). ``half_precision`` does the same to the
ShapesWorld UNet, so the null embedding is optimized in float32 (``optimize_null``) through an fp16 UNet, as in
the nodes. On a CPU an fp16 evaluation takes about ten times a float32 one.

    python -m attention.shapesworld.null_precision [--images 3] [--steps 50] [--dtype float16] [--weights FILE]
"""

from __future__ import annotations

import time

import torch

from ..inversion import NullTextSettings
from .editing import _scenes, invert
from .model import ShapesWorldModel

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def half_precision(model: ShapesWorldModel, dtype: torch.dtype) -> ShapesWorldModel:
    """Cast ``model``'s UNet to ``dtype`` in place, with ComfyUI's input and output casts (forward hooks)."""
    unet = model.unet.to(dtype)
    unet.time_embed.register_forward_pre_hook(lambda mod, args: (args[0].to(dtype),))
    unet.register_forward_pre_hook(lambda mod, args: (args[0].to(dtype), args[1], args[2].to(dtype)))
    unet.register_forward_hook(lambda mod, args, out: out.float())
    return model


def keep_best_figures(model: ShapesWorldModel, images: int = 3, steps: int = 50, guidance: float = 7.5) -> dict:
    """Reconstruction PSNR (dB, images in [0, 1]) of null-text inversion, Adam's last null (upstream) against
    the best evaluated one, on the same generator images (the reconstruction table's first ``images``)."""
    from .harness import psnr
    out = {}
    scenes = _scenes(images)
    for name, keep_best in (("last Adam null (upstream)", False), ("best evaluated null (keep_best)", True)):
        vals, bwd, t0 = [], 0, time.time()
        for sc in scenes:
            s = NullTextSettings(guidance=guidance, keep_best=keep_best)
            inv, rec = invert(model, sc.image, sc.caption, steps, guidance, "null-text", s)
            vals.append(round(psnr(rec, sc.image), 2))
            bwd += inv.unet_backward
        out[name] = {"psnr_db": round(sum(vals) / len(vals), 2), "per_image_db": vals,
                     "adam_steps_per_image": bwd / len(scenes),
                     "seconds_per_image": round((time.time() - t0) / len(scenes), 1)}
    return out


def build_parser():
    from .. import cli
    p = cli.parser(__doc__, "attention.shapesworld.null_precision")
    p.add_argument("--images", type=cli.int_range(1), default=3, help="generator images inverted per setting")
    p.add_argument("--steps", type=cli.int_range(2), default=50, help="DDIM steps of the inversion")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float16", help="the UNet's precision")
    cli.add_weights(p)
    return p


def main(argv=None):
    import json

    from .. import cli
    p = build_parser()
    args = p.parse_args(argv)
    model = half_precision(cli.load_model(p, args.weights), DTYPES[args.dtype])
    torch.manual_seed(0)
    print(json.dumps({f"null-text inversion, {args.dtype} UNet, guidance 7.5, {args.steps} steps":
                      keep_best_figures(model, args.images, args.steps)}), flush=True)


if __name__ == "__main__":
    main()
