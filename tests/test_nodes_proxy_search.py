"""Tier 2: PromptMixSampler's proxy search (nodes/proxy_search.py) in ComfyUI.

* Batched pooled features equal the one-prompt-at-a-time ``CLIP.encode_from_tokens`` on SD1.5's real text
  encoder architecture (random weights), on SD2's and SDXL's layouts, cut after the end token or not.
* The search ranks only candidates of the object word's token count; a second search with the same text
  encoder reads the cache, another encoder (other weights, a LoRA patch) never does; a damaged cache file is
  rebuilt; an interrupted search keeps what it encoded; the progress bar counts the prompts.
"""

from __future__ import annotations

import logging

import pytest
import torch
from comfy_env import comfy_or_skip, encode, sd15_clip, tiny_clip, tiny_sd15, tiny_sdxl_clip

pack = comfy_or_skip()

import comfy.model_management as mm  # noqa: E402
import folder_paths  # noqa: E402
from attention_lab.attention.prompt_mixing import PROXY_TEMPLATE  # noqa: E402
from attention_lab.nodes import proxy_search  # noqa: E402
from attention_lab.nodes.common import PROXY_CANDIDATES, token_key, tokenizer_words, word_ids  # noqa: E402
from attention_lab.nodes.prompt_mix import PromptMixSampler  # noqa: E402

PROMPT = "a cat and a dog in a garden"
OFFICIAL = PROXY_CANDIDATES[0]
SHORT, SHORT_FIT = 3000, 1937       # SD's first 3,000 vocabulary entries: 2,814 candidates, 1,937 of 1 token


def max_rel(a, b):
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max())


def probe_texts(clip):
    vocab = tokenizer_words(clip)
    longest = max(vocab, key=lambda w: len(word_ids(clip, w, "l")))     # a 55-token entry in SD's CLIP
    return [PROXY_TEMPLATE.format(word=w) for w in ("cat", "ing", "hamburger", longest)] + [
        "a (cat:1.3) on a [mat]", "a photo of " + "a very long prompt " * 20]   # emphasis; two 77-token chunks


@pytest.fixture(scope="module")
def sd15():
    with torch.inference_mode():
        clip = sd15_clip()
    return clip, probe_texts(clip)


def test_batched_features_equal_one_prompt_at_a_time_on_sd15s_text_encoder(sd15):
    clip, texts = sd15
    enc = proxy_search.PooledTextEncoder(clip)
    with torch.inference_mode():
        ref = enc.plain(texts)
        assert enc.mode == "shared-prefix" and enc.probe(texts[:2]) == "shared-prefix"
        for mode in ("shared-prefix", "truncated", "batched"):
            enc.mode = mode
            got = enc.encode(texts)
            assert got.shape == ref.shape == (len(texts), 768) and max_rel(got, ref) < 1e-5, mode
        # the sequences really are cut after the end token, and the shared prefix runs once
        text = enc.enc.transformer.text_model
        seen = {"encoder": [], "layer 0": []}
        hooks = [text.encoder.register_forward_pre_hook(lambda m, a: seen["encoder"].append(tuple(a[0].shape[:2]))),
                 text.encoder.layers[0].layer_norm1.register_forward_pre_hook(
                     lambda m, a: seen["layer 0"].append(tuple(a[0].shape[:2])))]
        try:
            enc.mode = "truncated"
            enc.encode(texts[:2])
            assert seen["encoder"] == [(2, 7)]                 # BOS 'a photo of a cat' EOS; '... ing' alike
            seen["layer 0"].clear()
            enc.mode = "shared-prefix"
            enc.encode(texts[:2])
            assert seen["layer 0"] == [(1, 5), (2, 2)]          # BOS 'a photo of a' once; the word and EOS per row
        finally:
            for h in hooks:
                h.remove()


def test_a_batched_mode_that_disagrees_falls_back(sd15, monkeypatch, caplog):
    clip, texts = sd15
    enc = proxy_search.PooledTextEncoder(clip)
    monkeypatch.setattr(enc, "_truncated", lambda rows, device: enc._batched(rows, device) * 1.01)
    with torch.inference_mode(), caplog.at_level(logging.WARNING, logger="attention_lab"):
        assert enc.probe(texts[:2]) == "batched"
    assert "shared-prefix pooled features differ" in caplog.text and "truncated pooled features differ" in caplog.text


@pytest.mark.parametrize("layout", ["sd2", "sdxl"])
def test_cut_batches_equal_one_prompt_at_a_time_on_sd2_and_sdxl_layouts(layout):
    if layout == "sdxl":
        clip = tiny_sdxl_clip()          # pooled output: clip_g's, projected
    else:                                # OpenCLIP-H layout: pads with 0, projected pooled output
        import comfy.sd
        import comfy.supported_models_base
        from comfy.text_encoders import sd2_clip
        cfg = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_hidden_layers": 3,
               "projection_dim": 64}
        clip = comfy.sd.CLIP(target=comfy.supported_models_base.ClipTarget(sd2_clip.SD2Tokenizer,
                                                                           sd2_clip.SD2ClipModel),
                             model_options={"clip_h_model_config": cfg})
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in clip.cond_stage_model.parameters():
                p.copy_((torch.randn(p.shape, generator=g) * 0.05).to(p.dtype))
    enc = proxy_search.PooledTextEncoder(clip)
    texts = [PROXY_TEMPLATE.format(word=w) for w in ("cat", "ing", "hamburger", "bicycles")] + [PROMPT]
    with torch.inference_mode():
        assert enc.probe(texts) == "shared-prefix"
        ref = enc.plain(texts)
        for mode in ("shared-prefix", "truncated"):
            enc.mode = mode
            assert max_rel(enc.encode(texts), ref) < 1e-5, mode


# ---------------------------------------------------------------------------------------------- the search
@pytest.fixture()
def cache_folder(tmp_path, monkeypatch):
    monkeypatch.setitem(folder_paths.folder_names_and_paths, proxy_search.CACHE_FOLDER, ([str(tmp_path)], set()))
    return tmp_path / "proxy_search"


class Spy:
    """Records what the search ranks and how many prompts it encodes; ``entries``: search only the first entries
    of the vocabulary (a shorter test)."""

    def __init__(self, monkeypatch, entries: int | None = None):
        self.ranked, self.encoded = [], 0
        if entries is not None:
            real_words = proxy_search.tokenizer_words
            monkeypatch.setattr(proxy_search, "tokenizer_words", lambda clip, c: real_words(clip, c)[:entries])
        real_rank, real_encode = proxy_search.suggest_proxies, proxy_search.PooledTextEncoder.encode

        def rank(encode_pooled, vocab, *a, **kw):
            self.ranked.append(list(vocab))
            return real_rank(encode_pooled, vocab, *a, **kw)

        def enc(encoder, texts, progress=None):
            self.encoded += len(texts)
            return real_encode(encoder, texts, progress)
        monkeypatch.setattr(proxy_search, "suggest_proxies", rank)
        monkeypatch.setattr(proxy_search.PooledTextEncoder, "encode", enc)

    def search(self, clip, word="cat", prompt=PROMPT, count=4):
        self.encoded = 0
        with torch.inference_mode():
            return proxy_search.suggest(clip, prompt, word, count, OFFICIAL)


def test_candidates_fit_the_object_word_and_a_second_search_reads_the_cache(cache_folder, monkeypatch, caplog):
    clip, spy = tiny_clip(), Spy(monkeypatch)
    key = token_key(clip)
    first = spy.search(clip)
    cold = spy.encoded
    candidates = spy.ranked[-1]
    assert len(candidates) == 7635 and len(first) == 4                # of 14,070 entries, the 1-token ones
    assert all(len(word_ids(clip, w, key)) == 1 for w in candidates + first)
    files = list(cache_folder.glob("*.safetensors"))
    assert len(files) == 1 and cold > 7635
    with caplog.at_level(logging.INFO, logger="attention_lab"):
        again = spy.search(clip)
    assert again == first and spy.encoded < 70                         # spot check, probe, references, shortlist
    assert "read 7635 cached vocabulary features" in caplog.text
    # a 2-token object word: other candidates, the 1-token ones' features stay cached
    assert len(word_ids(clip, "teacup", key)) == 2
    proxies = spy.search(clip, "teacup", "a teacup and a dog in a garden", 3)
    assert all(len(word_ids(clip, w, key)) == 2 for w in spy.ranked[-1] + proxies) and len(proxies) == 3
    assert len(spy.ranked[-1]) == 5677 and 5677 < spy.encoded < 5677 + 70
    assert list(cache_folder.glob("*.safetensors")) == files


def test_another_text_encoder_never_reads_the_cache(cache_folder, monkeypatch):
    spy = Spy(monkeypatch, SHORT)
    clip = tiny_clip()
    spy.search(clip)
    lora = clip.clone()                  # a patch on one weight, as a LoRA on the text encoder makes
    lora.add_patches({"clip_l.transformer.text_model.final_layer_norm.bias": (torch.full((64,), 0.5),)}, 1.0)
    other = tiny_clip()
    with torch.no_grad():
        other.cond_stage_model.clip_l.transformer.text_model.embeddings.token_embedding.weight[7944] += 0.01
    for c in (lora, other):
        spy.search(c)
        assert spy.encoded > SHORT_FIT
    assert len(list(cache_folder.glob("*.safetensors"))) == 3
    spy.search(clip)
    assert spy.encoded < 70


def test_a_damaged_cache_file_is_rebuilt(cache_folder, monkeypatch, caplog):
    clip, spy = tiny_clip(), Spy(monkeypatch, SHORT)
    first = spy.search(clip)
    (path,) = cache_folder.glob("*.safetensors")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="attention_lab"):
        assert spy.search(clip) == first
    assert "is unusable" in caplog.text and spy.encoded > SHORT_FIT
    spy.search(clip)
    assert spy.encoded < 70


def test_an_interrupted_search_keeps_what_it_encoded(cache_folder, monkeypatch):
    clip, spy = tiny_clip(), Spy(monkeypatch, SHORT)
    bars = []

    class Bar:
        def __init__(self, total):
            self.total, self.values = total, []
            bars.append(self)

        def update_absolute(self, value, total=None, preview=None):
            self.values.append((value, total))
            if len(bars) == 1 and value >= 1024:
                mm.interrupt_current_processing(True)
    monkeypatch.setattr(proxy_search.comfy.utils, "ProgressBar", Bar)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            spy.search(clip)
    finally:
        mm.interrupt_current_processing(False)
    assert bars[0].total == SHORT_FIT and bars[0].values[-1][0] < SHORT_FIT and len(spy.ranked) == 0
    spy.search(clip)
    assert len(bars) == 2 and bars[1].total == SHORT_FIT - 1024        # only the rest is encoded
    assert bars[1].values[-1] == (bars[1].total, bars[1].total)


def test_the_node_with_empty_proxy_words_samples_the_suggestions(cache_folder, monkeypatch):
    Spy(monkeypatch, SHORT)
    with torch.inference_mode():
        model, clip = tiny_sd15(), tiny_clip()
        latents, masks, proxies = PromptMixSampler.execute(
            model, clip, PROMPT, encode(clip, ""), {"samples": torch.zeros(1, 4, 16, 16)}, "cat", "", 3, "dog",
            3, 4, 7.5, "simple", 0.14, 0.34, 0.8, 0.05, 0.7, 5, 0.3).result
    words = proxies.split(", ")
    assert len(words) == 3 and latents["samples"].shape[0] == 4 and "cat" not in words
    assert all(len(word_ids(clip, w, "l")) == 1 for w in words)
