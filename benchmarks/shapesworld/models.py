"""The ShapesWorld model architectures: standard diffusers/transformers classes in the SD1 layout.

- VAE: AutoencoderKL, 32 px → 8x8x4 latents (downsampling by 4; SD's is 8 at 512 px).
- CLIP: a transformers CLIPModel whose text tower is the diffusion model's text encoder, exactly as SD1
  uses CLIP ViT-L/14's text tower; the vision tower and both projections serve the prototype step.
- UNet: UNet2DConditionModel cross-attending to the text tower's last hidden states (width 64).
- Metric models (not part of the diffusion model): an attribute classifier and an instance encoder.
"""
from __future__ import annotations

import torch
from torch import nn

TEXT_WIDTH = 64
LATENT_CHANNELS = 4


def vae_config() -> dict:
    return dict(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, layers_per_block=1,
        block_out_channels=(16, 32, 64), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, sample_size=32,
    )


def unet_config() -> dict:
    return dict(
        sample_size=8, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, layers_per_block=1,
        block_out_channels=(64, 128), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=(2, 4), norm_num_groups=32,  # 32-wide heads: faster on CPU than 8-wide ones
    )


def clip_config():
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    text = CLIPTextConfig(
        vocab_size=49408, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH, num_hidden_layers=4,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=TEXT_WIDTH, hidden_act="quick_gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )
    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4, image_size=32,
        patch_size=8, projection_dim=TEXT_WIDTH, hidden_act="quick_gelu",
    )
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=TEXT_WIDTH)


def noise_scheduler_config() -> dict:
    """SD's schedule: 1000 scaled-linear steps, ε-prediction."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                clip_sample=False, steps_offset=1, prediction_type="epsilon")


def _conv_stack(widths: tuple[int, ...]) -> nn.Sequential:
    layers, previous = [], 3
    for i, width in enumerate(widths):
        layers += [nn.Conv2d(previous, width, 3, stride=1 if i == 0 else 2, padding=1), nn.GroupNorm(8, width), nn.SiLU(),
                   nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(8, width), nn.SiLU()]
        previous = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


# The classifier's heads: what a scene's caption can say, read back from its picture.
HEADS = {"background": 4, "left_shape": 5, "left_colour": 7, "right_shape": 5, "right_colour": 7}


class AttributeClassifier(nn.Module):
    """Scene attributes from a 32x32 image: background, and per side the shape and main colour (or none)."""

    def __init__(self):
        super().__init__()
        self.features = _conv_stack((16, 32, 64))
        self.heads = nn.ModuleDict({name: nn.Linear(64, n) for name, n in HEADS.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.features(images * 2 - 1)
        return {name: head(features) for name, head in self.heads.items()}


class InstanceEncoder(nn.Module):
    """A unit embedding of the object in one half of an image (32x16): same instance → same direction."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.features = _conv_stack((16, 32, 64))
        self.project = nn.Linear(64, width)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.project(self.features(crops * 2 - 1)), dim=-1)


def half(images: torch.Tensor, position: str) -> torch.Tensor:
    """The half of [N,3,32,32] images where an object at `position` sits."""
    return images[..., :16] if position == "left" else images[..., 16:]
