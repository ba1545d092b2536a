"""A grounding dataset on disk: latents, prompts, words and one mask per word, appended one image at a time.

Li et al. 2023 train their grounding head on generated images labelled by a detector (one instance mask per
prompted class). We store what a user's graph produces: the image's **latent** (not its UNet features, which
are ~70 MB per SD image; the trainer recomputes them), the prompt, the words and each word's binary mask.

Layout: ``<root>/<name>/<000001>.safetensors``, one file per image, written to a temporary name and renamed,
so an interrupted run never leaves half a file. What belongs to a dataset is decided by that exact name: digits
only (six or more) and ``.safetensors``. Anything else in the folder (a renamed backup ``000002_old.safetensors``,
a copy ``000002 (1).safetensors``, notes, subfolders) is never read, counted or trained on; ``log_strays`` (run by
``load`` and once per Grounding Dataset Add) names those entries in one log line. Hidden entries (``.DS_Store``,
macOS ``._*`` files, our own ``.000003.tmp`` of an interrupted write) are skipped without a word. Tensors:
``latent`` (C, h, w) float32 (a raw VAE latent, as in ComfyUI's LATENT dict), ``masks`` (N, H, W) uint8 0/1.
Metadata: ``format``, ``prompt``, ``words`` (JSON list).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import logger

FORMAT = "attention_lab.grounding_dataset/1"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
EXAMPLE_FILE = re.compile(r"^[0-9]{6,}\.safetensors$")      # the one rule of what a dataset holds


SKIP_FIX = ("Give each word a mask that covers its object (a segmentation node such as SAM or CLIPSeg, or the mask "
            "editor; LoadImageMask's alpha channel of an image without transparency is empty), then queue again")


class DatasetError(ValueError):
    pass


@dataclass
class Example:
    latent: torch.Tensor        # (C, h, w) raw VAE latent
    prompt: str
    words: list[str]
    masks: torch.Tensor         # (N, H, W) bool, one per word


def check_name(name: str) -> str:
    name = name.strip()
    if not _NAME.match(name) or ".." in name:
        raise DatasetError(f"dataset name {name!r} is not allowed: use 1-64 letters, digits, '_', '-' or '.', "
                           "starting with a letter or digit (it becomes a folder name), e.g. 'my_shapes'")
    return name


@dataclass
class GroundingDataset:
    """A named folder of examples. ``len()`` counts files; ``load()`` reads them all (they are small).

    ``skipped``: what the Grounding Dataset Add run that handed this object on skipped, and why, when it
    added nothing (e.g. "image 0 'cat': empty mask ..."); ``load()`` of a still missing dataset says so."""

    name: str
    path: Path
    skipped: tuple[str, ...] = ()

    @classmethod
    def at(cls, root: Path | str, name: str) -> "GroundingDataset":
        name = check_name(name)
        return cls(name, Path(root) / name)

    def files(self) -> list[Path]:
        """The example files (``EXAMPLE_FILE``), in index order."""
        return example_files(self.path)

    def strays(self) -> list[str]:
        """Names of the visible entries of the folder that are not example files (never read)."""
        if not self.path.is_dir():
            return []
        return sorted(p.name + ("/" if p.is_dir() else "") for p in self.path.iterdir()
                      if not p.name.startswith(".") and not (p.is_file() and EXAMPLE_FILE.match(p.name)))

    def log_strays(self) -> None:
        strays = self.strays()
        if strays:
            logger.warning("grounding dataset %r: skipped %s (not example files: a dataset holds only files named "
                           "like 000001.safetensors; move the others out of %s)", self.name, ", ".join(strays),
                           self.path)

    def __len__(self) -> int:
        return len(self.files())

    def fingerprint(self) -> str:
        files = self.files()
        return f"{self.path}:{len(files)}:{files[-1].stat().st_mtime_ns if files else 0}"

    def append(self, example: Example) -> Path:
        """Write one example; returns its file."""
        if example.masks.ndim != 3 or example.latent.ndim != 3:
            raise DatasetError(f"an example needs masks (N, H, W) and a latent (C, h, w); got masks "
                               f"{tuple(example.masks.shape)} and latent {tuple(example.latent.shape)}")
        if example.masks.shape[0] != len(example.words):
            raise DatasetError(f"{example.masks.shape[0]} masks for {len(example.words)} words")
        self.path.mkdir(parents=True, exist_ok=True)
        files = self.files()
        index = int(files[-1].stem) + 1 if files else 1
        final = self.path / f"{index:06d}.safetensors"
        tmp = self.path / f".{index:06d}.tmp"
        try:
            save_file({"latent": example.latent.detach().float().cpu().contiguous(),
                       "masks": example.masks.detach().to(torch.uint8).cpu().contiguous()}, str(tmp),
                      metadata={"format": FORMAT, "prompt": example.prompt, "words": json.dumps(example.words)})
            os.chmod(tmp, 0o644)             # as save_head: not the temp file's 0600
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                tmp.unlink()
        return final

    def load(self) -> list[Example]:
        """Every example; raises DatasetError for a missing/empty dataset or a foreign file."""
        files = self.files()
        self.log_strays()
        if not files:
            strays = self.strays()
            why = ("does not exist" if not self.path.is_dir() else
                   f"holds no example file (only {', '.join(strays)})" if strays else "is empty")
            if self.skipped:
                raise DatasetError(
                    f"grounding dataset {self.name!r} ({self.path}) {why}: Grounding Dataset Add skipped every "
                    f"example it was given ({'; '.join(self.skipped)}). {SKIP_FIX}")
            raise DatasetError(f"grounding dataset {self.name!r} ({self.path}) {why}; fill it first with "
                               "Grounding Dataset Add (queue the filling graph), or pick another dataset")
        out = []
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as fh:
                    meta = fh.metadata() or {}
                    latent, masks = fh.get_tensor("latent"), fh.get_tensor("masks").bool()
                if meta.get("format") != FORMAT:
                    raise ValueError(f"format {meta.get('format')!r}")
                out.append(Example(latent, meta["prompt"], json.loads(meta["words"]), masks))
            except Exception as e:  # noqa: BLE001 - any parse failure: name the file
                raise DatasetError(f"{f} is not a grounding dataset file ({e}); delete it or move it out of "
                                   f"{self.path}") from e
        return out

    def vocabulary(self, examples: list[Example] | None = None) -> list[str]:
        words = {w for ex in (examples if examples is not None else self.load()) for w in ex.words}
        return sorted(words)


def list_datasets(root: Path | str) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and example_files(p))


def example_files(folder: Path) -> list[Path]:
    """The files of ``folder`` named by ``EXAMPLE_FILE``, in index order (000009 before 0000010)."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if EXAMPLE_FILE.match(p.name) and p.is_file()),
                  key=lambda p: int(p.name.split(".")[0]))
