"""Write an SD1.5 checkpoint of random weights that CheckpointLoaderSimple loads as SD15, for timing workflows.

    COMFYUI_PATH=/path/to/ComfyUI python tools/random_sd15_checkpoint.py OUT.safetensors [--seed 0]

The real SD1.5 architecture (UNet 860 M, CLIP ViT-L/14 text encoder 123 M, KL VAE 84 M parameters), built
from ComfyUI's own classes, weights normal(0, 0.02) in float16 (about 2 GB), saved with ComfyUI's
``comfy.sd.save_checkpoint`` in the original layout. Its images are noise; its timings are SD1.5's. Put it in
a models folder outside the repository (never commit it) and name it as the workflow does, e.g.
``v1-5-pruned-emaonly.safetensors``. Refuses to overwrite a file.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from attention import cli  # noqa: E402

UNET = {'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True,
        'legacy': False, 'adm_in_channels': None, 'in_channels': 4, 'model_channels': 320,
        'num_res_blocks': [2, 2, 2, 2], 'transformer_depth': [1, 1, 1, 1, 1, 1, 0, 0],
        'channel_mult': [1, 2, 4, 4], 'transformer_depth_middle': 1, 'use_linear_in_transformer': False,
        'context_dim': 768, 'num_heads': 8, 'transformer_depth_output': [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        'use_temporal_attention': False, 'use_temporal_resblock': False}
VAE = {'double_z': True, 'z_channels': 4, 'resolution': 256, 'in_channels': 3, 'out_ch': 3, 'ch': 128,
       'ch_mult': [1, 2, 4, 4], 'num_res_blocks': 2, 'attn_resolutions': [], 'dropout': 0.0}


def randomize(module: torch.nn.Module, g: torch.Generator) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))


def random_model(model_class, unet: dict, dtype: torch.dtype, g: torch.Generator):
    """A ComfyUI ModelPatcher of ``model_class`` (a ``comfy.supported_models`` class, e.g. SD15) built from the UNet
    config ``unet`` in ``dtype``, its diffusion model's weights normal(0, 0.02) drawn from ``g`` (which then goes on
    to whatever the caller draws next). Used by this tool and benchmarks/full_size.py."""
    import comfy.model_management as mm
    import comfy.model_patcher
    mc = model_class(dict(unet, dtype=dtype))
    mc.set_inference_dtype(dtype, None)
    model = mc.get_model({})
    randomize(model.diffusion_model, g)
    return comfy.model_patcher.ModelPatcher(model, mm.get_torch_device(), mm.unet_offload_device())


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("out", type=Path, help="the checkpoint to write (.safetensors), outside the repository")
    p.add_argument("--seed", type=cli.int_range(0), default=0, help="seed of the random weights")
    args = p.parse_args(argv)
    if args.out.exists():
        p.error(f"argument out: {args.out} exists: give a new file name (nothing is overwritten)")
    if args.out.suffix != ".safetensors":
        p.error(f"argument out: {args.out} does not end in .safetensors: give NAME.safetensors")
    sys.path.insert(0, str(ROOT / "tools"))
    from comfy_boot import boot
    boot()
    import comfy.ldm.models.autoencoder
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.supported_models_base

    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(args.seed)
    patcher = random_model(comfy.supported_models.SD15, UNET, torch.float16, g)
    clip = comfy.sd.CLIP(target=comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer,
                                                                       comfy.sd1_clip.SD1ClipModel),
                         model_options={"dtype": torch.float16})
    randomize(clip.cond_stage_model, g)
    ae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=VAE, embed_dim=4)
    randomize(ae, g)
    vae = comfy.sd.VAE(sd={k: v.half() for k, v in ae.state_dict().items()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    comfy.sd.save_checkpoint(str(args.out), patcher, clip, vae, metadata={"attention_lab": "random weights"})
    print(f"wrote {args.out} ({args.out.stat().st_size / 2 ** 30:.2f} GiB) in {time.perf_counter() - t0:.0f} s")
    m, c, v, _ = comfy.sd.load_checkpoint_guess_config(str(args.out))[:4]
    print(f"loads as {type(m.model.model_config).__name__} with CLIP {type(c.cond_stage_model).__name__} and a "
          f"{type(v.first_stage_model).__name__} VAE")


if __name__ == "__main__":
    main()
