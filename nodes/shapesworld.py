"""ShapesWorldLoader: the pack's embedded tiny model as ComfyUI MODEL, CLIP and VAE.

Everything ShapesWorld-specific lives here; every other node treats the result like any
SD1.x checkpoint. The UNet is a plain-torch module that honours ComfyUI's attention patch
contract; the VAE is ComfyUI's own pixel-space VAE (the model works on 32x32 RGB in
[-1, 1], so an EmptyLatentImage of 256x256 gives 32x32 images).
"""

from __future__ import annotations

import numbers
from pathlib import Path
from types import SimpleNamespace

import comfy.latent_formats
import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd
import comfy.supported_models_base
import torch
from comfy_api.latest import io

from ..attention.shapesworld.model import DEFAULT_WEIGHTS, read_weights
from ..attention.shapesworld.text import EOS, ShapesTokenizer
from ..attention.shapesworld.train import build_models
from .common import CATEGORY

TOKEN_KEY = "sw"


class ShapesWorldLatentFormat(comfy.latent_formats.LatentFormat):
    latent_channels = 3
    scale_factor = 1.0

    def __init__(self):
        self.latent_rgb_factors = [[0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5]]
        self.latent_rgb_factors_bias = [0.5, 0.5, 0.5]


class ShapesWorldConfig(comfy.supported_models_base.BASE):
    unet_config = {"disable_unet_model_creation": True}
    unet_extra_config = {}
    latent_format = ShapesWorldLatentFormat
    sampling_settings = {"beta_schedule": "linear", "linear_start": 0.00085, "linear_end": 0.012}
    memory_usage_factor = 1.0


class ComfyShapesTokenizer:
    """ComfyUI tokenizer interface over the ShapesWorld word tokenizer."""

    def __init__(self, embedding_directory=None, tokenizer_data=None, **kwargs):
        self.tok = ShapesTokenizer()

    def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
        chunks = self.tok.chunks(text)
        if return_word_ids:
            chunks = [[(t, w, 0) for t, w in c] for c in chunks]
        return {TOKEN_KEY: chunks}

    def untokenize(self, token_weight_pair):
        return [(p, self.tok.vocab[p[0]]) for p in token_weight_pair]

    def state_dict(self):
        return {}


class ComfyShapesTextModel(torch.nn.Module):
    """ComfyUI text-model interface (encode_token_weights) over the ShapesWorld encoder."""

    def __init__(self, device=None, dtype=None, model_options=None, config=None, **kwargs):
        super().__init__()
        _, self.encoder = build_models(config)
        self.encoder.to(device=device, dtype=torch.float32)
        self.dtypes = {torch.float32}
        # SD layout for code that looks up the token table as clip.cond_stage_model.clip_<key>.transformer
        self.clip_sw = SimpleNamespace(transformer=self.encoder)

    def set_clip_options(self, options):
        pass

    def reset_clip_options(self):
        pass

    def load_sd(self, sd):
        return self.encoder.load_state_dict(sd)

    def _encode(self, ids: list[list[int]], spliced=()) -> torch.Tensor:
        """Context of token ids; ``spliced``: (chunk, position, vector) embeddings replacing tokens, as
        ComfyUI's tensor tokens (one vector per token here)."""
        dev = self.encoder.position_embedding.device
        e = self.encoder.token_embedding(torch.tensor(ids, dtype=torch.long, device=dev))
        if spliced:
            rows = torch.tensor([c for c, _, _ in spliced], device=dev)
            cols = torch.tensor([p for _, p, _ in spliced], device=dev)
            e = e.index_put((rows, cols), torch.stack([v.reshape(-1).to(e) for _, _, v in spliced]))
        return self.encoder.forward_embeddings(e)

    def encode_token_weights(self, token_weight_pairs):
        chunks = token_weight_pairs[TOKEN_KEY]
        ids = [[t[0] if isinstance(t[0], numbers.Integral) else 0 for t in c] for c in chunks]
        spliced = []
        for ci, c in enumerate(chunks):
            for p, t in enumerate(c):
                if not isinstance(t[0], numbers.Integral):
                    v = t[0].get("data") if isinstance(t[0], dict) else t[0]
                    if not torch.is_tensor(v) or v.numel() != self.encoder.width:
                        raise ValueError(f"ShapesWorld takes one {self.encoder.width}-wide vector per embedding "
                                         f"token; got {type(v).__name__} {getattr(v, 'shape', '')}")
                    spliced.append((ci, p, v))
        z = self._encode(ids, spliced)                                 # (chunks, CONTEXT, width)
        weights = torch.tensor([[t[1] for t in c] for c in chunks], device=z.device, dtype=z.dtype)
        if (weights != 1.0).any():  # ComfyUI's convention: interpolate from the empty prompt
            empty = self._encode([[t for t, _ in ShapesTokenizer().chunks("")[0]]])
            z = empty + (z - empty) * weights[..., None]
        cond = z.reshape(1, -1, z.shape[-1])
        pooled = z[0, ids[0].index(EOS)][None]    # CLIP's pooled output is the EOS state
        return cond.float().cpu(), pooled.float().cpu()


def load_shapesworld(path: Path | str = DEFAULT_WEIGHTS):
    sd, config, _ = read_weights(path)
    unet, _ = build_models(config)
    unet.load_state_dict({k[5:]: v.float() for k, v in sd.items() if k.startswith("unet.")})
    config_obj = ShapesWorldConfig({"disable_unet_model_creation": True})
    bm = comfy.model_base.BaseModel(config_obj, comfy.model_base.ModelType.EPS)
    bm.diffusion_model = unet.eval()
    model = comfy.model_patcher.ModelPatcher(bm, load_device=mm.get_torch_device(),
                                             offload_device=mm.unet_offload_device())

    class Target(comfy.supported_models_base.ClipTarget):
        pass
    target = Target(ComfyShapesTokenizer, ComfyShapesTextModel)
    target.params = {"config": config}
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32})
    clip.cond_stage_model.load_sd({k[5:]: v.float() for k, v in sd.items() if k.startswith("text.")})
    vae = comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})
    return model, clip, vae


class ShapesWorldLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ShapesWorldLoader",
            display_name="ShapesWorld Loader",
            category=CATEGORY,
            description=(
                "Loads Attention Lab's embedded tiny text-to-image model of coloured shapes (32x32 RGB, SD's "
                "noise schedule, epsilon prediction). Use an EmptyLatentImage of 256x256 for 32x32 images and "
                "prompts such as 'a red circle and a blue square on a gray background'."),
            inputs=[
                io.String.Input("weights", default="", tooltip=(
                    "Path of a ShapesWorld .safetensors file; empty = the committed assets/shapesworld.safetensors.")),
            ],
            outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output()],
        )

    @classmethod
    def execute(cls, weights) -> io.NodeOutput:
        return io.NodeOutput(*load_shapesworld(weights.strip() or DEFAULT_WEIGHTS))
