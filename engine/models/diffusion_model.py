"""The engine's view of a Stable Diffusion model: diffusers modules plus what training needs to know."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

# UNet tensors that identify a base model. They are outside the attention projections, so a LoRA
# applied upstream (in a ComfyUI graph, say) does not change the fingerprint of its base model.
_FINGERPRINT_TENSORS = ("conv_in.weight", "time_embedding.linear_1.weight", "conv_out.weight")


def model_fingerprint(unet_state: dict[str, torch.Tensor], text_embedding: torch.Tensor) -> str:
    """A short, dtype-independent identity of a base model.

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
    # The first rows of the token table tell text encoders apart without hashing 49k rows.
    rows = text_embedding.detach()[:64].to("cpu", torch.float16).contiguous()
    digest.update(rows.numpy().tobytes())
    return digest.hexdigest()[:16]


@dataclass
class DiffusionModel:
    """A Stable Diffusion 1.x/2.x model as diffusers modules.

    `noise_scheduler` is the training noise schedule (DDPM, with the model's prediction type);
    samplers for generation are made from its config.
    """

    unet: "UNet2DConditionModel"  # noqa: F821 (diffusers types, imported lazily)
    vae: "AutoencoderKL"  # noqa: F821
    text_encoder: "CLIPTextModel"  # noqa: F821
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
            embedding = self.text_encoder.get_input_embeddings().weight
            self._fingerprint = model_fingerprint(self.unet.state_dict(), embedding)
        return self._fingerprint

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def to(self, device=None, dtype=None) -> "DiffusionModel":
        for module in (self.unet, self.vae, self.text_encoder):  # diffusers warns about any dtype it is given
            module.to(device=device, **({} if dtype is None else {"dtype": dtype}))
        return self

    def pipeline(self, scheduler=None):
        """A StableDiffusionPipeline over these modules (DDIM sampler unless one is given)."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        if scheduler is None:
            scheduler = DDIMScheduler.from_config(self.noise_scheduler.config)
        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
