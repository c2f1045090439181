"""Tiny seeded models with the real Stable Diffusion architectures, for tests and the smoke demo.

Every builder is deterministic for a given seed and leaves the global RNG untouched. The models are
random (no pretrained weights can be downloaded here), but they are the same diffusers/transformers/
segment-anything classes as the real ones, so code that works on them works on real checkpoints.
"""
from __future__ import annotations

import torch

from .loading import text_encoder_config
from .models import DiffusionModel
from .tokenizer import clip_tokenizer

TINY_RESOLUTION = 64  # pixels; the tiny VAE downsamples by 8, like SD's
TEXT_WIDTH = 32
SAM_IMAGE_SIZE = 256


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tiny_text_config(family: str = "sd1"):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=TEXT_WIDTH,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=TEXT_WIDTH,
        hidden_act="quick_gelu" if family == "sd1" else "gelu",
        bos_token_id=49406,
        eos_token_id=49407,  # transformers pools at the first eos id; the legacy 2 means argmax pooling
        pad_token_id=49407 if family == "sd1" else 0,
    )


def tiny_text_encoder(seed: int = 0, family: str = "sd1"):
    from transformers import CLIPTextModel

    return _seeded(seed, lambda: CLIPTextModel(tiny_text_config(family)).eval())


def tiny_unet(seed: int = 0, family: str = "sd1"):
    from diffusers import UNet2DConditionModel

    return _seeded(
        seed,
        lambda: UNet2DConditionModel(
            sample_size=TINY_RESOLUTION // 8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TEXT_WIDTH,
            attention_head_dim=(2, 4),
            norm_num_groups=32,
            use_linear_projection=family == "sd2",
        ).eval(),
    )


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    return _seeded(
        seed,
        lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            layers_per_block=1,
            block_out_channels=(8, 16, 32, 32),
            norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            sample_size=TINY_RESOLUTION,
        ).eval(),
    )


def noise_scheduler(prediction_type: str = "epsilon"):
    """SD's training noise schedule: 1000 scaled-linear steps from 0.00085 to 0.012."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def tiny_model(seed: int = 0, family: str = "sd1", prediction_type: str = "epsilon") -> DiffusionModel:
    """A complete tiny SD1-style (or SD2-style: linear projections, gelu, '!' padding) model."""
    tokenizer = clip_tokenizer(pad_token="<|endoftext|>" if family == "sd1" else "!")
    return DiffusionModel(
        unet=tiny_unet(seed, family),
        vae=tiny_vae(seed + 1),
        text_encoder=tiny_text_encoder(seed + 2, family),
        tokenizer=tokenizer,
        noise_scheduler=noise_scheduler(prediction_type),
        family=family,
        name=f"tiny-{family}-{prediction_type}-seed{seed}",
    )


def _init_sensibly(module: torch.nn.Module) -> None:
    """Random weights that keep activations finite through deep full-size stacks (uses the global RNG).

    Linear/conv weights N(0, 1/fan_in), biases 0, norm scales 1, embeddings N(0, 0.02).
    """
    for child in module.modules():
        if isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)):
            fan_in = child.weight[0].numel()
            torch.nn.init.normal_(child.weight, std=fan_in**-0.5)
            if child.bias is not None:
                torch.nn.init.zeros_(child.bias)
        elif isinstance(child, (torch.nn.LayerNorm, torch.nn.GroupNorm)):
            if child.weight is not None:
                torch.nn.init.ones_(child.weight)
                torch.nn.init.zeros_(child.bias)
        elif isinstance(child, torch.nn.Embedding):
            torch.nn.init.normal_(child.weight, std=0.02)


def comfy_tiny_model(seed: int = 0) -> DiffusionModel:
    """The smallest SD1 model that ComfyUI's checkpoint loader detects as SD1.5 with no missing keys.

    (Like real SD1.5 files it has no CLIP text_projection/logit_scale, which ComfyUI does not need.)

    ComfyUI reads the UNet's shape from the keys but requires 320 model channels, 768 context, conv
    proj_in and 4 input channels; it hard-codes SD's VAE and CLIP-L, so those are full size here. The
    UNet has one level (no down/upsampling), one block per level and one transformer layer
    (25.8 M parameters); the whole model has about 233 M (about 444 MiB as an fp16 file).
    Random weights, initialised so that outputs stay finite.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    def build():
        unet = UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(320,),
            down_block_types=("CrossAttnDownBlock2D",),
            up_block_types=("CrossAttnUpBlock2D",),
            cross_attention_dim=768,
            attention_head_dim=8,
            use_linear_projection=False,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            layers_per_block=2,
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            sample_size=512,
            scaling_factor=0.18215,
        )
        text_encoder = CLIPTextModel(
            text_encoder_config("sd1", hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
        )
        for module in (unet, vae, text_encoder):
            _init_sensibly(module)
        return unet.eval(), vae.eval(), text_encoder.eval()

    unet, vae, text_encoder = _seeded(seed, build)
    return DiffusionModel(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        noise_scheduler=noise_scheduler("epsilon"),
        family="sd1",
        name=f"comfy-tiny-sd1-seed{seed}",
    )


def tiny_clip(text_encoder=None, seed: int = 0, family: str = "sd1"):
    """A tiny CLIPModel (vision + text towers with projections) for the prototype step.

    Its text tower is a copy of `text_encoder` when given, as SD1's text encoder is CLIP-L's text tower.
    """
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=4,
        projection_dim=TEXT_WIDTH,
    )
    config = CLIPConfig(
        text_config=tiny_text_config(family).to_dict(),
        vision_config=vision.to_dict(),
        projection_dim=TEXT_WIDTH,
    )
    clip = _seeded(seed, lambda: CLIPModel(config).eval())
    if text_encoder is not None:
        clip.text_model.load_state_dict(text_encoder.state_dict())
    return clip


def tiny_sam_config():
    """The tiny SAM architecture: every published SAM convention, a 256-px input and 32-wide layers."""
    from .segment import SamConfig

    return SamConfig(
        image_size=SAM_IMAGE_SIZE, patch_size=16, encoder_dim=32, encoder_depth=2, encoder_heads=2,
        encoder_mlp_dim=64, window_size=4, global_attn_blocks=(1,), qkv_bias=True, prompt_dim=32,
        mask_in_chans=8, decoder_depth=2, decoder_mlp_dim=64, decoder_attention_downsample=2,
        multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=32,
    )  # fmt: skip


def tiny_sam(seed: int = 0, config=None):
    """A tiny segment-anything model (same classes as sam_vit_b/l/h); `config` overrides tiny_sam_config()."""
    from .segment import sam_from_config

    return _seeded(seed, lambda: sam_from_config(config or tiny_sam_config()))
