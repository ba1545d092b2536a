"""Tier-2 helpers: import a real ComfyUI checkout (COMFYUI_PATH) and this pack inside it.

Every tier-2 test module calls ``comfy_or_skip()`` at import; without COMFYUI_PATH the
module is skipped, so CI (which has no ComfyUI) runs tier 1 only.

ComfyUI runs on the CPU (``--cpu``) unless ATTENTION_LAB_COMFY_DEVICE=cuda, which starts it without that
flag so that it picks the GPU as it does for a user (the GPU check in a lent machine's session).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from compare import DEVICE_ENV, ON_GPU, SAME_SAMPLES, assert_same_samples, bound, rel, requested_device  # noqa: F401  (re-exported for the node tests)

ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "attention_lab"
_state: dict = {}


def comfy_device_args() -> list[str]:
    """ComfyUI's device flags for ATTENTION_LAB_COMFY_DEVICE: "cpu" (the default) is ``--cpu``; "cuda" is
    none, so ComfyUI takes the GPU as it does for a user. Anything else is refused by name."""
    device = requested_device()
    if device == "cpu":
        return ["--cpu"]
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"{DEVICE_ENV}=cuda but torch {torch.__version__} sees no CUDA device")
        return []
    raise ValueError(f"{DEVICE_ENV}={device!r}: use 'cpu' (the default) or 'cuda'")


def comfy_or_skip():
    path = os.environ.get("COMFYUI_PATH")
    if not path or not (Path(path) / "comfy").is_dir():
        pytest.skip("tier 2: set COMFYUI_PATH to a ComfyUI checkout to run the node tests",
                    allow_module_level=True)
    if "pack" in _state:
        return _state["pack"]
    device_args = comfy_device_args()
    sys.path.insert(0, path)
    cwd = os.getcwd()
    os.chdir(path)
    argv = sys.argv
    sys.argv = [argv[0], *device_args]
    try:
        import comfy.options
        comfy.options.enable_args_parsing()
        import comfy.model_management  # noqa: F401  (parses args)
    finally:
        sys.argv = argv
        os.chdir(cwd)
    if not device_args:  # cuda: make sure ComfyUI really took the GPU, not a silent CPU fallback
        device = comfy.model_management.get_torch_device()
        if getattr(device, "type", str(device)) != "cuda":
            raise RuntimeError(f"{DEVICE_ENV}=cuda but ComfyUI chose the device {device}")
        # The tests compare one computation done two ways (batched, split, patched with an identity) at float32
        # precision; cuDNN's default TF32 convolutions would make every such comparison a 10-bit-mantissa one.
        import torch
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    import atexit
    import shutil
    import tempfile

    import folder_paths  # the pack's caches (proxy search) go to a temporary folder, not ComfyUI's models folder
    cache = tempfile.mkdtemp(prefix="attention_lab_cache_")
    atexit.register(shutil.rmtree, cache, True)
    folder_paths.folder_names_and_paths["attention_lab_cache"] = ([cache], set())
    spec = importlib.util.spec_from_file_location(PACK_NAME, ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = pack
    spec.loader.exec_module(pack)
    _state["pack"] = pack
    return pack


CTX = 64


def _tiny_unet(model_config_class, cfg: dict, seed: int, std: float):
    """A ModelPatcher around a UNet of ``cfg`` with seeded random weights (comfy ops skip init)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    mc = model_config_class(cfg)
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.diffusion_model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


TINY_SD15 = {'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True,
             'legacy': False, 'adm_in_channels': None, 'dtype': torch.float32, 'in_channels': 4,
             'model_channels': 32, 'num_res_blocks': [1, 1], 'transformer_depth': [1, 1], 'channel_mult': [1, 2],
             'transformer_depth_middle': 1, 'use_linear_in_transformer': False, 'context_dim': CTX,
             'transformer_depth_output': [1, 1, 1, 1], 'use_temporal_attention': False,
             'use_temporal_resblock': False}


def tiny_sd15():
    import comfy.supported_models
    return _tiny_unet(comfy.supported_models.SD15, dict(TINY_SD15), seed=0, std=0.05)


def tiny_controlnet(seed: int = 4, std: float = 0.05):
    """A ControlNet for ``tiny_sd15`` made of ComfyUI's own classes (``comfy.cldm.cldm.ControlNet`` in
    ``comfy.controlnet.ControlNet``, as ``load_controlnet`` builds it) with seeded random weights, zero
    convolutions included, so that its hint changes the image. Apply it with ControlNetApplyAdvanced and a
    (1, 128, 128, 3) IMAGE for a 16x16 latent."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management as mm
    import comfy.ops
    cfg = {k: v for k, v in TINY_SD15.items() if k != "out_channels"}
    cfg.update(hint_channels=3, num_heads=8, operations=comfy.ops.disable_weight_init,
               device=mm.unet_offload_device())
    net = comfy.cldm.cldm.ControlNet(**cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return comfy.controlnet.ControlNet(net, load_device=mm.get_torch_device())


def tiny_sdxl():
    import comfy.supported_models
    cfg = {'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True,
           'legacy': False, 'num_classes': 'sequential', 'adm_in_channels': 2816, 'in_channels': 4,
           'model_channels': 64, 'num_res_blocks': [1, 1], 'transformer_depth': [0, 2], 'channel_mult': [1, 2],
           'transformer_depth_middle': 2, 'use_linear_in_transformer': True, 'context_dim': 2048,
           'num_head_channels': 32, 'transformer_depth_output': [0, 0, 2, 2], 'use_temporal_attention': False,
           'use_temporal_resblock': False, 'dtype': torch.float32}
    return _tiny_unet(comfy.supported_models.SDXL, cfg, seed=1, std=0.02)


def _randomize(module, seed: int, std: float) -> None:
    """Seeded random weights for every parameter and floating buffer (e.g. MMDiT's position table)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]:
            t.copy_((torch.randn(t.shape, generator=g) * std).to(t.dtype))


FLUX_TXT = 32      # the tiny T5's width = the tiny Flux's context_in_dim
FLUX_VEC = 64      # the tiny CLIP-L's width = the tiny Flux's vec_in_dim


def tiny_flux(guidance_embed: bool = True, seed: int = 4):
    """ComfyUI's own Flux class (2 double + 2 single blocks, 4 heads of 16, patch 2): Flux dev's layout
    (guidance-distilled) or, with ``guidance_embed=False``, schnell's."""
    import comfy.supported_models
    cfg = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": FLUX_VEC,
           "context_in_dim": FLUX_TXT, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 4, "depth": 2,
           "depth_single_blocks": 2, "axes_dim": [4, 6, 6], "theta": 10000, "patch_size": 2, "qkv_bias": True,
           "guidance_embed": guidance_embed, "txt_ids_dims": []}
    config = comfy.supported_models.Flux if guidance_embed else comfy.supported_models.FluxSchnell
    return _tiny_unet(config, cfg, seed=seed, std=0.05)


def tiny_sd3(x_block_self_attn: bool = False, seed: int = 5):
    """ComfyUI's own MMDiT (SD3 layout: 2 joint blocks, hidden 128 = 2 heads of 64, patch 2, CLIP-L/G pooled
    2048, a 4096-wide context); ``x_block_self_attn``: SD3.5 medium's extra image attention in block 0."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    embedder = {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}}
    cfg = {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "adm_in_channels": 2048,
           "context_embedder_config": embedder,
           "pos_embed_max_size": 24, "num_patches": 24 * 24, "pos_embed_scaling_factor": None, "qk_norm": "rms",
           "x_block_self_attn_layers": [0] if x_block_self_attn else []}
    mc = comfy.supported_models.SD3(cfg)
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({})
    _randomize(model.diffusion_model, seed, 0.05)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def _clip(tokenizer_class, model_class, opts: dict, seed: int, std: float = 0.02):
    import comfy.sd
    import comfy.supported_models_base
    clip = comfy.sd.CLIP(target=comfy.supported_models_base.ClipTarget(tokenizer_class, model_class),
                         model_options=opts)
    _randomize(clip.cond_stage_model, seed, std)
    return clip


T5_TINY = {"d_model": FLUX_TXT, "d_kv": 8, "num_heads": 4, "d_ff": 64, "num_layers": 1}


def tiny_flux_clip():
    """Flux's text encoders from ComfyUI's classes and bundled tokenizers: CLIP-L (pooled vector) and a one-layer
    T5 (the context), both tiny."""
    import comfy.text_encoders.flux
    opts = {"clip_l_model_config": {"hidden_size": FLUX_VEC, "intermediate_size": 64, "num_attention_heads": 2,
                                    "num_hidden_layers": 2, "projection_dim": FLUX_VEC},
            "t5xxl_model_config": T5_TINY}
    return _clip(comfy.text_encoders.flux.FluxTokenizer, comfy.text_encoders.flux.flux_clip(dtype_t5=torch.float32),
                 opts, seed=6)


def tiny_sd3_clip(t5: bool = True):
    """SD3's three text encoders from ComfyUI's classes and bundled tokenizers: CLIP-L/G (768 + 1280 wide, padded
    to 4096) then a one-layer T5 (4096 wide, as the concatenation needs; kept in float16: its table is 32128 x
    4096)."""
    import comfy.text_encoders.sd3_clip
    opts = {"clip_l_model_config": {"hidden_size": 768, "intermediate_size": 64, "num_attention_heads": 2,
                                    "num_hidden_layers": 3, "projection_dim": 768},
            "clip_g_model_config": {"hidden_size": 1280, "intermediate_size": 64, "num_attention_heads": 2,
                                    "num_hidden_layers": 3, "projection_dim": 1280},
            "t5xxl_model_config": {**T5_TINY, "d_model": 4096, "num_heads": 2}}
    model = comfy.text_encoders.sd3_clip.sd3_clip(t5=t5, dtype_t5=torch.float16)
    return _clip(comfy.text_encoders.sd3_clip.SD3Tokenizer, model, opts, seed=7)


def tiny_clip(embedding_directory: str | None = None):
    """A 2-layer SD1 CLIP of width CTX; ``embedding_directory``: ComfyUI's embeddings folder (textual inversions
    named ``embedding:name`` in prompts), as CheckpointLoader passes it."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    te_cfg = {"hidden_size": CTX, "intermediate_size": 128, "num_attention_heads": 2,
              "num_hidden_layers": 2, "projection_dim": CTX}
    clip = comfy.sd.CLIP(target=target, embedding_directory=embedding_directory,
                         model_options={"clip_l_model_config": te_cfg})
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in clip.cond_stage_model.parameters():
            p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))
    return clip


def sd15_clip(seed: int = 4):
    """SD1.5's text encoder at its real size (CLIP ViT-L/14 text tower, 123 M parameters, the bundled
    config and tokenizer), as CheckpointLoaderSimple builds it for an SD1.5 checkpoint, with seeded random
    weights (normal, std 0.02): for timings and for equality checks on the real architecture."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    clip = comfy.sd.CLIP(target=target)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in clip.cond_stage_model.parameters():
            p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))
    return clip


def tiny_sdxl_clip():
    """SDXL's two text encoders with one layer each (widths 768 + 1280 = the UNet's 2048 context)."""
    import comfy.sd
    import comfy.sdxl_clip
    import comfy.supported_models_base
    target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
    opts = {"clip_l_model_config": {"hidden_size": 768, "intermediate_size": 64, "num_attention_heads": 2,
                                    "num_hidden_layers": 3, "projection_dim": 768},
            "clip_g_model_config": {"hidden_size": 1280, "intermediate_size": 64, "num_attention_heads": 2,
                                    "num_hidden_layers": 3, "projection_dim": 1280}}
    clip = comfy.sd.CLIP(target=target, model_options=opts)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in clip.cond_stage_model.parameters():
            p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))
    return clip


def encode(clip, text):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def sdxl_cond(seed: int, tokens: int = 77):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, 2048, generator=g),
             {"pooled_output": torch.randn(1, 1280, generator=g), "width": 256, "height": 256}]]


def sample(model, positive, negative, latent, cfg=7.0, sampler="euler", steps=4, seed=0, scheduler="normal",
           noise_mask=None):
    """KSampler's call (comfy.sample.sample) on LATENT samples ``latent``, with its noise mask if given."""
    import comfy.sample
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
                               noise_mask=noise_mask, disable_pbar=True, seed=seed)


class StubServer:
    """What ComfyUI's PromptExecutor needs of a server when a test runs a graph in-process."""
    client_id = None
    last_node_id = None
    last_prompt_id = None

    def send_sync(self, event, data, sid=None):
        pass


def register_pack(out: Path) -> None:
    """Register ComfyUI's stock nodes and this pack (as a server would), with output/temp folders under ``out``."""
    import asyncio

    import folder_paths

    import nodes
    folder_paths.set_output_directory(str(out / "output"))
    folder_paths.set_temp_directory(str(out / "temp"))

    async def setup():
        await nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False)
        assert await nodes.load_custom_node(str(ROOT))
    asyncio.run(setup())
