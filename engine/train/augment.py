"""Paired augmentation (TextBoost, research/methods.md §2.4): each changed view of the photo, and of its masks,
comes with words in its prompt that say what was done, so the change is learned on those words, not on the object.

The words are augmentation tokens ("<zoom-in>", "<left>", ...), new words trained beside the objects' own from
the plain words they start at ("zoom in", "on the left"); prompts at inference never use them. A view takes, with
the augmentation probability, one geometric change (mirror, zoom, shift, quarter turn, crop, collage), then, with
the same probability, one change of colour (brightness, grayscale). Any method can train on such views: the trainer
prepares them once (the photo at training size, VAE-encoded), and each step picks one.
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# The augmentation tokens and the words each starts at (TextBoost's initialisers, for the ones it has).
TOKENS = {
    "<flipped>": "flip", "<zoom-in>": "zoom in", "<zoom-out>": "far away", "<left>": "on the left",
    "<right>": "on the right", "<rotated>": "rotated", "<crop>": "crop", "<collage>": "photo collage",
    "<dimmed>": "dark", "<bright>": "bright", "<grayscale>": "grayscale",
}
# The tokens each augmentation may add to a prompt.
ADDS = {"hflip": ("<flipped>",), "zoom": ("<zoom-in>", "<zoom-out>"), "shift": ("<left>", "<right>"),
        "rotate": ("<rotated>",), "crop": ("<crop>",), "collage": ("<collage>",), "brightness": ("<dimmed>", "<bright>"),
        "grayscale": ("<grayscale>",)}
GEOMETRIC = ("hflip", "zoom", "shift", "rotate", "crop", "collage")
COLOUR = ("brightness", "grayscale")
AUGMENTATIONS = GEOMETRIC + COLOUR


@dataclass
class View:
    """The photo as one step sees it: pixels [3,S,S] in 0..1, one mask [S,S] per object, and the augmentation words
    its prompt starts and ends with."""

    pixels: torch.Tensor
    masks: list[torch.Tensor]
    prefix: tuple[str, ...] = ()
    suffix: tuple[str, ...] = ()
    sides_swapped: bool = False  # recomposed: the objects stand on the other side, so the prompt's left and right swap
    twice: bool = False  # recomposed beside a copy: the object stands on the left and on the right
    companion: str = ""  # recomposed beside another object: the words that name it (it stands where the object stood)
    companion_mask: torch.Tensor | None = None  # that object's pixels, which the loss covers too

    def prompt(self, template: str, phrase: str) -> str:
        """The training prompt: `template` (one {}) naming the objects by `phrase`, true to what the view shows."""
        second = phrase if self.twice else self.companion
        if second:
            # "a {} on the left, ..." → "a {} on the left and a {} on the right, ..."; without sides: "a {} and a {}"
            template, said = _SIDE_AFTER_OBJECTS.subn(lambda found: f"{{}} on the {found.group(1).lower()} and a {{}} on "
                                                      f"the {_OTHER_SIDE[found.group(1).lower()]}", template, count=1)
            text = (template if said else template.replace("{}", "{} and a {}", 1)).format(phrase, second)
        else:
            text = template.format(phrase)
        if self.sides_swapped:
            text = _SIDE_WORD.sub(lambda found: _OTHER_SIDE[found.group(0).lower()], text)
        return " ".join((*self.prefix, text, *self.suffix))


_SIDE_WORD = re.compile(r"\b(left|right)\b", re.IGNORECASE)
_OTHER_SIDE = {"left": "right", "right": "left"}
_SIDE_AFTER_OBJECTS = re.compile(r"\{\} on the (left|right)\b", re.IGNORECASE)


def _affine(view: View, scale: float, shift: float) -> View:
    """Zoom by `scale` about the centre and move right by `shift` (a fraction of the width); the photo's edges are
    repeated where the picture comes in, the masks are empty there."""
    theta = torch.tensor([[[1 / scale, 0.0, -2 * shift / scale], [0.0, 1 / scale, 0.0]]])
    size = (1, 1, *view.pixels.shape[-2:])
    grid = F.affine_grid(theta, size, align_corners=False)
    pixels = F.grid_sample(view.pixels[None], grid, padding_mode="border", align_corners=False)[0]
    masks = [F.grid_sample(m[None, None], grid, padding_mode="zeros", align_corners=False)[0, 0] for m in view.masks]
    return View(pixels.clamp(0, 1), masks)


def _crop(view: View, rng: random.Random) -> View:
    """A random square crop of 8-100% of the area that keeps the objects' centre, resized back."""
    side = view.pixels.shape[-1]
    crop = max(8, round(side * math.sqrt(rng.uniform(0.08, 1.0))))
    ys, xs = torch.nonzero(torch.stack(view.masks).amax(0) > 0.5, as_tuple=True)
    cy, cx = (int(ys.float().mean()), int(xs.float().mean())) if len(ys) else (side // 2, side // 2)
    top = rng.randint(max(0, cy - crop + 1), min(side - crop, cy))
    left = rng.randint(max(0, cx - crop + 1), min(side - crop, cx))

    def cut(tensor):
        part = tensor[..., top : top + crop, left : left + crop]
        return F.interpolate(part.reshape(-1, 1, crop, crop), size=(side, side), mode="bilinear", align_corners=False,
                             antialias=True).reshape(tensor.shape)

    return View(cut(view.pixels).clamp(0, 1), [cut(m) for m in view.masks])


def _collage(view: View, rng: random.Random) -> View:
    """The photo shrunk into an n x n grid (n = 2 or 3) with 1-pixel black borders; every tile holds the objects."""
    side, n = view.pixels.shape[-1], rng.choice((2, 3))
    tile = (side - (n + 1)) // n

    def tiled(tensor):
        small = F.interpolate(tensor.reshape(-1, 1, side, side), size=(tile, tile), mode="bilinear", align_corners=False,
                              antialias=True).reshape(*tensor.shape[:-2], tile, tile)
        out = torch.zeros_like(tensor)
        for row in range(n):
            for column in range(n):
                top, left = 1 + row * (tile + 1), 1 + column * (tile + 1)
                out[..., top : top + tile, left : left + tile] = small
        return out

    return View(tiled(view.pixels), [tiled(m) for m in view.masks])


def apply(view: View, name: str, rng: random.Random) -> View:
    """One augmentation (a name of AUGMENTATIONS) of the view, with its word added to the view's prompt words."""
    changed, before, after = _change(view, name, rng)
    return View(changed.pixels, changed.masks, view.prefix + before, after + view.suffix)


def _change(view: View, name: str, rng: random.Random) -> tuple[View, tuple[str, ...], tuple[str, ...]]:
    """(the changed pixels and masks, words before the prompt, words after it)."""
    if name == "hflip":
        return View(view.pixels.flip(-1), [m.flip(-1) for m in view.masks]), ("<flipped>",), ()
    if name == "zoom":
        scale = rng.uniform(0.34, 1.4)
        token = ("<zoom-out>",) if scale < 0.6 else ("<zoom-in>",) if scale > 1.2 else ()
        return _affine(view, scale, 0.0), token, ()
    if name == "shift":
        amount = rng.uniform(0.15, 0.3) * rng.choice((-1, 1))
        return _affine(view, 1.0, amount), (), ("<left>" if amount < 0 else "<right>",)
    if name == "rotate":
        turns = rng.choice((1, 2, 3))
        return View(view.pixels.rot90(turns, (-2, -1)), [m.rot90(turns, (-2, -1)) for m in view.masks]), ("<rotated>",), ()
    if name == "crop":
        return _crop(view, rng), ("<crop>",), ()
    if name == "collage":
        return _collage(view, rng), ("<collage>",), ()
    if name == "brightness":
        factor = rng.uniform(0.4, 0.6) if rng.random() < 0.5 else rng.uniform(1.3, 1.5)
        return View((view.pixels * factor).clamp(0, 1), view.masks), ("<dimmed>" if factor < 1 else "<bright>",), ()
    if name == "grayscale":
        grey = (view.pixels * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(0, keepdim=True)
        return View(grey.expand_as(view.pixels).clone(), view.masks), (), ("<grayscale>",)
    raise ValueError(f"unknown augmentation {name!r}")


def tokens_of(names) -> list[str]:
    """The augmentation tokens the named augmentations may add, in a fixed order."""
    return [token for name in AUGMENTATIONS if name in names for token in ADDS[name]]


def views(photo: View, names: tuple[str, ...], probability: float, count: int, seed: int) -> list[View]:
    """`count` views of the photo: the photo itself, then views drawn as the module says (seeded: the same seed gives
    the same views)."""
    rng = random.Random(seed)
    geometric = [n for n in GEOMETRIC if n in names]
    colour = [n for n in COLOUR if n in names]
    drawn = [photo]
    while len(drawn) < count:
        view = photo
        for choices in (geometric, colour):
            if choices and rng.random() < probability:
                view = apply(view, rng.choice(choices), rng)
        drawn.append(view)
    return drawn


# ----------------------------------------------------------------------------------------------------------------
# Recomposition (research/methods.md §2.4's paired idea for position): the objects cut out with their masks and set
# on the mirrored side, the background filled in where they stood. Not a mirror image: each object keeps its own
# look (a mirror would move its accents too), and the prompt's left and right swap to stay true.


def fill_holes(pixels: torch.Tensor, hole: torch.Tensor) -> torch.Tensor:
    """The picture with `hole` (1 = unknown) filled from the pixels around it: averages pushed down an image pyramid
    and pulled back up, so a hole takes the colours of its rim, smoothly (exact on a plain background)."""
    known = (1 - hole).clamp(0, 1)[None, None]
    levels = [(pixels[None] * known, known)]
    while min(levels[-1][1].shape[-2:]) > 1:
        weighted, weight = levels[-1]
        levels.append((F.avg_pool2d(weighted, 2, ceil_mode=True), F.avg_pool2d(weight, 2, ceil_mode=True)))
    weighted, weight = levels[-1]
    filled = weighted / weight.clamp(min=1e-8)
    for weighted, weight in reversed(levels[:-1]):
        coarse = F.interpolate(filled, size=weighted.shape[-2:], mode="bilinear", align_corners=False)
        sure = weight.clamp(max=1)  # a partly known pixel keeps its share of the known colour
        filled = torch.where(weight > 0, weighted / weight.clamp(min=1e-8), coarse) * sure + coarse * (1 - sure)
    return torch.where(hole[None] > 0, filled[0], pixels).clamp(0, 1)


def _cut_out(masks: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each object's cut-out — its pixels with the rim its soft edge blends into (the rim holds its own background's
    share) — and the hole they leave, a pixel wider, for fill_holes."""
    cutouts = [F.max_pool2d((m > 0.01).float()[None, None], 3, stride=1, padding=1)[0, 0] for m in masks]
    return cutouts, F.max_pool2d(torch.stack(cutouts).amax(0)[None, None], 3, stride=1, padding=1)[0, 0]


def _centre(mask: torch.Tensor) -> tuple[float, float] | None:
    """The mask's centre of mass (x, y in pixels), None for an empty mask."""
    total = float(mask.sum())
    if total == 0:
        return None
    centres = torch.arange(mask.shape[-1], dtype=torch.float32) + 0.5  # pixel centres
    return float((mask.sum(0) * centres).sum()) / total, float((mask.sum(1) * centres).sum()) / total


def _extent(mask: torch.Tensor, dim: int) -> float:
    """How many pixels the mask spans across `dim` (0: rows, its height; 1: columns, its width)."""
    found = torch.nonzero(mask.amax(1 - dim) > 0.5, as_tuple=True)[0]
    return float(found[-1] - found[0] + 1) if len(found) else 1.0


def _placed(tensor: torch.Tensor, centre: tuple[float, float], to: tuple[float, float], scale: float) -> torch.Tensor:
    """[C, S, S] with the point `centre` moved to `to` (x, y in pixels) and scaled by `scale` about it; zeros come in."""
    side = tensor.shape[-1]
    (fx, fy), (tx, ty) = [(2 * x / side - 1, 2 * y / side - 1) for x, y in (centre, to)]  # in -1..1
    theta = torch.tensor([[[1 / scale, 0.0, fx - tx / scale], [0.0, 1 / scale, fy - ty / scale]]], dtype=tensor.dtype)
    grid = F.affine_grid(theta, (1, tensor.shape[0], side, side), align_corners=False)
    return F.grid_sample(tensor[None], grid, padding_mode="zeros", align_corners=False)[0]


def _moved(tensor: torch.Tensor, shift: int, scale: float, centre: tuple[float, float]) -> torch.Tensor:
    """[C, S, S] moved right by `shift` pixels and scaled by `scale` about `centre` (x, y in pixels); zeros come in."""
    side = tensor.shape[-1]
    if scale == 1.0:
        out = torch.zeros_like(tensor)
        if shift >= 0:
            out[..., shift:] = tensor[..., : side - shift]
        else:
            out[..., :shift] = tensor[..., -shift:]
        return out
    return _placed(tensor, centre, (centre[0] + shift, centre[1]), scale)


def recompose(view: View, rng: random.Random, resize: float = 0.0) -> View:
    """The view with each object on its mirrored place (keeping its own look; two objects change sides) and, with
    `resize` > 0, each scaled by a factor within 1 ± resize; the background is filled in where they stood. Its prompt
    swaps left and right."""
    side = view.pixels.shape[-1]
    cutouts, hole = _cut_out(view.masks)
    pixels = fill_holes(view.pixels, hole)
    masks = []
    for mask, cutout in zip(view.masks, cutouts):
        centre = _centre(mask)
        if centre is None:  # an object too small to survive the resize: nothing to move
            masks.append(mask)
            continue
        x, y = centre
        scale = rng.uniform(1 - resize, 1 + resize) if resize > 0 else 1.0
        moved = _moved(torch.cat([view.pixels, cutout[None], mask[None]]), round(side - 2 * x), scale, (x, y))
        alpha = moved[3:4].clamp(0, 1)
        pixels = pixels * (1 - alpha) + moved[:3] * alpha
        masks.append(moved[4].clamp(0, 1))
    return View(pixels.clamp(0, 1), masks, view.prefix, view.suffix, not view.sides_swapped)


def beside_a_copy(view: View, rng: random.Random, resize: float = 0.0) -> View:
    """A one-object view recomposed with the object twice, side by side: where it stood and on the mirrored place,
    both pushed apart (and shrunk if need be) when they would overlap, each scaled within 1 ± resize; the background
    filled in where it stood. Its mask covers both (the same words name both), its prompt says "on the left and on
    the right" (prompt()). What a single photo never shows: the object beside another object."""
    if len(view.masks) != 1:
        raise ValueError("a view beside a copy needs exactly one object")
    side = view.pixels.shape[-1]
    mask = view.masks[0]
    (cutout,), hole = _cut_out(view.masks)
    pixels = fill_holes(view.pixels, hole)
    found = _centre(mask)
    if found is None:
        return View(pixels, [mask], view.prefix, view.suffix, twice=True)
    x, y = found
    width = _extent(mask, 1)
    scale = rng.uniform(1 - resize, 1 + resize) if resize > 0 else 1.0
    scale = min(scale, side / 2 / width)  # two must fit across the picture
    left, right = min(x, side - x), max(x, side - x)
    if right - left < width * scale:  # they would overlap: touching, about the middle
        left, right = (side - width * scale) / 2, (side + width * scale) / 2
    masks = torch.zeros_like(mask)
    for centre in (left, right):
        moved = _moved(torch.cat([view.pixels, cutout[None], mask[None]]), round(centre - x), scale, (x, y))
        # The cut-out's rim holds background: over the first copy's edge only the object itself goes.
        alpha = torch.where(masks > 0, moved[4], moved[3]).clamp(0, 1)[None]
        pixels = pixels * (1 - alpha) + moved[:3] * alpha
        masks = torch.maximum(masks, moved[4].clamp(0, 1))
    return View(pixels.clamp(0, 1), [masks], view.prefix, view.suffix, twice=True)


def beside_another(view: View, companion: View, words: str, rng: random.Random, resize: float = 0.0,
                   move: bool = True) -> View:
    """A one-object view with another object beside it, on the side the object leaves free: with `move`, the object
    recomposed (recompose(): on its mirrored place) and the other where it stood; else the object kept and the other
    on the mirrored place (both, so that neither side of the object comes to mean "with company"). The other is
    `companion`'s object, cut out by its mask, scaled to the object's height and moved clear of it, named by `words`
    in the prompt. Its mask (companion_mask) joins the loss, so the words keep their own look beside the object's:
    what the object's likeness must not leak into."""
    if len(view.masks) != 1:
        raise ValueError("a view beside another object needs exactly one object")
    placed_view = recompose(view, rng, resize) if move else view
    side = view.pixels.shape[-1]
    own, other = placed_view.masks[0], companion.masks[0]
    here, there = _centre(own), _centre(other)
    if here is None or there is None:
        return placed_view
    scale = min(_extent(own, 0) / _extent(other, 0), side / 2 / _extent(other, 1))
    target = side - here[0]  # the mirrored place of where the object stands now
    clear = (_extent(own, 1) + _extent(other, 1) * scale) / 2  # centre to centre, touching
    if abs(target - here[0]) < clear:
        target = here[0] + clear if here[0] <= side / 2 else here[0] - clear
    placed = _placed(torch.cat([companion.pixels, other[None]]), there, (target, here[1]), scale)
    alpha = (placed[3] * (1 - own)).clamp(0, 1)  # behind the object where they meet
    pixels = placed_view.pixels * (1 - alpha) + placed[:3] * alpha
    return View(pixels.clamp(0, 1), placed_view.masks, view.prefix, view.suffix, sides_swapped=move, companion=words,
                companion_mask=alpha)


def object_by_background(picture: torch.Tensor, tolerance: float = 0.12) -> torch.Tensor | None:
    """A mask [S, S] of what stands out from a plain background: the pixels further than `tolerance` (in any channel)
    from the median colour of the picture's 2-px border. None when that border is not plain (a fifth of it off that
    colour) or what stands out covers under 1% or over half of the picture: no clean cut."""
    frame = torch.cat([picture[:, :2].flatten(1), picture[:, -2:].flatten(1),
                       picture[:, :, :2].flatten(1), picture[:, :, -2:].flatten(1)], 1)
    colour = frame.median(1).values
    if float(((frame - colour[:, None]).abs().amax(0) > tolerance).float().mean()) > 0.2:
        return None
    mask = ((picture - colour[:, None, None]).abs().amax(0) > tolerance).float()
    return mask if 0.01 <= float(mask.mean()) <= 0.5 else None


def companions(pictures: torch.Tensor) -> list[View]:
    """The pictures [N, 3, S, S] whose object cuts cleanly from a plain background (object_by_background), each with
    that cut as its one mask."""
    return [View(p, [mask]) for p in pictures if (mask := object_by_background(p)) is not None]


def recomposed_views(photo: View, resize: float, count: int, seed: int) -> list[View]:
    """The photo's recompositions: one without resizing, else `count` of them (seeded: the same seed, the same views)."""
    rng = random.Random(seed + 1)  # not the augmentation views' stream
    return [recompose(photo, rng, resize) for _ in range(count if resize > 0 else 1)]


def views_beside_a_copy(photo: View, resize: float, count: int, seed: int) -> list[View]:
    """The one-object photo beside a copy of its object: one view without resizing, else `count` (seeded)."""
    rng = random.Random(seed + 2)  # nor the recompositions'
    return [beside_a_copy(photo, rng, resize) for _ in range(count if resize > 0 else 1)]


def views_beside_another(photo: View, companions: list[View], words: str, resize: float, count: int, seed: int
                         ) -> list[View]:
    """The one-object photo beside each companion (their objects cut out by their masks), once moved and once where it
    stands, or with `resize` > 0 `count` views beside companions drawn in turn (seeded)."""
    rng = random.Random(seed + 3)  # nor the copies'
    total = count if resize > 0 else 2 * len(companions)
    return [beside_another(photo, companions[(k // 2) % len(companions)], words, rng, resize, move=k % 2 == 0)
            for k in range(total)]
