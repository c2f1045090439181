"""Masks after segmentation: grown or shrunk, feathered, and a numbered preview of several over the photo."""
from __future__ import annotations

import colorsys
import math

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..images import load_image, load_mask, to_pil


MAX_GROW = 512  # pixels: more would swallow or erase any object in a photo


def check_refine_settings(dilate, feather) -> None:
    if isinstance(dilate, bool) or not isinstance(dilate, (int, np.integer)) or not -MAX_GROW <= dilate <= MAX_GROW:
        raise InputError(f"dilate must be a whole number of pixels from -{MAX_GROW} to {MAX_GROW}, got {dilate!r}.")
    if isinstance(feather, bool) or not isinstance(feather, (int, float)) or not 0 <= feather <= MAX_GROW:
        raise InputError(f"feather must be a blur radius (sigma) from 0 to {MAX_GROW} pixels, got {feather!r}.")


def check_not_emptied(masks, dilate: int) -> None:
    """A mask that shrinking (a negative dilate) left without object pixels is refused, not written."""
    for number, mask in enumerate(masks, 1):
        if float(mask.max()) < 0.5:
            raise InputError(f"the mask of object {number} is empty after dilate {dilate}: the object is thinner than "
                             "that; shrink by fewer pixels.")


def _grow(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Dilate [H, W] by `pixels` (a square max-filter); negative pixels erode."""
    if pixels == 0:
        return mask
    radius = abs(pixels)
    sign = 1 if pixels > 0 else -1
    grown = F.max_pool2d(sign * mask[None, None], kernel_size=2 * radius + 1, stride=1, padding=radius)
    return sign * grown[0, 0]


def _gaussian_blur(mask: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    blurred = F.pad(mask[None, None], (radius,) * 4, mode="replicate")
    blurred = F.conv2d(blurred, kernel.view(1, 1, 1, -1))
    return F.conv2d(blurred, kernel.view(1, 1, -1, 1))[0, 0]


def refine_mask(mask, dilate: int = 0, feather: float = 0.0) -> torch.Tensor:
    """Grow (dilate > 0) or shrink (dilate < 0) a mask by whole pixels, then soften its edge.

    feather is a Gaussian sigma in pixels. The object itself stays at 1 and the edge fades outward
    over about 2 sigma: max(mask, min(1, 2 * blur(mask))) equals 1 on the mask and its boundary.
    Applies to SAM masks and user-drawn masks alike; returns float32 [H, W] in 0..1.
    """
    check_refine_settings(dilate, feather)
    mask = _grow(load_mask(mask), int(dilate))
    if feather > 0:
        mask = torch.maximum(mask, (2 * _gaussian_blur(mask, float(feather))).clamp(max=1.0))
    return mask.clamp(0.0, 1.0).contiguous()


def _mask_colour(index: int) -> tuple[float, float, float]:
    """A distinct, saturated RGB colour for object `index` (golden-ratio steps around the hue circle)."""
    return colorsys.hsv_to_rgb((0.08 + index * 0.618034) % 1.0, 0.85, 1.0)


def overlay_masks(image, masks, opacity: float = 0.45) -> torch.Tensor:
    """A preview [3, H, W]: each mask tinted in its own colour, outlined, numbered 1, 2, ... at its centre."""
    from PIL import ImageDraw

    image = load_image(image)
    height, width = image.shape[-2:]
    masks = [load_mask(mask, f"mask {i + 1}") for i, mask in enumerate(masks)]
    for i, mask in enumerate(masks):
        if tuple(mask.shape) != (height, width):
            raise InputError(
                f"mask {i + 1} is {mask.shape[1]}x{mask.shape[0]} but the image is {width}x{height}; "
                "use masks made from this image."
            )
    outline = max(1, round(max(height, width) / 300))
    preview = image.clone()
    for i, mask in enumerate(masks):
        colour = torch.tensor(_mask_colour(i)).view(3, 1, 1)
        preview = preview * (1 - opacity * mask) + colour * (opacity * mask)
        inside = (mask >= 0.5).float()
        edge = (inside - _grow(inside, -outline)) > 0
        preview = torch.where(edge, colour, preview)

    picture = to_pil(preview)
    draw = ImageDraw.Draw(picture)
    font_size = max(12, round(min(height, width) / 12))
    for i, mask in enumerate(masks):
        weights = (mask >= 0.5).float()
        if not weights.any():
            continue
        total = weights.sum()
        centre_y = float((weights.sum(dim=1) * torch.arange(height)).sum() / total)
        centre_x = float((weights.sum(dim=0) * torch.arange(width)).sum() / total)
        text = str(i + 1)
        left, top, right, bottom = draw.textbbox((0, 0), text, font_size=font_size)
        draw.text(
            (centre_x - (left + right) / 2, centre_y - (top + bottom) / 2),
            text,
            fill=(255, 255, 255),
            font_size=font_size,
            stroke_width=max(1, font_size // 10),
            stroke_fill=(0, 0, 0),
        )
    return load_image(picture)
