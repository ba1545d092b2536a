"""Shared ComfyUI glue: socket types, layer discovery, patch installation, word lookup."""

from __future__ import annotations

import comfy.patcher_extension
from comfy.ldm.modules.attention import SpatialTransformer, optimized_attention
from comfy_api.latest import io

from ..attention.controller import AttentionController
from ..attention.hook import HOOK_KEY, OVERRIDE_KEY, AttentionHook, Install, SlotMarker, with_foreign_slots
from ..attention.layers import LayerId
from ..attention.store import AttentionStore
from ..attention.words import ContextWords, PromptWords, locate_words
from .dit import dit_info, prepare_dit_call

AttentionStoreType = io.Custom("ATTENTION_STORE")
InversionType = io.Custom("ATTENTION_LAB_INVERSION")
CATEGORY = "attention_lab"
SUPPORTED_MODELS = "SD1.x, SD2.x and SDXL UNet checkpoints, and the ShapesWorld model"
DIT_NODES = ("Attention Capture, Attention Map View, Self-Attention Cluster, Prompt Mix Sampler and P2P Edit "
             "Sampler")


class UnsupportedModelError(TypeError):
    pass


def comfy_attention(q, k, v, heads):
    return optimized_attention(q, k, v, heads)


def model_layer_ids(model, dit: bool = False) -> list[LayerId]:
    """Every attention layer of the MODEL's diffusion model: (kind, number, depth) of a UNet, or ("double" |
    "single", block, 0) of a Flux / SD3 DiT when the node supports those (``dit``)."""
    dm = model.get_model_object("diffusion_model")
    if hasattr(dm, "attention_layer_ids"):
        return list(dm.attention_layer_ids())
    info = dit_info(dm)
    if info is not None:
        if not dit:
            raise UnsupportedModelError(
                f"this node cannot patch a {type(dm).__name__} (DiT) diffusion model yet; supported: "
                f"{SUPPORTED_MODELS}. On Flux and SD3/3.5 models use {DIT_NODES}.")
        return info.layer_ids()
    if not all(hasattr(dm, a) for a in ("input_blocks", "middle_block", "output_blocks")):
        raise UnsupportedModelError(
            f"Attention Lab cannot patch a {type(dm).__name__} diffusion model; supported: {SUPPORTED_MODELS} "
            f"(and Flux, SD3/3.5 for {DIT_NODES}). Load one of those with a checkpoint loader.")
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
    """Put ``controller`` on ``layers`` of the (already cloned) ModelPatcher ``m`` through the pack's attention hook
    (``attention/hook.py``): one ``transformer_options["optimized_attention_override"]``, chained onto an override
    already on the model, two slot markers (attn1/attn2 patch lists) and an APPLY_MODEL wrapper that prepares each
    model call. No attn1/attn2 replace slot is taken: other packs' replace objects stay theirs (a layer whose slot
    one of them owns is observed around its function, see ``hook.with_foreign_slots``)."""
    to = m.model_options.setdefault("transformer_options", {})
    hook, current = to.get(HOOK_KEY), to.get(OVERRIDE_KEY)
    if hook is None:
        hook = AttentionHook(previous=current, kernel=comfy_attention,
                             dit=dit_info(m.get_model_object("diffusion_model")))
    elif current is not hook:   # another override went on after ours (calling ours as its previous, we trust)
        hook = AttentionHook(hook.installs, previous=current, kernel=hook.kernel, tracker=hook.tracker, dit=hook.dit)
    hook = hook.with_install(Install(controller, frozenset(layers), self_attn, cross_attn))
    to[OVERRIDE_KEY] = to[HOOK_KEY] = hook
    patches = to.get("patches", {})
    for name, marker in hook.markers().items():
        if not any(isinstance(p, SlotMarker) and p.tracker is hook.tracker for p in patches.get(name, [])):
            m.set_model_patch(marker, name)
    kind = comfy.patcher_extension.WrappersMP.APPLY_MODEL
    if not comfy.patcher_extension.get_wrappers_with_key(kind, HOOK_KEY, to):
        comfy.patcher_extension.add_wrapper_with_key(kind, HOOK_KEY, prepare_model_call, to)


def prepare_model_call(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                       **kwargs):
    """APPLY_MODEL wrapper: this call's transformer_options with our per-call preparation (``hook.py``: proxies
    in front of other packs' attention slots; ``joint.py``: DiT block proxies and token layout); the MODEL's
    options are not changed."""
    to = transformer_options if transformer_options is not None else {}
    hook = to.get(HOOK_KEY)
    if hook is not None:
        to = with_foreign_slots(to)
        if hook.dit is not None:
            to = prepare_dit_call(hook, to, x, t, c_crossattn, kwargs, executor.class_obj)
    return executor(x, t, c_concat, c_crossattn, control, to, **kwargs)


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
            ids = inner.get_vocab()
            vocab = sorted(ids, key=ids.get)        # id order, as vocab.json (get_vocab's order may vary)
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
    return _chunks(tokens[key]), key


def _chunks(chunks) -> list[list[int]]:
    return [[t[0] if isinstance(t[0], int) else -1 for t in chunk] for chunk in chunks]


def _sub_tokenizer(clip, key: str):
    return getattr(clip.tokenizer, {"l": "clip_l", "g": "clip_g"}.get(key, key), None)


def word_ids(clip, word: str, key: str) -> list[int]:
    """Token ids of ``word`` alone, without BOS/EOS/padding, for any ComfyUI tokenizer (T5: no BOS); an embedding
    vector (``embedding:name``) is -1, as in ``prompt_token_chunks``."""
    sub = _sub_tokenizer(clip, key)
    if sub is not None and hasattr(sub, "tokens_start"):
        start, eos = sub.tokens_start, sub.end_token
    else:
        start, eos = 1, clip.tokenize("")[key][0][1][0]
    out = []
    for t in clip.tokenize(word)[key][0][start:]:
        tid = t[0] if isinstance(t[0], int) else -1
        if tid == eos:
            break
        out.append(tid)
    return out


def context_parts(clip, tokens: dict) -> list[tuple[str, int]]:
    """(tokenizer key, first key position) of each part of the text context the CLIP's conditioning holds, in
    order: SD3 concatenates its CLIP-L/G part (77 per chunk) and its T5 part along the tokens; Flux's context is its
    T5 part alone (CLIP-L gives the pooled vector only); SD1.x/SDXL/ShapesWorld have one part."""
    import comfy.text_encoders.flux
    import comfy.text_encoders.sd3_clip
    te = clip.cond_stage_model
    if isinstance(te, comfy.text_encoders.flux.FluxClipModel):
        return [("t5xxl", 0)]
    if isinstance(te, comfy.text_encoders.sd3_clip.SD3ClipModel):
        parts, offset = [], 0
        clip_keys = [k for k, enc in (("l", te.clip_l), ("g", te.clip_g)) if enc is not None]
        if clip_keys:
            parts.append((clip_keys[0], 0))
            offset = min(sum(len(c) for c in tokens[k]) for k in clip_keys)
        if te.t5xxl is not None:
            parts.append(("t5xxl", offset))
        return parts
    return [(_token_key(tokens), 0)]


def prompt_words(clip, prompt: str) -> PromptWords | ContextWords:
    """The pack's one word rule (``attention/words.py``) on this CLIP's tokenizers: case as the tokenizer sees
    it, ComfyUI emphasis, whole words, multi-token words, every 77-token chunk, and each part of a context several
    text encoders fill (SD3: CLIP-L/G then T5)."""
    tokens = clip.tokenize(prompt)
    parts = context_parts(clip, tokens)
    made = [(PromptWords(prompt, _chunks(tokens[key]), lambda w, key=key: word_ids(clip, w, key)), offset)
            for key, offset in parts]
    if len(made) == 1 and made[0][1] == 0:
        return made[0][0]
    return ContextWords(prompt, made)


def word_positions(clip, prompt: str, words_text: str, what: str = "word") -> tuple[list[str], list[tuple[int, ...]]]:
    """Words from a comma-separated list and their key positions in ``prompt`` (an unknown word is refused,
    naming it and the prompt's words)."""
    return locate_words(prompt_words(clip, prompt), words_text, what)
