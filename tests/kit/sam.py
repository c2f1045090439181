"""Test kit: tiny segment-anything models with every published SAM convention, and the file writer for them."""
from __future__ import annotations

from pathlib import Path

import torch

from protobooth.engine.fileio import atomic_path, save_safetensors
from protobooth.engine.models.tiny import seeded
from protobooth.engine.segment.sam_files import SamConfig, sam_from_config

SAM_IMAGE_SIZE = 256


def tiny_sam_config():
    """The tiny SAM architecture: every published SAM convention, a 256-px input and 32-wide layers."""
    return SamConfig(
        image_size=SAM_IMAGE_SIZE, patch_size=16, encoder_dim=32, encoder_depth=2, encoder_heads=2,
        encoder_mlp_dim=64, window_size=4, global_attn_blocks=(1,), qkv_bias=True, prompt_dim=32,
        mask_in_chans=8, decoder_depth=2, decoder_mlp_dim=64, decoder_attention_downsample=2,
        multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=32,
    )  # fmt: skip


def tiny_sam(seed: int = 0, config=None):
    """A tiny segment-anything model (same classes as sam_vit_b/l/h); `config` overrides tiny_sam_config()."""
    return seeded(seed, lambda: sam_from_config(config or tiny_sam_config()))


def save_sam_checkpoint(sam, path) -> None:
    """Write the model's weights where load_sam reads them: .safetensors, or a torch.save state dict."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in sam.state_dict().items()}
    if Path(path).suffix.lower() == ".safetensors":
        save_safetensors(state, path)
        return
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
