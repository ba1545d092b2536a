"""On-disk cache of a text encoder's pooled features of vocabulary prompts (the proxy search of prompt mixing).

One safetensors file per (text encoder, tokenizer, template): the file name is ``key``, a digest of all three
(``digest``), so another encoder never reads it. Contents, n entries of which m are encoded:

    counts   (n,)    int32   token count of each entry written alone (the proxy rule needs the object's count)
    rows     (m,)    int64   row in ``entries`` of each encoded entry
    features (m, d)  float   pooled feature of ``template.format(word=entry)``, as the encoder gave it
    metadata: format, key, template, entries (a JSON list of n strings)

A file that cannot be read, or whose metadata or shapes do not agree, is reported and treated as absent (the
caller rebuilds it); files are written to a temporary name and renamed, so a reader never sees half a file.
Pure torch + safetensors: the ComfyUI side (which encoder, where the folder is) is ``nodes/proxy_search.py``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import logger

FORMAT = "attention_lab.vocab_features/1"


@dataclass
class VocabFeatures:
    """What one cache file holds, as dictionaries keyed by the vocabulary entry."""

    key: str
    template: str
    counts: dict[str, int] = field(default_factory=dict)               # entry -> token count alone
    features: dict[str, torch.Tensor] = field(default_factory=dict)    # entry -> (d,) pooled feature

    def stack(self, entries: list[str]) -> torch.Tensor:
        """(len(entries), d) features of ``entries``, in order (each must be encoded)."""
        return torch.stack([self.features[e] for e in entries])


def digest(parts: Iterable) -> str:
    """sha256 hex of a sequence of strings, bytes, numbers, tensors (dtype, shape and bytes) and nested
    lists/tuples/sets/dicts of them; other objects by type name and their attributes (to a depth of 16)."""
    h = hashlib.sha256()
    _feed(h, list(parts))
    return h.hexdigest()


def _feed(h, obj, depth: int = 0) -> None:
    if depth > 16:                         # a cycle or a deep object graph: its type stands for it
        h.update(f"X{type(obj).__qualname__}".encode())
        return
    depth += 1
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    elif isinstance(obj, bytes):
        h.update(b"B%d:" % len(obj) + obj)
    elif isinstance(obj, (str, int, float, bool)) or obj is None:
        s = repr(obj)
        h.update(f"S{len(s)}:{s}".encode())
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}[".encode())
        for x in obj:
            _feed(h, x, depth)
        h.update(b"]")
    elif isinstance(obj, (set, frozenset)):
        _feed(h, ["set", sorted(obj, key=repr)], depth)
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}{{".encode())
        for k in sorted(obj, key=repr):
            _feed(h, k, depth)
            _feed(h, obj[k], depth)
        h.update(b"}")
    elif callable(obj) and hasattr(obj, "__qualname__"):
        _feed(h, f"{getattr(obj, '__module__', '')}.{obj.__qualname__}", depth)
    else:
        _feed(h, [type(obj).__qualname__, dict(getattr(obj, "__dict__", {}))], depth)


def read(path: Path, key: str, template: str) -> VocabFeatures | None:
    """The cache at ``path`` for ``key``/``template``; None when absent. A file that is unreadable, of another
    format, key or template, or inconsistent is logged and removed, and None returned (rebuild it)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        out = _parse(meta, tensors, key, template)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        logger.warning("proxy search cache %s is unusable (%s: %s); rebuilding it", path, type(e).__name__, e)
        _remove(path)
        return None
    return out


def _parse(meta: dict, tensors: dict, key: str, template: str) -> VocabFeatures:
    if meta.get("format") != FORMAT:
        raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("key") != key or meta.get("template") != template:
        raise ValueError(f"written for key {meta.get('key')!r} / template {meta.get('template')!r}, not "
                         f"{key!r} / {template!r}")
    entries = json.loads(meta["entries"])
    counts, rows, feats = tensors["counts"], tensors["rows"], tensors["features"]
    n, m = len(entries), rows.numel()
    if not (isinstance(entries, list) and all(isinstance(e, str) for e in entries) and len(set(entries)) == n):
        raise ValueError("entries are not a list of distinct strings")
    if counts.shape != (n,) or rows.shape != (m,) or feats.dim() != 2 or feats.shape[0] != m:
        raise ValueError(f"shapes disagree: {n} entries, counts {tuple(counts.shape)}, rows {tuple(rows.shape)}, "
                         f"features {tuple(feats.shape)}")
    if m and (rows.min() < 0 or rows.max() >= n or rows.unique().numel() != m):
        raise ValueError("rows out of range or repeated")
    if (counts < 0).any() or not torch.isfinite(feats.float()).all():
        raise ValueError("negative token counts or non-finite features")
    out = VocabFeatures(key, template, dict(zip(entries, counts.tolist())))
    out.features = {entries[r]: feats[i] for i, r in enumerate(rows.tolist())}
    return out


def write(path: Path, cache: VocabFeatures) -> bool:
    """Write ``cache`` atomically (temporary file, then rename). False, with a warning, when it cannot."""
    path = Path(path)
    entries = list(cache.counts)
    index = {e: i for i, e in enumerate(entries)}
    encoded = [e for e in cache.features if e in index]
    feats = cache.stack(encoded) if encoded else torch.zeros(0, 0)
    tensors = {"counts": torch.tensor([cache.counts[e] for e in entries], dtype=torch.int32),
               "rows": torch.tensor([index[e] for e in encoded], dtype=torch.int64),
               "features": feats.detach().cpu().contiguous()}
    meta = {"format": FORMAT, "key": cache.key, "template": cache.template, "entries": json.dumps(entries)}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp), metadata=meta)
        os.chmod(tmp, 0o644)                 # readable like the models around it, not a temporary file's 0600
        os.replace(tmp, path)
    except OSError as e:
        logger.warning("could not write the proxy search cache %s (%s); the search will run again next time",
                       path, e)
        _remove(tmp)
        return False
    return True


def _remove(path: Path) -> None:
    try:
        Path(path).unlink()
    except OSError:
        pass


def close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    """Row-wise ||a - b|| <= rtol * ||b|| for (n, d) features (a stored feature against a fresh one)."""
    a, b = a.float().cpu(), b.float().cpu()
    if a.shape != b.shape:
        return False
    err = (a - b).norm(dim=-1)
    scale = b.norm(dim=-1).clamp(min=1e-12)
    return bool((err <= rtol * scale).all()) and not math.isnan(float(err.sum()))
