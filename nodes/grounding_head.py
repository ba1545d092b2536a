"""Grounding head nodes (Li et al. 2023): train a head on a grounding dataset; load a saved or the embedded one.

Glue only: the head, queries, loss and training loop are ``attention/grounding.py``, head files
``attention/grounding_head_file.py``. Heads live in ``models/attention_lab_grounding/``; the embedded ShapesWorld
head is ``assets/shapesworld_grounding.safetensors``.
"""

from __future__ import annotations

import os
from pathlib import Path

import comfy.model_management as mm
import comfy.utils
import folder_paths
import torch
import torch.nn.functional as F
from comfy_api.latest import io, ui

from ..attention import logger
from ..attention.grounding import (
    DEFAULT_TEMPLATE,
    HeadConfig,
    TrainBatch,
    build_head,
    stack_queries,
    template_text,
    train_head,
)
from ..attention.grounding_dataset import Example, check_name
from ..attention.grounding_features import GroundingFeatures
from ..attention.grounding_head_file import HeadMeta, load_head, save_head
from .common import CATEGORY, encode_prompt
from .grounding_dataset import GroundingDatasetType
from .grounding_features import ROWS, compute_features
from .grounding_words import QueryEncoder

GroundingHeadType = io.Custom("GROUNDING_HEAD")

HEAD_FOLDER = "attention_lab_grounding"
EMBEDDED_HEAD = "shapesworld (embedded)"
EMBEDDED_HEAD_PATH = Path(__file__).resolve().parents[1] / "assets" / "shapesworld_grounding.safetensors"
HEAD_SIZES = ("upstream", "small")
_SMALL = dict(dim=64, heads=4, layers=2, ffn=256)   # the notes' CPU pilot (B10): widths 8/16/32.., d 64

folder_paths.add_model_folder_path(HEAD_FOLDER, os.path.join(folder_paths.models_dir, HEAD_FOLDER), is_default=True)
folder_paths.folder_names_and_paths[HEAD_FOLDER] = (folder_paths.folder_names_and_paths[HEAD_FOLDER][0],
                                                    {".safetensors"})


class LoadedHead:
    """What a GROUNDING_HEAD socket carries: the module, its metadata and where it came from."""

    def __init__(self, head, meta: HeadMeta, source: str):
        self.head, self.meta, self.source = head, meta, source

    def __repr__(self):
        return f"LoadedHead({self.source}: {self.meta.describe()})"


# --------------------------------------------------------------------------------------------- training

def _stack_conditioning(conds: list) -> list:
    """One CONDITIONING whose tensor has one row per image (all prompts must share the token length)."""
    first = conds[0][0]
    extra = dict(first[1])
    if "pooled_output" in extra:
        extra["pooled_output"] = torch.cat([c[0][1]["pooled_output"] for c in conds])
    return [[torch.cat([c[0][0] for c in conds]), extra]]


def _batches_of(examples: list[Example], batch: int, gen: torch.Generator):
    """Endless batches of example indices: epochs in random order, each batch of one latent shape."""
    queue: list[int] = []
    while True:
        if not queue:
            queue = torch.randperm(len(examples), generator=gen).tolist()
        first = queue.pop(0)
        shape = examples[first].latent.shape
        same = [i for i in queue if examples[i].latent.shape == shape][:batch - 1]
        for i in same:
            queue.remove(i)
        yield [first] + same


class GroundingHeadTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GroundingHeadTrain",
            display_name="Grounding Head Train",
            category=CATEGORY,
            description=(
                "Trains a grounding head (Li et al. 2023) on a grounding dataset: per step, a batch of stored latents "
                "is noised to the timestep, the frozen MODEL gives its features, and the head learns to predict each "
                "word's mask from them and the word's text embedding (Adam, BCE-with-logits). Saves the head to "
                "models/attention_lab_grounding/<save_name>.safetensors when done (an interrupted run writes "
                "nothing and leaves an earlier file intact). Every step runs the UNet once per image: minutes on a "
                "GPU; on a CPU practical only for small models such as ShapesWorld."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model whose features the head reads (frozen)."),
                io.Clip.Input("clip", tooltip="The CLIP of that model; encodes prompts and word queries (frozen)."),
                GroundingDatasetType.Input("dataset", tooltip="From Grounding Dataset Add or Grounding Dataset Load."),
                io.Int.Input("steps", default=500, min=1, max=1000000,
                             tooltip="Optimizer steps (1-1,000,000); the paper trains up to 500k steps of batch 1."),
                io.Int.Input("batch", default=4, min=1, max=256,
                             tooltip="Images per step (1-256); the paper uses 1. Each image costs one UNet call."),
                io.Float.Input("lr", default=1e-4, min=1e-7, max=1e-1, step=1e-6, tooltip=(
                    "Adam learning rate (1e-7 to 0.1). The paper's 1e-5 suits ~100k online steps; small datasets "
                    "and few steps need about 1e-4 to 3e-4.")),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=False,
                             tooltip="Seed of the head's initialization, the batch order and the noise (0 to 2^64-1)."),
                io.Int.Input("timestep", default=1, min=0, max=999,
                             tooltip=("DDPM timestep 0-999 of the features; 1 = the paper's. Use the same when "
                                      "segmenting.")),
                io.Combo.Input("query", options=["template", "prompt"], default="template", tooltip=(
                    "Text side of a word: 'template' = its states in the template prompt (paper), 'prompt' = its "
                    "states in the image's own prompt (ours; transfers better on ShapesWorld).")),
                io.String.Input("template", default=DEFAULT_TEMPLATE, tooltip=(
                    "Template prompt for 'template' queries; must contain {word}. The paper's: "
                    "'a photograph of a {word}'.")),
                io.Combo.Input("rows", options=list(ROWS), default=ROWS[0],
                               tooltip=("Feature rows, as in Grounding Features: 'uncond + cond' (paper) or "
                                        "'cond only'.")),
                io.Combo.Input("head_size", options=list(HEAD_SIZES), default="upstream", tooltip=(
                    "'upstream': the paper's head (decoder width 512, 8 heads, 3 layers, 1x1 widths 16/32/64/128); "
                    "'small': width 64, 4 heads, 2 layers, widths 8/16/32 (CPU-friendly).")),
                io.String.Input("save_name", default="grounding_head", tooltip=(
                    "File name under models/attention_lab_grounding/ (.safetensors added); empty = do not save.")),
                io.Conditioning.Input("negative", optional=True, tooltip=(
                    "Unconditional prompt for the uncond rows; default the empty prompt encoded with 'clip' (paper).")),
            ],
            outputs=[GroundingHeadType.Output(display_name="head"),
                     io.String.Output(display_name="path", tooltip="Where the head was saved ('' when not saved).")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, dataset, steps, batch, lr, seed, timestep, query, template, rows, head_size,
                save_name, negative=None) -> io.NodeOutput:
        save_name = save_name.strip()
        if save_name:
            check_name(save_name)
        template_text("x", template)                      # a template without {word}: error before any work
        examples = dataset.load()
        want = model.model.latent_format.latent_channels
        other = sorted({int(ex.latent.shape[0]) for ex in examples} - {want})
        if other:
            raise ValueError(f"dataset '{dataset.name}' holds latents with {other} channels but this model's latents "
                             f"have {want}: the dataset was filled with another model family's VAE; train with that "
                             f"model, or fill a new dataset with this one")
        if rows == ROWS[0] and negative is None:
            negative = encode_prompt(clip, "")
        queries = QueryEncoder(clip, query, template)
        conds: dict[str, list] = {}
        gen = torch.Generator().manual_seed(seed % (2 ** 63))
        order = _batches_of(examples, batch, gen)

        def features_of(idx: list[int], step: int) -> GroundingFeatures:
            for i in idx:
                p = examples[i].prompt
                if p not in conds:
                    conds[p] = encode_prompt(clip, p)
            lengths = {conds[examples[i].prompt][0][0].shape[1] for i in idx}
            latents = torch.stack([examples[i].latent for i in idx])
            if len(lengths) == 1:
                pos = _stack_conditioning([conds[examples[i].prompt] for i in idx])
                return compute_features(model, pos, negative, latents, timestep, (seed + step) % 2 ** 63, rows)
            return GroundingFeatures.cat([compute_features(model, conds[examples[i].prompt], negative,
                                                           latents[j:j + 1], timestep,
                                                           (seed + step) % 2 ** 63, rows)
                                          for j, i in enumerate(idx)])

        def make_batch(step: int) -> tuple[TrainBatch, GroundingFeatures]:
            with torch.no_grad():                      # the text encoder and UNet stay out of the autograd graph
                return _make_batch(step)

        def _make_batch(step: int) -> tuple[TrainBatch, GroundingFeatures]:
            mm.throw_exception_if_processing_interrupted()
            idx = next(order)
            feats = features_of(idx, step)
            out_hw = tuple(examples[idx[0]].masks.shape[-2:])
            per_q, per_t = [], []
            for i in idx:
                ex = examples[i]
                per_q.append(torch.stack([queries(ex.prompt, w) for w in ex.words]))
                t = ex.masks.float()
                if tuple(t.shape[-2:]) != out_hw:
                    t = F.interpolate(t[None], size=out_hw, mode="nearest")[0]
                per_t.append(t)
            with torch.inference_mode(False):          # normal tensors: the loss is differentiated
                q, valid = stack_queries([x.clone() for x in per_q])
                targets = torch.zeros(len(idx), q.shape[1], *out_hw)
                for j, t in enumerate(per_t):
                    targets[j, :t.shape[0]] = t.clone()
            return TrainBatch(list(feats.levels), q, targets, valid), feats

        first_batch, first_feats = make_batch(0)
        overrides = {}
        if head_size == "small":
            overrides = dict(_SMALL, widths=tuple(8 * 2 ** s for s in range(len(first_feats.levels))))
        head = build_head(HeadConfig.for_features(first_feats, **overrides), seed=seed % (2 ** 63))
        pbar = comfy.utils.ProgressBar(steps)

        def batches(i: int) -> TrainBatch:
            return first_batch if i == 0 else make_batch(i)[0]

        def progress(step: int, total: int, loss: float) -> None:
            mm.throw_exception_if_processing_interrupted()
            pbar.update_absolute(step, total)

        result = train_head(head, batches, steps, lr=lr, progress=progress)
        meta = HeadMeta.for_features(
            first_feats, query=query, template=template, seen_words=tuple(dataset.vocabulary(examples)),
            training={"dataset": dataset.name, "images": len(examples), "steps": steps, "batch": batch, "lr": lr,
                      "seed": seed, "head_size": head_size, "seconds": round(result.seconds, 1),
                      "loss_first": result.losses[0], "loss_last": result.losses[-1]})
        path = ""
        if save_name:
            folder = Path(folder_paths.get_folder_paths(HEAD_FOLDER)[0])
            path = str(save_head(folder / f"{save_name}.safetensors", result.head, meta))
        text = (f"trained {steps} steps on {len(examples)} images of '{dataset.name}' in {result.seconds:.1f} s; "
                f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}; seen words: {', '.join(meta.seen_words)}"
                + (f"; saved {path}" if path else ""))
        logger.info("GroundingHeadTrain: %s", text)
        return io.NodeOutput(LoadedHead(result.head, meta, path or "trained in this run"), path,
                             ui=ui.PreviewText(text))


# --------------------------------------------------------------------------------------------- loading

def head_options() -> list[str]:
    return folder_paths.get_filename_list(HEAD_FOLDER) + [EMBEDDED_HEAD]


class GroundingHeadLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GroundingHeadLoader",
            display_name="Grounding Head Loader",
            category=CATEGORY,
            description=(
                "Loads a grounding head from models/attention_lab_grounding/ (saved by Grounding Head Train), or the "
                "pack's embedded ShapesWorld head. The head only works with features of the model family, context "
                "width and feature layout it was trained on."),
            inputs=[io.Combo.Input("head_name", options=head_options(), tooltip=(
                "A .safetensors file of models/attention_lab_grounding/, or 'shapesworld (embedded)' "
                "(assets/shapesworld_grounding.safetensors, for the ShapesWorld model)."))],
            outputs=[GroundingHeadType.Output(display_name="head")],
        )

    @classmethod
    def execute(cls, head_name) -> io.NodeOutput:
        if head_name == EMBEDDED_HEAD:
            path = EMBEDDED_HEAD_PATH
        else:
            path = folder_paths.get_full_path(HEAD_FOLDER, head_name)
            if path is None:
                raise FileNotFoundError(f"grounding head {head_name!r} is not in "
                                        f"{folder_paths.get_folder_paths(HEAD_FOLDER)}; "
                                        "refresh the node list or train one with Grounding Head Train")
        head, meta = load_head(path)
        text = f"{head_name}: {meta.describe()}, {meta.query} queries, seen words {', '.join(meta.seen_words)}"
        return io.NodeOutput(LoadedHead(head, meta, str(path)), ui=ui.PreviewText(text))
