"""Tier 1: MnM's proxy-word suggestion against upstream's ``prompt_utils.get_proxy_words`` /
``get_topk_similar_words`` (orpatashnik/local-prompt-mixing, written out here in our own words), on a random text
encoder; moved out of test_faithful_ports.py (issue 26) to keep each file readable in one sitting."""

from __future__ import annotations

import numpy as np
import pytest
import torch


# ----------------------------------------------------------------------------- 5. MnM proxy suggestion
def official_topk_similar(encode, template, base_word, vocab, k):
    """``prompt_utils.get_topk_similar_words``: pooled features of ``template`` with each vocabulary word and with
    the base word, L2-normalized; vocabulary words by descending cosine (numpy argsort, flipped), first k."""
    ref = encode([template.format(word=base_word)])
    ref = ref / ref.norm(p=2, dim=-1, keepdim=True)
    feats = encode([template.format(word=w) for w in vocab])
    feats = feats / feats.norm(p=2, dim=-1, keepdim=True)
    order = np.flip(feats.matmul(ref.view(-1, 1)).numpy().reshape(-1).argsort())
    return [vocab[i] for i in order[:k]]


def official_proxy_words(encode, prompt_template, obj, vocab, variations):
    """``prompt_utils.get_proxy_words``: alphabetic entries of two letters or more; 50 closest by 'a photo of a
    {word}', then the closest by the prompt; the object word is put first when it is not already."""
    vocab = [w for w in vocab if w.isalpha() and len(w) > 1]
    short = official_topk_similar(encode, "a photo of a {word}", obj, vocab, 50)
    words = official_topk_similar(encode, prompt_template, obj, short, variations)
    return words if words[0] == obj else [obj] + words


def test_proxy_suggestion_equals_upstream_ranking():
    """Ours (the ranking the node runs, with the vocabulary's features computed inline or looked up as from the
    cache) against upstream's, on a random text encoder whose pooled features depend on every character."""
    from attention.prompt_mixing import suggest_proxies
    g = torch.Generator().manual_seed(6)
    table, pos = torch.randn(128, 16, generator=g), torch.randn(64, 16, generator=g)

    def encode(texts):                                  # (n, 16) pooled features, nonlinear in the text
        rows = [torch.tanh(sum(table[ord(c) % 128] * (1 + pos[i % 64]) for i, c in enumerate(t))) for t in texts]
        return torch.stack(rows) + 0.1
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["".join(letters[int(j)] for j in torch.randint(0, 26, (int(n),), generator=g))
             for n in torch.randint(2, 7, (400,), generator=g)] + ["x", "a1", "b-c"]      # the last 3 are dropped
    vocab = list(dict.fromkeys(vocab))
    prompt = "a cat sitting on a mat"
    theirs = official_proxy_words(encode, "a {word} sitting on a mat", "cat", vocab, 4)
    assert theirs[0] == "cat" and len(theirs) == 5             # the object is not in this vocabulary
    cached = {w: encode([f"a photo of a {w}"])[0] for w in vocab}
    for features in (None, lambda ws: torch.stack([cached[w] for w in ws])):
        assert suggest_proxies(encode, vocab, prompt, "cat", 4, vocab_features=features) == theirs[1:]
    # upstream keeps the object word among the candidates (then returns it plus count - 1 others); we skip it
    with_obj = vocab + ["cat"]
    assert suggest_proxies(encode, with_obj, prompt, "cat", 4) == theirs[1:]
    # the whole shortlist (its 50 come from the template ranking, reordered by the prompt's), one, none
    long = official_proxy_words(encode, "a {word} sitting on a mat", "cat", vocab, 50)
    assert suggest_proxies(encode, vocab, prompt, "cat", 50) == long[1:]
    assert suggest_proxies(encode, vocab, prompt, "cat", 1) == theirs[1:2]
    assert suggest_proxies(encode, vocab, prompt, "cat", 0) == []


def test_proxy_helpers_follow_upstream():
    """``get_topk_similar_words``' cosine order (the reference normalized as a whole: a reference whose halves
    differ in scale ranks by its direction); the alphabetic candidates of two letters or more, once each, the
    object skipped; the object replaced once (its first occurrence, any case), or refused by name."""
    from attention.prompt_mixing import proxy_candidates, proxy_prompt, top_similar
    ref = torch.tensor([10.0, 0.0, 0.0, 1.0])
    feats = torch.tensor([[0.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0], [0.7, 0.0, 0.0, 0.7]])
    cos = (feats @ ref) / feats.norm(dim=-1) / ref.norm()
    assert top_similar(ref[None], feats, 3) == np.flip(cos.numpy().argsort()).tolist() == [1, 2, 0]
    assert proxy_candidates(["x", "ab", "Cat", "a1", "ab", "b-c", "dog"], "cat") == ["ab", "dog"]
    assert proxy_prompt("A Cat and a cat", "cat", "dog") == "A dog and a cat"
    with pytest.raises(ValueError) as err:
        proxy_prompt("a dog", "cat", "cow")
    assert str(err.value) == "object word 'cat' is not in the prompt 'a dog'; write it as it appears there"
