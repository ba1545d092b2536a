"""Grounded Segment node (Li et al. 2023): word masks from a grounding head, an image's features and its words.

Glue only: the head's forward pass is ``attention/grounding.py`` (``GroundingHead.segment``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from comfy_api.latest import io, ui

from ..attention import logger
from ..attention.grounding import GroundingLayoutError, stack_queries
from ..attention.grounding_head_file import check_compatible, check_query_mode
from ..attention.render import colorize, grid, overlay
from ..attention.tokens import split_words
from .common import CATEGORY
from .grounding_features import GroundingFeaturesType
from .grounding_head import GroundingHeadType, LoadedHead
from .grounding_words import QueryEncoder, lines_per_image


class GroundedSegment(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GroundedSegment",
            display_name="Grounded Segment",
            category=CATEGORY,
            description=(
                "Segments words in an image with a grounding head (Li et al. 2023): the head reads the image's UNet "
                "features (Grounding Features) and each word's text embedding and outputs the word's probability "
                "map; mask = probability > threshold. Works for words the head never saw in training "
                "(open vocabulary), usually less well than for seen ones."),
            inputs=[
                GroundingHeadType.Input("head", tooltip="From Grounding Head Loader or Grounding Head Train."),
                GroundingFeaturesType.Input("features", tooltip=(
                    "From Grounding Features, same model family as the head.")),
                io.Clip.Input("clip", tooltip="The model's CLIP; encodes the word queries."),
                io.String.Input("prompt", multiline=True, default="", tooltip=(
                    "The image's prompt (one line for all images, or one per image); 'prompt' queries read the "
                    "words' states in it.")),
                io.String.Input("words", multiline=True, default="", tooltip=(
                    "Words to segment, comma separated (one line for all images, or one line per image).")),
                io.Float.Input("threshold", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Probability threshold 0-1 of the masks; the paper uses 0.5."),
                io.Combo.Input("query", options=["auto", "template", "prompt"], default="auto", tooltip=(
                    "'auto' = the mode the head was trained with; another choice must match it.")),
                io.Boolean.Input("seen_only", default=False, tooltip=(
                    "Refuse words the head was not trained on (its seen words), instead of trying them "
                    "open-vocabulary.")),
                io.Image.Input("image", optional=True, tooltip=(
                    "The decoded image: background of the overlays and size of the outputs (default: the finest "
                    "feature size).")),
            ],
            outputs=[
                io.Mask.Output(display_name="masks", tooltip="One mask per word, image by image."),
                io.Image.Output(display_name="heatmaps", tooltip="Each word's probability (0-1) as a colour map."),
                io.Image.Output(display_name="overlays", tooltip="Each word's probability over the image."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, head, features, clip, prompt, words, threshold, query, seen_only, image=None) -> io.NodeOutput:
        if not isinstance(head, LoadedHead):
            raise TypeError(f"'head' must come from Grounding Head Loader or Train, got {type(head).__name__}")
        meta = head.meta
        if head.head.config.prior_channels:
            raise GroundingLayoutError("this head takes extra per-word prior maps (a figure-command ablation); "
                                       "the nodes give none; load a head trained without priors")
        check_compatible(meta, features, name=f"the grounding head ({Path(head.source).name})")
        mode = meta.query if query == "auto" else query
        check_query_mode(meta, mode)
        b = features.batch
        prompts = lines_per_image(prompt, b, "prompt") if prompt.strip() else [""] * b
        word_lists = [split_words(line) for line in lines_per_image(words, b, "words")]
        for i, ws in enumerate(word_lists):
            if not ws:
                raise ValueError(f"image {i} has no words to segment; write them comma separated, e.g. 'cat, dog'")
            unseen = [w for w in ws if w not in meta.seen_words]
            if seen_only and unseen:
                raise ValueError(f"words {unseen} are not among the head's seen words {list(meta.seen_words)}; remove "
                                 "them or turn seen_only off to try them open-vocabulary")
            if mode == "prompt" and not prompts[i]:
                raise ValueError("'prompt' queries need the image's prompt; fill in 'prompt'")
        enc = QueryEncoder(clip, mode, meta.template)
        q, valid = stack_queries([torch.stack([enc(prompts[i], w) for w in ws]) for i, ws in enumerate(word_lists)])
        out_hw = tuple(image.shape[1:3]) if image is not None else features.sizes[-1]
        dev = next(head.head.parameters()).device
        probs, _ = head.head.segment([x.to(dev, torch.float32) for x in features.levels], q.to(dev), valid.to(dev),
                                     out_hw)
        probs = torch.cat([probs[i, :len(ws)] for i, ws in enumerate(word_lists)]).float().cpu()  # (sum N, H, W)
        masks = (probs > threshold).float()
        heat = colorize(probs)
        if image is not None:
            base = torch.cat([image[min(i, image.shape[0] - 1)].expand(len(ws), *image.shape[1:])
                              for i, ws in enumerate(word_lists)]).cpu()
        else:
            base = torch.full((*probs.shape, 3), 0.5)
        over = overlay(base, probs)
        names = [w for ws in word_lists for w in ws]
        logger.info("GroundedSegment: %s, mask areas %s", names,
                    [round(float(m.mean()), 3) for m in masks])
        return io.NodeOutput(masks, heat, over, ui=ui.PreviewImage(grid(over, cols=len(word_lists[0])), cls=cls))
