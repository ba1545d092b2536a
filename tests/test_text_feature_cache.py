"""Tier 1: the proxy search's on-disk feature cache (attention/text_feature_cache.py): a written cache reads back
equal; one of another key, template or format, a truncated or garbled file, or inconsistent contents is refused
(and removed, so the caller rebuilds it), never trusted."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from attention import text_feature_cache as tfc

TEMPLATE = "a photo of a {word}"


def filled(key="k1") -> tfc.VocabFeatures:
    g = torch.Generator().manual_seed(0)
    c = tfc.VocabFeatures(key, TEMPLATE, {"cat": 1, "ing": 2, "dog": 1, "tion": 3})
    c.features = {"cat": torch.randn(8, generator=g), "dog": torch.randn(8, generator=g)}
    return c


def test_write_then_read_gives_the_same_cache(tmp_path):
    path = tmp_path / "sub" / "k1.safetensors"
    c = filled()
    assert tfc.write(path, c)
    back = tfc.read(path, "k1", TEMPLATE)
    assert back.counts == c.counts and list(back.counts) == list(c.counts)
    assert set(back.features) == {"cat", "dog"}
    assert torch.equal(back.stack(["dog", "cat"]), c.stack(["dog", "cat"]))
    assert [p.name for p in path.parent.iterdir()] == ["k1.safetensors"]          # no temporary file left
    assert tfc.read(tmp_path / "absent.safetensors", "k1", TEMPLATE) is None


@pytest.mark.parametrize("damage", ["truncated", "garbage", "other key", "other template", "bad rows",
                                    "bad counts", "nan feature", "other format"])
def test_a_damaged_or_foreign_file_is_refused_and_removed(tmp_path, caplog, damage):
    path = tmp_path / "k1.safetensors"
    tfc.write(path, filled())
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 64)
    elif damage in ("other key", "other template"):
        tfc.write(path, filled("k2") if damage == "other key" else
                  tfc.VocabFeatures("k1", "a {word}", {"cat": 1}))
    else:
        meta = {"format": tfc.FORMAT, "key": "k1", "template": TEMPLATE, "entries": json.dumps(["cat", "dog"])}
        tensors = {"counts": torch.tensor([1, 1], dtype=torch.int32), "rows": torch.tensor([0, 1]),
                   "features": torch.randn(2, 8)}
        if damage == "bad rows":
            tensors["rows"] = torch.tensor([0, 5])
        elif damage == "bad counts":
            tensors["counts"] = torch.tensor([1], dtype=torch.int32)
        elif damage == "nan feature":
            tensors["features"][1, 3] = float("nan")
        else:
            meta["format"] = "something/0"
        save_file(tensors, str(path), metadata=meta)
    with caplog.at_level(logging.WARNING, logger="attention_lab"):
        assert tfc.read(path, "k1", TEMPLATE) is None
    assert "rebuilding it" in caplog.text and not path.exists()


def test_an_unwritable_folder_is_a_warning_not_an_error(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with caplog.at_level(logging.WARNING, logger="attention_lab"):
        assert not tfc.write(blocker / "k1.safetensors", filled())
    assert "could not write" in caplog.text


def test_digest_tells_weights_apart():
    w = {"a": torch.ones(3), "b": torch.zeros(2, 2)}
    same = {"a": torch.ones(3), "b": torch.zeros(2, 2)}
    assert tfc.digest([sorted(w.items())]) == tfc.digest([sorted(same.items())])
    for other in ({"a": torch.ones(3), "b": torch.zeros(4)},                       # shape
                  {"a": torch.ones(3, dtype=torch.float64), "b": torch.zeros(2, 2)},  # dtype
                  {"a": torch.tensor([1.0, 1.0, 1.0 + 2 ** -20]), "b": torch.zeros(2, 2)},  # one value
                  {"a2": torch.ones(3), "b": torch.zeros(2, 2)}):                  # name
        assert tfc.digest([sorted(w.items())]) != tfc.digest([sorted(other.items())])
    assert tfc.digest([{"p": (1.0, torch.ones(2))}]) != tfc.digest([{"p": (0.5, torch.ones(2))}])


def test_close_is_relative_per_row():
    b = torch.tensor([[100.0, 0.0], [0.01, 0.0]])
    assert tfc.close(b + torch.tensor([[0.5, 0], [0.00005, 0]]), b, 1e-2)
    assert not tfc.close(b + torch.tensor([[0.0, 0], [0.001, 0]]), b, 1e-2)
    assert not tfc.close(b[:1], b, 1e-2)


def test_digest_of_sets_and_cyclic_objects():
    class Adapter:                                   # a patch object holding a set and a reference to itself
        def __init__(self, keys):
            self.keys, self.me = set(keys), None
            self.me = self
    assert tfc.digest([Adapter({"a", "b"})]) == tfc.digest([Adapter({"b", "a"})])
    assert tfc.digest([Adapter({"a", "b"})]) != tfc.digest([Adapter({"a", "c"})])
