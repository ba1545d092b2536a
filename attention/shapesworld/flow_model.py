"""ShapesWorld-Flow outside ComfyUI: weights file, text conditioning, rectified-flow sampling (pure torch).

``ShapesWorldFlowModel`` bundles the Flux twin (:mod:`attention.shapesworld.flow`), the ShapesWorld text encoder
(per-token context + pooled EOS vector, as ComfyUI's CLIP interface returns them) and the sampler ComfyUI runs for
it: ModelSamplingDiscreteFlow with the file's ``shift`` and multiplier 1 (FluxSchnell's settings: the timestep the
transformer sees is sigma in [0, 1]), CONST parameterization (x0 = x - sigma * v), the 'simple' scheduler over the
1000-entry sigma table, k-diffusion's Euler step and CFG on x0 with [uncond, cond] in one batch.

Duck-types :class:`attention.shapesworld.model.ShapesWorldModel` where the generation figures need it
(``generate``, ``encode``, ``object_positions``, ``noise``, ``size``, ``device``).

Shapes: x (B, 3, S, S) in k-diffusion space (= the flow state, noise at sigma 1); context (B, T, W); pooled (B, W).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .flow import FlowConfig, FluxTwin
from .model import ShapesWorldModel, read_weights
from .text import EOS, ShapesTokenizer, TextEncoder
from .weights import SHIPPED_FLOW, SHIPPED_WEIGHTS

DEFAULT_FLOW_WEIGHTS = SHIPPED_FLOW
TEXT_WEIGHTS = SHIPPED_WEIGHTS      # the text encoder the flow model was trained on (frozen)
FLOW_PREFIX, TEXT_PREFIX = "flow.", "text."


class FlowWeightsError(RuntimeError):
    pass


def time_snr_shift(shift: float, t: torch.Tensor) -> torch.Tensor:
    """ComfyUI's flow time shift: shift * t / (1 + (shift - 1) t) (identity at shift 1)."""
    return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)


def flow_sigmas(steps: int, shift: float = 1.0, table_size: int = 1000) -> torch.Tensor:
    """The 'simple' scheduler on ModelSamplingDiscreteFlow's table (multiplier 1): ``steps`` sigmas from 1.0 down,
    evenly strided over the table, then 0. (steps + 1,)"""
    table = time_snr_shift(shift, torch.arange(1, table_size + 1, dtype=torch.float32) / table_size)
    stride = table_size / steps
    return torch.tensor([float(table[-(1 + int(i * stride))]) for i in range(steps)] + [0.0])


@torch.no_grad()
def sample_euler_flow(denoiser, x: torch.Tensor, sigmas: torch.Tensor, on_step=None) -> torch.Tensor:
    """k-diffusion's Euler (ComfyUI 'euler', no churn): d = (x - x0) / sigma, x += d (sigma_next - sigma);
    for CONST d is the velocity. ``on_step(i, x, x0)`` sees each step."""
    for i in range(len(sigmas) - 1):
        s = sigmas[i]
        x0 = denoiser(x, s.expand(x.shape[0]))
        if on_step is not None:
            on_step(i, x, x0)
        x = x + (x - x0) / s * (sigmas[i + 1] - s)
    return x


def read_flow_weights(path: Path | str = DEFAULT_FLOW_WEIGHTS) -> tuple[dict, dict, dict]:
    """(state dict, config, training metadata) of a ShapesWorld-Flow file, or FlowWeightsError saying why."""
    path = Path(path)
    fix = ("give a file written by `python -m attention.shapesworld.flow_train`, or the shipped "
           f"{DEFAULT_FLOW_WEIGHTS.name} (`git checkout -- assets/{DEFAULT_FLOW_WEIGHTS.name}` restores it)")
    if not path.is_file():
        raise FlowWeightsError(f"ShapesWorld-Flow weights file {path} is missing: {fix}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
        config = json.loads(meta["config"])
        training = json.loads(meta.get("training", "{}"))
        config["flux"]
    except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt or foreign file
        raise FlowWeightsError(f"{path} is not a ShapesWorld-Flow weights file ({type(e).__name__}: {e}): {fix}") from e
    return sd, config, training


def split_state(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v.float() for k, v in sd.items() if k.startswith(prefix)}


def pooled_from_context(context: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """CLIP-style pooled vector: the context at each row's first end token. (B, T, W), (B, T) -> (B, W)"""
    eos = (ids == EOS).int().argmax(1)
    return context[torch.arange(len(ids), device=context.device), eos]


def save_flow_weights(path: Path | str, model: FluxTwin, text: TextEncoder, config: dict, meta: dict) -> None:
    """Write a ShapesWorld-Flow file: transformer under ``flow.``, text encoder under ``text.``, fp16, with the
    config (FluxParams under "flux", text encoder size, image size, sampling settings) and training metadata."""
    tensors = {FLOW_PREFIX + k: v.detach().half().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({TEXT_PREFIX + k: v.detach().half().cpu().contiguous() for k, v in text.state_dict().items()})
    save_file(tensors, str(path), metadata={"config": json.dumps(config), "training": json.dumps(meta)})
    os.chmod(path, 0o644)   # safetensors writes through an owner-only temp file


def load_text_encoder(path: Path | str = TEXT_WEIGHTS) -> TextEncoder:
    """The (frozen, eval) text encoder of a ShapesWorld weights file."""
    sd, cfg, _ = read_weights(path)
    text = TextEncoder(width=cfg["text_width"], layers=cfg["text_layers"])
    text.load_state_dict(split_state(sd, TEXT_PREFIX))
    return text.eval().requires_grad_(False)


class ShapesWorldFlowModel:
    def __init__(self, path: Path | str = DEFAULT_FLOW_WEIGHTS, device: str = "cpu"):
        sd, self.config, self.training = read_flow_weights(path)
        self.flow_config = FlowConfig.from_dict(self.config["flux"])
        self.transformer = FluxTwin(self.flow_config)
        self.text = TextEncoder(width=self.config["text_width"], layers=self.config["text_layers"])
        try:
            self.transformer.load_state_dict(split_state(sd, FLOW_PREFIX))
            self.text.load_state_dict(split_state(sd, TEXT_PREFIX))
        except RuntimeError as e:
            raise FlowWeightsError(f"{path} does not match the ShapesWorld-Flow model "
                                   f"({str(e).splitlines()[0]})") from e
        self.transformer.eval().to(device), self.text.eval().to(device)
        self.device = device
        self.tokenizer = ShapesTokenizer()
        self.size = int(self.config["image_size"])
        self.shift = float(self.config["sampling"]["shift"])

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(context (B, T, W), pooled (B, W)) of each prompt's first chunk (weights ignored)."""
        ids = self.tokenizer.encode_batch(prompts).to(self.device)
        context = self.text(ids)
        return context, pooled_from_context(context, ids)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: tuple[torch.Tensor, torch.Tensor],
                 transformer_options: dict | None = None) -> torch.Tensor:
        """The transformer's velocity at state x and ``sigma`` (B,) (the timestep is sigma: multiplier 1)."""
        context, pooled = cond
        return self.transformer(x, sigma, context, y=pooled, transformer_options=transformer_options)

    def denoiser(self, cond, uncond=None, cfg: float = 1.0, extra: dict | None = None,
                 sample_sigmas: torch.Tensor | None = None):
        """``denoiser(x, sigma) -> x0`` with CFG, batching [uncond, cond] as ComfyUI does; ``extra``: more
        transformer_options (e.g. an optimized_attention_override), copied per call."""
        def fn(x, sigma):
            items = x.shape[0]
            use_uncond = uncond is not None and cfg != 1.0
            cou = [1, 0] if use_uncond else [0]
            ctx = tuple(torch.cat([u, c]) for u, c in zip(uncond, cond)) if use_uncond else cond
            xb, sb = torch.cat([x] * len(cou)), torch.cat([sigma] * len(cou))
            to = dict(extra or {})
            to.update(cond_or_uncond=cou, sigmas=sigma[:1], sample_sigmas=sample_sigmas)
            x0 = xb - self.velocity(xb, sb, ctx, to) * sb.view(-1, 1, 1, 1)
            if not use_uncond:
                return x0
            u, c = x0[:items], x0[items:]
            return u + (c - u) * cfg
        return fn

    def noise(self, n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(n, 3, self.size, self.size, generator=g).to(self.device)

    def sigmas(self, steps: int) -> torch.Tensor:
        return flow_sigmas(steps, self.shift).to(self.device)

    def generate(self, prompts: list[str], seed: int = 0, steps: int = 20, cfg: float = 5.0, negative: str = "",
                 noise: torch.Tensor | None = None, sigmas: torch.Tensor | None = None,
                 extra: dict | None = None) -> torch.Tensor:
        """Images (B, 3, S, S) in [0, 1]: Euler from pure noise (sigma 1) over ``steps`` 'simple' sigmas."""
        sigmas = self.sigmas(steps) if sigmas is None else sigmas.to(self.device)
        cond, uncond = self.encode(prompts), self.encode([negative] * len(prompts))
        x = (noise if noise is not None else self.noise(len(prompts), seed)).to(self.device) * sigmas[0]
        out = sample_euler_flow(self.denoiser(cond, uncond, cfg, extra, sigmas), x, sigmas)
        return ((out + 1) / 2).clamp(0, 1)

    # the word rule on the shared tokenizer, exactly as the UNet model applies it
    prompt_words = ShapesWorldModel.prompt_words
    word_positions = ShapesWorldModel.word_positions
    object_positions = ShapesWorldModel.object_positions
