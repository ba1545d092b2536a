"""Layer ids taken from the model, and the parser for user layer selections.

A UNet layer is addressed the way ComfyUI's ``BasicTransformerBlock`` addresses it:
``(block kind, block number, depth inside the SpatialTransformer)``, e.g.
``("output", 3, 0)``. Ids come from what the model reports in ``extra_options``
(``block``, ``block_index``, ``activations_shape``), never from counting calls.
A DiT block is ``("double", i, 0)`` or ``("single", i, 0)`` as ComfyUI names it (``block_type``,
``block_index``, ``patches_replace["dit"][("double_block", i)]``; SD3's joint blocks are "double").

Selection syntax (comma separated, case insensitive):
    all             every attention layer
    16 / 16x16      every layer whose feature map is 16x16
    input.7         every depth of input block 7
    output.3-5      output blocks 3, 4 and 5
    output.0-2.1    depth 1 of output blocks 0..2 (SDXL blocks have depth > 1)
    middle          the middle block
    double.15-18    DiT double (Flux) / joint (SD3) blocks 15..18
    single          every single-stream block (Flux)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

BLOCK_KINDS = ("input", "middle", "output", "double", "single")


@dataclass(frozen=True, order=True)
class LayerId:
    kind: str    # "input" | "middle" | "output" (UNet) | "double" | "single" (DiT)
    number: int  # block number inside input_blocks / output_blocks (0 for middle); DiT: block_index
    depth: int   # transformer depth index inside the SpatialTransformer (block_index); DiT: 0

    def __str__(self) -> str:
        return f"{self.kind}.{self.number}.{self.depth}"

    @classmethod
    def from_extra_options(cls, extra_options: dict) -> "LayerId":
        kind, number = extra_options["block"][:2]
        return cls(str(kind), int(number), int(extra_options.get("block_index", 0)))


@dataclass(frozen=True)
class LayerInfo:
    layer: LayerId
    height: int  # feature-map rows at the size that was sampled
    width: int   # feature-map columns

    @property
    def tokens(self) -> int:
        return self.height * self.width


class LayerSelectionError(ValueError):
    pass


_TERM = re.compile(r"^(input|middle|output|double|single)(?:\.(\d+)(?:-(\d+))?)?(?:\.(\d+)(?:-(\d+))?)?$")
_RES = re.compile(r"^(\d+)(?:x(\d+))?$")


@dataclass(frozen=True)
class _Term:
    kind: str | None = None          # block kind, None for a resolution or "all" term
    numbers: tuple[int, int] | None = None
    depths: tuple[int, int] | None = None
    size: tuple[int, int] | None = None  # (h, w) for a resolution term
    text: str = ""

    def matches(self, layer: LayerId, height: int, width: int) -> bool:
        if self.size is not None:
            return (height, width) == self.size
        if self.kind is None:
            return True
        if layer.kind != self.kind:
            return False
        if self.numbers and not self.numbers[0] <= layer.number <= self.numbers[1]:
            return False
        if self.depths and not self.depths[0] <= layer.depth <= self.depths[1]:
            return False
        return True


@dataclass(frozen=True)
class LayerSelection:
    """A parsed selection; resolution terms are resolved when the feature size is known."""

    terms: tuple[_Term, ...]
    text: str

    def matches(self, layer: LayerId, height: int, width: int) -> bool:
        return any(t.matches(layer, height, width) for t in self.terms)

    def validate_ids(self, layers: list[LayerId]) -> None:
        """Check every block term against the model's layer ids (resolution terms are checked later)."""
        for term in self.terms:
            if term.kind is None:
                continue
            if not any(term.matches(lid, -1, -1) for lid in layers):
                raise LayerSelectionError(
                    f"layer selection term {term.text!r} matches no layer of this model; "
                    f"its attention layers are: {describe_ids(layers)}")

    def select(self, available: list[LayerInfo]) -> set[LayerId]:
        """Resolve against layers with known sizes; every term must match something."""
        chosen: set[LayerId] = set()
        for term in self.terms:
            hit = {i.layer for i in available if term.matches(i.layer, i.height, i.width)}
            if not hit:
                raise LayerSelectionError(
                    f"layer selection term {term.text!r} matches no layer; available layers: "
                    f"{describe(available)}")
            chosen |= hit
        return chosen


def describe_ids(layers: list[LayerId]) -> str:
    return ", ".join(str(lid) for lid in sorted(set(layers)))


def describe(available: list[LayerInfo]) -> str:
    by_res: dict[tuple[int, int], list[str]] = {}
    for info in sorted(available, key=lambda i: i.layer):
        by_res.setdefault((info.height, info.width), []).append(str(info.layer))
    return "; ".join(f"{h}x{w}: {', '.join(ids)}" for (h, w), ids in sorted(by_res.items(), reverse=True))


def parse_layer_selection(text: str) -> LayerSelection:
    """Parse ``text``; raise ``LayerSelectionError`` that shows the valid forms."""
    terms = [t.strip().lower() for t in (text or "").split(",") if t.strip()]
    if not terms:
        raise LayerSelectionError(
            f"empty layer selection {text!r}; use 'all', a resolution such as '16', "
            f"or block ids such as 'output.3-5'")
    return LayerSelection(tuple(_parse_term(t, text) for t in terms), text)


def _parse_term(term: str, text: str) -> _Term:
    if term == "all":
        return _Term(text=term)
    m = _RES.match(term)
    if m:
        h = int(m.group(1))
        return _Term(size=(h, int(m.group(2) or h)), text=term)
    m = _TERM.match(term)
    if not m:
        raise LayerSelectionError(
            f"cannot parse layer selection term {term!r} in {text!r}; valid forms are 'all', "
            f"'16' or '16x16', 'input.7', 'output.3-5', 'output.0-2.1', 'middle', 'double.15-18', 'single'")
    def rng(a, b):
        if a is None:
            return None
        lo, hi = int(a), int(b if b is not None else a)
        if hi < lo:
            raise LayerSelectionError(f"range {lo}-{hi} in layer term {term!r} is reversed; write {hi}-{lo}")
        return (lo, hi)
    return _Term(kind=m.group(1), numbers=rng(m.group(2), m.group(3)),
                 depths=rng(m.group(4), m.group(5)), text=term)
