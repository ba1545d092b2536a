"""Grounding features: a UNet's block outputs at one evaluation, recorded through ComfyUI's block patches.

Li, Zhou, Zhang, Zhang, Wang, Xie, "Guiding Text-to-Image Diffusion Model Towards Grounded Generation"
(arXiv 2301.05221; ICCV 2023 as "Open-vocabulary Object Segmentation with Diffusion Models").
Upstream: https://github.com/Lipurple/Grounded-Diffusion at commit 5680115dcf5196d3736e2b1d157e9f5c7c6869ce,
``ldm/modules/diffusionmodules/openaimodel.py`` (``UNetModel.forward``). That repository has no licence, so
nothing here is copied; this module is written from the description in ../shared/grounding-notes.md (A2).

What upstream records, and what we record: the output of every input block, of the middle block and of every
output block at one UNet evaluation (upstream: only the last DDIM step, t = 1), filed by spatial size. Each
block's CFG rows are concatenated on channels, uncond first, then cond (upstream reshapes the UNet batch
``(2B, C, H, W) -> (B, 2C, H, W)``, which pairs the right rows only for B = 1; we pair rows through
``transformer_options["cond_or_uncond"]``, so any batch size, CFG 1 and ComfyUI's low-memory batch splitting
are handled). Within a size the blocks keep the UNet's call order (input blocks, middle, output blocks), as
upstream's lists do, so per level the channels read ``[b1 uncond, b1 cond, b2 uncond, b2 cond, ...]``.

Where each block output is seen (ComfyUI 0.8 ``UNetModel._forward``, openaimodel.py l.868-913):
    input block k        ``input_block_patch(h, transformer_options)`` with block == ("input", k)
    middle block         ``output_block_patch(h, hsp, transformer_options)`` with block == ("output", 0): h
    output block k < last ``output_block_patch`` with block == ("output", k + 1): h
    last output block    no block patch sees it; a forward pre-hook on ``diffusion_model.out`` (the final
                         GroupNorm-SiLU-conv, called right after it) records its input
                         (``FeatureRecorder.hook_final_block``). Without the hook it is simply absent.

Shape legend:
    R   rows of one UNet call = len(cond_or_uncond) * B
    B   images (latent batch)
    C   channels of one block output; C_s channels of one level (all its blocks, all kept rows)
    H W spatial size of a block output / level
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Iterable, Sequence

import torch
from torch import nn

from . import logger

COND, UNCOND = 0, 1          # ComfyUI's cond_or_uncond values (samplers.py: 0 = positive, 1 = negative)
_KIND_ORDER = {"input": 0, "middle": 1, "output": 2}


class FeatureRecordError(ValueError):
    """The recorded calls cannot make the requested features (missing rows, mixed batch sizes, no calls)."""


@dataclass
class GroundingFeatures:
    """Multi-resolution UNet features of B images at one timestep, ready for a grounding head.

    ``levels[s]``: (B, C_s, H_s, W_s), ordered coarse -> fine (increasing H_s * W_s).
    ``blocks[s]``: ids of the blocks that level holds, in channel order ("input.1", "middle.0", "output.3").
    ``block_channels[s]``: channels of each of those blocks (one row; a block takes 2x that when
    ``concat_uncond``).
    ``concat_uncond``: True: each block contributes [uncond, cond] channels (upstream); False: cond only
    (the features of a CFG-1 evaluation, which has no uncond row).
    ``family``: model family id ("sd1", "sd2", "sdxl", "shapesworld", ...); ``context_dim``: width of the
    text states the UNet attends to; ``timestep``: DDPM index of the evaluation; ``sigma``: its noise level.
    """

    levels: tuple[torch.Tensor, ...]
    family: str
    context_dim: int
    timestep: int
    concat_uncond: bool
    blocks: tuple[tuple[str, ...], ...] = ()
    block_channels: tuple[tuple[int, ...], ...] = ()
    sigma: float = float("nan")
    extra: dict = field(default_factory=dict)

    @property
    def sizes(self) -> tuple[tuple[int, int], ...]:
        return tuple((int(t.shape[-2]), int(t.shape[-1])) for t in self.levels)

    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(int(t.shape[1]) for t in self.levels)

    @property
    def batch(self) -> int:
        return int(self.levels[0].shape[0])

    def to(self, device=None, dtype=None) -> "GroundingFeatures":
        return replace(self, levels=tuple(t.to(device=device, dtype=dtype) for t in self.levels))

    def select(self, index: int | slice | Sequence[int]) -> "GroundingFeatures":
        """The features of some images (``index`` into B); always keeps the batch dimension."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return replace(self, levels=tuple(t[index] for t in self.levels))

    def describe(self) -> str:
        parts = [f"{h}x{w}: {c} ch" for (h, w), c in zip(self.sizes, self.channels)]
        rows = "uncond+cond" if self.concat_uncond else "cond only"
        return (f"{self.family} features of {self.batch} image(s) at t={self.timestep} ({rows}, context "
                f"{self.context_dim}): " + ", ".join(parts))

    @staticmethod
    def cat(items: Sequence["GroundingFeatures"]) -> "GroundingFeatures":
        """Features of several batches stacked on B; all must share the layout (sizes and channels)."""
        first = items[0]
        for f in items[1:]:
            if (f.sizes, f.channels, f.concat_uncond, f.family) != (first.sizes, first.channels,
                                                                    first.concat_uncond, first.family):
                raise FeatureRecordError(f"cannot stack features of different layouts: {first.describe()} "
                                         f"vs {f.describe()}")
        levels = tuple(torch.cat([f.levels[s] for f in items]) for s in range(len(first.levels)))
        return replace(first, levels=levels)


def block_id(kind: str, number: int) -> str:
    return f"{kind}.{number}"


def _order(bid: str) -> tuple[int, int]:
    kind, number = bid.split(".")
    return _KIND_ORDER.get(kind, 3), int(number)


class FeatureRecorder:
    """Records block outputs of UNet calls, per block and per conditioning kind, from ComfyUI's patches.

    Use (ComfyUI: ``m = model.clone(); m.set_model_input_block_patch(rec.input_block_patch)`` and
    ``m.set_model_output_block_patch(rec.output_block_patch)``, which append to any patches already there;
    outside ComfyUI: ``to = rec.attach(to)``)::

        rec = FeatureRecorder()
        with rec.hook_final_block(unet):                      # optional: the last output block
            unet(x, t, context, transformer_options=rec.attach({"cond_or_uncond": [1, 0], ...}))
        feats = rec.features(family="sd1", context_dim=768, timestep=1)

    Every call's rows are split with ``cond_or_uncond`` (chunk i of the R rows belongs to entry i), so the
    recorder is right for any batch size, for a call with only cond rows (CFG 1) and for ComfyUI's low-memory
    batch splitting (uncond and cond in separate calls). A later call overwrites an earlier one's record of
    the same block and kind (``clear()`` between evaluations of different images). When one call holds
    several chunks of one kind (several positive conditionings), the first is kept and a warning logged.
    Patches return their inputs untouched, so the model's output is unchanged.
    """

    def __init__(self):
        self._records: dict[str, dict[int, torch.Tensor]] = {}
        self._last_output: tuple[str, list[int]] | None = None
        self._warned = False
        self.calls = 0

    def __deepcopy__(self, memo):  # ModelPatcher.clone deep-copies model_options: keep one shared recorder
        return self

    def clear(self) -> None:
        self._records.clear()
        self._last_output = None
        self.calls = 0

    @property
    def recorded_blocks(self) -> tuple[str, ...]:
        return tuple(sorted(self._records, key=_order))

    # --- ComfyUI patch callables ------------------------------------------------------------------
    def input_block_patch(self, h: torch.Tensor, transformer_options: dict) -> torch.Tensor:
        kind, number = transformer_options["block"]
        if int(number) == 0:
            self.calls += 1
        self._record(block_id(kind, int(number)), h, transformer_options.get("cond_or_uncond"))
        return h

    def output_block_patch(self, h: torch.Tensor, hsp: torch.Tensor, transformer_options: dict):
        number = int(transformer_options["block"][1])
        cou = transformer_options.get("cond_or_uncond")
        self._record(block_id("middle", 0) if number == 0 else block_id("output", number - 1), h, cou)
        self._last_output = (block_id("output", number), cou)
        return h, hsp

    def final_block_hook(self, module: nn.Module, args: tuple) -> None:
        """Forward pre-hook for ``diffusion_model.out``: its input is the last output block's output."""
        if self._last_output is not None and args:
            bid, cou = self._last_output
            self._record(bid, args[0], cou)
        self._last_output = None

    def patches(self) -> dict[str, list]:
        """``transformer_options["patches"]`` entries of this recorder."""
        return {"input_block_patch": [self.input_block_patch], "output_block_patch": [self.output_block_patch]}

    def attach(self, transformer_options: dict | None = None) -> dict:
        """A copy of ``transformer_options`` whose patch lists end with this recorder's (existing patches
        run first, as ComfyUI's ``set_model_*_block_patch`` appends)."""
        to = dict(transformer_options or {})
        patches = {k: list(v) for k, v in to.get("patches", {}).items()}
        for name, fns in self.patches().items():
            patches[name] = patches.get(name, []) + fns
        to["patches"] = patches
        return to

    @contextmanager
    def hook_final_block(self, diffusion_model: nn.Module):
        """Record the last output block through a pre-hook on ``diffusion_model.out``, removed on exit."""
        out = getattr(diffusion_model, "out", None)
        if not isinstance(out, nn.Module):
            raise FeatureRecordError(f"{type(diffusion_model).__name__} has no `out` module to hook; the last "
                                     "output block cannot be recorded (record without hook_final_block)")
        handle = out.register_forward_pre_hook(self.final_block_hook)
        try:
            yield self
        finally:
            handle.remove()
            self._last_output = None

    def _record(self, bid: str, h: torch.Tensor, cond_or_uncond: Iterable[int] | None) -> None:
        cou = list(cond_or_uncond) if cond_or_uncond is not None else [COND]
        rows = int(h.shape[0])
        if rows % len(cou):
            raise FeatureRecordError(f"block {bid}: {rows} rows cannot be split into the {len(cou)} chunks of "
                                     f"cond_or_uncond={cou}; pass the transformer_options of the call")
        chunks = h.detach().chunk(len(cou))
        slot = self._records.setdefault(bid, {})
        seen = set()
        for kind, chunk in zip(cou, chunks):
            if kind in seen:
                if not self._warned:
                    logger.warning("grounding features: one UNet call holds several %s conditionings; the first "
                                "is recorded", "positive" if kind == COND else "negative")
                    self._warned = True
                continue
            seen.add(kind)
            slot[int(kind)] = chunk

    # --- assembly ---------------------------------------------------------------------------------
    def features(self, family: str, context_dim: int, timestep: int, sigma: float = float("nan"),
                 concat_uncond: bool | None = None, blocks: Sequence[str] | None = None) -> GroundingFeatures:
        """Group the recorded blocks by spatial size (coarse -> fine).

        ``concat_uncond``: None = True when every block has an uncond record, else cond only; True demands
        uncond rows (raises FeatureRecordError naming the fix when there are none); False keeps cond only.
        ``blocks``: ids to keep (default all recorded). Raises FeatureRecordError when nothing was recorded,
        when a block has no cond record, or when blocks disagree on the batch size.
        """
        ids = [b for b in self.recorded_blocks if blocks is None or b in set(blocks)]
        if not ids:
            raise FeatureRecordError("no block outputs were recorded: the UNet was not called with this "
                                     "recorder's input/output block patches (or `blocks` matched none)")
        missing_cond = [b for b in ids if COND not in self._records[b]]
        if missing_cond:
            raise FeatureRecordError(f"blocks {missing_cond} have no cond (positive) rows; evaluate the UNet "
                                     "with the prompt's conditioning")
        has_uncond = all(UNCOND in self._records[b] for b in ids)
        if concat_uncond is None:
            concat_uncond = has_uncond
        elif concat_uncond and not has_uncond:
            raise FeatureRecordError("uncond rows were not recorded (a CFG-1 call evaluates the prompt only); "
                                     "evaluate the negative prompt too, or use cond-only features "
                                     "(concat_uncond=False) with a head trained on cond-only features")
        batches = {b: int(self._records[b][COND].shape[0]) for b in ids}
        if len(set(batches.values())) > 1:
            raise FeatureRecordError(f"blocks were recorded with different batch sizes {batches}; clear() the "
                                     "recorder between evaluations")
        groups: dict[tuple[int, int], list[str]] = {}
        for b in ids:
            groups.setdefault(tuple(self._records[b][COND].shape[-2:]), []).append(b)
        order = sorted(groups, key=lambda s: (s[0] * s[1], s))
        levels, names, widths = [], [], []
        for size in order:
            parts = []
            for b in groups[size]:
                rec = self._records[b]
                parts += [rec[UNCOND], rec[COND]] if concat_uncond else [rec[COND]]
            levels.append(torch.cat(parts, dim=1))                       # (B, C_s, H, W)
            names.append(tuple(groups[size]))
            widths.append(tuple(int(self._records[b][COND].shape[1]) for b in groups[size]))
        return GroundingFeatures(tuple(levels), family, int(context_dim), int(timestep), bool(concat_uncond),
                                 tuple(names), tuple(widths), float(sigma))
