"""Prompt mixing's proxy search in ComfyUI: which vocabulary words to try when proxy_words is empty.

Glue around ``attention/prompt_mixing.py`` ``suggest_proxies`` (upstream ``prompt_utils.get_proxy_words``):
* candidates are the tokenizer's vocabulary entries (``tokenizer_words``) *of the object word's token count*
  (the node swaps values token by token and refuses another count; upstream ranks them all);
* the pooled features of the template prompts are computed in batches (``PooledTextEncoder``), for SD-family
  CLIP text encoders on sequences cut after the end token: the pooled output is the final layer's state at
  the first end token and the encoder is causal, so the padding after it changes nothing; and the tokens all
  rows of a batch begin with ('<start> a photo of a') run once, their keys and values shared (checked on every
  run against ``CLIP.encode_from_tokens``, with plain cut batches, full-length batches and one prompt at a
  time as fallbacks);
* the features are cached on disk per text encoder (``attention/text_feature_cache.py``) in the folder
  ``attention_lab_cache`` (default ``models/attention_lab_cache``; extra_model_paths.yaml can move it), named
  by a digest of the encoder's weights, its LoRA patches, the tokenizers and the template;
* a ProgressBar counts the prompts, the loop stops on ComfyUI's interrupt (what was encoded is kept).
"""

from __future__ import annotations

import time
from pathlib import Path

import comfy.clip_model
import comfy.model_management as mm
import comfy.ops
import comfy.utils
import folder_paths
import torch
from comfy.ldm.modules.attention import optimized_attention_for_device

from ..attention import logger
from ..attention import text_feature_cache as tfc
from ..attention.prompt_mixing import PROXY_TEMPLATE, proxy_candidates, suggest_proxies
from ..attention.words import split_word_list
from .common import token_key, tokenizer_words, word_ids

CACHE_FOLDER = "attention_lab_cache"        # folder_paths name; default models/attention_lab_cache
TOKEN_BUDGET = 16384                        # tokens per text-encoder call (batch rows x sequence length)
PROBE_RTOL = 1e-3                           # batched vs one-at-a-time pooled features, relative L2 per row
CACHE_RTOL = 1e-2                           # cached vs fresh features (another device may round differently)
SAVE_EVERY_S = 60.0


def cache_dir() -> Path:
    """The cache folder: the first path of ComfyUI's folder ``attention_lab_cache`` (registered on first use
    as ``models/attention_lab_cache`` unless extra_model_paths.yaml names one)."""
    if CACHE_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(CACHE_FOLDER, str(Path(folder_paths.models_dir) / CACHE_FOLDER))
    return Path(folder_paths.get_folder_paths(CACHE_FOLDER)[0]) / "proxy_search"


def _pooled_encoder(cond_stage_model):
    """(SDClipModel, tokens key) whose pooled output ``CLIP.encode_from_tokens`` returns, or None."""
    import comfy.sd1_clip
    import comfy.sdxl_clip
    if isinstance(cond_stage_model, comfy.sdxl_clip.SDXLClipModel):
        return cond_stage_model.clip_g, "g"
    if isinstance(cond_stage_model, comfy.sd1_clip.SD1ClipModel):
        return getattr(cond_stage_model, cond_stage_model.clip), cond_stage_model.clip_name
    return None


MODES = ("shared-prefix", "truncated", "batched", "per-text")     # fastest first; probe() falls back in order


class PooledTextEncoder:
    """Pooled text features of many texts, as ``clip.encode_from_tokens(clip.tokenize(t), return_pooled=True)[1]``
    gives them one by one. ``mode`` (chosen by ``probe``): "shared-prefix" (batches cut after the end token,
    the tokens every row of a batch begins with run once), "truncated" (batches cut after the end token),
    "batched" (full-length batches through the encoder's own forward) or "per-text" (the public call)."""

    def __init__(self, clip):
        self.clip = clip
        found = _pooled_encoder(clip.cond_stage_model)
        self.enc, self.key = found if found is not None else (None, None)
        self.mode = "per-text"
        if self.enc is not None and self.enc.special_tokens.get("end") is not None:
            cut = isinstance(self.enc.transformer, comfy.clip_model.CLIPTextModel)
            self.mode = "shared-prefix" if cut else "batched"
        self.module = self.enc if self.enc is not None else clip.cond_stage_model

    # -- the ways -----------------------------------------------------------------------------------------
    def plain(self, texts: list[str]) -> torch.Tensor:
        out = [self.clip.encode_from_tokens(self.clip.tokenize(t), return_pooled=True)[1] for t in texts]
        return torch.cat([o.reshape(1, -1).float().cpu() for o in out])

    def _prepare(self) -> torch.device:
        """As ``encode_from_tokens``: default options (clip-skip does not reach the pooled output), the model
        loaded with its patches, the execution device set."""
        cm = self.clip.cond_stage_model
        cm.reset_clip_options()
        self.clip.load_model()
        cm.set_clip_options({"execution_device": self.clip.patcher.load_device})
        return self.clip.patcher.load_device

    def _truncated(self, rows: list[list[int]], device) -> torch.Tensor:
        """Pooled features of token rows, each cut after its first end token (rows padded to the longest)."""
        eos = self.enc.special_tokens["end"]
        ends = [r.index(eos) for r in rows]
        n = max(ends) + 1
        text = self.enc.transformer.text_model
        ids = torch.tensor([r[:n] for r in rows], device=device, dtype=torch.long)              # (b, n)
        pos = comfy.ops.cast_to(text.embeddings.position_embedding.weight, dtype=torch.float32, device=device)[:n]
        shared = 0                      # leading positions equal in every row, before every end token
        while shared < min(ends) and bool((ids[:, shared] == ids[0, shared]).all()):
            shared += 1
        if self.mode != "shared-prefix" or shared < 2:
            shared = 0
        x = text.embeddings.token_embedding(ids[:, shared:], out_dtype=torch.float32) + pos[shared:]   # (b, u, c)
        if shared:
            prefix = text.embeddings.token_embedding(ids[:1, :shared], out_dtype=torch.float32) + pos[:shared]
            x = _layers_after_prefix(text.encoder, prefix, x)
        else:
            causal = torch.full((n, n), -torch.finfo(x.dtype).max, dtype=x.dtype, device=device).triu_(1)
            x, _ = text.encoder(x, mask=causal)
        x = text.final_layer_norm(x)
        pooled = x[torch.arange(len(rows), device=device), torch.tensor(ends, device=device) - shared]  # (b, c)
        if self.enc.return_projected_pooled:
            pooled = self.enc.transformer.text_projection(pooled)
        return pooled.float().cpu()

    def _batched(self, rows: list[list[int]], device) -> torch.Tensor:
        return self.enc(rows)[1].float().cpu()

    def _rows(self, texts: list[str]) -> list[list[int] | None]:
        """First-chunk token ids of each text (the pooled output is the first chunk's); None for a text with an
        embedding in it (encoded one at a time)."""
        out = []
        for t in texts:
            chunk = self.clip.tokenize(t)[self.key][0]
            out.append([tok[0] for tok in chunk] if all(isinstance(tok[0], int) for tok in chunk) else None)
        return out

    # -- public -------------------------------------------------------------------------------------------
    def encode(self, texts: list[str], progress=None) -> torch.Tensor:
        """(len(texts), d) float32 CPU pooled features. ``progress(done, total)`` after each call; stops on
        ComfyUI's interrupt."""
        if self.mode == "per-text" or not texts:
            out = []
            for i, t in enumerate(texts):
                mm.throw_exception_if_processing_interrupted()
                out.append(self.plain([t]))
                if progress is not None:
                    progress(i + 1, len(texts))
            return torch.cat(out) if out else torch.zeros(0, 0)
        rows = self._rows(texts)
        out: list[torch.Tensor | None] = [None] * len(texts)
        for i, r in enumerate(rows):
            if r is None:
                out[i] = self.plain([texts[i]])[0]
        eos = self.enc.special_tokens["end"]
        truncated = self.mode in ("shared-prefix", "truncated")

        def length(i):
            return rows[i].index(eos) + 1 if truncated else len(rows[i])
        todo = sorted((i for i, r in enumerate(rows) if r is not None), key=length)
        device, done = self._prepare(), len(texts) - len(todo)
        step = self._truncated if truncated else self._batched
        j = 0
        with torch.inference_mode():
            while j < len(todo):
                n, k = length(todo[j]), j + 1           # rows of one length (sorted): no padding
                while k < len(todo) and length(todo[k]) == n and (k + 1 - j) * n <= TOKEN_BUDGET:
                    k += 1
                batch = todo[j:k]
                mm.throw_exception_if_processing_interrupted()
                for i, f in zip(batch, step([rows[i] for i in batch], device)):
                    out[i] = f
                done += len(batch)
                j = k
                if progress is not None:
                    progress(done, len(texts))
        return torch.stack(out)

    def probe(self, texts: list[str]) -> str:
        """Check the batched mode against the one-at-a-time call on ``texts`` (different lengths); fall back
        (shared-prefix -> truncated -> batched -> per-text) while they disagree. Returns the mode kept."""
        if self.mode == "per-text":
            return self.mode
        ref = self.plain(texts)
        while self.mode != "per-text":
            got = self.encode(texts)
            if tfc.close(got, ref, PROBE_RTOL):
                return self.mode
            err = float(((got - ref).norm(dim=-1) / ref.norm(dim=-1).clamp(min=1e-12)).max())
            fallback = MODES[MODES.index(self.mode) + 1]
            logger.warning("proxy search: %s pooled features differ from CLIP.encode_from_tokens by %.2e (relative); "
                           "using %s encoding", self.mode, err, fallback)
            self.mode = fallback
        return self.mode


def _layers_after_prefix(encoder, prefix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The causal CLIP ``encoder``'s final states of ``x`` (b, u, c), the positions that follow the shared
    ``prefix`` (1, p, c) in every row: each layer as ``comfy.clip_model.CLIPLayer`` (pre-norm attention, then
    MLP, both residual) with its own modules, the prefix's keys and values computed once (a key-value cache).
    Equal to running the whole rows (tests/test_nodes_proxy_search.py; checked again by ``probe``)."""
    p, (b, u, _) = prefix.shape[1], x.shape
    attention = optimized_attention_for_device(x.device, mask=True, small_input=True)
    big = -torch.finfo(x.dtype).max
    prefix_mask = torch.full((p, p), big, dtype=x.dtype, device=x.device).triu_(1)
    rows_mask = torch.full((u, p + u), big, dtype=x.dtype, device=x.device).triu_(p + 1)   # row i sees <= p + i
    for layer in encoder.layers:
        a = layer.self_attn
        h = layer.layer_norm1(prefix)
        k_pre, v_pre = a.k_proj(h), a.v_proj(h)
        prefix = prefix + a.out_proj(attention(a.q_proj(h), k_pre, v_pre, a.heads, prefix_mask))
        prefix = prefix + layer.mlp(layer.layer_norm2(prefix))
        h = layer.layer_norm1(x)
        k = torch.cat([k_pre.expand(b, -1, -1), a.k_proj(h)], dim=1)
        v = torch.cat([v_pre.expand(b, -1, -1), a.v_proj(h)], dim=1)
        x = x + a.out_proj(attention(a.q_proj(h), k, v, a.heads, rows_mask))
        x = x + layer.mlp(layer.layer_norm2(x))
    return x


def _tokenizer_parts(clip) -> list:
    """What decides the tokens: per (sub)tokenizer its class, special tokens, length, vocabulary and merges."""
    tok = clip.tokenizer
    parts = [type(tok).__qualname__]
    holders = [tok] + [v for k, v in sorted(vars(tok).items()) if hasattr(v, "tokenize_with_weights")]
    for h in holders:
        inner = getattr(h, "tokenizer", None)
        parts.append([type(h).__qualname__, getattr(h, "start_token", None), getattr(h, "end_token", None),
                      getattr(h, "pad_token", None), getattr(h, "max_length", None),
                      getattr(h, "pad_with_end", None), type(inner).__qualname__])
        if inner is not None and hasattr(inner, "get_vocab"):
            parts.append(sorted(inner.get_vocab().items()))
            ranks = getattr(inner, "bpe_ranks", None)
            if isinstance(ranks, dict):
                parts.append(sorted((list(k), v) for k, v in ranks.items()))
        elif isinstance(getattr(inner, "vocab", None), (list, tuple)):
            parts.append(list(inner.vocab))
    return parts


def cache_key(clip, encoder: PooledTextEncoder, template: str = PROXY_TEMPLATE) -> str:
    """Digest of the pooled encoder's weights as loaded (dtype, shape, bytes), the LoRA-style patches on the
    CLIP, the tokenizers and the template: equal only for the same text encoder."""
    m = encoder.module
    parts = [tfc.FORMAT, template, type(clip.cond_stage_model).__qualname__, type(m).__qualname__,
             bool(getattr(m, "return_projected_pooled", False)), getattr(m, "special_tokens", None),
             _tokenizer_parts(clip), sorted(m.state_dict().items()), clip.patcher.patches]
    return tfc.digest(parts)[:32]


def _load_cache(path: Path, key: str, encoder: PooledTextEncoder) -> tfc.VocabFeatures:
    cache = tfc.read(path, key, PROXY_TEMPLATE)
    if cache is None:
        return tfc.VocabFeatures(key, PROXY_TEMPLATE)
    stored = list(cache.features)
    if stored:      # spot check: a few stored features against the encoder now
        sample = [stored[i * (len(stored) - 1) // 3] for i in range(4)] if len(stored) > 3 else stored
        fresh = encoder.encode([PROXY_TEMPLATE.format(word=w) for w in sample])
        if not tfc.close(cache.stack(sample), fresh, CACHE_RTOL):
            logger.warning("proxy search cache %s does not match this text encoder's output; rebuilding it", path)
            return tfc.VocabFeatures(key, PROXY_TEMPLATE)
    logger.info("proxy search: read %d cached vocabulary features from %s", len(stored), path)
    return cache


def _encode_missing(cache: tfc.VocabFeatures, todo: list[str], encoder: PooledTextEncoder, path: Path) -> None:
    """Encode the template prompts of ``todo`` into ``cache``, saving every SAVE_EVERY_S and at the end (also when
    interrupted: a re-queue continues)."""
    pbar = comfy.utils.ProgressBar(len(todo))
    start = last_save = last_log = time.monotonic()
    chunk = 1024                                  # entries per encode() call (saves and logs between)
    logger.info("proxy search: encoding %d vocabulary prompts with the text encoder (%s batches); cached in %s",
                len(todo), encoder.mode, path)
    try:
        for i in range(0, len(todo), chunk):
            part = todo[i:i + chunk]
            feats = encoder.encode([PROXY_TEMPLATE.format(word=w) for w in part],
                                   progress=lambda d, _t, i=i: pbar.update_absolute(i + d, len(todo)))
            cache.features.update(zip(part, feats))
            now = time.monotonic()
            if now - last_log > 10:
                logger.info("proxy search: %d / %d vocabulary prompts encoded (%.0f s)", i + len(part), len(todo),
                            now - start)
                last_log = now
            if now - last_save > SAVE_EVERY_S:
                tfc.write(path, cache)
                last_save = now
    finally:
        tfc.write(path, cache)
    logger.info("proxy search: %d vocabulary prompts encoded in %.1f s", len(todo), time.monotonic() - start)


def suggest(clip, prompt: str, word: str, count: int, candidates: str) -> list[str]:
    """``count`` proxies for ``word`` in ``prompt`` from the vocabulary entries ``candidates`` (see
    ``tokenizer_words``) of the object word's token count, ranked as upstream (``suggest_proxies``)."""
    key = token_key(clip)
    n_word = len(word_ids(clip, word, key))
    words = proxy_candidates(tokenizer_words(clip, candidates), word)
    encoder = PooledTextEncoder(clip)
    probe = [word] + words[:3] + ([max(words, key=len)] if words else [])     # one batch of equal rows, a long one
    encoder.probe([PROXY_TEMPLATE.format(word=w) for w in probe] + [prompt])
    path = cache_dir() / f"{cache_key(clip, encoder)}.safetensors"
    cache = _load_cache(path, path.stem, encoder)
    new_counts = [w for w in words if w not in cache.counts]
    for w in new_counts:
        cache.counts[w] = len(word_ids(clip, w, key))
    fitting = [w for w in words if cache.counts[w] == n_word]
    if not fitting:
        raise ValueError(f"no vocabulary entry of this CLIP is {n_word} token(s) like the object word {word!r}, so "
                         f"none can be its proxy (values are swapped token by token); type proxies of {n_word} "
                         f"token(s) into proxy_words")
    todo = [w for w in fitting if w not in cache.features]
    logger.info("proxy search: %d of %d candidate entries are %d token(s) like %r; %d cached, %d to encode",
                len(fitting), len(words), n_word, word, len(fitting) - len(todo), len(todo))
    if todo:
        _encode_missing(cache, todo, encoder, path)
    elif new_counts:
        tfc.write(path, cache)
    return suggest_proxies(encoder.encode, fitting, prompt, word, count, vocab_features=cache.stack)


def proxies(clip, prompt: str, word: str, proxy_words: str, count: int, candidates: str) -> list[str]:
    """The node's proxies: the typed ``proxy_words``, or ``count`` suggestions when it is empty."""
    given = split_word_list(proxy_words)
    if given:
        return given
    words = suggest(clip, prompt, word, count, candidates)
    logger.info("PromptMixSampler: suggested proxies for %r: %s", word, words)
    return words
