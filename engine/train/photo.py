"""The photo as training sees it: the largest square around its objects, at a size the UNet can take."""
from __future__ import annotations

import logging

import torch

from ..errors import InputError

log = logging.getLogger("protobooth")


def square_crop(image: torch.Tensor, masks: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The largest square that keeps the objects' bounding box as centred as the image allows."""
    height, width = image.shape[-2:]
    side = min(height, width)
    union = torch.stack(masks).amax(0)
    ys, xs = torch.nonzero(union > 0, as_tuple=True)
    cy, cx = (ys.min() + ys.max()).item() / 2, (xs.min() + xs.max()).item() / 2
    top = int(min(max(round(cy - side / 2), 0), height - side))
    left = int(min(max(round(cx - side / 2), 0), width - side))
    cut = union[top : top + side, left : left + side]
    if float(cut.sum()) < 0.98 * float(union.sum()):
        log.warning("the objects do not fit in a square crop of the image; parts outside it are not learned.")
    crop = (slice(None), slice(top, top + side), slice(left, left + side))
    return image[crop], [m[crop[1:]] for m in masks]


def training_size(model, resolution: int | None) -> int:
    """The training size in pixels: the setting, or the model's native size; refused when the UNet cannot take it."""
    factor = model.vae_scale_factor
    native = model.unet.config.sample_size * factor
    size = resolution or native
    if size % factor:
        raise InputError(f"resolution {size} must be a multiple of {factor} (the model's native size is {native}).")
    smallest = factor * _smallest_latent_side(model.unet.config)
    if size < smallest:
        raise InputError(f"resolution {size} is too small for this model's UNet; use at least {smallest} "
                         f"(its native size is {native}).")
    return size


def _smallest_latent_side(config) -> int:
    """The smallest latent side at which every group norm of the UNet sees more than one value per group.

    Each down block halves the side (rounding up); torch refuses a group norm over a single value.
    """
    channels, groups = list(config.block_out_channels), config.norm_num_groups or 1
    side = 1
    while True:
        sides = [side]
        for _ in channels[1:]:
            sides.append((sides[-1] + 1) // 2)
        narrowest = [min(channels[max(i - 1, 0)], channels[i]) for i in range(len(channels))]
        if all(s * s * c > groups for s, c in zip(sides, narrowest)):
            return side
        side += 1
