"""ShapesWorldLoader: the pack's embedded tiny model as ComfyUI MODEL, CLIP and VAE.

Everything ShapesWorld-specific lives here; every other node treats the result like any
SD1.x checkpoint. The UNet is a plain-torch module that honours ComfyUI's attention patch
contract; the VAE is ComfyUI's own pixel-space VAE (the model works on 32x32 RGB in
[-1, 1], so an EmptyLatentImage of 256x256 gives 32x32 images).
"""

from __future__ import annotations

import numbers
import re
from pathlib import Path
from types import SimpleNamespace

import comfy.latent_formats
import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd
import comfy.supported_models_base
import torch
from comfy_api.latest import io, ui

from ..attention.shapesworld.harness import colour_blobs, load_classifier
from ..attention.shapesworld.model import DEFAULT_WEIGHTS, build_models, read_weights
from ..attention.shapesworld.text import EOS, ShapesTokenizer, TextEncoder
from ..attention.shapesworld.world import COLOURS, SHAPES, SceneSpec, ShapesWorld, one_colour_spec
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
        self.encoder = TextEncoder(width=config["text_width"], layers=config["text_layers"])
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


def shapesworld_clip_vae(config: dict, text_sd: dict):
    """ComfyUI CLIP over the ShapesWorld text encoder (``text_sd``: its state dict) and the pixel-space VAE; shared
    by the ShapesWorld loaders (the UNet's and ShapesWorld-Flow's)."""
    class Target(comfy.supported_models_base.ClipTarget):
        pass
    target = Target(ComfyShapesTokenizer, ComfyShapesTextModel)
    target.params = {"config": config}
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32})
    clip.cond_stage_model.load_sd(text_sd)
    vae = comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})
    return clip, vae


def load_shapesworld(path: Path | str = DEFAULT_WEIGHTS):
    sd, config, _ = read_weights(path)
    unet, _ = build_models(config)
    unet.load_state_dict({k[5:]: v.float() for k, v in sd.items() if k.startswith("unet.")})
    config_obj = ShapesWorldConfig({"disable_unet_model_creation": True})
    bm = comfy.model_base.BaseModel(config_obj, comfy.model_base.ModelType.EPS)
    bm.diffusion_model = unet.eval()
    model = comfy.model_patcher.ModelPatcher(bm, load_device=mm.get_torch_device(),
                                             offload_device=mm.unet_offload_device())
    clip, vae = shapesworld_clip_vae(config, {k[5:]: v.float() for k, v in sd.items() if k.startswith("text.")})
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


# --------------------------------------------------------------------------------------------- grounding masks
# Mask sources for the grounding nodes (nodes/grounding_*.py) on ShapesWorld, so a CPU-only graph can fill a
# dataset without an external segmenter: exact scenes of the world, or the pack's pseudo-labeller.

def _shape_list(text: str) -> list[str]:
    shapes = [s.strip() for s in (text or "").split(",") if s.strip()] or list(SHAPES)
    bad = [s for s in shapes if s not in SHAPES]
    if bad:
        raise ValueError(f"unknown shapes {bad}; ShapesWorld's shapes are {', '.join(SHAPES)} (comma separated, "
                         "empty = all)")
    return shapes


def _union_by_word(words: list[str], masks: list[torch.Tensor]) -> tuple[list[str], list[torch.Tensor]]:
    """One mask per distinct word: the union of its objects (two stars -> one 'star' mask)."""
    out: dict[str, torch.Tensor] = {}
    for w, m in zip(words, masks):
        out[w] = out[w] | m if w in out else m.clone()
    return list(out), list(out.values())


class ShapesWorldScenes(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ShapesWorldScenes",
            display_name="ShapesWorld Scenes",
            category=CATEGORY,
            description=(
                "Draws random ShapesWorld scenes with their exact masks: images, captions, the shape words and one "
                "mask per shape word (the union of that shape's objects). A mask source for Grounding Dataset Add "
                "that needs no segmenter; restrict 'shapes' to the seen words to hold others out."),
            inputs=[
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff,
                             tooltip="Seed of the scenes (0 to 2^64-1); a new seed gives new scenes."),
                io.Int.Input("count", default=16, min=1, max=1024, tooltip="Number of scenes (1-1024)."),
                io.String.Input("shapes", default="", tooltip=(
                    "Shapes that may appear, comma separated (circle, square, triangle, star, cross, diamond); "
                    "empty = all six.")),
                io.Int.Input("max_objects", default=3, min=1, max=3, tooltip="Objects per scene: 1 to this (1-3)."),
                io.Float.Input("same_colour_share", default=0.0, min=0.0, max=1.0, step=0.05, tooltip=(
                    "Share of the scenes (0-1) drawn as 2 to max(2, max_objects) objects of ONE colour and distinct "
                    "shapes, where only the shape tells the objects apart. 0 = every scene in random colours. "
                    "Measured on ShapesWorld: a third of such scenes lifts a head's seen-word mIoU on same-"
                    "colour scenes from 0.27 to 0.79 (docs/grounding.md). Needs at least two shapes.")),
            ],
            outputs=[io.Image.Output(display_name="images", tooltip="32x32 scenes; VAE Encode them for a LATENT."),
                     io.String.Output(display_name="prompts", tooltip="The caption of each scene, one per line."),
                     io.String.Output(display_name="words", tooltip="Each scene's shape words, one line per scene."),
                     io.Mask.Output(display_name="masks", tooltip="One exact mask per shape word, scene by scene.")],
        )

    @classmethod
    def execute(cls, seed, count, shapes, max_objects, same_colour_share=0.0) -> io.NodeOutput:
        allowed = _shape_list(shapes)
        if not 0.0 <= same_colour_share <= 1.0:
            raise ValueError(f"same_colour_share is {same_colour_share}; use a share from 0 to 1 (0 = random colours)")
        if same_colour_share > 0 and len(allowed) < 2:
            raise ValueError(f"same_colour_share is {same_colour_share} but 'shapes' allows only {allowed}: a "
                             "same-colour scene needs two distinct shapes; name at least two shapes or set the share "
                             "to 0")
        world = ShapesWorld(seed=seed % (2 ** 63), max_objects=max_objects)
        gen = torch.Generator().manual_seed((seed + 1) % (2 ** 63))
        images, prompts, word_lines, masks = [], [], [], []
        for _ in range(count):
            # the share draws from the generator only when it is used, so share 0 keeps the scenes of earlier versions
            if same_colour_share > 0 and float(torch.rand((), generator=gen)) < same_colour_share:
                k = min(2 + int(torch.randint(max(max_objects, 2) - 1, (), generator=gen)), len(allowed))
                scene = world.sample(one_colour_spec(allowed, k, gen))
            else:
                n = 1 + int(torch.randint(max_objects, (), generator=gen))
                picks = [allowed[int(torch.randint(len(allowed), (), generator=gen))] for _ in range(n)]
                scene = world.sample(SceneSpec([(None, s) for s in picks]))
            words, ms = _union_by_word([o.shape for o in scene.objects], [o.mask for o in scene.objects])
            images.append(scene.image.permute(1, 2, 0))
            prompts.append(scene.caption)
            word_lines.append(", ".join(words))
            masks += ms
        return io.NodeOutput(torch.stack(images), "\n".join(prompts), "\n".join(word_lines),
                             torch.stack(masks).float())


class ShapesWorldPseudoMasks(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ShapesWorldPseudoMasks",
            display_name="ShapesWorld Pseudo Masks",
            category=CATEGORY,
            description=(
                "The pack's pseudo-labeller for generated ShapesWorld images, the analogue of the paper's detector: "
                "each prompted object's mask is the largest blob of its colour, kept only when the region classifier "
                "calls that blob the prompted shape (as the paper skips a class its detector misses). Outputs the "
                "kept shape words and their masks, for Grounding Dataset Add."),
            inputs=[
                io.Image.Input("images", tooltip="Generated (decoded) ShapesWorld images."),
                io.String.Input("prompts", multiline=True, default="", tooltip=(
                    "The prompt of each image (one line for all, or one per image), e.g. 'a red circle and a blue "
                    "star'; objects are read as colour + shape pairs.")),
            ],
            outputs=[io.String.Output(display_name="words", tooltip="Kept shape words, one line per image."),
                     io.Mask.Output(display_name="masks", tooltip="One mask per kept word, image by image."),
                     io.String.Output(display_name="report", tooltip="What was kept and skipped.")],
        )

    @classmethod
    def execute(cls, images, prompts) -> io.NodeOutput:
        lines = [ln.strip() for ln in prompts.strip().splitlines()] or [""]
        if len(lines) == 1:
            lines = lines * images.shape[0]
        if len(lines) != images.shape[0]:
            raise ValueError(f"{len(lines)} prompt lines for {images.shape[0]} images; give one line for all images "
                             "or one per image")
        clf = load_classifier()
        word_lines, masks, report = [], [], []
        for i, (img, prompt) in enumerate(zip(images, lines)):
            pairs = prompt_objects(prompt)
            if not pairs:
                raise ValueError(f"prompt {prompt!r} names no ShapesWorld object (colour + shape, e.g. 'a red star')")
            chw = img.permute(2, 0, 1).float().cpu()
            words, ms = [], []
            for colour, shape in pairs:
                blobs = colour_blobs(chw, colour)
                pred = clf.predict(chw[None], blobs[0][None])[0][0] if blobs else None
                if pred == shape:
                    words.append(shape)
                    ms.append(blobs[0])
                else:
                    report.append(f"image {i}: {colour} {shape} skipped ({'no blob' if pred is None else pred})")
            words, ms = _union_by_word(words, ms)
            word_lines.append(", ".join(words))
            masks += ms
        h, w = images.shape[1:3]
        out = torch.stack(masks).float() if masks else torch.zeros(0, h, w)
        text = f"kept {len(masks)} masks" + ("; " + "; ".join(report) if report else "")
        return io.NodeOutput("\n".join(word_lines), out, text, ui=ui.PreviewText(text))


def prompt_objects(prompt: str) -> list[tuple[str, str]]:
    """(colour, shape) pairs of a ShapesWorld prompt, in order ('a red star and a blue circle')."""
    tokens = re.findall(r"[a-z]+", prompt.lower())
    return [(a, b) for a, b in zip(tokens, tokens[1:]) if a in COLOURS and b in SHAPES]
