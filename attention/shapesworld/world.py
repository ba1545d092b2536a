"""The ShapesWorld generator: seeded scenes of 1-3 coloured shapes with exact masks.

Rendering is vectorised in torch (supersampled inside-tests per shape), so a batch of
scenes is drawn on the CPU or GPU in milliseconds. Pixels are (3, S, S) in [0, 1];
masks are (S, S) booleans at coverage >= 0.5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLOURS = {
    "red": (0.90, 0.10, 0.10), "green": (0.10, 0.72, 0.20), "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.88, 0.10), "purple": (0.58, 0.20, 0.80), "orange": (1.00, 0.55, 0.05),
    "cyan": (0.10, 0.85, 0.90),
}
BACKGROUNDS = {"gray": (0.50, 0.50, 0.50), "black": (0.06, 0.06, 0.06), "white": (0.95, 0.95, 0.95)}


class ImpossibleSceneError(ValueError):
    pass


@dataclass
class ShapeObject:
    shape: str
    colour: str
    cx: float        # centre, pixels
    cy: float
    radius: float    # half extent, pixels
    angle: float = 0.0
    mask: torch.Tensor | None = field(default=None, repr=False)  # (S, S) bool

    @property
    def words(self) -> tuple[str, str]:
        return (self.colour, self.shape)


@dataclass
class Scene:
    image: torch.Tensor               # (3, S, S) in [0, 1]
    objects: list[ShapeObject]
    background: str
    caption: str
    background_mask: torch.Tensor     # (S, S) bool: pixels of no object


@dataclass
class SceneSpec:
    """What to draw; any None field is drawn at random."""
    objects: list[tuple[str | None, str | None]]   # (colour, shape) per object
    background: str | None = None
    name_background: bool | None = None


def one_colour_spec(shapes: list[str] | tuple[str, ...], k: int, generator: torch.Generator) -> SceneSpec:
    """k objects of one random colour with k distinct shapes drawn from ``shapes`` (draws the colour, then the
    shapes): a scene where only the shape tells the objects apart."""
    colour = list(COLOURS)[int(torch.randint(len(COLOURS), (), generator=generator))]
    picks = torch.randperm(len(shapes), generator=generator)[:k].tolist()
    return SceneSpec([(colour, shapes[j]) for j in picks])


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_for(objects: list[tuple[str, str]], background: str | None) -> str:
    parts = [f"{article(c)} {c} {s}" for c, s in objects]
    if len(parts) == 1:
        text = parts[0]
    elif len(parts) == 2:
        text = f"{parts[0]} and {parts[1]}"
    else:
        text = ", ".join(parts[:-1]) + f" and {parts[-1]}"
    if background:
        text += f" on {article(background)} {background} background"
    return text


def _inside(shape: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inside test in the unit frame of the shape (u right, v down, extent about [-1, 1])."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return torch.maximum(u.abs(), v.abs()) <= 0.82
    if shape == "diamond":
        return u.abs() + v.abs() <= 1.0
    if shape == "cross":
        return ((u.abs() <= 0.32) & (v.abs() <= 0.95)) | ((v.abs() <= 0.32) & (u.abs() <= 0.95))
    if shape == "triangle":  # apex up, base at v = 0.75
        return (v <= 0.75) & (v >= -1.0 + 1.85 * u.abs())
    if shape == "star":
        r = torch.sqrt(u * u + v * v)
        theta = torch.atan2(u, -v)
        spike = (0.5 + 0.5 * torch.cos(5 * theta)) ** 2
        return r <= 0.42 + 0.6 * spike
    raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")


def render_masks(objects: list[ShapeObject], size: int, supersample: int = 4,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Coverage of each object, (n, S, S) in [0, 1]."""
    s = size * supersample
    coords = (torch.arange(s, device=device, dtype=torch.float32) + 0.5) / supersample
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    out = []
    for ob in objects:
        ca, sa = math.cos(ob.angle), math.sin(ob.angle)
        dx, dy = (xx - ob.cx) / ob.radius, (yy - ob.cy) / ob.radius
        u, v = ca * dx + sa * dy, -sa * dx + ca * dy
        cov = _inside(ob.shape, u, v).float()
        cov = torch.nn.functional.avg_pool2d(cov[None, None], supersample)[0, 0]
        out.append(cov)
    return torch.stack(out) if out else torch.zeros(0, size, size, device=device)


class ShapesWorld:
    """Seeded scene sampler. ``ShapesWorld(seed).sample()`` gives a random scene."""

    def __init__(self, seed: int = 0, size: int = 32, min_radius: float = 4.5, max_radius: float = 7.5,
                 p_name_background: float = 0.5, max_objects: int = 3):
        self.size = size
        self.min_radius, self.max_radius = min_radius, max_radius
        self.p_name_background = p_name_background
        self.max_objects = max_objects
        self.gen = torch.Generator().manual_seed(seed)

    def _rand(self) -> float:
        return float(torch.rand((), generator=self.gen))

    def _choice(self, seq):
        seq = list(seq)
        return seq[int(torch.randint(len(seq), (), generator=self.gen))]

    def _place(self, n: int, radius_range: tuple[float, float]) -> list[tuple[float, float, float]]:
        lo, hi = radius_range
        for _ in range(200):
            placed: list[tuple[float, float, float]] = []
            for _ in range(n):
                for _ in range(100):
                    r = lo + (hi - lo) * self._rand()
                    cx = r + (self.size - 2 * r) * self._rand()
                    cy = r + (self.size - 2 * r) * self._rand()
                    if all(math.hypot(cx - x, cy - y) >= r + rr + 1.0 for x, y, rr in placed):
                        placed.append((cx, cy, r))
                        break
            if len(placed) == n:
                return placed
        raise ImpossibleSceneError(
            f"cannot place {n} non-overlapping objects of radius {lo}-{hi} px in a {self.size}x{self.size} "
            f"image; ask for fewer objects (at most {self.max_objects}) or smaller radii")

    def sample(self, spec: SceneSpec | None = None, radius_range: tuple[float, float] | None = None,
               device: torch.device | str = "cpu") -> Scene:
        if spec is None:
            n = 1 + int(torch.randint(self.max_objects, (), generator=self.gen))
            spec = SceneSpec([(None, None)] * n)
        n = len(spec.objects)
        if n < 1 or n > self.max_objects:
            raise ImpossibleSceneError(f"a scene holds 1 to {self.max_objects} objects, not {n}")
        bg = spec.background or self._choice(BACKGROUNDS)
        if bg not in BACKGROUNDS:
            raise ValueError(f"unknown background {bg!r}; known: {', '.join(BACKGROUNDS)}")
        pairs = []
        for colour, shape in spec.objects:
            colour = colour or self._choice(COLOURS)
            shape = shape or self._choice(SHAPES)
            if colour not in COLOURS or shape not in SHAPES:
                raise ValueError(f"unknown object {colour!r} {shape!r}; colours: {', '.join(COLOURS)}; "
                                 f"shapes: {', '.join(SHAPES)}")
            pairs.append((colour, shape))
        places = self._place(n, radius_range or (self.min_radius, self.max_radius))
        objects = [ShapeObject(s, c, cx, cy, r, angle=(self._rand() - 0.5) * 0.5)
                   for (c, s), (cx, cy, r) in zip(pairs, places)]
        cover = render_masks(objects, self.size, device=device)             # (n, S, S)
        image = torch.tensor(BACKGROUNDS[bg], device=device).view(3, 1, 1).expand(3, self.size, self.size).clone()
        for ob, cov in zip(objects, cover):
            col = torch.tensor(COLOURS[ob.colour], device=device).view(3, 1, 1)
            image = image * (1 - cov) + col * cov
            ob.mask = cov >= 0.5
        name_bg = spec.name_background
        if name_bg is None:
            name_bg = self._rand() < self.p_name_background
        caption = caption_for(pairs, bg if name_bg else None)
        bg_mask = ~(cover >= 0.5).any(0) if n else torch.ones(self.size, self.size, dtype=torch.bool)
        return Scene(image.clamp(0, 1), objects, bg, caption, bg_mask)

    def batch(self, n: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, list[str], list[Scene]]:
        scenes = [self.sample(device=device) for _ in range(n)]
        return torch.stack([s.image for s in scenes]), [s.caption for s in scenes], scenes
