"""The engine's view of a Stable Diffusion model: diffusers modules plus what training needs to know."""
from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .families import family as family_record

# UNet tensors that identify a base model. They are outside the attention projections, so a LoRA
# applied upstream (in a ComfyUI graph, say) does not change the fingerprint of its base model.
_FINGERPRINT_TENSORS = ("conv_in.weight", "time_embedding.linear_1.weight", "conv_out.weight")
FINGERPRINT_ROWS = 64  # of the token table: enough to tell text encoders apart without hashing 49k rows


def model_fingerprint(unet_state: dict[str, torch.Tensor], token_tables: list[torch.Tensor]) -> str:
    """A short, dtype-independent identity of a base model, from its UNet and the token table of each text encoder
    (SDXL: CLIP-L's, then bigG's; their first rows side by side, never the whole joint table).

    Values are hashed after rounding to fp16, so the same checkpoint loaded in fp16 (ComfyUI) or fp32
    (diffusers) gets the same fingerprint.
    """
    digest = hashlib.sha256()
    # The architecture: every tensor name with its shape.
    for name in sorted(unet_state):
        digest.update(f"{name}{tuple(unet_state[name].shape)};".encode())
    for name in _FINGERPRINT_TENSORS:
        tensor = unet_state[name].detach().to("cpu", torch.float16).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    rows = torch.cat([table.detach()[:FINGERPRINT_ROWS].to("cpu", torch.float16) for table in token_tables], dim=1)
    digest.update(rows.numpy().tobytes())
    return digest.hexdigest()[:16]


class Conditioning(NamedTuple):
    """What the text gives the UNet: the cross-attention context, and for SDXL the pooled text embedding."""

    context: torch.Tensor
    pooled: torch.Tensor | None = None

    def cat(self, other: "Conditioning") -> "Conditioning":
        """Both batches in one (rows of `other` after these)."""
        pooled = None if self.pooled is None else torch.cat([self.pooled, other.pooled.to(self.pooled.dtype)])
        return Conditioning(torch.cat([self.context, other.context.to(self.context.dtype)]), pooled)


@dataclass
class DiffusionModel:
    """A Stable Diffusion 1.x/2.x or SDXL model as diffusers modules.

    `noise_scheduler` is the training noise schedule (DDPM, with the model's prediction type);
    samplers for generation are made from its config. SDXL's two text encoders are one module here
    (models/sdxl.py: SDXLTextEncoder), whose token vectors are both encoders' widths side by side.
    """

    unet: "UNet2DConditionModel"  # noqa: F821 (diffusers types, imported lazily)
    vae: "AutoencoderKL"  # noqa: F821
    text_encoder: "CLIPTextModel | SDXLTextEncoder"  # noqa: F821
    tokenizer: "CLIPTokenizer"  # noqa: F821
    noise_scheduler: "DDPMScheduler"  # noqa: F821
    family: str = "sd1"
    name: str = ""
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_scaling(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            tables = [encoder.get_input_embeddings().weight for encoder in self.text_encoders]
            self._fingerprint = model_fingerprint(self.unet.state_dict(), tables)
        return self._fingerprint

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def text_widths(self) -> tuple[int, ...]:
        """The widths of a token vector's parts, one per text encoder (the embedding file's keys, in order)."""
        widths = getattr(self.text_encoder, "widths", None)
        return tuple(widths) if widths else (self.text_encoder.get_input_embeddings().weight.shape[1],)

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        """The transformers text encoder(s), in the order of the family's embedding keys and LoRA prefixes."""
        parts = getattr(self.text_encoder, "parts", None)
        return list(parts.values()) if parts else [self.text_encoder]

    def encode(self, input_ids: torch.Tensor) -> Conditioning:
        """The UNet's text conditioning for tokenized prompts (through the text encoder as it is now)."""
        output = self.text_encoder(input_ids=input_ids)
        return Conditioning(output[0], output[1] if family_record(self.family).size_conditioning else None)

    def encode_prompts(self, prompts: list[str], device=None) -> Conditioning:
        """encode() of prompts as the model's own tokenizer reads them (no new words), the ids on `device`."""
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.encode(ids.to(device or self.device))

    def pictures(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents [N, C, h, w] (as the UNet sees them) → pictures [N, 3, H, W] in 0..1, float, through the VAE."""
        decoded = self.vae.decode((latents / self.latent_scaling).to(self.vae.device, self.vae.dtype)).sample
        return (decoded.float() / 2 + 0.5).clamp(0, 1)

    def unet_kwargs(self, conditioning: Conditioning, size: int) -> dict:
        """The UNet's conditioning arguments besides the noisy latents and timesteps, for square `size`-px pictures."""
        kwargs = {"encoder_hidden_states": conditioning.context.to(self.unet.dtype)}
        if conditioning.pooled is not None:
            from .sdxl import time_ids

            pooled = conditioning.pooled.to(self.unet.dtype)
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled,
                                           "time_ids": time_ids(size, len(pooled), pooled.device, pooled.dtype)}
        return kwargs

    def to(self, device=None, dtype=None) -> "DiffusionModel":
        for module in (self.unet, self.vae, self.text_encoder):  # diffusers warns about any dtype it is given
            module.to(device=device, **({} if dtype is None else {"dtype": dtype}))
        return self

    def pipeline(self, scheduler=None, tokenizer=None):
        """A diffusers pipeline over these modules (DDIM sampler unless one is given; the model's tokenizer unless
        one is given): StableDiffusionPipeline, or StableDiffusionXLPipeline for SDXL."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        if scheduler is None:
            scheduler = DDIMScheduler.from_config(self.noise_scheduler.config)
        tokenizer = tokenizer or self.tokenizer
        if family_record(self.family).size_conditioning:
            from diffusers import StableDiffusionXLPipeline

            from .sdxl import BIG_G_PAD_ID

            tokenizer_2 = copy.deepcopy(tokenizer)  # the same words, padded as bigG's own tokenizer pads
            tokenizer_2.pad_token = tokenizer_2.convert_ids_to_tokens(BIG_G_PAD_ID)
            return StableDiffusionXLPipeline(
                vae=self.vae, text_encoder=self.text_encoder.clip_l, text_encoder_2=self.text_encoder.clip_g,
                tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=self.unet, scheduler=scheduler,
            )
        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=tokenizer,
            unet=self.unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
