"""Grounding head: segments a prompt's words from a frozen UNet's features (Li et al. 2023).

Li, Zhou, Zhang, Zhang, Wang, Xie, "Guiding Text-to-Image Diffusion Model Towards Grounded Generation"
(arXiv 2301.05221; ICCV 2023 "Open-vocabulary Object Segmentation with Diffusion Models").
Official code: https://github.com/Lipurple/Grounded-Diffusion at commit
5680115dcf5196d3736e2b1d157e9f5c7c6869ce (ldm/models/seg_module.py, train.py, test.py). That repository has
no licence, so nothing is copied: this is our implementation from the published description
(/work/shared/grounding-notes.md, A2-A4).

Layout (upstream's, generalized from its four feature sizes to any number L >= 1):
* each feature level s (coarse -> fine) goes through a 1x1 conv without bias to ``widths[s]`` channels
  (upstream 16/32/64/128) and is bilinearly resized to the next finer level's size (the finest stays);
* coarse to fine: the running map is resized to level s's target size, concatenated with level s and
  passed through a residual block (BN-ReLU-3x3 conv-BN-ReLU-3x3 conv, spectrally normalized convs, 1x1
  shortcut when the width changes) -> a per-pixel embedding of E = sum(widths) channels at the finest size;
* non-overlapping PxP patches of it (P = 4) -> ``to_k`` -> the memory of a pre-norm transformer decoder
  (D = 512, 8 heads, FFN 2048, ReLU, dropout 0, 3 layers, no positional encoding) whose queries are the
  words' text embeddings through ``to_q``;
* an MLP (D -> D -> D -> E) turns each decoded query into a mask embedding; logits = dot product with the
  per-pixel embedding, bilinearly upsampled to the output size; mask = sigmoid > 0.5.

Two upstream batch-1 defects are not reproduced: the features' CFG rows are paired per image by the
recorder (not by a reshape), and the decoder keeps the batch axis, so no query attends to another image.
Deliberate change (equal in value): logits are computed at the embedding's size and then upsampled, where
upstream upsamples the embedding first; the dot product is linear, so the two agree (tier-1 test).
Ours, not the paper's (off by default): ``prior_channels`` extra per-query maps (e.g. the word's own
cross-attention map) whose weights the MLP also outputs.

A head's file (its ``HeadMeta``, the compatibility checks, save and load) is ``grounding_head_file.py``.

Shape legend:
    B images   N queries (words) per image   L feature levels, s one of them (coarse -> fine)
    C_s channels of level s   H_s, W_s its size   H, W the finest size   E = sum(widths)
    D decoder width   P patch side   T text context width   K prior maps per query
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_TEMPLATE = "a photograph of a {word}"
QUERY_MODES = ("template", "prompt")


class GroundingLayoutError(ValueError):
    """A head met features (or queries) of another model family, context width or feature layout."""


# ---------------------------------------------------------------------------------------------- config

@dataclass
class HeadConfig:
    channels: tuple[int, ...]            # C_s per level, coarse -> fine
    context_dim: int                     # T
    widths: tuple[int, ...] = ()         # 1x1 conv widths; () = upstream's 16 * 2**s
    dim: int = 512                       # D
    heads: int = 8
    layers: int = 3
    ffn: int = 2048
    patch: int = 4                       # P
    spectral_norm: bool = True
    prior_channels: int = 0              # K (ours; 0 = the paper's head)

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        self.widths = tuple(int(w) for w in self.widths) or tuple(16 * 2 ** s for s in range(len(self.channels)))
        if not self.channels:
            raise ValueError("a grounding head needs at least one feature level; got channels ()")
        if len(self.widths) != len(self.channels):
            raise ValueError(f"widths {self.widths} must give one width per feature level ({len(self.channels)} "
                             f"levels with channels {self.channels}); pass {len(self.channels)} widths or ()")
        if self.dim % self.heads:
            raise ValueError(f"decoder width {self.dim} is not divisible by {self.heads} heads; pick a multiple")

    @property
    def embed_dim(self) -> int:
        return sum(self.widths)

    @classmethod
    def for_features(cls, features, **overrides) -> "HeadConfig":
        """A config whose levels match a features container (``levels``, ``context_dim``)."""
        return cls(tuple(int(x.shape[1]) for x in features.levels), int(features.context_dim), **overrides)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "HeadConfig":
        return cls(**json.loads(text))


# ---------------------------------------------------------------------------------------------- modules

class ResidualBlock(nn.Module):
    """BigGAN-style block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus a (1x1 conv) shortcut.
    (B, c_in, h, w) -> (B, c_out, h, w)"""

    def __init__(self, c_in: int, c_out: int, spectral: bool):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm if spectral else (lambda m: m)
        self.bn1, self.bn2 = nn.BatchNorm2d(c_in), nn.BatchNorm2d(c_out)
        self.conv1 = sn(nn.Conv2d(c_in, c_out, 3, padding=1))
        self.conv2 = sn(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.shortcut = sn(nn.Conv2d(c_in, c_out, 1)) if c_in != c_out else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.relu(self.bn1(x)))
        h = self.conv2(F.relu(self.bn2(h)))
        return self.shortcut(x) + h


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (..., h, w) maps (identity when already that size)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    lead = x.shape[:-2]
    y = F.interpolate(x.reshape(-1, *x.shape[-3:]) if x.dim() >= 4 else x[None],
                      size=tuple(size), mode="bilinear", align_corners=False)
    return y.reshape(*lead, *size)


class GroundingHead(nn.Module):
    def __init__(self, config: HeadConfig):
        super().__init__()
        c = self.config = config
        widths = c.widths
        self.project = nn.ModuleList(nn.Conv2d(ch, w, 1, bias=False) for ch, w in zip(c.channels, widths))
        run = [sum(widths[:s + 1]) for s in range(len(widths))]
        self.fuse = nn.ModuleList(ResidualBlock(run[s], run[s], c.spectral_norm) for s in range(1, len(widths)))
        if len(widths) == 1:
            self.fuse.append(ResidualBlock(widths[0], widths[0], c.spectral_norm))
        e = c.embed_dim
        self.to_k = nn.Linear(e * c.patch * c.patch, c.dim, bias=False)
        self.to_q = nn.Linear(c.context_dim, c.dim, bias=False)
        layer = nn.TransformerDecoderLayer(c.dim, c.heads, c.ffn, dropout=0.0, activation="relu",
                                           batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, c.layers, norm=nn.LayerNorm(c.dim))
        self.mlp = nn.Sequential(nn.Linear(c.dim, c.dim), nn.ReLU(), nn.Linear(c.dim, c.dim), nn.ReLU(),
                                 nn.Linear(c.dim, e + c.prior_channels))

    # -------------------------------------------------------------------------------- pieces
    def check_levels(self, levels: Sequence[torch.Tensor]) -> None:
        got = tuple(int(x.shape[1]) for x in levels)
        if got != self.config.channels:
            raise GroundingLayoutError(
                f"the grounding head expects {len(self.config.channels)} feature levels with channels "
                f"{self.config.channels} (coarse -> fine); the features have {len(got)} levels with channels {got}. "
                f"Use a head trained on the model and feature settings that produced these features")

    def pixel_embedding(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        """Levels [(B, C_s, H_s, W_s)] coarse -> fine -> (B, E, H, W) at the finest level's size."""
        self.check_levels(levels)
        sizes = [tuple(x.shape[-2:]) for x in levels]
        target = [sizes[min(s + 1, len(sizes) - 1)] for s in range(len(sizes))]
        proj = [resize(p(x), t) for p, x, t in zip(self.project, levels, target)]
        x = proj[0]
        if len(proj) == 1:
            return self.fuse[0](x)
        for s in range(1, len(proj)):
            x = self.fuse[s - 1](torch.cat([resize(x, target[s]), proj[s]], dim=1))
        return x

    def tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, E, H, W) -> (B, M, D) patch tokens, M = ceil(H/P) * ceil(W/P) (zero padding at the far edges)."""
        p = self.config.patch
        h, w = pixels.shape[-2:]
        pixels = F.pad(pixels, (0, -w % p, 0, -h % p))
        patches = F.unfold(pixels, p, stride=p)                      # (B, E*P*P, M)
        return self.to_k(patches.transpose(1, 2))

    def mask_embeddings(self, memory: torch.Tensor, queries: torch.Tensor,
                        query_mask: torch.Tensor | None) -> torch.Tensor:
        """memory (B, M, D), queries (B, N, T), query_mask (B, N) True = real -> (B, N, E + K)."""
        pad = None
        if query_mask is not None:
            pad = ~query_mask.bool()
            pad[pad.all(1)] = False          # a row with no word: its outputs are ignored, avoid NaN
        q = self.to_q(queries)
        return self.mlp(self.decoder(q, memory, tgt_key_padding_mask=pad))

    # -------------------------------------------------------------------------------- forward
    def forward(self, levels: Sequence[torch.Tensor], queries: torch.Tensor, query_mask: torch.Tensor | None = None,
                out_size: tuple[int, int] | None = None, prior: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, N, H_out, W_out) of each query word at every pixel.

        levels: [(B, C_s, H_s, W_s)] coarse -> fine; queries: (B, N, T) text embeddings; query_mask: (B, N)
        bool, False for padding queries (their logits are meaningless); out_size: output size, default the
        finest level's; prior: (B, N, K, h, w) extra maps per query when the head has ``prior_channels`` K.
        """
        if queries.dim() != 3 or queries.shape[-1] != self.config.context_dim:
            raise GroundingLayoutError(
                f"queries must be (batch, words, {self.config.context_dim}) text embeddings of the model the head "
                f"was trained with; got shape {tuple(queries.shape)}")
        if queries.shape[0] != levels[0].shape[0]:
            raise ValueError(f"{queries.shape[0]} query rows for {levels[0].shape[0]} feature images; give one row "
                             f"of queries per image")
        pixels = self.pixel_embedding(levels)                        # (B, E, H, W)
        emb = self.mask_embeddings(self.tokens(pixels), queries, query_mask)
        e = self.config.embed_dim
        logits = torch.einsum("bnd,bdhw->bnhw", emb[..., :e], pixels)
        k = self.config.prior_channels
        if k:
            if prior is None or prior.shape[:3] != (*queries.shape[:2], k):
                raise ValueError(f"this head takes {k} prior map(s) per query, shape (B, N, {k}, h, w); got "
                                 f"{None if prior is None else tuple(prior.shape)}")
            prior = resize(prior.to(pixels.dtype), tuple(pixels.shape[-2:]))
            logits = logits + torch.einsum("bnk,bnkhw->bnhw", emb[..., e:], prior)
        return resize(logits, out_size or tuple(pixels.shape[-2:]))

    @torch.no_grad()
    def segment(self, levels, queries, query_mask=None, out_size=None, prior=None,
                threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities, masks) (B, N, H, W): sigmoid of the logits and probability > threshold (eval mode)."""
        was = self.training
        self.eval()
        try:
            probs = torch.sigmoid(self(levels, queries, query_mask, out_size, prior))
        finally:
            self.train(was)
        return probs, probs > threshold


def build_head(config: HeadConfig, seed: int = 0) -> GroundingHead:
    """A freshly initialized head; the initialization draws from ``seed`` (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GroundingHead(config)


# ---------------------------------------------------------------------------------------------- text side

def template_text(word: str, template: str = DEFAULT_TEMPLATE) -> str:
    """The template prompt of a word: upstream encodes "a photograph of a {word}" for each class."""
    if "{word}" not in template:
        raise ValueError(f"template {template!r} has no '{{word}}' placeholder; e.g. {DEFAULT_TEMPLATE!r}")
    return template.replace("{word}", word)


def word_query(states: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
    """A word's query embedding: the mean of its token states. states (L, T) or (B, L, T) -> (T,) or (B, T).

    Upstream takes the class tokens of its template (positions 5.. after BOS + "a photograph of a") and
    averages them when the name has several tokens; in "prompt" mode the positions are the word's own
    tokens in the generation prompt."""
    if not positions:
        raise ValueError("the word has no token positions (the tokenizer dropped it); give a word the text "
                         "encoder knows")
    idx = torch.as_tensor(list(positions), device=states.device)
    return states.index_select(-2, idx).mean(-2)


def stack_queries(per_image: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(N_b, T)] -> queries (B, N, T) zero-padded to the longest, and the (B, N) mask of real queries."""
    n = max(1, max(int(q.shape[0]) for q in per_image))
    t = per_image[0].shape[-1]
    out = per_image[0].new_zeros(len(per_image), n, t)
    mask = torch.zeros(len(per_image), n, dtype=torch.bool, device=out.device)
    for b, q in enumerate(per_image):
        out[b, :q.shape[0]] = q
        mask[b, :q.shape[0]] = True
    return out, mask


# ---------------------------------------------------------------------------------------------- loss

def grounding_loss(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Upstream's objective: BCE-with-logits averaged over pixels per (image, word), summed over the words
    and divided by the batch size. logits, targets (B, N, H, W); valid (B, N) bool (padding and words whose
    mask was skipped contribute nothing)."""
    per = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none").mean((-2, -1))
    if valid is not None:
        per = torch.where(valid.bool(), per, per.new_zeros(()))
    return per.sum() / logits.shape[0]


# ---------------------------------------------------------------------------------------------- training

@dataclass
class TrainBatch:
    levels: list[torch.Tensor]            # [(B, C_s, H_s, W_s)] coarse -> fine
    queries: torch.Tensor                 # (B, N, T)
    targets: torch.Tensor                 # (B, N, H_out, W_out) in {0, 1}
    valid: torch.Tensor                   # (B, N) bool: real word with a usable mask
    prior: torch.Tensor | None = None     # (B, N, K, h, w) when the head has prior_channels


@dataclass
class TrainResult:
    head: GroundingHead                   # the trained copy (eval mode)
    losses: list[float]                   # one per step
    steps: int
    seconds: float


def train_head(head: GroundingHead, batches: Callable[[int], TrainBatch], steps: int, lr: float = 1e-4,
               progress: Callable[[int, int, float], None] | None = None, weight_decay: float = 0.0,
               device: str | torch.device | None = None) -> TrainResult:
    """Adam on ``grounding_loss`` for ``steps`` steps; ``batches(i)`` gives step i's batch (features computed
    by the caller, frozen, no gradient into the UNet). Trains a copy: ``head`` itself is never modified, so an
    exception (e.g. an interruption raised by ``progress(step, steps, loss)``) leaves it and any file intact.
    Upstream: Adam, lr 1e-5, no weight decay, batch 1, ~100k online iterations; smaller datasets want larger lr.
    Runs with gradients enabled even inside ``torch.inference_mode()`` (ComfyUI's executor)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not lr > 0:
        raise ValueError(f"learning rate must be positive, got {lr}")
    t0 = time.perf_counter()
    with torch.inference_mode(False), torch.enable_grad():
        work = GroundingHead(head.config)
        work.load_state_dict({k: v.detach().clone() for k, v in head.state_dict().items()})
        dev = device or next(head.parameters()).device
        work.to(dev).train()
        opt = torch.optim.Adam(work.parameters(), lr=lr, weight_decay=weight_decay)
        losses: list[float] = []
        for i in range(steps):
            b = batches(i)
            levels = [x.detach().clone().to(dev, torch.float32) for x in b.levels]
            prior = None if b.prior is None else b.prior.detach().clone().to(dev, torch.float32)
            targets = b.targets.detach().clone().to(dev)
            logits = work(levels, b.queries.detach().clone().to(dev, torch.float32), b.valid.to(dev),
                          tuple(targets.shape[-2:]), prior)
            loss = grounding_loss(logits, targets, b.valid.to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(i + 1, steps, losses[-1])
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"grounding loss became {losses[-1]} at step {i + 1}; lower the learning "
                                         f"rate (now {lr})")
    work.eval()
    return TrainResult(work, losses, steps, time.perf_counter() - t0)


def copy_head(head: GroundingHead) -> GroundingHead:
    """A deep copy (e.g. to keep a snapshot while another copy trains)."""
    return copy.deepcopy(head)
