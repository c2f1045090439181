"""ShapesWorld: a small procedural world of flat shapes, deterministic from a seed.

A scene is a plain background with one or two large objects, on the left and/or the right. An object
is an *instance*: a class (circle, square, triangle, star), a main colour, and an accent, a second
colour on part of the object (a cap on one side, a band, a dot, a corner) or none. Captions name the
class, the main colour, the position and the background, never the accent: "a photo of a red circle on
the left, gray background". So text can ask for "a red circle" but not for *this* red circle with a
white band; that is what one-shot learning has to add. The held-out instances never appear in the
pretraining scenes.

Images are 32x32 RGB, rendered at 4x and box-downsampled (antialiased edges), with a per-pixel mask for
every object.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 32
SUPERSAMPLE = 4

CLASSES = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (0.90, 0.16, 0.12),
    "green": (0.16, 0.72, 0.22),
    "blue": (0.18, 0.32, 0.95),
    "yellow": (0.96, 0.86, 0.12),
    "purple": (0.58, 0.20, 0.80),
    "white": (0.96, 0.96, 0.96),
}
BACKGROUNDS = {
    "black": (0.07, 0.07, 0.08),
    "gray": (0.50, 0.50, 0.50),
    "brown": (0.45, 0.28, 0.14),
    "pink": (0.96, 0.62, 0.72),
}
POSITIONS = ("left", "right")
# Accents: where the second colour goes, in the object's own coordinates (u right, v down, radius 1).
ACCENTS = ("none", "cap-top", "cap-bottom", "cap-left", "cap-right", "band-across", "band-down", "dot",
           "corner-top-left", "corner-top-right", "corner-bottom-left", "corner-bottom-right")

RADIUS = 7.0  # pixels at 32 px
CENTRE_X = {"left": 8.5, "right": 23.5}
CENTRE_Y = 16.0


@dataclass(frozen=True)
class Instance:
    shape: str
    colour: str
    accent: str = "none"
    accent_colour: str | None = None

    def __post_init__(self):
        if self.shape not in CLASSES or self.colour not in COLOURS or self.accent not in ACCENTS:
            raise ValueError(f"not a ShapesWorld instance: {self}")
        if (self.accent == "none") != (self.accent_colour is None) or self.accent_colour == self.colour:
            raise ValueError(f"an accent needs a second colour other than the main one: {self}")

    @property
    def words(self) -> str:
        """What a caption can say about it."""
        return f"{self.colour} {self.shape}"

    @property
    def key(self) -> str:
        return f"{self.colour}-{self.shape}-{self.accent}-{self.accent_colour or 'none'}"


@dataclass(frozen=True)
class Placed:
    instance: Instance
    position: str
    dx: float = 0.0  # jitter in pixels
    dy: float = 0.0
    scale: float = 1.0


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[Placed, ...]

    def caption(self, words: dict[int, str] | None = None) -> str:
        """The English caption; `words` replaces object i's description (e.g. with a trigger word)."""
        words = words or {}
        parts = [f"a {words.get(i, p.instance.words)} on the {p.position}"
                 for i, p in sorted(enumerate(self.objects), key=lambda item: POSITIONS.index(item[1].position))]
        return f"a photo of {' and '.join(parts)}, {self.background} background"


# One-shot instances: accents on colour pairs, each kept out of pretraining.
HELD_OUT = (
    Instance("circle", "red", "band-across", "white"),
    Instance("square", "blue", "corner-top-right", "yellow"),
    Instance("triangle", "yellow", "dot", "purple"),
    Instance("star", "white", "cap-top", "red"),
    Instance("circle", "green", "cap-left", "purple"),
    Instance("square", "purple", "band-down", "green"),
    Instance("triangle", "blue", "cap-bottom", "white"),
    Instance("star", "yellow", "corner-bottom-left", "blue"),
)
_HELD_OUT_KEYS = {i.key for i in HELD_OUT}


def all_instances(include_held_out: bool = False) -> list[Instance]:
    instances = []
    for shape in CLASSES:
        for colour in COLOURS:
            instances.append(Instance(shape, colour))
            for accent in ACCENTS[1:]:
                for second in COLOURS:
                    if second != colour:
                        instances.append(Instance(shape, colour, accent, second))
    return [i for i in instances if include_held_out or i.key not in _HELD_OUT_KEYS]


class SceneSampler:
    """Random scenes from a seed: one object (60%) or two, random instances, background, jitter."""

    def __init__(self, seed: int, instances: list[Instance] | None = None, two_object_share: float = 0.4):
        self.rng = np.random.default_rng(seed)
        instances = instances if instances is not None else all_instances()
        self._plain = [i for i in instances if i.accent == "none"] or instances
        self._accented = [i for i in instances if i.accent != "none"] or instances
        self.two_object_share = two_object_share

    def _jitter(self, instance: Instance, position: str) -> Placed:
        r = self.rng
        return Placed(instance, position, float(r.uniform(-0.8, 0.8)), float(r.uniform(-1.5, 1.5)), float(r.uniform(0.94, 1.06)))

    def instance(self) -> Instance:
        """Class and colour uniform; no accent a quarter of the time, else a uniform accent and second colour."""
        plain = self.rng.random() < 0.25
        pool = self._plain if plain else self._accented
        return pool[int(self.rng.integers(len(pool)))]

    def scene(self) -> Scene:
        background = BACKGROUNDS_LIST[int(self.rng.integers(len(BACKGROUNDS_LIST)))]
        if self.rng.random() < self.two_object_share:
            objects = (self._jitter(self.instance(), "left"), self._jitter(self.instance(), "right"))
        else:
            objects = (self._jitter(self.instance(), POSITIONS[int(self.rng.integers(2))]),)
        return Scene(background, objects)

    def scenes(self, n: int) -> list[Scene]:
        return [self.scene() for _ in range(n)]

    def placed(self, instance: Instance, position: str) -> Placed:
        return self._jitter(instance, position)

    def featuring(self, instance: Instance) -> tuple[Scene, str]:
        """A random scene with `instance` on a random side (half the time beside a random companion): (scene, side)."""
        side = POSITIONS[int(self.rng.integers(2))]
        objects = [self.placed(instance, side)]
        if self.rng.random() < 0.5:
            objects.append(self.placed(self.instance(), "right" if side == "left" else "left"))
        return Scene(BACKGROUNDS_LIST[int(self.rng.integers(len(BACKGROUNDS_LIST)))], tuple(objects)), side


BACKGROUNDS_LIST = tuple(BACKGROUNDS)


# ------------------------------------------------------------------------------------------ rendering

def _star_boundary(angle: torch.Tensor, outer: float = 1.08, inner: float = 0.46, points: int = 5) -> torch.Tensor:
    """Radius of a five-pointed star (first point up) along each direction `angle` (clockwise from up)."""
    sector = math.pi / points
    index = torch.floor(angle / sector)
    a = index * sector
    tip_first = (index.remainder(2) == 0)
    ra = torch.where(tip_first, torch.tensor(outer), torch.tensor(inner))
    rb = torch.where(tip_first, torch.tensor(inner), torch.tensor(outer))
    phi = angle - a
    # the straight edge between the polar points (ra, 0) and (rb, sector), met by the ray at phi
    return ra * rb * math.sin(sector) / (ra * torch.sin(phi) + rb * torch.sin(sector - phi))


def shape_mask(shape: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return torch.maximum(u.abs(), v.abs()) <= 0.86
    if shape == "triangle":
        return (v <= 0.82) & (u.abs() * 1.9 <= v + 1.0)
    if shape == "star":
        angle = torch.atan2(u, -v).remainder(2 * math.pi)
        return torch.sqrt(u * u + v * v) <= _star_boundary(angle)
    raise ValueError(shape)


def accent_mask(accent: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if accent == "none":
        return torch.zeros_like(u, dtype=torch.bool)
    if accent.startswith("cap-"):
        side = {"cap-top": -v, "cap-bottom": v, "cap-left": -u, "cap-right": u}[accent]
        return side > 0.32
    if accent == "band-across":
        return v.abs() < 0.24
    if accent == "band-down":
        return u.abs() < 0.24
    if accent == "dot":
        return u * u + (v - 0.05) ** 2 < 0.42 ** 2
    if accent.startswith("corner-"):
        sv = -1.0 if "top" in accent else 1.0
        su = -1.0 if "left" in accent else 1.0
        return su * u + sv * v > 0.62
    raise ValueError(accent)


def render(scenes: list[Scene], chunk: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [N,3,32,32] in 0..1 and object masks [N,2,32,32] (object i's coverage, 0 where absent)."""
    parts = [_render_chunk(scenes[i : i + chunk]) for i in range(0, len(scenes), chunk)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


_COLOUR_TABLE = torch.tensor([COLOURS[c] for c in COLOURS])
_COLOUR_INDEX = {c: i for i, c in enumerate(COLOURS)}


def _render_chunk(scenes: list[Scene]) -> tuple[torch.Tensor, torch.Tensor]:
    """All scenes of a chunk at once: per object slot, every pixel's object coordinates."""
    n, size = len(scenes), IMAGE_SIZE * SUPERSAMPLE
    grid = (torch.arange(size, dtype=torch.float32) + 0.5) / SUPERSAMPLE
    ys, xs = torch.meshgrid(grid, grid, indexing="ij")
    images = torch.tensor([BACKGROUNDS[s.background] for s in scenes])[:, :, None, None].expand(n, 3, size, size).clone()
    masks = torch.zeros(n, 2, size, size)
    for slot in range(2):
        rows = [k for k, s in enumerate(scenes) if len(s.objects) > slot]
        if not rows:
            continue
        placed = [scenes[k].objects[slot] for k in rows]
        radius = torch.tensor([RADIUS * p.scale for p in placed])[:, None, None]
        cx = torch.tensor([CENTRE_X[p.position] + p.dx for p in placed])[:, None, None]
        cy = torch.tensor([CENTRE_Y + p.dy for p in placed])[:, None, None]
        u, v = (xs - cx) / radius, (ys - cy) / radius
        inside = torch.zeros(len(rows), size, size, dtype=torch.bool)
        accent = torch.zeros_like(inside)
        for shape in CLASSES:
            which = torch.tensor([p.instance.shape == shape for p in placed])
            if which.any():
                inside[which] = shape_mask(shape, u[which], v[which])
        for name in ACCENTS[1:]:
            which = torch.tensor([p.instance.accent == name for p in placed])
            if which.any():
                accent[which] = accent_mask(name, u[which], v[which])
        accent &= inside
        main = _COLOUR_TABLE[[_COLOUR_INDEX[p.instance.colour] for p in placed]][:, :, None, None]
        second = _COLOUR_TABLE[[_COLOUR_INDEX[p.instance.accent_colour or p.instance.colour] for p in placed]][:, :, None, None]
        colour = torch.where(accent[:, None], second, main)
        index = torch.tensor(rows)
        images[index] = torch.where(inside[:, None], colour, images[index])
        masks[index, slot] = inside.float()
    return F.avg_pool2d(images, SUPERSAMPLE), F.avg_pool2d(masks, SUPERSAMPLE)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N,3,H,W] 0..1 → [N,H,W,3] uint8."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_grid(rows: list[torch.Tensor], path, scale: int = 3) -> None:
    """Rows of [3,H,W] pictures (rows may differ in length) → one PNG with 1-px white gaps, enlarged `scale` times."""
    from PIL import Image

    cell = IMAGE_SIZE + 2
    columns = max(len(r) for r in rows)
    grid = torch.ones(3, len(rows) * cell, columns * cell)
    for r, row in enumerate(rows):
        for c, picture in enumerate(row):
            grid[:, r * cell + 1 : r * cell + 1 + IMAGE_SIZE, c * cell + 1 : c * cell + 1 + IMAGE_SIZE] = picture
    Image.fromarray(to_uint8(grid[None])[0]).resize((columns * cell * scale, len(rows) * cell * scale), Image.NEAREST).save(path)
