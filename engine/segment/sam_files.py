"""segment-anything checkpoints: their architecture read from the tensor shapes, loaded as weights only.

SAM checkpoints are read with `torch.load(weights_only=True)` or as safetensors. Their architecture (vit_b, vit_l,
vit_h or any other size) is read from the tensor shapes, so no model-type setting is needed.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InputError
from ..fileio import error_summary
from .sam_import import import_segment_anything

log = logging.getLogger("protobooth")

# Architecture facts the weights do not record; SAM's own builder uses these for every model size.
DECODER_HEADS = 8
ENCODER_LAYER_NORM_EPS = 1e-6

_CHECKPOINT_HINT = (
    "use an original segment-anything checkpoint: sam_vit_b_01ec64.pth, sam_vit_l_0b3195.pth or "
    "sam_vit_h_4b8939.pth (SAM 2, HQ-SAM, MobileSAM and Hugging Face SAM files have other layouts)"
)


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
        raise InputError(
            f"SAM checkpoint {path} could not be read as weights ({error_summary(error)}); "
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
