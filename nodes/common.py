"""Shared ComfyUI glue: socket types, layer discovery, patch installation, word lookup."""

from __future__ import annotations

import comfy.patcher_extension
from comfy.ldm.modules.attention import SpatialTransformer, optimized_attention
from comfy_api.latest import io

from ..attention.controller import AttentionController, chain_patch
from ..attention.layers import LayerId
from ..attention.store import AttentionStore
from ..attention.words import PromptWords, locate_words

AttentionStoreType = io.Custom("ATTENTION_STORE")
InversionType = io.Custom("ATTENTION_LAB_INVERSION")
CATEGORY = "attention_lab"
SUPPORTED_MODELS = "SD1.x, SD2.x and SDXL UNet checkpoints, and the ShapesWorld model"


class UnsupportedModelError(TypeError):
    pass


def comfy_attention(q, k, v, heads):
    return optimized_attention(q, k, v, heads)


def model_layer_ids(model) -> list[LayerId]:
    """Every (kind, number, depth) attention layer of the MODEL's diffusion model."""
    dm = model.get_model_object("diffusion_model")
    if hasattr(dm, "attention_layer_ids"):
        return list(dm.attention_layer_ids())
    if not all(hasattr(dm, a) for a in ("input_blocks", "middle_block", "output_blocks")):
        raise UnsupportedModelError(
            f"Attention Lab cannot patch a {type(dm).__name__} diffusion model; supported: {SUPPORTED_MODELS}. "
            f"Load one of those with a checkpoint loader.")
    ids = []
    groups = (("input", list(dm.input_blocks)), ("middle", [dm.middle_block]), ("output", list(dm.output_blocks)))
    for kind, blocks in groups:
        for number, block in enumerate(blocks):
            for layer in block:
                if isinstance(layer, SpatialTransformer):
                    ids += [LayerId(kind, number, d) for d in range(len(layer.transformer_blocks))]
    if not ids:
        raise UnsupportedModelError(f"the {type(dm).__name__} model has no cross-attention transformer "
                                    f"layers; supported: {SUPPORTED_MODELS}")
    return ids


def install_controller(m, controller: AttentionController, layers: list[LayerId],
                       self_attn: bool = True, cross_attn: bool = True) -> None:
    """Put ``controller`` on ``layers`` of the (already cloned) ModelPatcher ``m``, chaining onto
    whatever replace patch is there (ours, another pack's, or ComfyUI's 2-tuple fallback)."""
    replaces = m.model_options.get("transformer_options", {}).get("patches_replace", {})
    for lid in layers:
        for name, is_cross, wanted in (("attn1", False, self_attn), ("attn2", True, cross_attn)):
            if not wanted:
                continue
            existing = replaces.get(name, {})
            prev = existing.get((lid.kind, lid.number, lid.depth)) or existing.get((lid.kind, lid.number))
            patch = chain_patch(prev, controller, is_cross, comfy_attention)
            m.set_model_patch_replace(patch, name, lid.kind, lid.number, lid.depth)


def add_outer_sample_wrapper(m, key: str, before=None, after=None, on_success=None) -> None:
    """Run ``before()`` when a sampling run starts, ``on_success(samples)`` with its output when it succeeds,
    and ``after(ok)`` when it ends (also on errors)."""
    def wrapper(executor, *args, **kwargs):
        if before is not None:
            before()
        ok = False
        try:
            out = executor(*args, **kwargs)
            if on_success is not None:
                on_success(out)
            ok = True
            return out
        finally:
            if after is not None:
                after(ok)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, key, wrapper)


def require_finished_store(store) -> AttentionStore:
    """The store of a finished sampling run, or an error that says how to wire the graph."""
    if not isinstance(store, AttentionStore):
        raise TypeError(f"'store' must come from Attention Capture, got {type(store).__name__}")
    if store.empty:
        raise RuntimeError(
            "the attention store is empty: nothing was sampled with Attention Capture's MODEL yet. Sample "
            "with that MODEL and connect the sampler's LATENT output to this node's 'samples' input.")
    if not store.finished:
        raise RuntimeError("the last sampling run with this store did not finish (interrupted or failed); "
                           "queue the workflow again")
    return store


def check_store_run(store: AttentionStore, samples) -> None:
    """Refuse a store whose maps come from another sampling run than the LATENT wired to ``samples`` (two
    samplers on one captured MODEL: the store holds the last run only)."""
    if samples is None or not isinstance(samples, dict) or "samples" not in samples:
        return
    if store.matches_output(samples["samples"]) is False:
        raise ValueError(
            f"the attention store holds the maps of another sampling run than the LATENT connected to 'samples' "
            f"(the store keeps the last run with its MODEL, run {store.runs}, whose output differs). Give each "
            f"sampler its own Attention Capture, or view the maps before sampling again with the same MODEL.")


def _token_key(tokens: dict) -> str:
    return "l" if "l" in tokens else next(iter(tokens))


def token_key(clip) -> str:
    """The tokenizer key whose positions address cross-attention ('l' for SD/SDXL)."""
    return _token_key(clip.tokenize(""))


def encode_prompt(clip, prompt: str) -> list:
    """CONDITIONING of ``prompt``, exactly as CLIPTextEncode makes it."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(prompt))


PROXY_CANDIDATES = ("word-internal pieces (official)", "whole words")


def tokenizer_words(clip, candidates: str = PROXY_CANDIDATES[0]) -> list[str]:
    """Candidate words for proxy suggestions from the CLIP's tokenizer vocabulary. ``candidates``: the official
    ``prompt_utils`` keeps the vocabulary entries that are alphabetic, i.e. BPE pieces *without* the end-of-word
    mark (14,071 in SD's CLIP); "whole words" keeps the end-of-word entries instead (33,244; 7,858 shared).
    Word-level vocabularies (ShapesWorld) give the same list either way."""
    if candidates not in PROXY_CANDIDATES:
        raise ValueError(f"proxy candidates {candidates!r} is not one of {list(PROXY_CANDIDATES)}")
    tok = clip.tokenizer
    for holder in [tok] + [getattr(tok, a) for a in ("clip_l", "clip_g", "tok") if hasattr(tok, a)]:
        inner = getattr(holder, "tokenizer", holder)
        if hasattr(inner, "get_vocab"):
            vocab = inner.get_vocab()
            if candidates == PROXY_CANDIDATES[0]:
                return [w for w in vocab if w.isalpha()]
            return [w[:-4] for w in vocab if w.endswith("</w>") and w[:-4].isalpha()]
        if isinstance(getattr(inner, "vocab", None), (list, tuple)):
            return [w for w in inner.vocab if w.isalpha()]
    raise TypeError(f"cannot read a vocabulary from the {type(tok).__name__} tokenizer to suggest proxies; "
                    f"give the proxy words yourself")


def prompt_token_chunks(clip, prompt: str) -> tuple[list[list[int]], str]:
    tokens = clip.tokenize(prompt)
    key = _token_key(tokens)
    chunks = [[t[0] if isinstance(t[0], int) else -1 for t in chunk] for chunk in tokens[key]]
    return chunks, key


def word_ids(clip, word: str, key: str) -> list[int]:
    """Token ids of ``word`` alone, without BOS/EOS/padding, for any ComfyUI tokenizer; an embedding vector
    (``embedding:name``) is -1, as in ``prompt_token_chunks``."""
    empty = clip.tokenize("")[key][0]
    eos = empty[1][0]
    out = []
    for t in clip.tokenize(word)[key][0][1:]:
        tid = t[0] if isinstance(t[0], int) else -1
        if tid == eos:
            break
        out.append(tid)
    return out


def prompt_words(clip, prompt: str) -> PromptWords:
    """The pack's one word rule (``attention/words.py``) on this CLIP's tokenizer: case as the tokenizer sees
    it, ComfyUI emphasis, whole words, multi-token words, every 77-token chunk."""
    chunks, key = prompt_token_chunks(clip, prompt)
    return PromptWords(prompt, chunks, lambda w: word_ids(clip, w, key))


def word_positions(clip, prompt: str, words_text: str, what: str = "word") -> tuple[list[str], list[tuple[int, ...]]]:
    """Words from a comma-separated list and their key positions in ``prompt`` (an unknown word is refused,
    naming it and the prompt's words)."""
    return locate_words(prompt_words(clip, prompt), words_text, what)
