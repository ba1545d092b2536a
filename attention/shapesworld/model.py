"""The ShapesWorld model: building it, loading the committed weights, running it outside ComfyUI.

``ShapesWorldModel`` bundles the UNet, the text encoder and the tokenizer, and calls the
UNet with ComfyUI's transformer_options contract (``cond_or_uncond``, ``sigmas``,
``sample_sigmas``, the attention hook of ``attention/hook.py``), so controllers behave exactly as in ComfyUI.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ..hook import hook_options, merge_options
from ..sampling import cfg_combine, sample_euler
from ..schedule import sigma_to_t, simple_sigmas, train_sigmas
from ..words import PromptWords
from .text import ShapesTokenizer, TextEncoder
from .unet import ShapesUNet
from .weights import SHIPPED_WEIGHTS, WeightsError, unet_config_problem, weights_fix

DEFAULT_WEIGHTS = SHIPPED_WEIGHTS
# the architecture a training run builds and records in its weights file ("config"); a file's own config wins
MODEL_CONFIG = {"channels": [32, 64, 128], "context_dim": 128, "heads": 4, "text_width": 128,
                "text_layers": 3, "image_size": 32}


def build_models(cfg: dict = MODEL_CONFIG) -> tuple[ShapesUNet, TextEncoder]:
    """The UNet and the text encoder of a config (untrained)."""
    unet = ShapesUNet(channels=tuple(cfg["channels"]), context_dim=cfg["context_dim"], heads=cfg["heads"])
    text = TextEncoder(width=cfg["text_width"], layers=cfg["text_layers"])
    return unet, text


def read_weights(path: Path | str = DEFAULT_WEIGHTS) -> tuple[dict, dict, dict]:
    """(state dict, config, training metadata) of a ShapesWorld weights file, or a clear error."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"ShapesWorld weights file {path} is missing: " + weights_fix(path))
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
        config = json.loads(meta["config"])
        training = json.loads(meta.get("training", "{}"))
    except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt file
        raise WeightsError(f"ShapesWorld weights file {path} is corrupt or not a ShapesWorld file ({e}): "
                           + weights_fix(path)) from e
    problem = unet_config_problem(path, config, weights_fix(path))
    if problem:
        raise WeightsError(problem)
    return sd, config, training


class ShapesWorldModel:
    def __init__(self, path: Path | str = DEFAULT_WEIGHTS, device: str = "cpu"):
        sd, self.config, self.training = read_weights(path)
        self.unet, self.text = build_models(self.config)
        try:
            self.unet.load_state_dict({k[5:]: v.float() for k, v in sd.items() if k.startswith("unet.")})
            self.text.load_state_dict({k[5:]: v.float() for k, v in sd.items() if k.startswith("text.")})
        except RuntimeError as e:
            raise WeightsError(f"ShapesWorld weights file {path} does not match the model "
                               f"({str(e).splitlines()[0]}): " + weights_fix(path)) from e
        self.unet.eval().to(device), self.text.eval().to(device)
        self.device = device
        self.tokenizer = ShapesTokenizer()
        self.sigmas = train_sigmas()
        self.size = int(self.config["image_size"])

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """(B, CONTEXT, width) conditioning for each prompt (first chunk, weights ignored)."""
        return self.text(self.tokenizer.encode_batch(prompts).to(self.device))

    def eps(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
            transformer_options: dict | None = None) -> torch.Tensor:
        """Epsilon for the k-diffusion state x at ``sigma`` (one per row)."""
        xin = x / (sigma.view(-1, 1, 1, 1) ** 2 + 1).sqrt()
        t = sigma_to_t(sigma, self.sigmas)
        return self.unet(xin, t, context, transformer_options=transformer_options)

    def denoiser(self, cond: torch.Tensor, uncond: torch.Tensor | None, cfg: float,
                 patches: dict | None = None, sample_sigmas: torch.Tensor | None = None,
                 extra: dict | None = None):
        """A ``denoiser(x, sigma) -> x0`` with CFG, batching [uncond, cond] as ComfyUI does."""
        def fn(x, sigma):
            items = x.shape[0]
            use_uncond = uncond is not None and cfg != 1.0
            cou = [1, 0] if use_uncond else [0]
            ctx = torch.cat([uncond, cond]) if use_uncond else cond
            xb = torch.cat([x] * len(cou))
            sb = torch.cat([sigma] * len(cou))
            to = merge_options(extra or {}, patches or {})
            to.update(cond_or_uncond=cou, sigmas=sigma[:1], sample_sigmas=sample_sigmas)
            eps = self.eps(xb, sb, ctx, to)
            x0 = xb - eps * sb.view(-1, 1, 1, 1)
            if not use_uncond:
                return x0
            u, c = x0[:items], x0[items:]
            return cfg_combine(c, u, cfg)
        return fn

    def word_positions(self, prompt: str, word: str, occurrence: int | None = None) -> tuple[int, ...]:
        """Key positions of ``word`` in ``prompt`` (all occurrences, or the ``occurrence``-th)."""
        return self.prompt_words(prompt).positions(word, occurrence=occurrence)

    def prompt_words(self, prompt: str) -> PromptWords:
        """The pack's word rule (``attention/words.py``) on this tokenizer."""
        chunks = [[t for t, _ in c] for c in self.tokenizer.chunks(prompt)]
        return PromptWords(prompt, chunks, self.tokenizer.word_ids)

    def object_positions(self, scene) -> list[tuple[int, ...]]:
        """Positions of each object's shape word in its scene's caption (repeated shapes in order)."""
        seen: dict[str, int] = {}
        out = []
        for ob in scene.objects:
            out.append(self.word_positions(scene.caption, ob.shape, occurrence=seen.get(ob.shape, 0)))
            seen[ob.shape] = seen.get(ob.shape, 0) + 1
        return out

    def noise(self, n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(n, 3, self.size, self.size, generator=g).to(self.device)

    def generate(self, prompts: list[str], seed: int = 0, steps: int = 20, cfg: float = 5.0,
                 patches: dict | None = None, negative: str = "", noise: torch.Tensor | None = None,
                 sigmas: torch.Tensor | None = None, extra: dict | None = None) -> torch.Tensor:
        """Images (B, 3, S, S) in [0, 1] for ``prompts`` with the Euler/DDIM loop (``extra``: more
        transformer_options, e.g. ``{"patches": {"attn2_patch": [...]}}``)."""
        sigmas = simple_sigmas(steps) if sigmas is None else sigmas
        cond = self.encode(prompts)
        uncond = self.encode([negative] * len(prompts))
        x = (noise if noise is not None else self.noise(len(prompts), seed)) * sigmas[0]
        den = self.denoiser(cond, uncond, cfg, patches, sigmas, extra)
        out = sample_euler(den, x, sigmas.to(self.device))
        return ((out + 1) / 2).clamp(0, 1)


def layer_patches(self_controllers=(), cross_controllers=()) -> dict:
    """transformer_options entries putting the controllers on every self / cross attention layer through the
    pack's attention hook (the override ComfyUI's attention calls; merge with ``hook.merge_options``)."""
    return hook_options(self_controllers, cross_controllers, ShapesUNet.attention_layer_ids())


def patches_for(controller, cross_layers=True, self_layers=True) -> dict:
    """transformer_options entries installing one ``controller`` on every attention layer."""
    return layer_patches([controller] if self_layers else [], [controller] if cross_layers else [])
