"""Tiny seeded models with the real Stable Diffusion architectures: the plumbing demo (`protobooth demo --model
tiny`) runs on them, and so do the tests.

Every builder is deterministic for a given seed and leaves the global RNG untouched. The models are random (no
pretrained weights can be downloaded here), but they are the same diffusers/transformers classes as the real ones,
so code that works on them works on real checkpoints.
"""
from __future__ import annotations

import torch

from ..compat import text_tensors
from ..text.tokenizer import clip_tokenizer
from .diffusion_model import DiffusionModel
from .families import family as family_record
from .families import noise_scheduler

TINY_RESOLUTION = 64  # pixels; the tiny VAE downsamples by 8, like SD's
TEXT_WIDTH = 32
# Tiny SDXL: the bigG half wider than the CLIP-L half, as in the real model, so a swapped half shows.
BIG_G_WIDTH, BIG_G_PROJECTION, TIME_EMBED = 48, 40, 8


def seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tiny_text_config(family: str = "sd1"):
    return family_record(family).text_encoder_config(hidden_size=TEXT_WIDTH, intermediate_size=37, num_hidden_layers=2,
                                                     num_attention_heads=4)


def tiny_text_encoder(seed: int = 0, family: str = "sd1"):
    from transformers import CLIPTextModel

    return seeded(seed, lambda: CLIPTextModel(tiny_text_config(family)).eval())


def tiny_unet(seed: int = 0, family: str = "sd1"):
    from diffusers import UNet2DConditionModel

    shape = dict(sample_size=TINY_RESOLUTION // 8, in_channels=4, out_channels=4, layers_per_block=1,
                 block_out_channels=(32, 64), attention_head_dim=(2, 4), norm_num_groups=32)
    if family == "sdxl":  # SDXL's shape: no attention at the first level, linear projections, size conditioning
        shape.update(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
                     cross_attention_dim=TEXT_WIDTH + BIG_G_WIDTH, use_linear_projection=True,
                     addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED,
                     projection_class_embeddings_input_dim=BIG_G_PROJECTION + 6 * TIME_EMBED)
    else:
        shape.update(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_WIDTH,
                     use_linear_projection=family == "sd2")
    return seeded(seed, lambda: UNet2DConditionModel(**shape).eval())


def tiny_vae(seed: int = 0, family: str = "sd1"):
    from diffusers import AutoencoderKL

    return seeded(
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
            scaling_factor=family_record(family).latent_scaling,
        ).eval(),
    )


def tiny_sdxl_text_encoder(seed: int = 0):
    """SDXL's two text encoders, tiny, as the one module the engine uses (models/sdxl.py)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from .sdxl import SDXLTextEncoder, text_configs

    config_l, config_g = text_configs(width_l=TEXT_WIDTH, width_g=BIG_G_WIDTH, layers_l=2, layers_g=3, heads_l=4,
                                      heads_g=4, projection=BIG_G_PROJECTION, intermediate_l=37, intermediate_g=53)
    return SDXLTextEncoder(seeded(seed, lambda: CLIPTextModel(config_l).eval()),
                           seeded(seed + 1, lambda: CLIPTextModelWithProjection(config_g).eval())).eval()


def tiny_model(seed: int = 0, family: str = "sd1", prediction_type: str = "epsilon") -> DiffusionModel:
    """A complete tiny SD1-style (or SD2-style: linear projections, gelu, '!' padding; or SDXL-style: two text
    encoders, size conditioning) model."""
    tokenizer = clip_tokenizer(pad_token=family_record(family).pad_token)
    text_encoder = tiny_sdxl_text_encoder(seed + 2) if family == "sdxl" else tiny_text_encoder(seed + 2, family)
    return DiffusionModel(
        unet=tiny_unet(seed, family),
        vae=tiny_vae(seed + 1, family),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        noise_scheduler=noise_scheduler(prediction_type),
        family=family,
        name=f"tiny-{family}-{prediction_type}-seed{seed}",
    )


def tiny_clip(text_encoder=None, seed: int = 0, family: str = "sd1"):
    """A tiny CLIPModel (vision + text towers with projections) for the prototype step.

    Its text tower is a copy of `text_encoder` when given, as SD1's text encoder is CLIP-L's text tower (and SDXL's
    second, bigG's).
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
        text_config=(text_encoder.config if text_encoder is not None else tiny_text_config(family)).to_dict(),
        vision_config=vision.to_dict(),
        projection_dim=TEXT_WIDTH,
    )
    clip = seeded(seed, lambda: CLIPModel(config).eval())
    if text_encoder is not None:
        tower = clip.text_model.state_dict()  # (a CLIPTextModelWithProjection's own projection stays out)
        clip.text_model.load_state_dict({name: t for name, t in text_tensors(text_encoder).items() if name in tower})
    return clip


