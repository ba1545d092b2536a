"""Grounding head files: what a head was trained on (``HeadMeta``), whether features fit it, saving and loading.

A head file is a safetensors file of the head's weights whose metadata holds the format name, its version,
the ``HeadConfig`` and the ``HeadMeta`` as JSON. The head itself is ``attention/grounding.py``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import logger
from .grounding import DEFAULT_TEMPLATE, QUERY_MODES, GroundingHead, GroundingLayoutError, HeadConfig

FORMAT = "attention_lab.grounding_head"
VERSION = 1


class GroundingHeadFileError(RuntimeError):
    """A head file is missing, corrupt or not a grounding head."""


@dataclass
class HeadMeta:
    family: str                                # model family of the features ("sd1", "sdxl", "shapesworld", ...)
    context_dim: int                           # T
    channels: tuple[int, ...]                  # per level, coarse -> fine
    sizes: tuple[tuple[int, int], ...]         # per level at training time (other image sizes are allowed)
    concat_uncond: bool                        # features uncond ‖ cond (True) or cond only
    timestep: int                              # DDPM index of the features (upstream: 1)
    query: str = "template"                    # "template" (upstream) | "prompt" (the word's states in the prompt)
    template: str = DEFAULT_TEMPLATE
    seen_words: tuple[str, ...] = ()
    training: dict = field(default_factory=dict)   # steps, batch, lr, seed, loss, data source, seconds, ...
    blocks: tuple[tuple[str, ...], ...] = ()       # per level, the UNet block ids it holds (informational)

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        self.sizes = tuple((int(h), int(w)) for h, w in self.sizes)
        self.seen_words = tuple(self.seen_words)
        self.blocks = tuple(tuple(b) for b in self.blocks)
        if self.query not in QUERY_MODES:
            raise ValueError(f"query mode {self.query!r} is not one of {QUERY_MODES}")

    @classmethod
    def for_features(cls, features, **rest) -> "HeadMeta":
        return cls(family=str(features.family), context_dim=int(features.context_dim),
                   channels=tuple(int(x.shape[1]) for x in features.levels),
                   sizes=tuple(tuple(x.shape[-2:]) for x in features.levels),
                   concat_uncond=bool(features.concat_uncond), timestep=int(features.timestep),
                   blocks=tuple(tuple(b) for b in getattr(features, "blocks", ())), **rest)

    def describe(self) -> str:
        return (f"{self.family} features (context width {self.context_dim}, {len(self.channels)} levels with "
                f"channels {self.channels}, {'uncond ‖ cond' if self.concat_uncond else 'cond only'})")


def describe_features(features) -> str:
    channels = tuple(int(x.shape[1]) for x in features.levels)
    return (f"{features.family} features (context width {features.context_dim}, {len(channels)} levels with "
            f"channels {channels}, {'uncond ‖ cond' if features.concat_uncond else 'cond only'})")


def check_compatible(meta: HeadMeta, features, name: str = "the grounding head") -> None:
    """Raise GroundingLayoutError naming both sides unless ``features`` match what the head was trained on.
    A different timestep only logs a warning (the t ablation feeds other timesteps on purpose)."""
    channels = tuple(int(x.shape[1]) for x in features.levels)
    same = (str(features.family) == meta.family and int(features.context_dim) == meta.context_dim
            and channels == meta.channels and bool(features.concat_uncond) == meta.concat_uncond)
    if not same:
        raise GroundingLayoutError(
            f"{name} was trained on {meta.describe()}, but these are {describe_features(features)}. Compute the "
            f"features with the model (and CFG setting) the head was trained on, or train a head on this model")
    if int(features.timestep) != meta.timestep:
        logger.warning("grounding: features at timestep %d, the head was trained at %d; masks may be worse",
                       int(features.timestep), meta.timestep)


def check_query_mode(meta: HeadMeta, query: str, name: str = "the grounding head") -> None:
    if query != meta.query:
        raise GroundingLayoutError(f"{name} was trained with {meta.query!r} queries, not {query!r}; set query to "
                                   f"{meta.query!r} or train a head with {query!r} queries")


def save_head(path: Path | str, head: GroundingHead, meta: HeadMeta, overwrite: bool = True) -> Path:
    """Write head + metadata as safetensors, atomically (temp file, then rename: a crash never leaves half a
    file where an earlier head was). ``overwrite=False`` refuses an existing file."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (or the command's --force) to replace it, or "
                              f"choose another file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu().clone() for k, v in head.state_dict().items()}
    m = asdict(meta)
    metadata = {"format": FORMAT, "version": str(VERSION), "config": head.config.to_json(), "meta": json.dumps(m)}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(state, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o644)                 # like any other file we write, not the temp file's 0600
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_head(path: Path | str, device: str | torch.device = "cpu") -> tuple[GroundingHead, HeadMeta]:
    """(head in eval mode, metadata) from a file written by ``save_head``, or GroundingHeadFileError."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise GroundingHeadFileError(f"grounding head file {path} does not exist; train one (GroundingHeadTrain "
                                     f"node, or python -m attention.shapesworld.grounding --train-asset) or pick "
                                     f"another file")
    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt file
        raise GroundingHeadFileError(f"grounding head file {path} is not a readable safetensors file ({e})") from e
    if md.get("format") != FORMAT:
        raise GroundingHeadFileError(f"{path} is not an Attention Lab grounding head (metadata format "
                                     f"{md.get('format')!r}, expected {FORMAT!r})")
    if int(md.get("version", 0)) > VERSION:
        raise GroundingHeadFileError(f"{path} was written by a newer version ({md['version']} > {VERSION}) of the "
                                     f"pack; update Attention Lab")
    config = HeadConfig.from_json(md["config"])
    raw = json.loads(md["meta"])
    meta = HeadMeta(**raw)
    head = GroundingHead(config)
    try:
        head.load_state_dict(state)
    except RuntimeError as e:
        raise GroundingHeadFileError(f"grounding head file {path} does not match its own config "
                                     f"({str(e).splitlines()[0]})") from e
    return head.to(device).eval(), meta
