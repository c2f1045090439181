"""Test kit: the smallest SD1 checkpoint the real ComfyUI detects as SD1.5 (full-size CLIP-L and VAE, which
ComfyUI hard-codes), and the smallest SDXL-family one it detects (full-size CLIP-L, OpenCLIP bigG and VAE), with
random weights that keep activations finite."""
from __future__ import annotations

import torch

from protobooth.engine.models.diffusion_model import DiffusionModel
from protobooth.engine.models.families import family, noise_scheduler
from protobooth.engine.models.tiny import seeded
from protobooth.engine.text.tokenizer import clip_tokenizer


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
            family("sd1").text_encoder_config(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                              num_attention_heads=12)
        )
        for module in (unet, vae, text_encoder):
            _init_sensibly(module)
        return unet.eval(), vae.eval(), text_encoder.eval()

    unet, vae, text_encoder = seeded(seed, build)
    return DiffusionModel(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        noise_scheduler=noise_scheduler("epsilon"),
        family="sd1",
        name=f"comfy-tiny-sd1-seed{seed}",
    )


def comfy_smallest_sdxl_model(seed: int = 0) -> DiffusionModel:
    """A small SDXL-family model that ComfyUI's checkpoint loader detects (as Segmind Vega) with no missing keys.

    ComfyUI matches an SDXL-family UNet by 320 model channels, linear projections, 2048 context, 2816 added-condition
    inputs and the transformer depths of the input blocks alone (Vega's are [0, 0, 1, 1, 2, 2]); channel multipliers,
    the middle block and the output blocks are not checked. Here every level is 320 wide and the UNet is otherwise
    SDXL's shape (two blocks per level, output blocks mirroring the input ones, attention in the middle): 115.5 M
    parameters. ComfyUI builds SDXL's text encoders (CLIP-L, 123.1 M parameters; OpenCLIP bigG, 694.7 M) and VAE
    (83.7 M) at full size from its own configs whatever the file holds: a tensor left out stays uninitialised memory
    and one of another shape fails the load, so those are full size here and make 89% of the file. 1016.8 M
    parameters, 2,033,883,774 bytes in fp16. (Both test ComfyUIs also accept a 60.6 M-parameter UNet, KOALA-700M's
    input depths with one block per level, no attention on the way up and no middle block: a 1.92 GB file, 5% less,
    but no longer SDXL's shape.)
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from protobooth.engine.models.sdxl import SDXLTextEncoder, text_configs

    def build():
        with torch.device("meta"):  # skip the libraries' own initialisation: ours replaces it
            unet = UNet2DConditionModel(
                sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 320, 320),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 1, 2), cross_attention_dim=2048, attention_head_dim=(5, 5, 5),
                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816,
            )
            vae = AutoencoderKL(
                in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, sample_size=1024, scaling_factor=family("sdxl").latent_scaling,
            )
            config_l, config_g = text_configs(width_l=768, width_g=1280, layers_l=12, layers_g=32, heads_l=12, heads_g=20,
                                              projection=1280)
            clip_l, clip_g = CLIPTextModel(config_l), CLIPTextModelWithProjection(config_g)
        modules = (unet, vae, clip_l, clip_g)
        for module in modules:
            module.to_empty(device="cpu")
            _init_sensibly(module)
        for module in (clip_l, clip_g):  # the buffer to_empty left unset
            dict(module.named_buffers())[next(n for n, _ in module.named_buffers() if n.endswith("position_ids"))].copy_(
                torch.arange(config_l.max_position_embeddings)[None])
        return unet.eval(), vae.eval(), SDXLTextEncoder(clip_l.eval(), clip_g.eval()).eval()

    unet, vae, text_encoder = seeded(seed, build)
    return DiffusionModel(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(),
                          noise_scheduler=noise_scheduler("epsilon"), family="sdxl", name=f"comfy-smallest-sdxl-seed{seed}")
