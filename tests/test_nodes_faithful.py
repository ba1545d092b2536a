"""Tier 2: the upstream defaults as the nodes really run them in ComfyUI (issue 26; docs/faithful-ports.md):
DPL's token initialization through ComfyUI's SD1 CLIP tokenizer files, P2P Edit Sampler's self-attention limit
from a seed and from an inversion, Prompt Mix Sampler's default blend nouns, and the defaults of the inputs that
keep a departure from upstream optional."""

import json
from pathlib import Path

import torch
from comfy_env import comfy_or_skip, encode

pack = comfy_or_skip()

import comfy.sd1_clip  # noqa: E402
from attention_lab.attention.p2p import P2PController  # noqa: E402
from attention_lab.nodes import prompt_mix as prompt_mix_node  # noqa: E402
from attention_lab.nodes.dpl import DPLTokenOptimizer  # noqa: E402
from attention_lab.nodes.inversion import NullTextInvert  # noqa: E402
from attention_lab.nodes.learnable_tokens import initial_values, locate  # noqa: E402
from attention_lab.nodes.p2p import P2PEditSampler  # noqa: E402
from attention_lab.nodes.prompt_mix import PromptMixSampler  # noqa: E402

SRC = "a cat and a dog in a garden"



def official_initializer_ids(words: list[str]) -> list[int]:
    """``_3_dpl_inv.py``: ``tokenizer.encode(args.initializer_token, add_special_tokens=False)`` on a list of
    strings is ``convert_tokens_to_ids`` of each string: its vocab.json entry as written, i.e. the word-internal
    BPE piece without '</w>', and the unknown token (CLIP's <|endoftext|>) where there is none."""
    vocab = json.loads((Path(comfy.sd1_clip.__file__).parent / "sd1_tokenizer" / "vocab.json").read_text())
    return [vocab.get(w, vocab["<|endoftext|>"]) for w in words], vocab


def test_token_initialization_takes_the_word_internal_piece_as_upstream(sd):
    """DPLTokenOptimizer's default token_init through the real path: ComfyUI's SD1 tokenizer and CLIP embedding
    table (``learnable_tokens.locate`` / ``initial_values``, as the node calls them)."""
    _, clip = sd
    prompt = "a cat and a hamburger in a garden"
    nt = locate(clip, prompt, "cat, hamburger, garden")
    table = clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight
    ours = initial_values(clip, prompt, nt)[0]                                   # (3, d) the node's default
    official, vocab = official_initializer_ids(["cat", "hamburger", "garden"])
    assert official[0] == vocab["cat"] == 1481 and vocab["cat</w>"] == 2368
    assert official[1] == vocab["<|endoftext|>"]                  # no word-internal 'hamburger': upstream's unk
    assert clip.tokenizer.clip_l.tokenizer.convert_tokens_to_ids(["cat", "hamburger", "garden"]) == official
    with torch.no_grad():
        assert torch.equal(ours[0], table[official[0]].float()) and torch.equal(ours[2], table[official[2]].float())
        assert torch.equal(ours[1], table[vocab["hamburger</w>"]].float())   # ours keeps the prompt's token (named)
        prompt_tokens = initial_values(clip, prompt, nt, "prompt token")[0]
        assert torch.equal(prompt_tokens, table[[vocab[w + "</w>"] for w in ("cat", "hamburger", "garden")]].float())


def _self_sizes_replaced(monkeypatch, run) -> set[int]:
    """The self-attention layer sizes (query pixels) where P2PController asked for the probabilities to edit."""
    seen: set[int] = set()
    original = P2PController.wants_probs

    def spy(self, ctx):
        out = original(self, ctx)
        if out and not ctx.is_cross:
            seen.add(ctx.height * ctx.width)
        return out
    monkeypatch.setattr(P2PController, "wants_probs", spy)
    run()
    monkeypatch.undo()
    return seen


def test_p2p_self_attention_limit_follows_the_source_of_the_image(sd, monkeypatch):
    """From a seed upstream's generated-image notebook replaces self-attention up to latent / 4 per side (16x16 at
    512 px), from an inversion the null-text notebook up to latent / 2 (32x32): on a 16x16 latent the tiny UNet's
    self layers are 16x16 and 8x8, so no layer from a seed and the 8x8 layers from an inversion."""
    model, clip = sd
    lat = torch.zeros(1, 4, 16, 16)
    args = dict(edit="auto", seed=1, steps=4, cfg=7.5, scheduler="simple", cross_replace_steps=0.8,
                cross_replace_words="", self_replace_steps=0.5, reweight="", blend_words="", blend_threshold=0.3,
                blend_start=0.2)
    target = "a tiger and a dog in a garden"

    def edit(inversion=None):
        with torch.inference_mode():
            P2PEditSampler.execute(model, clip, SRC, target, encode(clip, ""), {"samples": lat}, inversion=inversion,
                                   **args)
    assert _self_sizes_replaced(monkeypatch, edit) == set()                       # 16 px limit: 4x4
    with torch.inference_mode():
        inv, _ = NullTextInvert.execute(model, clip, SRC, "ddim", 4, 7.5, "simple", 3, 1e-5,
                                        latent={"samples": lat}).result
    assert _self_sizes_replaced(monkeypatch, lambda: edit(inv)) == {8 * 8}        # 8x8 = (16 / 2)^2


def test_prompt_mix_blend_labels_every_noun_by_default(sd, monkeypatch):
    """PromptMixSampler with its default nouns (empty) labels the blend's clusters with every noun of the prompt
    (cat, dog, garden: CLIP keys 2, 5, 8), not only the object and preserve words."""
    model, clip = sd
    calls = []
    real = prompt_mix_node.foreground

    def spy(store, item, positions, *a, **k):
        calls.append(list(positions))
        return real(store, item, positions, *a, **k)
    monkeypatch.setattr(prompt_mix_node, "foreground", spy)
    with torch.inference_mode():
        PromptMixSampler.execute(model, clip, SRC, encode(clip, ""), {"samples": torch.zeros(1, 4, 16, 16)}, "cat",
                                 "tiger", 2, "", 3, 6, 7.5, "simple", 0.14, 0.34, 0.8, 0.05, 0.7, 5, 0.3)
    assert calls and all(c == [(2,), (5,), (8,)] for c in calls), calls


def test_departures_from_upstream_are_off_by_default():
    """keep_best_null (not upstream) is an input whose default is upstream's: Adam's last null."""
    for node in (NullTextInvert, DPLTokenOptimizer):
        inputs = {i.id: i for i in node.define_schema().inputs}
        assert inputs["keep_best_null"].default is False, node
        assert "fp16" in inputs["keep_best_null"].tooltip
    nouns = {i.id: i for i in PromptMixSampler.define_schema().inputs}["nouns"]
    assert nouns.default == "" and "every noun" in nouns.tooltip


def test_grounding_template_query_equals_upstream_class_embedding(sd):
    """The grounding nodes' template queries (``QueryEncoder`` in 'template' mode, upstream's "a photograph of a
    {word}") through ComfyUI's CLIP, against train.py's slice: the states of the template prompt at tokens
    5 .. len(tokenizer.tokenize(text)), averaged when the class has several tokens (pottedplant: 3)."""
    from attention_lab.attention.grounding import DEFAULT_TEMPLATE
    from attention_lab.nodes.grounding_words import QueryEncoder
    _, clip = sd
    encoder = QueryEncoder(clip, "template", DEFAULT_TEMPLATE)
    hf = clip.tokenizer.clip_l.tokenizer
    for word in ("dog", "pottedplant"):
        text = "a photograph of a " + word
        states = clip.encode_from_tokens(clip.tokenize(text)).float().cpu()[0]       # (77, T), BOS at 0
        n = len(hf.tokenize(text))
        assert word != "pottedplant" or n - 4 > 1                                     # a multi-token class
        official = states[5:n + 1].mean(0)
        torch.testing.assert_close(encoder("any prompt", word), official)
