"""SelfAttnCluster: object and background masks from captured self- and cross-attention."""

from __future__ import annotations

import torch
from comfy_api.latest import io, ui

from ..attention import logger
from ..attention.cluster import cluster_colours, cluster_store
from ..attention.cluster import nearest_size as nearest_captured
from ..attention.render import grid, upsample
from .capture import MAP_KINDS, concept_positions, map_kind
from .common import CATEGORY, AttentionStoreType, check_store_run, require_finished_store, word_positions


def nearest_size(wanted: int, sizes: list[tuple[int, int]], what: str) -> tuple[int, int]:
    best = nearest_captured(wanted, sizes, what)
    if max(best) != wanted:
        logger.info("SelfAttnCluster: no %s maps with a %d px side, using the nearest captured size %dx%d",
                    what, wanted, *best)
    return best


class SelfAttnCluster(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SelfAttnCluster",
            display_name="Self-Attention Cluster",
            category=CATEGORY,
            description=(
                "Segments a generated (or inverted) image from its captured attention, as in 'Localizing "
                "Object-level Shape Variations' and DPL: KMeans over self-attention, each cluster labelled with "
                "the word whose cross-attention covers it best, or background. Outputs a MASK per word, the "
                "background MASK and a picture of the clusters."),
            inputs=[
                AttentionStoreType.Input("store", tooltip="From Attention Capture, with capture_self on."),
                io.Clip.Input("clip", tooltip="The CLIP that encoded the prompt."),
                io.String.Input("prompt", multiline=True, default="", tooltip="The positive prompt that was sampled."),
                io.String.Input("words", default="", tooltip=(
                    "The nouns to label clusters with, comma separated (words of the prompt; case and emphasis "
                    "ignored).")),
                io.Latent.Input("samples", tooltip="The sampler's LATENT: orders this node after sampling and "
                                                    "sets the mask size when no image is given."),
                io.Int.Input("clusters", default=5, min=1, max=64, tooltip="KMeans cluster count (1-64; official 5)."),
                io.Float.Input("threshold", default=0.3, min=0.0, max=1.0, step=0.01, tooltip=(
                    "A cluster takes a word when its mean normalized cross-attention exceeds this (0-1; 0.3 in "
                    "prompt mixing, 0.2 in DPL); otherwise it is background.")),
                io.Int.Input("self_resolution", default=32, min=4, max=128, tooltip=(
                    "Self-attention map size to cluster (px of the feature map; the nearest captured size is "
                    "used, 32 as in the official code).")),
                io.Int.Input("cross_resolution", default=16, min=4, max=128, tooltip=(
                    "Cross-attention map size used for the labels (nearest captured size; 16 officially).")),
                io.Int.Input("seed", default=1, min=0, max=2**31 - 1, control_after_generate=False, tooltip=(
                    "KMeans seed (0-2147483647); same seed, same masks. Not randomized after each run: the "
                    "masks, and everything computed from them, stay put.")),
                io.Int.Input("batch_index", default=0, min=0, max=4095, tooltip="Which image of the batch."),
                io.Image.Input("image", optional=True, tooltip="If given, masks and picture take its size."),
                io.Combo.Input("labels", options=list(MAP_KINDS), default=MAP_KINDS[0], optional=True, tooltip=(
                    "Which maps label the clusters: the words' 'attention' maps, or the ConceptAttention maps of "
                    "concepts given to Attention Capture on Flux ('words' then names those concepts).")),
            ],
            outputs=[
                io.Mask.Output(display_name="word_masks", tooltip="One mask per word, in the order given."),
                io.Mask.Output(display_name="background", tooltip="Pixels of clusters no word claimed."),
                io.Image.Output(display_name="clusters", tooltip="The clusters in distinct colours."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, store, clip, prompt, words, samples, clusters, threshold, self_resolution,
                cross_resolution, seed, batch_index, image=None, labels=MAP_KINDS[0]) -> io.NodeOutput:
        require_finished_store(store)
        check_store_run(store, samples)
        kind = map_kind(labels)
        names, positions = concept_positions(store, words) if kind == "concept" else word_positions(clip, prompt, words)
        s_size = nearest_size(self_resolution, store.resolutions(cross=False), "self-attention")
        c_size = nearest_size(cross_resolution, store.resolutions(cross=kind),
                              "concept" if kind == "concept" else "cross-attention")
        if not 0 <= batch_index < store.items:
            raise IndexError(f"batch_index {batch_index} is out of range 0..{store.items - 1} of the captured batch")
        result = cluster_store(store, positions, batch_index, clusters, threshold, s_size, c_size, seed, kind)
        hw = tuple(image.shape[1:3]) if image is not None else tuple(samples["samples"].shape[-2:])
        masks = upsample(torch.stack([result.word_mask(i) for i in range(len(names))]), hw, "nearest")
        background = upsample(result.background_mask(), hw, "nearest")[None]
        picture = upsample(cluster_colours(result.labels).permute(2, 0, 1), hw, "nearest").permute(1, 2, 0)[None]
        labelled = {names[w] if w >= 0 else "background": [] for w in result.cluster_word}
        for c, w in enumerate(result.cluster_word):
            labelled[names[w] if w >= 0 else "background"].append(c)
        text = "; ".join(f"{k}: clusters {v}" for k, v in labelled.items())
        logger.info("SelfAttnCluster %dx%d self / %dx%d cross: %s", *s_size, *c_size, text)
        preview = grid(torch.cat([picture, masks[..., None].expand(-1, -1, -1, 3)]), cols=len(names) + 1)
        return io.NodeOutput(masks, background, picture, ui=ui.PreviewImage(preview, cls=cls))
