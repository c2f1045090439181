"""Images and masks in, checked and normalised.

Inside the engine an image is a float32 tensor [3, H, W] in 0..1 (RGB) and a mask is a float32 tensor
[H, W] in 0..1 (1 = object). Everything a user may hand over (a path, a PIL image, a numpy array in
HWC layout, greyscale, RGBA, 16-bit) is converted to that here, and nothing else in the engine has to
care about formats.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from .errors import InputError

log = logging.getLogger("protobooth")

# Photos above this many pixels are refused before they are decoded (a small file can hold a huge picture, and
# decoding a 12000x12000 one takes 5 GB); PROTOBOOTH_MAX_PIXELS changes it.
MAX_PIXELS = 50_000_000
EXIF_ORIENTATION = 0x0112  # the EXIF tag ComfyUI's Load Image also turns pictures by
MIN_MASK_COVERAGE = 0.001  # below 0.1% of the image the object vanishes at latent resolution
MAX_MASK_COVERAGE = 0.99  # above 99% the "object" is the whole picture
_RGBA_BACKGROUND = 0.5  # transparent pixels become mid-grey, the neutral colour of masked crops


def _array_from_pil(image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        return np.asarray(image).astype(np.float32) / 65535.0
    if image.mode == "F":
        return np.asarray(image).astype(np.float32)
    if image.mode not in ("L", "RGB", "RGBA", "LA"):
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    return np.asarray(image)


def _float_array(array: np.ndarray, what: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535.0
    if array.dtype == bool:
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
        if not np.isfinite(array).all():
            raise InputError(f"{what} contains NaN or infinite values; pass a valid image (0..1 floats or 8/16-bit).")
        return array
    raise InputError(f"{what} has unsupported pixel type {array.dtype}; use 8-bit, 16-bit or float pixels.")


def max_pixels() -> int:
    value = os.environ.get("PROTOBOOTH_MAX_PIXELS", "")
    if not value:
        return MAX_PIXELS
    if not value.isdigit() or int(value) < 64:
        raise InputError(f"PROTOBOOTH_MAX_PIXELS={value!r} is not a pixel count; set a whole number such as "
                         f"{MAX_PIXELS}, or unset it.")
    return int(value)


def _check_pixels(size: tuple[int, int], what: str, path) -> None:
    width, height = size
    limit = max_pixels()
    if width * height > limit:
        raise InputError(f"{what} {path} is {width}x{height} = {width * height:,} pixels, over the limit of {limit:,}; "
                         "scale it down (a long side of 2048 is plenty), or raise the limit with PROTOBOOTH_MAX_PIXELS.")


def _open(source, what: str, header_only: bool = False):
    """A path → a decoded PIL image, upright as its EXIF orientation says (as ComfyUI's Load Image does); other
    sources are returned as they are. The pixel limit is checked from the header, before decoding."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not isinstance(source, (str, os.PathLike)):
        return source
    path = Path(source)
    if not path.is_file():
        raise InputError(f"{what} file not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit speaks instead
            with Image.open(path) as opened:
                _check_pixels(opened.size, what, path)
                if header_only:  # the upright size: orientations 5-8 turn the picture a quarter
                    width, height = opened.size
                    return (height, width) if opened.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8) else (width, height)
                opened.load()
                return ImageOps.exif_transpose(opened).copy()
    except Image.DecompressionBombError:
        raise InputError(f"{what} {path} is larger than {2 * (Image.MAX_IMAGE_PIXELS or 0):,} pixels, over the limit "
                         f"of {max_pixels():,}; scale it down (a long side of 2048 is plenty).") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise InputError(f"{what} {path} is not a readable image ({error}); use PNG, JPEG or WebP.") from None


def check_image_file(path, what: str = "image") -> tuple[int, int]:
    """Cheap check of an image file before any work: it exists, is an image, and is within the pixel limit.
    Returns its (width, height) as it will be loaded (upright)."""
    return _open(path, what, header_only=True)


def load_image(source, what: str = "image") -> torch.Tensor:
    """Any image → float32 [3, H, W] in 0..1. Tensors are taken as [C, H, W] or [H, W]; arrays as HWC or HW."""
    from PIL import Image

    source = _open(source, what)
    if isinstance(source, Image.Image):
        array = _array_from_pil(source)
    elif isinstance(source, torch.Tensor):
        tensor = source.detach().cpu()
        array = (tensor.movedim(0, -1) if tensor.ndim == 3 else tensor).numpy()
    elif isinstance(source, np.ndarray):
        array = source
    else:
        raise InputError(f"{what}: expected a path, PIL image, numpy array or tensor, got {type(source).__name__}.")
    array = _float_array(np.asarray(array), what)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 2, 3, 4):
        raise InputError(f"{what} has shape {array.shape}; expected height x width with 1 to 4 channels.")
    channels = array.shape[-1]
    if channels in (2, 4):  # with alpha: composite over grey
        alpha = array[..., -1:]
        array = array[..., :-1] * alpha + _RGBA_BACKGROUND * (1 - alpha)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if array.shape[0] < 8 or array.shape[1] < 8:
        raise InputError(f"{what} is only {array.shape[1]}x{array.shape[0]} pixels; use a real photo.")
    return torch.from_numpy(np.clip(array, 0.0, 1.0).copy()).movedim(-1, 0).contiguous()


def load_mask(source, what: str = "mask") -> torch.Tensor:
    """Any mask → float32 [H, W] in 0..1. Colour masks use their brightness; RGBA masks their alpha."""
    from PIL import Image

    source = _open(source, what)
    if isinstance(source, Image.Image):
        if "A" in source.getbands() and source.getextrema()[-1][0] < 255:
            source = source.getchannel("A")
        array = _array_from_pil(source if source.mode in ("L", "I;16", "I", "F", "1") else source.convert("L"))
        if array.dtype == bool:
            array = array.astype(np.float32)
    elif isinstance(source, torch.Tensor):
        array = source.detach().cpu().float().numpy()
    elif isinstance(source, np.ndarray):
        array = source
    else:
        raise InputError(f"{what}: expected a path, PIL image, numpy array or tensor, got {type(source).__name__}.")
    array = _float_array(np.asarray(array), what)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 3:
        array = array[..., :3].mean(axis=-1)
    if array.ndim != 2:
        raise InputError(f"{what} has shape {array.shape}; expected a single-channel height x width mask.")
    return torch.from_numpy(np.clip(array, 0.0, 1.0).copy())


def check_masks(masks, image: torch.Tensor, names: list[str] | None = None) -> list[torch.Tensor]:
    """Validate object masks against their image: same size, not empty; warn when tiny or whole-image."""
    if masks is None or len(masks) == 0:
        raise InputError("no object mask given; pass one mask (or one box/point prompt) per object.")
    height, width = image.shape[-2:]
    checked = []
    for index, mask in enumerate(masks):
        label = f"mask {index + 1}" + (f" ({names[index]})" if names and index < len(names) else "")
        mask = load_mask(mask, label)
        if tuple(mask.shape) != (height, width):
            raise InputError(
                f"{label} is {mask.shape[1]}x{mask.shape[0]} but the image is {width}x{height}; "
                "make the mask from this image (same size)."
            )
        coverage = float(mask.mean())
        if coverage == 0.0:
            raise InputError(f"{label} is empty (no object pixels); draw or segment the object again.")
        if float(mask.max()) < 0.5:
            raise InputError(f"{label} has no pixel at half brightness or more (its brightest is "
                             f"{float(mask.max()) * 255:.0f} of 255); white marks the object: draw it again.")
        if coverage < MIN_MASK_COVERAGE:
            log.warning("%s covers only %.3f%% of the image; the object may be too small to learn.", label, 100 * coverage)
        elif coverage > MAX_MASK_COVERAGE:
            log.warning("%s covers %.1f%% of the image; the object mask is nearly the whole picture.", label, 100 * coverage)
        checked.append(mask)
    return checked


def to_pil(image: torch.Tensor):
    """float [3, H, W] (or [H, W]) in 0..1 → PIL image."""
    from PIL import Image

    array = (image.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    if array.ndim == 3:
        array = array.movedim(0, -1)
    return Image.fromarray(array.numpy())


def to_uint8_hwc(image: torch.Tensor) -> np.ndarray:
    """float [3, H, W] in 0..1 → uint8 HWC array (what segment-anything takes)."""
    return np.asarray(to_pil(image))
