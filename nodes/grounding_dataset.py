"""Grounding dataset nodes (Li et al. 2023): fill a named dataset of latents, prompts, words and masks; open it.

Glue only: the dataset files are ``attention/grounding_dataset.py``. Datasets live in
``output/attention_lab/grounding/<name>/``; latents are stored, not features (the trainer recomputes those).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import folder_paths
import torch
from comfy_api.latest import io, ui

from ..attention import logger
from ..attention.grounding_dataset import SKIP_FIX, DatasetError, Example, GroundingDataset
from ..attention.masks import check_aspect, fit_to_grid, mask_batch
from ..attention.tokens import split_words
from .common import CATEGORY
from .grounding_words import lines_per_image, positions_in

GroundingDatasetType = io.Custom("GROUNDING_DATASET")


def dataset_root() -> Path:
    return Path(folder_paths.get_output_directory()) / "attention_lab" / "grounding"


class GroundingDatasetAdd(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GroundingDatasetAdd",
            display_name="Grounding Dataset Add",
            category=CATEGORY,
            description=(
                "Appends training examples for a grounding head to a named dataset on disk "
                "(ComfyUI output/attention_lab/grounding/<name>/): each image's LATENT, prompt, words and one "
                "MASK per word. Queue the graph many times (new seeds) to fill it; any mask source works "
                "(segment-anything or CLIPSeg packs, the mask editor, Self-Attention Cluster, ShapesWorld's "
                "scenes). Empty masks are skipped with a warning, as the paper skips a class its detector "
                "misses. Latents are stored, not features; the trainer recomputes those."),
            inputs=[
                io.Latent.Input("latent", tooltip="Raw LATENT of the image(s) (sampler output or VAE Encode)."),
                io.Clip.Input("clip", tooltip=(
                    "The CLIP of the prompts; used to check that each word is in its prompt.")),
                io.String.Input("prompts", multiline=True, default="", tooltip=(
                    "The prompt of each image: one line for all images, or one line per image of the batch.")),
                io.String.Input("words", multiline=True, default="", tooltip=(
                    "The words to learn, comma separated (e.g. 'cat, dog'): one line for all images, or one line "
                    "per image. Each must occur in its image's prompt.")),
                io.Mask.Input("masks", tooltip=(
                    "One mask per word, image by image (image 0's words, then image 1's, ...); any size whose aspect "
                    "ratio is within 2 % of the latent's (resized to it); values > 0.5 count as inside.")),
                io.String.Input("dataset", default="my_grounding_set", tooltip=(
                    "Dataset name (1-64 letters, digits, '_', '-', '.'); a folder of that name is created.")),
            ],
            outputs=[GroundingDatasetType.Output(display_name="dataset",
                                                 tooltip="The dataset, for Grounding Head Train.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, latent, clip, prompts, words, masks, dataset) -> io.NodeOutput:
        ds = GroundingDataset.at(dataset_root(), dataset)
        ds.log_strays()                         # files of the folder that are not examples: named once, never read
        samples = latent["samples"]
        b = samples.shape[0]
        prompt_lines = lines_per_image(prompts, b, "prompts")
        if not words.strip():
            raise ValueError("no words given; write the words to learn, comma separated, e.g. 'cat, dog' (one line "
                             "for all images or one per image)")
        word_lists = [split_words(line) for line in lines_per_image(words, b, "words")]
        for i, ws in enumerate(word_lists):
            for w in ws:
                positions_in(clip, prompt_lines[i], w)
        total = sum(len(ws) for ws in word_lists)
        masks = mask_batch(masks, "GroundingDatasetAdd", "masks")              # (N, H, W) whatever the layout
        if masks.shape[0] != total:
            detail = "; ".join(f"image {i}: {', '.join(ws)}" for i, ws in enumerate(word_lists))
            raise ValueError(f"{masks.shape[0]} masks for {total} words ({detail}); give exactly one mask per word, "
                             f"image by image")
        check_aspect(tuple(masks.shape[-2:]), tuple(samples.shape[-2:]), "GroundingDatasetAdd", "masks", "latent")
        masks = fit_to_grid(masks, tuple(samples.shape[-2:]))                   # exactly the image's aspect
        added, skipped, k = 0, [], 0
        for i, ws in enumerate(word_lists):
            keep_w, keep_m = [], []
            for word in ws:
                m = masks[k] > 0.5
                k += 1
                if not m.any():
                    skipped.append(f"image {i} '{word}': empty mask (no value above 0.5, largest "
                                   f"{float(masks[k - 1].max()):.2f})")
                    continue
                keep_w.append(word)
                keep_m.append(m)
            if keep_w:
                ds.append(Example(samples[i], prompt_lines[i], keep_w, torch.stack(keep_m)))
                added += 1
            elif not ws:
                skipped.append(f"image {i}: no words")
        text = f"dataset {ds.name}: added {added} image(s), {len(ds)} in total ({ds.path})"
        if skipped and not added:      # the trainer downstream repeats why, should the dataset still be empty
            ds = dataclasses.replace(ds, skipped=tuple(skipped))
            text = (f"WARNING: nothing was added to dataset {ds.name}: every example given was skipped "
                    f"({'; '.join(skipped)}); it holds {len(ds)} image(s) ({ds.path}). {SKIP_FIX}.")
        elif skipped:
            text += f". WARNING: skipped {'; '.join(skipped)}"
        if skipped:
            logger.warning("GroundingDatasetAdd: %s", text)
        else:
            logger.info("GroundingDatasetAdd: %s", text)
        return io.NodeOutput(ds, ui=ui.PreviewText(text))


class GroundingDatasetLoad(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GroundingDatasetLoad",
            display_name="Grounding Dataset Load",
            category=CATEGORY,
            description=("Opens a grounding dataset filled by Grounding Dataset Add (output/attention_lab/grounding/"
                         "<name>/), to train a head in a graph of its own."),
            inputs=[io.String.Input("dataset", default="my_grounding_set",
                                    tooltip="Name of the dataset folder (as given to Grounding Dataset Add).")],
            outputs=[GroundingDatasetType.Output(display_name="dataset")],
        )

    @classmethod
    def fingerprint_inputs(cls, dataset):
        try:
            return GroundingDataset.at(dataset_root(), dataset).fingerprint()
        except DatasetError:
            return dataset

    @classmethod
    def execute(cls, dataset) -> io.NodeOutput:
        ds = GroundingDataset.at(dataset_root(), dataset)
        ds.load()  # missing/empty/corrupt: the error names the fix
        return io.NodeOutput(ds, ui=ui.PreviewText(f"dataset {ds.name}: {len(ds)} image(s)"))
