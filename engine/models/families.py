"""Model families: one record per family holds every fact that differs between them, and everything reads it.

Loading, the ComfyUI views, concept files, tokenizers and nodes ask this table (family(name).pad_token, ...)
instead of restating a fact. SDXL's two text encoders are one to the engine (models/sdxl.py); its record names both embedding halves.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..text.tokenizer import END_TOKEN, END_TOKEN_ID, START_TOKEN_ID  # CLIP's tokenizer: every family's



@dataclass(frozen=True)
class Family:
    name: str  # the engine's name: "sd1", "sd2", "sdxl"
    label: str  # what users call it
    trainable: bool
    text_activation: str = ""  # of its text encoder: OpenAI CLIP-L uses quick_gelu, OpenCLIP gelu
    pad_token: str = END_TOKEN  # what its tokenizer pads prompts with (ComfyUI pads the same way)
    pad_token_id: int = END_TOKEN_ID
    # The keys of its vectors in an embedding file (ComfyUI, kohya, diffusers): one per text encoder, in the order
    # their columns stand in a token's vector.
    embedding_keys: tuple[str, ...] = ()
    # The attributes of ComfyUI's CLIP model (cond_stage_model) that hold its text encoders, in the order their
    # columns stand in a token's vector; its tokenizer keeps each encoder's word tokenizer under the same name.
    comfy_text_encoders: tuple[str, ...] = ()
    comfy_model_configs: tuple[str, ...] = ()  # ComfyUI's model-config classes of this family
    # ComfyUI model-config classes of this family's architecture that are other models, with what users call them
    # (refused by name: their UNets take other inputs).
    comfy_other_models: tuple[tuple[str, str], ...] = ()
    native_sizes: tuple[tuple[str, int], ...] = ()  # (prediction type, pixels it draws natively)
    unet_heads: int | None = None  # SD1 UNets have a fixed number of heads ...
    unet_head_channels: int | None = None  # ... SD2 UNets heads of a fixed width (the weights do not show it)
    # kohya's LoRA key prefix of each text encoder, in embedding_keys' order (ComfyUI and diffusers map them).
    text_lora_prefixes: tuple[str, ...] = ("lora_te_",)
    latent_scaling: float = 0.18215  # of its KL autoencoder's latents
    # Its UNet also takes the pooled text embedding and the picture's size (SDXL's micro-conditioning).
    size_conditioning: bool = False
    clip_vision: str = ""  # the CLIP image encoder whose features fit its text encoder (prototype init)
    full_clip: str = ""  # the full CLIP model file (both towers) that holds its text projection
    # Whether its checkpoints may carry that projection (SDXL's never hold CLIP-L's; ComfyUI leaves it unset there).
    checkpoint_text_projection: bool = True

    def native_size(self, prediction_type: str = "epsilon") -> int:
        sizes = dict(self.native_sizes)
        return sizes.get(prediction_type, sizes.get("epsilon", 512))

    def text_encoder_config(self, *, hidden_size: int, intermediate_size: int, num_hidden_layers: int,
                            num_attention_heads: int, vocab_size: int = 49408, max_position_embeddings: int = 77):
        """A transformers CLIPTextConfig for this family's text encoder of the given sizes."""
        from transformers import CLIPTextConfig

        return CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            max_position_embeddings=max_position_embeddings,
            projection_dim=hidden_size,
            hidden_act=self.text_activation,
            layer_norm_eps=1e-5,
            bos_token_id=START_TOKEN_ID,
            eos_token_id=END_TOKEN_ID,  # transformers pools at the first end token; a legacy 2 means argmax
            pad_token_id=self.pad_token_id,
        )


FAMILIES = {
    "sd1": Family(
        "sd1", "Stable Diffusion 1.x", trainable=True, text_activation="quick_gelu", embedding_keys=("clip_l",),
        comfy_text_encoders=("clip_l",), comfy_model_configs=("SD15",),
        comfy_other_models=(("SD15_instructpix2pix", "an SD 1.5 InstructPix2Pix (image edit) model"),),
        native_sizes=(("epsilon", 512),), unet_heads=8,
        clip_vision="CLIP ViT-L/14 (768-wide features; e.g. openai/clip-vit-large-patch14 saved as "
                    "clip-vit-large-patch14.safetensors)",
        full_clip="model.safetensors of openai/clip-vit-large-patch14",
    ),
    "sd2": Family(
        "sd2", "Stable Diffusion 2.x", trainable=True, text_activation="gelu", pad_token="!", pad_token_id=0,
        embedding_keys=("clip_h",), comfy_text_encoders=("clip_h",), comfy_model_configs=("SD20",),
        comfy_other_models=(("SD21UnclipL", "an SD 2.1 unCLIP model"), ("SD21UnclipH", "an SD 2.1 unCLIP model")),
        native_sizes=(("epsilon", 512), ("v_prediction", 768)), unet_head_channels=64,
        clip_vision="CLIP ViT-H/14 (1024-wide features; e.g. CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors)",
        full_clip="model.safetensors of laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    ),
    "sdxl": Family(
        "sdxl", "SDXL", trainable=True, text_activation="quick_gelu", embedding_keys=("clip_l", "clip_g"),
        text_lora_prefixes=("lora_te1_", "lora_te2_"),
        comfy_text_encoders=("clip_l", "clip_g"),
        # The base model and the distilled ones ComfyUI knows by their reduced UNets (SSD-1B, Segmind Vega, KOALA):
        # the same conditioning, fewer layers.
        comfy_model_configs=("SDXL", "SSD1B", "Segmind_Vega", "KOALA_700M", "KOALA_1B"),
        comfy_other_models=(("SDXLRefiner", "the SDXL refiner (it conditions on bigG alone)"),
                            ("SDXL_instructpix2pix", "an SDXL InstructPix2Pix (image edit) model")),
        native_sizes=(("epsilon", 1024),), unet_head_channels=64, latent_scaling=0.13025, size_conditioning=True,
        clip_vision="CLIP ViT-L/14 for the CLIP-L half (e.g. clip-vit-large-patch14.safetensors); the bigG half: "
                    "OpenCLIP ViT-bigG/14 (1280-wide features; CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors) where "
                    "given, else the class word",
        full_clip="model.safetensors of openai/clip-vit-large-patch14",
        checkpoint_text_projection=False,
    ),
}
TRAINABLE = tuple(name for name, record in FAMILIES.items() if record.trainable)


def family(name: str) -> Family:
    """The record of a family by its engine name; a KeyError names the known ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise KeyError(f"no model family {name!r}; known: {', '.join(FAMILIES)}") from None


def noise_scheduler(prediction_type: str = "epsilon"):
    """The training noise schedule of SD1, SD2 and SDXL: 1000 scaled-linear steps from 0.00085 to 0.012."""
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
