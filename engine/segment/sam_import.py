"""Import segment-anything on machines without a working torchvision.

segment_anything imports torchvision at module level for two image helpers and two box ops. PyPI's
torchvision does not load beside a CPU-only torch build, and ComfyUI users may have none. When
torchvision is missing or broken, a small stand-in is placed in sys.modules for the duration of the
import only, so transformers and diffusers keep seeing torchvision as absent afterwards.
`torchvision_stand_in()` is that scope on its own (the test-only ComfyUI launcher uses it too).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import sys
import types

import numpy as np
import torch


def _resize(image, size):
    """torchvision.transforms.functional.resize for the PIL images SAM passes; size is (h, w)."""
    from PIL import Image

    height, width = size
    return image.resize((width, height), Image.BILINEAR)


def _to_pil_image(array):
    from PIL import Image

    return Image.fromarray(np.asarray(array))


def _box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    top_left = torch.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=2)
    return inter / (_box_area(a)[:, None] + _box_area(b)[None, :] - inter)


def _batched_nms(boxes, scores, idxs, iou_threshold):
    """Greedy non-maximum suppression done separately per category index (kept indices, best first)."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    # Offsetting boxes per category keeps categories from suppressing each other.
    offsets = idxs.to(boxes) * (boxes.max() + 1)
    shifted = boxes + offsets[:, None]
    order = scores.argsort(descending=True)
    keep = []
    while order.numel() > 0:
        best = order[0]
        keep.append(best)
        if order.numel() == 1:
            break
        ious = _box_iou(shifted[best][None], shifted[order[1:]])[0]
        order = order[1:][ious <= iou_threshold]
    return torch.stack(keep)


def _stand_in_modules() -> dict[str, types.ModuleType]:
    def module(name, **attrs):
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
        mod.__dict__.update(attrs)
        return mod

    functional = module("torchvision.transforms.functional", resize=_resize, to_pil_image=_to_pil_image)
    transforms = module("torchvision.transforms", functional=functional)
    boxes = module("torchvision.ops.boxes", batched_nms=_batched_nms, box_area=_box_area)
    ops = module("torchvision.ops", boxes=boxes, batched_nms=_batched_nms, box_area=_box_area)
    root = module("torchvision", transforms=transforms, ops=ops, __version__="0.0-protobooth-stand-in")
    return {m.__name__: m for m in (root, transforms, functional, ops, boxes)}


def _forget(prefixes: tuple[str, ...]) -> None:
    for name in [n for n in sys.modules if n.split(".")[0] in prefixes]:
        del sys.modules[name]


def import_segment_anything():
    """Return the segment_anything module, importing it with a scoped torchvision stand-in if needed."""
    if "segment_anything" in sys.modules:
        return sys.modules["segment_anything"]
    if importlib.util.find_spec("torchvision") is not None:
        try:
            return importlib.import_module("segment_anything")
        except (ImportError, RuntimeError):
            # A torchvision that fails to load (e.g. CUDA wheel beside a CPU torch): use the stand-in.
            _forget(("torchvision", "segment_anything"))
    with torchvision_stand_in():
        try:
            return importlib.import_module("segment_anything")
        except BaseException:
            _forget(("segment_anything",))
            raise


@contextlib.contextmanager
def torchvision_stand_in():
    """Make `import torchvision` give the stand-in inside the block only.

    Modules imported in the block keep their reference to it; sys.modules forgets it on exit. Code that
    caches whether torchvision is installed must decide before the block (it would see the stand-in).
    """
    stand_in = _stand_in_modules()
    replaced = {name: sys.modules[name] for name in stand_in if name in sys.modules}
    sys.modules.update(stand_in)
    try:
        yield
    finally:
        for name in stand_in:
            sys.modules.pop(name, None)
        sys.modules.update(replaced)
