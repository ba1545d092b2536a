"""Write random-weight Flux and SD3 model files that ComfyUI's stock loaders detect, and the capture workflows on them.

    COMFYUI_PATH=/path/to/ComfyUI python tools/random_dit_checkpoints.py OUT_DIR [--seed 0] [--size 256 192]

For running ``workflows/api/attention_capture_flux_api.json`` and ``..._sd3_api.json`` through a real ComfyUI's
HTTP API without real weights. Every part is built from ComfyUI's own classes, weights normal(0, 0.02), and
saved in the layout its loaders detect (``comfy/model_detection.py``, ``comfy/sd.py`` ``detect_te_model`` and
``VAE``). Detection fixes some sizes; the smallest each loader accepts:

==========================  ======================================================  ========================
file (under OUT_DIR/models)  what the loader reads from it                           size written
==========================  ======================================================  ========================
diffusion_models/            Flux: 24 heads of 128 (``num_heads``, ``axes_dim`` are   hidden 3072, 1 double +
random_flux_dev              fixed), depth = the blocks present, guidance embedding   1 single block, fp16,
                             if ``guidance_in`` is present                            0.55 G params, 1.1 GB
checkpoints/random_sd3       MMDiT: hidden = 64 x depth from ``x_embedder``, the      2 joint blocks (hidden
                             rest from the tensors; + the checkpoint's VAE            128), fp16, 0.2 GB
text_encoders/random_clip_l  CLIP-L: its json config (12 layers, 768 wide)           full size, fp16, 0.25 GB
text_encoders/random_clip_g  CLIP-G: detected by layer 30, its json config           full size, fp16, 1.4 GB
text_encoders/random_t5xxl   T5-XXL: detected by block 23, width 4096, json config   full size (4.8 G params),
 _fp8_e4m3fn                                                                         float8_e4m3fn, 4.8 GB
vae/random_flux_ae           16-channel KL VAE, ch 128 x [1, 2, 4, 4] fixed           full size, fp16, 0.17 GB
==========================  ======================================================  ========================

T5 is stored in float8 (ComfyUI casts per layer, as for the common ``t5xxl_fp8_e4m3fn`` file) to halve its
memory. Also written: ``OUT_DIR/<name>_random_api.json`` for each of ``SHIPPED`` (the capture, P2P,
rectified-flow P2P and prompt-mixing workflows of Flux and SD3), the shipped API workflows with these file names and
``--size`` / ``--steps`` substituted (the only changes). Serve them with
``python main.py --cpu --base-directory OUT_DIR`` (``OUT_DIR/custom_nodes`` linking this pack) and queue them
with ``tools/queue_workflow.py``. The images are noise; the run exercises the loaders, the DiT hook and the nodes.
Refuses to overwrite a file. Never commit the output.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from attention import cli  # noqa: E402

FILES = {"flux": "diffusion_models/random_flux_dev.safetensors", "sd3": "checkpoints/random_sd3.safetensors",
         "clip_l": "text_encoders/random_clip_l.safetensors", "clip_g": "text_encoders/random_clip_g.safetensors",
         "t5": "text_encoders/random_t5xxl_fp8_e4m3fn.safetensors", "vae": "vae/random_flux_ae.safetensors"}
# What comfy/model_detection.py derives for a Flux file whose img_in is 3072 wide with 1 + 1 blocks.
FLUX = {"image_model": "flux", "axes_dim": [16, 56, 56], "num_heads": 24, "mlp_ratio": 4.0, "theta": 10000,
        "out_channels": 16, "qkv_bias": True, "txt_ids_dims": [], "in_channels": 16, "hidden_size": 3072,
        "context_in_dim": 4096, "patch_size": 2, "vec_in_dim": 768, "depth": 1, "depth_single_blocks": 1,
        "guidance_embed": True, "yak_mlp": False, "txt_norm": False}
SD3 = {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "adm_in_channels": 2048,
       "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
       "pos_embed_max_size": 192, "num_patches": 192 * 192, "pos_embed_scaling_factor": None, "qk_norm": "rms",
       "x_block_self_attn_layers": []}
# the shipped API workflows on Flux's or SD3's stock loaders (workflows/api/<name>_api.json)
SHIPPED = ("attention_capture_flux", "attention_capture_sd3", "p2p_edit_flux", "p2p_edit_sd3", "rf_p2p_edit_flux",
           "prompt_mixing_flux")
VAE = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
       "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
# The shipped workflows' model file names -> ours.
NAMES = {"flux1-dev.safetensors": Path(FILES["flux"]).name, "clip_l.safetensors": Path(FILES["clip_l"]).name,
         "t5xxl_fp16.safetensors": Path(FILES["t5"]).name, "ae.safetensors": Path(FILES["vae"]).name,
         "sd3.5_large.safetensors": Path(FILES["sd3"]).name, "clip_g.safetensors": Path(FILES["clip_g"]).name}


def randomize(module: torch.nn.Module, g: torch.Generator) -> None:
    """Every parameter and floating buffer normal(0, 0.02), drawn in float32 and cast to its dtype (float8
    included): ComfyUI's ops skip initialization, and MMDiT's ``pos_embed`` is a buffer saved with the weights
    (left uninitialized, it made SD3's samples NaN)."""
    with torch.no_grad():
        for p in list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]:
            p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))


def save(path: Path, sd: dict, note: str) -> None:
    from safetensors.torch import save_file
    t0 = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata={"attention_lab": "random weights"})
    n = sum(v.numel() for v in sd.values())
    print(f"wrote {path} ({n / 1e6:.0f} M params, {path.stat().st_size / 2 ** 30:.2f} GiB, {note}) "
          f"in {time.perf_counter() - t0:.0f} s", flush=True)


def vae_state(g: torch.Generator) -> dict:
    """Flux's / SD3's VAE as comfy.sd.VAE builds it for a 16-channel KL file without quant convs."""
    from comfy.ldm.models.autoencoder import AutoencodingEngine
    ae = AutoencodingEngine(
        regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
        encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": VAE},
        decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": VAE})
    randomize(ae, g)
    return {k: v.half() for k, v in ae.state_dict().items()}


def text_encoder(kind: str, g: torch.Generator) -> dict:
    """The state dict of ComfyUI's text-encoder transformer, keys as a standalone file has them."""
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.text_encoders.sd3_clip
    if kind == "clip_l":
        m = comfy.sd1_clip.SDClipModel(dtype=torch.float16)
    elif kind == "clip_g":
        m = comfy.sdxl_clip.SDXLClipG(dtype=torch.float16)
    else:
        m = comfy.text_encoders.sd3_clip.T5XXLModel(dtype=torch.float8_e4m3fn)
    randomize(m.transformer, g)
    return m.transformer.state_dict()


def diffusion_model(kind: str, g: torch.Generator) -> dict:
    import comfy.supported_models
    mc = (comfy.supported_models.Flux(dict(FLUX)) if kind == "flux" else comfy.supported_models.SD3(dict(SD3)))
    mc.set_inference_dtype(torch.float16, None)
    model = mc.get_model({})
    randomize(model.diffusion_model, g)
    return {k: v.half() for k, v in model.diffusion_model.state_dict().items()}


def workflows(out: Path, size: tuple[int, int], steps: int) -> None:
    """The shipped Flux/SD3 workflows with our file names, ``size`` (width, height; Load Image's photo is scaled
    to that many pixels) and ``steps`` (of every sampler and inversion) substituted."""
    for name in SHIPPED:
        wf = json.loads((ROOT / "workflows" / "api" / f"{name}_api.json").read_text())
        for node in wf.values():
            inputs = node["inputs"]
            for k, v in inputs.items():
                if isinstance(v, str) and v in NAMES:
                    inputs[k] = NAMES[v]
            if node["class_type"] == "EmptySD3LatentImage":
                inputs["width"], inputs["height"] = size
            if node["class_type"] in ("KSampler", "P2PEditSampler", "NullTextInvert", "PromptMixSampler"):
                inputs["steps"] = steps
            if node["class_type"] == "ImageScaleToTotalPixels":
                inputs["megapixels"] = max(0.01, round(size[0] * size[1] / 2 ** 20, 3))
        dest = out / f"{name}_random_api.json"
        dest.write_text(json.dumps(wf, indent=1))
        print(f"wrote {dest} ({size[0]}x{size[1]}, {steps} steps)")


def check(models: Path) -> None:
    """Load every file with ComfyUI's own loaders, as the stock loader nodes do, and print what was detected."""
    import comfy.sd
    flux = comfy.sd.load_diffusion_model(str(models / FILES["flux"]))
    cfg = flux.model.model_config.unet_config
    print(f"diffusion model loads as {type(flux.model.model_config).__name__}: hidden {cfg['hidden_size']}, "
          f"{cfg['depth']} double + {cfg['depth_single_blocks']} single blocks, guidance {cfg['guidance_embed']}")
    m, _, vae = comfy.sd.load_checkpoint_guess_config(str(models / FILES["sd3"]), output_clip=False)[:3]
    print(f"checkpoint loads as {type(m.model.model_config).__name__} (depth "
          f"{m.model.model_config.unet_config['depth']}) with a {vae.latent_channels}-channel VAE")
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(models / FILES["vae"])))
    print(f"VAE file: {vae.latent_channels} latent channels")
    te = [str(models / FILES[k]) for k in ("clip_l", "t5")]
    for kind in te + [str(models / FILES["clip_g"])]:
        print(f"{Path(kind).name} detected as {comfy.sd.detect_te_model(comfy.utils.load_torch_file(kind))}")


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("out", type=Path, help="folder to write (a ComfyUI base directory), outside the repository")
    p.add_argument("--seed", type=cli.int_range(0), default=0, help="seed of the random weights")
    p.add_argument("--size", type=cli.int_range(16, 16384), nargs=2, default=[256, 192], metavar=("W", "H"),
                   help="image width and height of the written workflows, pixels (multiples of 16)")
    p.add_argument("--steps", type=cli.int_range(1, 10000), default=4, help="sampling steps of the written workflows")
    p.add_argument("--check-only", action="store_true", help="only load the existing files and print what ComfyUI "
                                                             "detects (and write the workflows)")
    args = p.parse_args(argv)
    if any(s % 16 for s in args.size):
        p.error(f"argument --size: {args.size} are not multiples of 16: give e.g. 256 192")
    models = args.out / "models"
    existing = [f for f in FILES.values() if (models / f).exists()]
    if existing and not args.check_only:
        p.error(f"argument out: {models / existing[0]} exists: give a new folder (nothing is overwritten)")
    sys.path.insert(0, str(ROOT / "tools"))
    from comfy_boot import boot
    boot()
    import comfy.utils  # noqa: F401
    if not args.check_only:
        g = torch.Generator().manual_seed(args.seed)
        t0 = time.perf_counter()
        save(models / FILES["flux"], diffusion_model("flux", g), "Flux, UNETLoader")
        vae = vae_state(g)
        save(models / FILES["vae"], vae, "VAELoader")
        sd3 = {f"model.diffusion_model.{k}": v for k, v in diffusion_model("sd3", g).items()}
        sd3.update({f"first_stage_model.{k}": v for k, v in vae.items()})
        save(models / FILES["sd3"], sd3, "SD3 + VAE, CheckpointLoaderSimple")
        for kind in ("clip_l", "clip_g", "t5"):
            save(models / FILES[kind], text_encoder(kind, g), "DualCLIPLoader / TripleCLIPLoader")
        workflows(args.out, tuple(args.size), args.steps)
        print(f"all written in {time.perf_counter() - t0:.0f} s")
    else:
        workflows(args.out, tuple(args.size), args.steps)
    check(models)


if __name__ == "__main__":
    main()
