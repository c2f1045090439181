"""Masks checked against their image: the coverage warnings (engine/images.py)."""
from __future__ import annotations

import logging

import pytest
import torch

from protobooth.engine.images import check_masks


def mask_covering(pixels: int, side: int = 100) -> torch.Tensor:
    mask = torch.zeros(side * side)
    mask[:pixels] = 1
    return mask.reshape(side, side)


@pytest.mark.parametrize(
    "pixels, warning",
    [
        (9, "mask 1 (zqcat) covers only 0.090% of the image; the object may be too small to learn."),
        (9901, "mask 1 (zqcat) covers 99.0% of the image; the object mask is nearly the whole picture."),
        (10000, "mask 1 (zqcat) covers 100.0% of the image"),
    ],
)
def test_a_tiny_or_whole_image_mask_is_accepted_with_a_warning(caplog, pixels, warning):
    image = torch.rand(3, 100, 100)
    with caplog.at_level(logging.WARNING, logger="protobooth"):
        [mask] = check_masks([mask_covering(pixels)], image, ["zqcat"])
    assert warning in caplog.text
    assert [r.levelno for r in caplog.records if r.name == "protobooth"] == [logging.WARNING]
    assert float(mask.sum()) == pixels


@pytest.mark.parametrize("pixels", [11, 500, 9899])  # just inside the limits (0.1%, 99%), and between
def test_masks_of_ordinary_size_pass_silently(caplog, pixels):
    with caplog.at_level(logging.DEBUG, logger="protobooth"):
        check_masks([mask_covering(pixels)], torch.rand(3, 100, 100), ["zqcat"])
    assert not [r for r in caplog.records if r.name == "protobooth"]


def test_each_mask_is_judged_on_its_own(caplog):
    masks = [mask_covering(500), mask_covering(5)]
    with caplog.at_level(logging.WARNING, logger="protobooth"):
        check_masks(masks, torch.rand(3, 100, 100), ["zqcat", "zqpot"])
    assert "mask 2 (zqpot) covers only 0.050%" in caplog.text and "mask 1" not in caplog.text
