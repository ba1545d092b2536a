"""Grounded generation nodes (Li et al. 2023): UNet features, a dataset of masks, a trained head, word masks.

Glue only: the recorder and feature container are ``attention/grounding_features.py``, the dataset files
``attention/grounding_dataset.py``, the head, queries, loss, training loop and head files
``attention/grounding.py``. Heads live in ``models/attention_lab_grounding/``; datasets in
``output/attention_lab/grounding/<name>/``.

Features are computed by evaluating the UNet **once** on the LATENT re-noised to the chosen timestep
(upstream: the last DDIM step, t = 1), with the positive and negative conditionings batched by ComfyUI
itself (``calc_cond_batch``: any batch size, SDXL's extra conds, low-memory splitting), through a clone of
the MODEL carrying the recorder's block patches. Works for generated and VAE-encoded real images alike.
"""

from __future__ import annotations

import os
from pathlib import Path

import comfy.model_management as mm
import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths
import torch
import torch.nn.functional as F
from comfy_api.latest import io, ui

from ..attention import logger
from ..attention.grounding import (
    DEFAULT_TEMPLATE,
    GroundingLayoutError,
    HeadConfig,
    HeadMeta,
    TrainBatch,
    build_head,
    check_compatible,
    check_query_mode,
    load_head,
    save_head,
    stack_queries,
    template_text,
    train_head,
    word_query,
)
from ..attention.grounding_dataset import DatasetError, Example, GroundingDataset, check_name
from ..attention.grounding_features import FeatureRecorder, FeatureRecordError, GroundingFeatures
from ..attention.render import colorize, grid, overlay
from ..attention.tokens import find_word_tokens, split_words
from .common import CATEGORY, encode_prompt, prompt_token_chunks, word_ids

GroundingFeaturesType = io.Custom("GROUNDING_FEATURES")
GroundingHeadType = io.Custom("GROUNDING_HEAD")
GroundingDatasetType = io.Custom("GROUNDING_DATASET")

HEAD_FOLDER = "attention_lab_grounding"
EMBEDDED_HEAD = "shapesworld (embedded)"
EMBEDDED_HEAD_PATH = Path(__file__).resolve().parents[1] / "assets" / "shapesworld_grounding.safetensors"
ROWS = ("uncond + cond", "cond only")
HEAD_SIZES = ("upstream", "small")
_SMALL = dict(dim=64, heads=4, layers=2, ffn=256)   # the notes' CPU pilot (B10): widths 8/16/32.., d 64
_FAMILIES = {"SD15": "sd1", "SD20": "sd2", "SD21UnclipL": "sd2", "SD21UnclipH": "sd2", "SDXL": "sdxl",
             "SDXLRefiner": "sdxl_refiner", "SSD1B": "sdxl", "Segmind_Vega": "sdxl", "KOALA_700M": "sdxl",
             "KOALA_1B": "sdxl", "ShapesWorldConfig": "shapesworld"}

folder_paths.add_model_folder_path(HEAD_FOLDER, os.path.join(folder_paths.models_dir, HEAD_FOLDER), is_default=True)
folder_paths.folder_names_and_paths[HEAD_FOLDER] = (folder_paths.folder_names_and_paths[HEAD_FOLDER][0],
                                                    {".safetensors"})


class LoadedHead:
    """What a GROUNDING_HEAD socket carries: the module, its metadata and where it came from."""

    def __init__(self, head, meta: HeadMeta, source: str):
        self.head, self.meta, self.source = head, meta, source

    def __repr__(self):
        return f"LoadedHead({self.source}: {self.meta.describe()})"


def dataset_root() -> Path:
    return Path(folder_paths.get_output_directory()) / "attention_lab" / "grounding"


# --------------------------------------------------------------------------------------------- features

def model_family(model) -> str:
    name = type(model.model.model_config).__name__
    return _FAMILIES.get(name, name.lower())


class _BothRowsGuider(comfy.samplers.CFGGuider):
    """Evaluates the positive (and negative) conditioning in one batched call; returns the positive's x0."""

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 - ComfyUI's signature
        conds = [self.conds["positive"]] + ([self.conds["negative"]] if "negative" in self.conds else [])
        return comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, model_options)[0]


def _one_evaluation(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """A k-diffusion 'sampler' that calls the denoiser once at sigmas[0] (features only)."""
    return model(x, sigmas[0] * x.new_ones([x.shape[0]]), **(extra_args or {}))


def compute_features(model, positive, negative, samples: torch.Tensor, timestep: int, seed: int,
                     rows: str = ROWS[0]) -> GroundingFeatures:
    """GroundingFeatures of a raw LATENT batch ``samples`` (B, C, h, w) noised to DDPM index ``timestep``
    (x_t = x_0 + sigma_t * noise, noise from ``seed``) and evaluated once; ``model`` is left untouched."""
    if rows == ROWS[0] and negative is None:
        raise ValueError("rows 'uncond + cond' needs the negative conditioning (upstream's uncond is the empty "
                         "prompt: a CLIPTextEncode with empty text); connect one, or set rows to 'cond only'")
    m = model.clone()
    rec = FeatureRecorder()
    m.set_model_input_block_patch(rec.input_block_patch)
    m.set_model_output_block_patch(rec.output_block_patch)
    sigma = float(m.get_model_object("model_sampling").sigma(torch.tensor(float(timestep))))
    samples = comfy.sample.fix_empty_latent_channels(m, samples)
    noise = comfy.sample.prepare_noise(samples, seed)
    guider = _BothRowsGuider(m)
    conds = {"positive": positive}
    if rows == ROWS[0]:
        conds["negative"] = negative
    guider.inner_set_conds(conds)
    sampler = comfy.samplers.KSAMPLER(_one_evaluation)
    sigmas = torch.tensor([sigma, 0.0])
    dm = m.get_model_object("diffusion_model")
    try:
        hook = rec.hook_final_block(dm)
    except FeatureRecordError:
        logger.warning("grounding: %s has no `out` module; the last output block is not recorded",
                       type(dm).__name__)
        hook = None
    with torch.no_grad():          # also when called from a training loop that enables gradients
        if hook is not None:
            with hook:
                guider.sample(noise, samples, sampler, sigmas, seed=seed, disable_pbar=True)
        else:
            guider.sample(noise, samples, sampler, sigmas, seed=seed, disable_pbar=True)
    context_dim = int(positive[0][0].shape[-1])
    feats = rec.features(model_family(m), context_dim, int(timestep), sigma, concat_uncond=rows == ROWS[0])
    feats.extra["latent_size"] = tuple(samples.shape[-2:])
    return feats


class GroundingFeaturesNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GroundingFeatures",
            display_name="Grounding Features",
            category=CATEGORY,
            description=(
                "UNet features of a LATENT for a grounding head (Li et al. 2023): the latent is noised to the chosen "
                "timestep and the MODEL is evaluated once with the positive and negative prompts; the output of "
                "every input, middle and output block is recorded and grouped by feature size, the uncond and cond "
                "rows concatenated on channels as in the paper. Use the sampler's output for a generated image or "
                "VAE Encode for a real one. The MODEL is not modified."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model that made (or will segment) the image."),
                io.Conditioning.Input("positive", tooltip=(
                    "The image's prompt (CLIPTextEncode). One conditioning for the whole batch.")),
                io.Latent.Input("latent", tooltip="Raw LATENT (sampler output or VAE Encode of a real image)."),
                io.Int.Input("timestep", default=1, min=0, max=999, tooltip=(
                    "DDPM timestep index 0-999 at which the UNet is evaluated; 1 = the paper's last DDIM step "
                    "(almost no noise). Larger values add more noise.")),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=False,
                             tooltip="Seed of the noise added to reach the timestep (0 to 2^64-1)."),
                io.Combo.Input("rows", options=list(ROWS), default=ROWS[0], tooltip=(
                    "'uncond + cond' (paper): both rows, concatenated on channels; needs 'negative'. "
                    "'cond only': the prompt's row only (what a CFG-1 evaluation has); a head must be trained "
                    "on the same choice.")),
                io.Conditioning.Input("negative", optional=True, tooltip=(
                    "The unconditional prompt; the paper uses the empty prompt. Required for 'uncond + cond'.")),
            ],
            outputs=[GroundingFeaturesType.Output(display_name="features", tooltip=(
                "Per feature size (coarse to fine) a (batch, channels, h, w) tensor, with model family, "
                "context width and timestep."))],
        )

    @classmethod
    def execute(cls, model, positive, latent, timestep, seed, rows, negative=None) -> io.NodeOutput:
        feats = compute_features(model, positive, negative, latent["samples"], timestep, seed, rows)
        logger.info("GroundingFeatures: %s", feats.describe())
        return io.NodeOutput(feats, ui=ui.PreviewText(feats.describe()))


# --------------------------------------------------------------------------------------------- words, queries

def _lines(text: str, count: int, what: str) -> list[str]:
    """One line per image, or one line for all ``count`` images."""
    lines = [ln.strip() for ln in (text or "").strip().splitlines()]
    if len(lines) == 1:
        return lines * count
    if len(lines) != count:
        raise ValueError(f"{len(lines)} lines of {what} for {count} images; give one line for all images or "
                         f"exactly one line per image")
    return lines


def check_word_known(clip, word: str, key: str) -> list[int]:
    """Token ids of ``word``; raises when the tokenizer drops it or maps it to an unknown token."""
    ids = word_ids(clip, word, key)
    if not ids:
        raise ValueError(f"word {word!r} tokenizes to nothing (the tokenizer drops it); use a word the text "
                         "encoder knows")
    try:
        names = [str(n) for _, n in clip.tokenizer.untokenize([(i, 1.0) for i in ids])]
    except Exception:  # noqa: BLE001 - a tokenizer without untokenize: nothing more to check
        names = []
    if any("<unk>" in n or "<|unk" in n for n in names):
        raise ValueError(f"word {word!r} is not in the text encoder's vocabulary (it becomes an unknown token); "
                         "use a word the text encoder knows")
    return ids


def positions_in(clip, prompt: str, word: str) -> tuple[int, ...]:
    chunks, key = prompt_token_chunks(clip, prompt)
    try:
        ids = check_word_known(clip, word, key)
    except ValueError as e:   # name the words the user can pick from
        raise ValueError(f"{e}; the prompt {prompt!r} has the words {prompt.replace(',', ' ').split()}") from None
    return find_word_tokens(chunks, ids, word, prompt).positions


class QueryEncoder:
    """Word query embeddings (T,) from a CLIP, cached: 'prompt' = the word's states in its prompt (ours),
    'template' = the word's states in the template prompt (upstream: "a photograph of a {word}")."""

    def __init__(self, clip, mode: str, template: str):
        self.clip, self.mode, self.template = clip, mode, template
        self._states: dict[str, torch.Tensor] = {}
        self._queries: dict[tuple[str, str], torch.Tensor] = {}

    def states(self, text: str) -> torch.Tensor:
        if text not in self._states:
            self._states[text] = encode_prompt(self.clip, text)[0][0][0].float().cpu()   # (L, T)
        return self._states[text]

    def __call__(self, prompt: str, word: str) -> torch.Tensor:
        text = template_text(word, self.template) if self.mode == "template" else prompt
        key = (text, word)
        if key not in self._queries:
            self._queries[key] = word_query(self.states(text), positions_in(self.clip, text, word))
        return self._queries[key]


# --------------------------------------------------------------------------------------------- dataset

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
                    "One mask per word, image by image (image 0's words, then image 1's, ...); any size with the "
                    "latent's aspect ratio; values > 0.5 count as inside.")),
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
        samples = latent["samples"]
        b = samples.shape[0]
        prompt_lines = _lines(prompts, b, "prompts")
        if not words.strip():
            raise ValueError("no words given; write the words to learn, comma separated, e.g. 'cat, dog' (one line "
                             "for all images or one per image)")
        word_lists = [split_words(line) for line in _lines(words, b, "words")]
        for i, ws in enumerate(word_lists):
            for w in ws:
                positions_in(clip, prompt_lines[i], w)
        total = sum(len(ws) for ws in word_lists)
        if masks.dim() == 2:
            masks = masks[None]
        if masks.shape[0] != total:
            detail = "; ".join(f"image {i}: {', '.join(ws)}" for i, ws in enumerate(word_lists))
            raise ValueError(f"{masks.shape[0]} masks for {total} words ({detail}); give exactly one mask per word, "
                             f"image by image")
        h, w = samples.shape[-2:]
        mh, mw = masks.shape[-2:]
        if abs(mh * w - mw * h) > max(h, w):
            raise ValueError(f"masks are {mw}x{mh} (aspect {mw / mh:.3f}) but the latent is {w}x{h} (aspect "
                             f"{w / h:.3f}); give masks of the image's aspect ratio (e.g. the decoded image's size)")
        added, skipped, k = 0, [], 0
        for i, ws in enumerate(word_lists):
            keep_w, keep_m = [], []
            for word in ws:
                m = masks[k] > 0.5
                k += 1
                if not m.any():
                    skipped.append(f"image {i} '{word}'")
                    continue
                keep_w.append(word)
                keep_m.append(m)
            if keep_w:
                ds.append(Example(samples[i], prompt_lines[i], keep_w, torch.stack(keep_m)))
                added += 1
            elif not ws:
                skipped.append(f"image {i} (no words)")
        if skipped:
            logger.warning("GroundingDatasetAdd: skipped %s", ", ".join(skipped))
        text = (f"dataset {ds.name}: added {added} image(s), {len(ds)} in total ({ds.path})"
                + (f"; skipped (empty mask or no words): {', '.join(skipped)}" if skipped else ""))
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


# --------------------------------------------------------------------------------------------- segmenting

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
        prompts = _lines(prompt, b, "prompt") if prompt.strip() else [""] * b
        word_lists = [split_words(line) for line in _lines(words, b, "words")]
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


NODES = [GroundingFeaturesNode, GroundingDatasetAdd, GroundingDatasetLoad, GroundingHeadTrain, GroundingHeadLoader,
         GroundedSegment]
