"""Object masks from one photo: segment-anything (SAM) prompted by boxes and points.

The flow is `sam = load_sam(path)`, `segmenter = Segmenter(sam)`, `segmenter.set_image(image)` (the one
expensive step: the image embedding), then `segmenter.segment(prompts)` for any number of objects and
prompts, each a cheap pass through SAM's prompt encoder and mask decoder. User-drawn masks skip SAM
but go through the same `refine_mask` (dilation, feathering) and `overlay_masks` preview.

SAM checkpoints are read as weights only (`torch.load(weights_only=True)` or safetensors). Their
architecture (vit_b, vit_l, vit_h or any other size) is read from the tensor shapes, so no model-type
setting is needed.
"""
from __future__ import annotations

import colorsys
import contextlib
import functools
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError
from .images import load_image, load_mask, to_pil, to_uint8_hwc
from .sam_import import import_segment_anything

log = logging.getLogger("protobooth")

Progress = Callable[[int, int], None]  # (done, total); may raise to cancel

# Architecture facts the weights do not record; SAM's own builder uses these for every model size.
DECODER_HEADS = 8
ENCODER_LAYER_NORM_EPS = 1e-6

_CHECKPOINT_HINT = (
    "use an original segment-anything checkpoint: sam_vit_b_01ec64.pth, sam_vit_l_0b3195.pth or "
    "sam_vit_h_4b8939.pth (SAM 2, HQ-SAM, MobileSAM and Hugging Face SAM files have other layouts)"
)


# ----------------------------------------------------------------------------------------------
# Prompts


@dataclass
class ObjectPrompt:
    """What SAM is told about one object: a box and/or points, in image pixels.

    box: (x0, y0, x1, y1), left-top and right-bottom corners, or None.
    points: (x, y) clicks; labels: one per point, 1 = on the object, 0 = background (None: all 1).
    """

    box: tuple[float, float, float, float] | None = None
    points: list[tuple[float, float]] = field(default_factory=list)
    labels: list[int] | None = None

    def check(self, label: str = "object", image_size: tuple[int, int] | None = None) -> "ObjectPrompt":
        """Validate and return a normalised copy (float coordinates, labels filled in).

        `label` names the object in error messages; with `image_size` (width, height) the box and the
        points must also lie inside the image.
        """
        box = None
        if self.box is not None:
            box = tuple(_numbers(self.box, 4, f"{label}: box"))
            x0, y0, x1, y1 = box
            if x1 <= x0 or y1 <= y0:
                raise InputError(
                    f"{label}: box {_fmt(box)} is inverted or empty; give it as [left, top, right, bottom] "
                    "with right > left and bottom > top."
                )
        if not isinstance(self.points, (list, tuple)):
            raise InputError(f"{label}: points must be a list of [x, y] pairs.")
        points = [tuple(_numbers(p, 2, f"{label}: point {i + 1}")) for i, p in enumerate(self.points)]
        labels = [1] * len(points) if self.labels is None else list(self.labels)
        if box is None and not points:
            raise InputError(f"{label}: no box and no point; give a box around the object or click a point on it.")
        if len(labels) != len(points):
            raise InputError(
                f"{label}: {len(points)} points but {len(labels)} labels; give one label per point "
                "(1 = on the object, 0 = background)."
            )
        for i, value in enumerate(labels):
            if isinstance(value, bool) or value not in (0, 1):
                raise InputError(f"{label}: label {i + 1} is {value!r}; use 1 (on the object) or 0 (background).")
        if image_size is not None:
            width, height = image_size
            if box is not None and not (0 <= box[0] and 0 <= box[1] and box[2] <= width and box[3] <= height):
                raise InputError(
                    f"{label}: box {_fmt(box)} reaches outside the {width}x{height} image; "
                    f"keep it within 0..{width} (x) and 0..{height} (y)."
                )
            for i, (x, y) in enumerate(points):
                if not (0 <= x <= width and 0 <= y <= height):
                    raise InputError(
                        f"{label}: point {i + 1} ({_fmt((x, y))}) is outside the {width}x{height} image; "
                        f"keep x within 0..{width} and y within 0..{height}."
                    )
        return ObjectPrompt(box=box, points=points, labels=[int(v) for v in labels])


def _fmt(values) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def _numbers(values, count: int, what: str) -> list[float]:
    if isinstance(values, (np.ndarray, torch.Tensor)):
        values = values.tolist()
    if (
        not isinstance(values, (list, tuple))
        or len(values) != count
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    ):
        raise InputError(f"{what} must be {count} finite numbers, got {values!r}.")
    return [float(v) for v in values]


_PROMPT_KEYS = ("box", "points", "labels", "positive", "negative")


def parse_prompts(prompts, image_size: tuple[int, int] | None = None) -> list[ObjectPrompt]:
    """Object prompts from JSON text, parsed JSON, or ObjectPrompts; validated, in object order.

    The JSON is a list with one entry per object (a single entry may be given without the list):

        [{"box": [x0, y0, x1, y1]},
         {"points": [[x, y], [x, y]], "labels": [1, 0]},
         {"positive": [[x, y]], "negative": [[x, y]]},
         {"box": [x0, y0, x1, y1], "negative": [[x, y]]}]

    Coordinates are image pixels, x to the right and y down from the top-left corner. An entry may
    hold a "box" (left, top, right, bottom), "points" with optional "labels" (1 = on the object,
    0 = background; all 1 when absent), and "positive" / "negative" point lists, in any combination
    with at least a box or a point. A point is [x, y] or {"x": x, "y": y}. Errors name the entry as
    `prompts[i].key` (i counts from 0) and the object as "object i+1". With `image_size` (width,
    height), boxes and points must also lie inside the image.
    """
    if isinstance(prompts, str):
        if not prompts.strip():
            raise InputError("prompts are empty; give one entry per object, e.g. [{\"box\": [10, 10, 200, 150]}].")
        try:
            prompts = json.loads(prompts)
        except json.JSONDecodeError as error:
            raise InputError(
                f"prompts are not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); "
                'write them like [{"box": [10, 10, 200, 150]}, {"positive": [[80, 90]]}].'
            ) from None
    if isinstance(prompts, (dict, ObjectPrompt)):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise InputError(f"prompts must be a list with one entry per object, got {type(prompts).__name__}.")
    if not prompts:
        raise InputError("the prompts list is empty; give one entry per object, e.g. [{\"box\": [10, 10, 200, 150]}].")
    return [_parse_entry(entry, index, image_size) for index, entry in enumerate(prompts)]


def _parse_entry(entry, index: int, image_size) -> ObjectPrompt:
    where = f"prompts[{index}]"
    label = f"{where} (object {index + 1})"
    if isinstance(entry, ObjectPrompt):
        return entry.check(label, image_size)
    if not isinstance(entry, dict):
        raise InputError(f"{label} must be an object like {{\"box\": [x0, y0, x1, y1]}}, got {entry!r}.")
    unknown = sorted(set(entry) - set(_PROMPT_KEYS))
    if unknown:
        raise InputError(f"{label} has unknown key(s) {unknown}; use {', '.join(_PROMPT_KEYS)}.")
    points, labels = [], []
    for key in ("points", "positive", "negative"):
        values = entry.get(key)
        if values is None:
            continue
        if not isinstance(values, (list, tuple)):
            raise InputError(f"{where}.{key} must be a list of [x, y] points, got {values!r}.")
        points += [_point(point, f"{where}.{key}[{i}]") for i, point in enumerate(values)]
        if key == "points":
            given = entry.get("labels")
            if given is not None and (not isinstance(given, (list, tuple)) or len(given) != len(values)):
                raise InputError(
                    f"{where}.labels must hold one label per entry of {where}.points ({len(values)}), got {given!r}; "
                    "use 1 for a point on the object, 0 for background."
                )
            labels += [1] * len(values) if given is None else list(given)
        else:
            labels += [1 if key == "positive" else 0] * len(values)
    if entry.get("labels") is not None and entry.get("points") is None:
        raise InputError(f"{where}.labels is given without {where}.points; put the points they label in \"points\".")
    return ObjectPrompt(box=entry.get("box"), points=points, labels=labels).check(label, image_size)


def _point(value, where: str):
    if isinstance(value, dict) and set(value) >= {"x", "y"}:
        value = [value["x"], value["y"]]
    return tuple(_numbers(value, 2, where))


# ----------------------------------------------------------------------------------------------
# Checkpoints


@dataclass(frozen=True)
class SamConfig:
    """A SAM architecture, as far as the checkpoint's tensor shapes define it."""

    image_size: int  # side of the square image the encoder sees
    patch_size: int
    encoder_dim: int
    encoder_depth: int
    encoder_heads: int
    encoder_mlp_dim: int
    window_size: int  # windowed attention in every block not listed in global_attn_blocks
    global_attn_blocks: tuple[int, ...]
    qkv_bias: bool
    prompt_dim: int  # prompt embeddings = image-embedding channels = mask-decoder width
    mask_in_chans: int
    decoder_depth: int
    decoder_mlp_dim: int
    decoder_attention_downsample: int
    multimask_outputs: int
    iou_head_depth: int
    iou_head_hidden_dim: int

    @property
    def model_type(self) -> str:
        """"vit_b", "vit_l" or "vit_h" for the published SAM models, else "custom"."""
        return next((name for name, config in SAM_CONFIGS.items() if config == self), "custom")

    def describe(self) -> str:
        return (
            f"{self.model_type} (ViT {self.encoder_dim} wide, {self.encoder_depth} blocks, "
            f"{self.encoder_heads} heads, {self.image_size}-px input)"
        )


def _published(dim: int, depth: int, heads: int, global_blocks: tuple[int, ...]) -> SamConfig:
    return SamConfig(
        image_size=1024, patch_size=16, encoder_dim=dim, encoder_depth=depth, encoder_heads=heads,
        encoder_mlp_dim=4 * dim, window_size=14, global_attn_blocks=global_blocks, qkv_bias=True,
        prompt_dim=256, mask_in_chans=16, decoder_depth=2, decoder_mlp_dim=2048,
        decoder_attention_downsample=2, multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=256,
    )  # fmt: skip


SAM_CONFIGS = {
    "vit_b": _published(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": _published(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": _published(1280, 32, 16, (7, 15, 23, 31)),
}


def sam_from_config(config: SamConfig, meta: bool = False):
    """A segment_anything `Sam` with this architecture and random weights.

    With meta=True the encoder and decoders hold no memory (meta device) and must be filled with
    `load_state_dict(..., assign=True)`; only the pixel normalisation buffers are real.
    """
    import_segment_anything()
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    grid = config.image_size // config.patch_size
    with torch.device("meta") if meta else contextlib.nullcontext():
        image_encoder = ImageEncoderViT(
            img_size=config.image_size,
            patch_size=config.patch_size,
            embed_dim=config.encoder_dim,
            depth=config.encoder_depth,
            num_heads=config.encoder_heads,
            # +0.5 so that int(dim * ratio) inside the encoder lands on mlp_dim despite rounding
            mlp_ratio=(config.encoder_mlp_dim + 0.5) / config.encoder_dim,
            out_chans=config.prompt_dim,
            qkv_bias=config.qkv_bias,
            norm_layer=functools.partial(torch.nn.LayerNorm, eps=ENCODER_LAYER_NORM_EPS),
            use_rel_pos=True,
            window_size=config.window_size,
            global_attn_indexes=config.global_attn_blocks,
        )
        prompt_encoder = PromptEncoder(
            embed_dim=config.prompt_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(config.image_size, config.image_size),
            mask_in_chans=config.mask_in_chans,
        )
        mask_decoder = MaskDecoder(
            num_multimask_outputs=config.multimask_outputs,
            transformer=TwoWayTransformer(
                depth=config.decoder_depth,
                embedding_dim=config.prompt_dim,
                mlp_dim=config.decoder_mlp_dim,
                num_heads=DECODER_HEADS,
                attention_downsample_rate=config.decoder_attention_downsample,
            ),
            transformer_dim=config.prompt_dim,
            iou_head_depth=config.iou_head_depth,
            iou_head_hidden_dim=config.iou_head_hidden_dim,
        )
    return Sam(image_encoder=image_encoder, prompt_encoder=prompt_encoder, mask_decoder=mask_decoder).eval()


def sam_config_from_state_dict(state: dict, what: str = "SAM checkpoint") -> SamConfig:
    """Read the architecture from tensor shapes only (works on meta tensors too)."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise _not_sam(what, f"it has no tensor {key!r}")
        return tuple(state[key].shape)

    def count(prefix: str) -> int:
        """How many numbered children prefix.0, prefix.1, ... there are."""
        found = {key[len(prefix):].split(".")[0] for key in state if key.startswith(prefix)}
        indices = {int(i) for i in found if i.isdigit()}
        if not indices or indices != set(range(len(indices))):
            raise _not_sam(what, f"its {prefix}N tensors are missing or not numbered 0, 1, 2, ...")
        return len(indices)

    encoder_dim, _, patch_size, _ = shape("image_encoder.patch_embed.proj.weight")
    grid = shape("image_encoder.pos_embed")[1]
    depth = count("image_encoder.blocks.")
    # Each block's relative-position table spans 2 * (attended width) - 1 positions: the whole grid
    # for global attention, the window otherwise. Its width is the head dimension.
    spans, head_dims = [], set()
    for block in range(depth):
        length, head_dim = shape(f"image_encoder.blocks.{block}.attn.rel_pos_h")
        spans.append((length + 1) // 2)
        head_dims.add(head_dim)
    windows = {span for span in spans if span != grid}
    head_dim = head_dims.pop()
    if len(windows) > 1 or head_dims or encoder_dim % head_dim:
        raise _not_sam(what, "its image-encoder blocks differ in window size or head size")
    prompt_dim = shape("prompt_encoder.no_mask_embed.weight")[1]
    decoder_inner = shape("mask_decoder.transformer.final_attn_token_to_image.q_proj.weight")[0]
    if prompt_dim % decoder_inner or decoder_inner % DECODER_HEADS:
        raise _not_sam(what, f"its mask decoder ({decoder_inner} wide) does not split into SAM's {DECODER_HEADS} heads")
    iou_head_depth = count("mask_decoder.iou_prediction_head.layers.")
    return SamConfig(
        image_size=grid * patch_size,
        patch_size=patch_size,
        encoder_dim=encoder_dim,
        encoder_depth=depth,
        encoder_heads=encoder_dim // head_dim,
        encoder_mlp_dim=shape("image_encoder.blocks.0.mlp.lin1.weight")[0],
        window_size=windows.pop() if windows else 0,
        global_attn_blocks=tuple(block for block, span in enumerate(spans) if span == grid),
        qkv_bias="image_encoder.blocks.0.attn.qkv.bias" in state,
        prompt_dim=prompt_dim,
        mask_in_chans=shape("prompt_encoder.mask_downscaling.3.weight")[0],
        decoder_depth=count("mask_decoder.transformer.layers."),
        decoder_mlp_dim=shape("mask_decoder.transformer.layers.0.mlp.lin1.weight")[0],
        decoder_attention_downsample=prompt_dim // decoder_inner,
        multimask_outputs=shape("mask_decoder.mask_tokens.weight")[0] - 1,
        iou_head_depth=iou_head_depth,
        # a one-layer IoU head has no hidden layer; SAM then ignores the hidden size
        iou_head_hidden_dim=shape("mask_decoder.iou_prediction_head.layers.0.weight")[0] if iou_head_depth > 1 else prompt_dim,
    )


def _not_sam(what: str, reason: str) -> InputError:
    return InputError(f"{what} is not a segment-anything (SAM ViT) checkpoint: {reason}; {_CHECKPOINT_HINT}.")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    suffix = path.suffix.lower()
    if suffix not in (".pth", ".pt", ".ckpt", ".bin", ".safetensors"):
        raise InputError(f"SAM checkpoint {path} has suffix {suffix!r}; give a .pth or .safetensors file.")
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any failure to read the file is the file's fault, not a bug
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise InputError(
            f"SAM checkpoint {path} could not be read as weights ({type(error).__name__}: {first_line}); "
            f"the file may be incomplete or not a weights file: download it again and {_CHECKPOINT_HINT}."
        ) from None
    # Training scripts often wrap the weights: {"model": state_dict, "optimizer": ...}.
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise _not_sam(f"SAM checkpoint {path}", "it holds no tensors")
    # SAM runs in float32 (fp16 convolutions are unsupported on CPU); .float() is free for fp32 files.
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_sam(path, device="cpu"):
    """Load a SAM checkpoint (.pth read with weights_only=True, or .safetensors) onto `device`.

    The architecture is read from the weights (see `sam_config_from_state_dict`); the model is returned
    in eval mode with its config at `sam.protobooth_config`.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"SAM checkpoint not found: {path}; give the path of a downloaded file ({_CHECKPOINT_HINT}).")
    state = _read_state_dict(path)
    config = sam_config_from_state_dict(state, f"SAM checkpoint {path}")
    sam = sam_from_config(config, meta=True)
    try:
        sam.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        raise _not_sam(f"SAM checkpoint {path}", f"its tensors do not fit a SAM {config.describe()} ({str(error)[:300]})") from None
    sam.protobooth_config = config
    log.info("loaded SAM %s from %s", config.describe(), path)
    return sam.to(device).eval()


def save_sam_checkpoint(sam, path) -> None:
    """Write the model's weights where load_sam reads them: .safetensors, or a torch.save state dict."""
    from .fileio import atomic_path, save_safetensors

    state = {k: v.detach().to("cpu").contiguous() for k, v in sam.state_dict().items()}
    if Path(path).suffix.lower() == ".safetensors":
        save_safetensors(state, path)
        return
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


# ----------------------------------------------------------------------------------------------
# Segmentation


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
        _check_refine_settings(dilate, feather)
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


# ----------------------------------------------------------------------------------------------
# Masks


def _check_refine_settings(dilate, feather) -> None:
    if isinstance(dilate, bool) or not isinstance(dilate, (int, np.integer)):
        raise InputError(f"dilate must be a whole number of pixels, got {dilate!r}.")
    if isinstance(feather, bool) or not isinstance(feather, (int, float)) or not 0 <= feather < math.inf:
        raise InputError(f"feather must be a blur radius (sigma) of 0 or more pixels, got {feather!r}.")


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
    _check_refine_settings(dilate, feather)
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
