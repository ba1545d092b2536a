"""Tier 1: the grounding dataset files (latents, prompts, words, masks) round trip and refuse bad input."""

import pytest
import torch

from attention.grounding_dataset import DatasetError, Example, GroundingDataset, check_name, list_datasets


def _example(seed: int, words=("cat", "dog")) -> Example:
    g = torch.Generator().manual_seed(seed)
    return Example(torch.randn(4, 8, 8, generator=g), "a cat and a dog", list(words),
                   torch.rand(len(words), 64, 64, generator=g) > 0.5)


def test_append_load_round_trip_and_listing(tmp_path):
    ds = GroundingDataset.at(tmp_path, "pets")
    with pytest.raises(DatasetError, match="does not exist"):
        ds.load()
    a, b = _example(0), _example(1, ("dog",))
    ds.append(a)
    fp = ds.fingerprint()
    ds.append(b)
    assert ds.fingerprint() != fp and len(ds) == 2
    out = ds.load()
    assert torch.equal(out[0].latent, a.latent) and torch.equal(out[0].masks, a.masks)
    assert out[1].words == ["dog"] and out[1].prompt == "a cat and a dog"
    assert ds.vocabulary() == ["cat", "dog"] and list_datasets(tmp_path) == ["pets"]
    assert {f.stat().st_mode & 0o777 for f in ds.files()} == {0o644} and not list(ds.path.glob(".*tmp"))
    (ds.path / ".000003.tmp").write_bytes(b"half")           # an interrupted write is not an example
    assert len(ds) == 2


def test_bad_names_mismatched_masks_and_foreign_files(tmp_path):
    for bad in ("../up", "a/b", "", ".hidden", "x" * 65):
        with pytest.raises(DatasetError, match="not allowed"):
            check_name(bad)
    ds = GroundingDataset.at(tmp_path, "d")
    with pytest.raises(DatasetError, match="2 masks for 1 words"):
        ds.append(Example(torch.zeros(4, 8, 8), "a cat", ["cat"], torch.ones(2, 8, 8, dtype=torch.bool)))
    ds.path.mkdir(parents=True, exist_ok=True)
    (ds.path / "000001.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(DatasetError, match="000001.safetensors is not a grounding dataset file"):
        ds.load()
