"""AttentionCapture and AttentionMapView: record where each word looks, and show it."""

from __future__ import annotations

import torch
from comfy_api.latest import io, ui

from ..attention import logger
from ..attention.layers import LayerSelectionError, parse_layer_selection
from ..attention.render import colorize, grid, masks_from_maps, normalize, overlay, upsample
from ..attention.store import AttentionStore, StoreConfig, word_maps
from ..attention.words import split_word_list
from .common import (
    CATEGORY,
    AttentionStoreType,
    add_outer_sample_wrapper,
    check_store_run,
    install_controller,
    model_layer_ids,
    prompt_words,
    require_finished_store,
    word_positions,
)
from .dit import concept_support
from .guided import add_chunk_wrapper

MAP_KINDS = ("attention", "concept attention")


class AttentionCapture(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttentionCapture",
            display_name="Attention Capture",
            category=CATEGORY,
            description=(
                "Clones the MODEL and records head-averaged attention maps of the positive prompt while any "
                "sampler node samples with the returned MODEL (SD1.x/SDXL UNets, Flux, SD3/3.5). Wire the "
                "sampler's LATENT into an Attention Map View to see them. The sampled image is unchanged. "
                "Conditioning entries with an area (evaluated on a crop) are not recorded; the maps are always the "
                "full frame's. On Flux, 'concepts' also records ConceptAttention maps (Helbling et al. 2025)."),
            inputs=[
                io.Model.Input("model", tooltip="The model to watch. It is cloned; the input stays unpatched."),
                io.String.Input("layers", default="all", tooltip=(
                    "Which attention layers to record: 'all', a feature size such as '16' (every 16x16 layer), "
                    "block ids such as 'output.3-5' or 'input.7', depth ranges such as 'output.0-2.1'; on Flux/SD3 "
                    "'double.15-18' or 'single'; comma separated.")),
                io.Boolean.Input("capture_self", default=True, tooltip=(
                    "Also record self-attention (pixel-to-pixel) maps, needed by SelfAttnCluster.")),
                io.Int.Input("self_max_size", default=32, min=1, max=128, tooltip=(
                    "Self-attention is recorded only on layers whose feature map is at most this many pixels on "
                    "a side (32 = 32x32 and smaller, 4 MiB per image per layer). Range 1-128.")),
                io.Float.Input("start", default=0.0, min=0.0, max=1.0, step=0.01, tooltip=(
                    "First step recorded, as a fraction of the sampling steps (0 = first step). Range 0-1.")),
                io.Float.Input("end", default=1.0, min=0.0, max=1.0, step=0.01, tooltip=(
                    "Recording stops before this fraction of the steps (1 = through the last step). Range 0-1.")),
                io.String.Input("concepts", default="", optional=True, tooltip=(
                    "Flux only: concepts for ConceptAttention maps, comma separated, at least two (e.g. 'cat, "
                    "grass, sky'); any words, in the prompt or not. Empty: attention maps only. Needs 'clip'.")),
                io.Clip.Input("clip", optional=True, tooltip=(
                    "The CLIP that encodes the prompt; needed only to encode 'concepts'.")),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with capture patches; sample with this."),
                AttentionStoreType.Output(display_name="store", tooltip="The maps, filled while sampling."),
            ],
        )

    @classmethod
    def validate_inputs(cls, layers, start, end, **kwargs):
        try:
            parse_layer_selection(layers)
        except LayerSelectionError as e:
            return str(e)
        if start >= end:
            return f"start ({start}) must be below end ({end}); both are fractions of the steps in [0, 1]"
        return True

    @classmethod
    def execute(cls, model, layers, capture_self, self_max_size, start, end, concepts="", clip=None) -> io.NodeOutput:
        selection = parse_layer_selection(layers)
        ids = model_layer_ids(model, dit=True)
        selection.validate_ids(ids)
        names, emb = concept_tokens(model, clip, concepts) if (concepts or "").strip() else ((), None)
        store = AttentionStore(StoreConfig(selection=selection, capture_self=capture_self,
                                           self_max_tokens=self_max_size * self_max_size,
                                           step_start=start, step_end=end, concepts=names, concept_embeddings=emb))
        m = model.clone()
        install_controller(m, store, ids, self_attn=capture_self, cross_attn=True)
        add_outer_sample_wrapper(m, f"attention_lab_capture_{id(store)}", before=store.reset, on_success=store.finish)
        add_chunk_wrapper(m)    # area entries run on a crop: the store records the full frame only
        logger.info("AttentionCapture: watching %d layers (%s)%s", len(ids), layers,
                    f", concepts {list(names)}" if names else "")
        return io.NodeOutput(m, store)


class AttentionMapView(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AttentionMapView",
            display_name="Attention Map View",
            category=CATEGORY,
            description=(
                "Shows the cross-attention of chosen words recorded by Attention Capture: a heatmap grid "
                "(one row per word, one column per feature size plus their mean), overlays on the image and a "
                "MASK per word; on Flux, ConceptAttention maps of the captured concepts instead. Connect the "
                "sampler's LATENT to 'samples' so it runs after sampling."),
            inputs=[
                AttentionStoreType.Input("store", tooltip="From Attention Capture."),
                io.Clip.Input("clip", tooltip="The CLIP that encoded the prompt; used to find the words' tokens."),
                io.String.Input("prompt", multiline=True, default="", tooltip=(
                    "The positive prompt that was sampled, exactly as encoded (weights such as (cat:1.2) allowed).")),
                io.String.Input("words", default="",
                                tooltip=("Words or phrases of the prompt to show, comma separated (case and (word:1.2) "
                                         "emphasis ignored; whole words; a word not in the prompt is an error).")),
                io.Latent.Input("samples", tooltip=(
                    "The sampler's output LATENT. Only used to run this node after the sampler and again "
                    "whenever it samples anew.")),
                io.String.Input("resolution", default="all", tooltip=(
                    "Feature size used for the overlays and masks: 'all' averages every captured size (resized "
                    "to the largest), '16' or '16x16' uses only 16x16 layers.")),
                io.Float.Input("threshold", default=0.5, min=0.0, max=1.0, step=0.01, tooltip=(
                    "Mask threshold on the normalized map (0-1): a pixel is in the word's mask when its "
                    "attention is at least this fraction of the map's range.")),
                io.Int.Input("batch_index", default=0, min=0, max=4095, tooltip=(
                    "Which image of the sampled batch to show (0 = first).")),
                io.Int.Input("tile_size", default=256, min=16, max=2048, tooltip=(
                    "Size of each heatmap tile of the grid in pixels (16-2048); overlays and masks take the "
                    "image's size, or this size when no image is given.")),
                io.Image.Input("image", optional=True,
                               tooltip="The decoded image, for overlays; sets the output size."),
                io.Combo.Input("maps", options=list(MAP_KINDS), default=MAP_KINDS[0], optional=True, tooltip=(
                    "'attention': the words' attention maps; 'concept attention': ConceptAttention maps of "
                    "concepts given to Attention Capture (Flux; 'words' then names those concepts).")),
            ],
            outputs=[
                io.Image.Output(display_name="heatmaps",
                                tooltip="Grid: rows are words, columns feature sizes then mean."),
                io.Image.Output(display_name="overlays", tooltip="One image per word with its map over the image."),
                io.Mask.Output(display_name="masks",
                               tooltip="One mask per word: normalized map >= threshold."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, store, clip, prompt, words, samples, resolution, threshold, batch_index, tile_size,
                image=None, maps=MAP_KINDS[0]) -> io.NodeOutput:
        require_finished_store(store)
        check_store_run(store, samples)
        kind = map_kind(maps)
        names, positions = concept_positions(store, words) if kind == "concept" else word_positions(clip, prompt, words)
        sizes = store.resolutions(cross=kind)
        size = _parse_resolution(resolution, sizes)
        if image is not None:
            out_hw = tuple(image.shape[1:3])
            base = image[min(batch_index, image.shape[0] - 1)]
        else:
            out_hw = (tile_size, tile_size)
            base = torch.zeros(*out_hw, 3)
        columns = [word_maps(store, positions, s, batch_index, kind) for s in sizes]
        mean_maps = word_maps(store, positions, None, batch_index, kind)
        chosen = mean_maps if size is None else word_maps(store, positions, size, batch_index, kind)
        tiles = []
        tile_hw = (tile_size, tile_size)
        for w in range(len(names)):
            for col in columns + [mean_maps]:
                tiles.append(colorize(normalize(upsample(col[w], tile_hw))))
        heat = grid(torch.stack(tiles), cols=len(columns) + 1)
        maps01 = normalize(upsample(chosen, out_hw))                      # (words, H, W)
        over = overlay(base.expand(len(names), *base.shape).cpu(), maps01)
        masks = masks_from_maps(maps01, threshold)
        logger.info("AttentionMapView: %s at sizes %s (steps recorded: %d)", names, sizes, len(store.steps_recorded))
        return io.NodeOutput(heat, over, masks, ui=ui.PreviewImage(heat, cls=cls))


def concept_tokens(model, clip, text: str) -> tuple[tuple[str, ...], torch.Tensor]:
    """ConceptAttention's concept tokens: each concept encoded alone by ``clip``, its first token (upstream: T5's
    token 0) -> (names, (C, context width)). Refused on models without a Flux text stream, without a CLIP, with
    fewer than two concepts (the maps are a softmax over concepts) or a CLIP whose width is not the model's."""
    dm = model.get_model_object("diffusion_model")
    reason = concept_support(dm)
    if reason:
        raise ValueError(f"concepts {text!r}: {reason}. Leave 'concepts' empty for attention maps.")
    if clip is None:
        raise ValueError(f"concepts {text!r} need the CLIP that encodes the prompt: connect it to 'clip'")
    names = tuple(split_word_list(text))
    if len(set(n.casefold() for n in names)) < 2:
        raise ValueError(f"concepts {text!r}: give at least two different concepts, comma separated (e.g. 'cat, "
                         f"grass, sky'); a concept map is a softmax over the concepts, so one concept is 1 everywhere")
    rows = []
    for name in names:
        cond = clip.encode_from_tokens(clip.tokenize(name))            # (1, T, width)
        first = min(prompt_words(clip, name).positions(name, "concept"))
        rows.append(cond[0, first].float().cpu())
    emb = torch.stack(rows)
    width = dm.params.context_in_dim
    if emb.shape[-1] != width:
        raise ValueError(f"the CLIP encodes {emb.shape[-1]}-wide tokens but the model's text input is {width} wide; "
                         f"connect the CLIP that goes with this model")
    return names, emb


def map_kind(maps: str):
    """The store table of a ``maps`` choice: True (attention) or "concept"."""
    if maps not in MAP_KINDS:
        raise ValueError(f"maps {maps!r} is not one of {list(MAP_KINDS)}")
    return "concept" if maps == MAP_KINDS[1] else True


def concept_positions(store: AttentionStore, words: str) -> tuple[list[str], list[tuple[int, ...]]]:
    """Concept names from a comma-separated list and their indices among the store's concepts."""
    have = [c.casefold() for c in store.config.concepts]
    if not have or not store.concepts:
        raise ValueError("this store has no ConceptAttention maps: give Attention Capture 'concepts' (and its "
                         "'clip') on a Flux model, sample, then view them")
    names = split_word_list(words)
    if not names:
        raise ValueError(f"no concepts given ({words!r}); the captured concepts are {list(store.config.concepts)}")
    bad = [n for n in names if n.casefold() not in have]
    if bad:
        raise ValueError(f"concept(s) {bad} were not captured; the captured concepts are "
                         f"{list(store.config.concepts)}. Name those, or add them to Attention Capture's 'concepts'.")
    return names, [(have.index(n.casefold()),) for n in names]


def _parse_resolution(text: str, sizes: list[tuple[int, int]]):
    t = (text or "all").strip().lower()
    if t == "all":
        return None
    try:
        parts = [int(p) for p in t.split("x")]
        hw = (parts[0], parts[-1])
    except ValueError:
        raise ValueError(f"resolution {text!r} is not 'all', '16' or '16x16'; captured sizes: "
                         f"{['%dx%d' % s for s in sizes]}") from None
    if hw not in sizes:
        raise ValueError(f"no cross-attention layer of size {hw[0]}x{hw[1]} was captured; captured sizes: "
                         f"{['%dx%d' % s for s in sizes]}. Pick one of them or 'all'.")
    return hw
