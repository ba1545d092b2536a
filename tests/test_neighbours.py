"""Tier 1: issue 27's inputs as other packs and users really wire them, where the rule is pure: MASK layouts and
sizes (attention/masks.py), stray files in a grounding dataset folder, textual-inversion names as one word
(attention/words.py, the StructureDiffusion chunker). The nodes' side is tests/test_nodes_neighbours.py."""

import logging
import re

import pytest
import torch

from attention.grounding_dataset import Example, GroundingDataset, list_datasets
from attention.masks import ASPECT_TOLERANCE, MaskLayoutError, check_aspect, fit_to_grid, mask_batch
from attention.structure import noun_phrases
from attention.words import PromptWords, WordNotInPromptError, emphasis_segments, locate_words, text_words

# 1. masks with an extra axis -------------------------------------------------------------------------------

def test_the_four_mask_layouts_that_mean_one_thing_give_one_batch():
    g = torch.Generator().manual_seed(0)
    ref = (torch.rand(3, 20, 30, generator=g) > 0.5).float()                 # (B, H, W), ComfyUI's MASK
    for layout in (ref, ref[:, None], ref[..., None], ref.bool(), ref.to(torch.uint8)):
        out = mask_batch(layout, "Node", "masks")
        assert out.shape == (3, 20, 30) and out.dtype == torch.float32 and torch.equal(out, ref)
    assert torch.equal(mask_batch(ref[0], "Node", "masks"), ref[:1])         # (H, W): one mask
    assert mask_batch(torch.ones(1, 1, 5, 1), "N", "m").shape == (1, 5, 1)  # (B, 1, H, W) first: a 5x1 mask


@pytest.mark.parametrize("shape, hint", [((4, 3, 8, 8), ""), ((2, 8, 8, 3), "IMAGE's layout"), ((8,), ""),
                                         ((1, 1, 1, 8, 8), ""), ((0, 8, 8), "no pixels")])
def test_other_layouts_are_refused_naming_node_input_and_shape(shape, hint):
    named = re.escape(f"GroundingDatasetAdd: 'masks' has shape {shape}")
    with pytest.raises(MaskLayoutError, match=f"{named}.*{hint}"):
        mask_batch(torch.zeros(shape), "GroundingDatasetAdd", "masks")


# 2. one size tolerance -------------------------------------------------------------------------------------

def test_aspect_within_the_tolerance_is_resized_and_beyond_it_refused_with_the_values():
    check_aspect((128, 190), (16, 24), "N", "masks")              # the 190x128 for 192x128: 1.0 % off
    check_aspect((16, 24), (16, 24), "N", "masks")
    with pytest.raises(ValueError, match=r"N: 'masks' is 128x128 \(aspect 1.000\) but the latent is 24x16 "
                                         r"\(aspect 1.500\): 33.3 % off, beyond the 2 % the pack resizes over"):
        check_aspect((128, 128), (16, 24), "N", "masks", "latent")
    edge = 24 * (1 + ASPECT_TOLERANCE) * 1.01                        # just beyond, either way round
    with pytest.raises(ValueError, match="beyond the 2 %"):
        check_aspect((1600, round(100 * edge)), (16, 24), "N", "m")
    m = torch.zeros(2, 128, 190)
    m[:, :, 95:] = 1
    out = fit_to_grid(m, (16, 24))
    assert out.shape == (2, 128, 192) and 0.49 < out.mean() < 0.51       # the image's aspect, the same half
    same = torch.rand(1, 32, 48)
    assert fit_to_grid(same, (16, 24)) is same                          # exact aspect: kept as it is


# 3. stray files in a dataset folder ------------------------------------------------------------------------

def _example(seed: int, words=("cat", "dog")) -> Example:
    g = torch.Generator().manual_seed(seed)
    return Example(torch.randn(4, 8, 8, generator=g), "a cat and a dog", list(words),
                   torch.rand(len(words), 64, 64, generator=g) > 0.5)


def test_only_exactly_named_files_are_examples_and_the_rest_is_named_once(tmp_path, caplog):
    ds = GroundingDataset.at(tmp_path, "pets")
    ds.append(_example(0))
    ds.append(_example(1))
    backup = ds.path / "000002_old.safetensors"
    backup.write_bytes((ds.path / "000002.safetensors").read_bytes())    # a renamed backup: a valid file
    (ds.path / "000002 (1).safetensors").write_bytes(b"x")
    (ds.path / "notes.txt").write_text("x")
    (ds.path / "old").mkdir()
    for hidden in (".DS_Store", "._000001.safetensors", ".000004.tmp"):
        (ds.path / hidden).write_bytes(b"x")
    assert len(ds) == 2 and [f.name for f in ds.files()] == ["000001.safetensors", "000002.safetensors"]
    with caplog.at_level(logging.WARNING, logger="attention_lab"):
        assert len(ds.load()) == 2                                       # the backup is never trained on
        ds.append(_example(2, ("cat",)))                                 # no int('000002_old') failure
    assert (ds.path / "000003.safetensors").is_file() and len(ds) == 3
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "skipped 000002 (1).safetensors, 000002_old.safetensors, notes.txt, old/" in lines[0]
    assert ".DS_Store" not in lines[0] and "._0000" not in lines[0] and ".tmp" not in lines[0]
    assert list_datasets(tmp_path) == ["pets"]
    only = GroundingDataset.at(tmp_path, "strays_only")
    only.path.mkdir()
    (only.path / "000001_old.safetensors").write_bytes(backup.read_bytes())
    assert list_datasets(tmp_path) == ["pets"]
    with pytest.raises(ValueError, match=r"holds no example file \(only 000001_old.safetensors\)"):
        only.load()


def test_example_files_sort_by_index_past_six_digits(tmp_path):
    ds = GroundingDataset.at(tmp_path, "big")
    ds.append(_example(0))
    (ds.path / "000001.safetensors").rename(ds.path / "999999.safetensors")
    ds.append(_example(1))
    assert [f.name for f in ds.files()] == ["999999.safetensors", "1000000.safetensors"]


def test_the_dataset_refuses_masks_with_an_extra_axis(tmp_path):
    ds = GroundingDataset.at(tmp_path, "d")
    with pytest.raises(ValueError, match=r"masks \(N, H, W\).*got masks \(2, 1, 8, 8\)"):
        ds.append(Example(torch.zeros(4, 8, 8), "a", ["a", "b"], torch.ones(2, 1, 8, 8, dtype=torch.bool)))
    assert len(ds) == 0


# 4. textual-inversion names: one word ---------------------------------------------------------------------

PROMPT = "a photo of embedding:emb3 cat and a red dog in a garden"
VOCAB = {w: [10 + i] for i, w in enumerate("a photo of cat and red dog in garden embedding emb3 : tiger".split())}
EMBEDDINGS = {"emb3": 2, "emb4": 2}            # name -> vectors, as ComfyUI's embedding folder


def word_ids(word):
    """A ComfyUI-like tokenizer: an existing embedding gives its vectors (-1 each), a missing one nothing."""
    out = []
    for w in text_words(word):
        if w.startswith("embedding:"):
            out += [-1] * EMBEDDINGS.get(w[len("embedding:"):], 0)
        else:
            out += VOCAB[w.lower()]
    return out


def pw(prompt):
    ids = [t for seg, _ in emphasis_segments(prompt) for w in text_words(seg) for t in word_ids(w)]
    return PromptWords(prompt, [[1] + ids + [2] * (20 - len(ids))], word_ids)


def test_an_embedding_is_one_word_with_the_positions_of_its_vectors():
    assert text_words(PROMPT) == ["a", "photo", "of", "embedding:emb3", "cat", "and", "a", "red", "dog", "in", "a",
                                  "garden"]
    assert text_words("(embedding:emb3:1.2), embedding:emb4, cat\nembedding:sub/x.pt") == [
        "embedding:emb3", "embedding:emb4", "cat", "embedding:sub/x.pt"]
    assert text_words("x,embedding:emb3") == ["x", "embedding", "emb3"]     # ComfyUI: text, not an embedding
    words = pw(PROMPT)
    assert words.positions("embedding:emb3") == (4, 5) and words.positions("cat") == (6,)
    assert words.positions("dog") == (10,)
    assert locate_words(words, "embedding:emb3 cat, red dog")[1] == [(4, 5, 6), (9, 10)]
    two = pw("a embedding:emb3 embedding:emb4 cat")                          # adjacent: one run of -1s, split
    assert two.positions("embedding:emb3") == (2, 3) and two.positions("embedding:emb4") == (4, 5)
    with pytest.raises(WordNotInPromptError, match=r"'emb3' is not in the prompt.*'embedding:emb3', 'cat'"):
        words.positions("emb3")
    missing = pw("a embedding:nothere cat")                                   # ComfyUI drops it: no word
    assert missing.names == ["a", "cat"] and missing.positions("cat") == (2,)


def test_the_chunker_keeps_an_embedding_as_one_word_of_its_phrase():
    phrases = noun_phrases(PROMPT)
    assert phrases == ["a photo", "embedding:emb3 cat", "a red dog", "a garden", "embedding:emb3 cat and a red dog"]
    words = pw(PROMPT)
    assert all(words.contains(p) for p in phrases)                            # no invented 'emb3 cat'
    assert noun_phrases("a (embedding:Emb3:1.2) cat on a red car") == ["a embedding:Emb3 cat", "a red car"]
