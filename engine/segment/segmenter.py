"""Object masks from one photo: segment-anything (SAM) prompted by boxes and points.

The flow is `sam = load_sam(path)`, `segmenter = Segmenter(sam)`, `segmenter.set_image(image)` (the one
expensive step: the image embedding), then `segmenter.segment(prompts)` for any number of objects and
prompts, each a cheap pass through SAM's prompt encoder and mask decoder. User-drawn masks skip SAM
but go through the same `refine_mask` (dilation, feathering) and `overlay_masks` preview.
"""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch

from ..images import load_image, to_uint8_hwc
from .masks import check_refine_settings, refine_mask
from .prompts import parse_prompts
from .sam_import import import_segment_anything

log = logging.getLogger("protobooth")

Progress = Callable[[int, int], None]  # (done, total); may raise to cancel


class Segmenter:
    """Masks for several objects in one image, computing SAM's image embedding once."""

    def __init__(self, sam):
        segment_anything = import_segment_anything()
        self.sam = sam.eval()
        self._predictor = segment_anything.SamPredictor(self.sam)
        self.image: torch.Tensor | None = None
        self.scores: list[float] = []  # SAM's predicted IoU of each mask from the last segment()

    def set_image(self, image, progress: Progress | None = None) -> None:
        """Compute the image embedding (the slow step). `progress(done, total)` is called per encoder block."""
        image = load_image(image)
        self.image = None
        blocks = self.sam.image_encoder.blocks
        hooks = []
        if progress is not None:
            for index, block in enumerate(blocks):
                hooks.append(block.register_forward_hook(lambda *_, done=index + 1: progress(done, len(blocks))))
        try:
            self._predictor.set_image(to_uint8_hwc(image))
        finally:
            for hook in hooks:
                hook.remove()
        self.image = image

    def segment(self, prompts, multimask: bool = True, dilate: int = 0, feather: float = 0.0,
                progress: Progress | None = None) -> list[torch.Tensor]:  # fmt: skip
        """One mask [H, W] (float, 0..1) per object, in prompt order.

        prompts: anything `parse_prompts` takes. multimask: let SAM propose several masks and keep the
        one with the highest predicted IoU (best for a single click, which is ambiguous: part, object
        or group); False uses SAM's single-mask output. dilate/feather: see `refine_mask`.
        """
        if self.image is None:
            raise RuntimeError("Segmenter.segment called before set_image")
        height, width = self.image.shape[-2:]
        prompts = parse_prompts(prompts, image_size=(width, height))
        check_refine_settings(dilate, feather)
        masks, self.scores = [], []
        for index, prompt in enumerate(prompts):
            candidates, scores, _ = self._predictor.predict(
                point_coords=np.array(prompt.points, dtype=np.float32) if prompt.points else None,
                point_labels=np.array(prompt.labels, dtype=np.int64) if prompt.points else None,
                box=np.array(prompt.box, dtype=np.float32) if prompt.box is not None else None,
                multimask_output=multimask,
            )
            best = int(np.argmax(scores))
            mask = torch.from_numpy(candidates[best].astype(np.float32))
            if not mask.any():
                log.warning("object %d: SAM found no object pixels; move the points or draw a box around it.", index + 1)
            masks.append(refine_mask(mask, dilate, feather))
            self.scores.append(float(scores[best]))
            if progress is not None:
                progress(index + 1, len(prompts))
        return masks
