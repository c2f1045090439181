"""The object encoder (Taming Encoder, arXiv 2304.02642; research/methods.md §4): in one forward pass, the CLIP
vision features of the masked object become K vectors in the text encoder's token space — a concept's token vectors,
which stock ComfyUI (`embedding:<name>`) and diffusers (`load_textual_inversion`) read like any embedding.

A small perceiver (K learned queries; each layer cross-attends to the vision features, then self-attends) predicts
an offset from the class word's vectors: its output layer starts at zero, so an untrained encoder gives exactly the
class word, and pretraining moves each object away from it. Dropped objects (pretraining's regulariser) get a learned
null offset instead.

Its file: the encoder's tensors, its shape in the metadata, and, when pretraining tuned the UNet too, that LoRA
(kohya keys under `unet_lora.`), which every concept it makes carries.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InputError
from ..fileio import save_safetensors

FORMAT = "protobooth-object-encoder/1"
METADATA_KEY = "protobooth_encoder"
LORA_PREFIX = "unet_lora."  # where the tuned UNet's LoRA (kohya keys) sits in the encoder's file


@dataclass(frozen=True)
class EncoderShape:
    vision_width: int  # the CLIP vision tower's hidden width (its last hidden state is the input)
    text_width: int  # the text encoder's token width (the concept's vectors)
    family: str = "sd1"
    queries: int = 1  # K: vectors per object (tuning from four costs editability: shapesworld/results/encoder_probe.md)
    width: int = 256
    layers: int = 4
    heads: int = 4
    lora_alpha: float = 0.0  # the UNet LoRA's alpha, when the file holds one
    # A vector is at most this long, or its class word's length where that is longer (0: unbounded): the one-shot
    # trainer's bound (the vocabulary's mean norm), without which vectors grow many times longer than any word's.
    max_norm: float = 0.0


class _Block(nn.Module):
    """Queries cross-attend to the picture's features, then to each other, then an MLP (pre-norm, residual)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.cross_norm, self.self_norm, self.mlp_norm = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.cross = nn.MultiheadAttention(width, heads, batch_first=True)
        self.attend = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, queries: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        h = self.cross_norm(queries)
        queries = queries + self.cross(h, features, features, need_weights=False)[0]
        h = self.self_norm(queries)
        queries = queries + self.attend(h, h, h, need_weights=False)[0]
        return queries + self.mlp(self.mlp_norm(queries))


class ObjectEncoder(nn.Module):
    def __init__(self, shape: EncoderShape):
        super().__init__()
        self.shape = shape
        self.queries = nn.Parameter(torch.randn(shape.queries, shape.width) * 0.02)
        self.feature_norm = nn.LayerNorm(shape.vision_width)
        self.feature_proj = nn.Linear(shape.vision_width, shape.width)
        self.blocks = nn.ModuleList(_Block(shape.width, shape.heads) for _ in range(shape.layers))
        self.out_norm = nn.LayerNorm(shape.width)
        self.out = nn.Linear(shape.width, shape.text_width)
        nn.init.zeros_(self.out.weight)  # an untrained encoder gives the class word's vectors
        nn.init.zeros_(self.out.bias)
        self.null = nn.Parameter(torch.zeros(shape.queries, shape.text_width))  # the dropped object's offset

    def forward(self, features: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """features [B, N, vision_width] (CLIP's last hidden state), start [B, K, text_width] (class words) → [B, K, W]."""
        queries = self.queries.expand(features.shape[0], -1, -1)
        features = self.feature_proj(self.feature_norm(features.float()))
        for block in self.blocks:
            queries = block(queries, features)
        return self._bounded(start.float() + self.out(self.out_norm(queries)), start)

    def dropped(self, start: torch.Tensor) -> torch.Tensor:
        return self._bounded(start.float() + self.null, start)

    def _bounded(self, vectors: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        if not self.shape.max_norm:
            return vectors
        bound = start.float().norm(dim=-1, keepdim=True).clamp(min=self.shape.max_norm)
        return vectors * (bound / vectors.norm(dim=-1, keepdim=True).clamp(min=1e-12)).clamp(max=1)


def save_encoder(encoder: ObjectEncoder, path, lora: dict[str, torch.Tensor] | None = None, notes: dict | None = None):
    """The encoder's file (atomically): its tensors, shape and notes, and the UNet LoRA tuned with it."""
    tensors = {name: t.detach().float() for name, t in encoder.state_dict().items()}
    tensors.update({LORA_PREFIX + name: t for name, t in (lora or {}).items()})
    meta = {"format": FORMAT, "shape": dataclasses.asdict(encoder.shape), "notes": notes or {}}
    save_safetensors(tensors, path, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})


def load_encoder(path, device="cpu") -> tuple[ObjectEncoder, dict[str, torch.Tensor], dict]:
    """(encoder, its UNet LoRA (kohya keys; empty for none), its notes) from a file save_encoder wrote."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {}).get(METADATA_KEY, "{}"))
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as error:  # not a safetensors file, or a damaged one
        raise InputError(f"{path} could not be read as a safetensors file ({type(error).__name__}); give an object "
                         "encoder file written by `protobooth pretrain-encoder`.") from None
    if meta.get("format") != FORMAT:
        raise InputError(f"{path} is not a ProtoBooth object encoder (its metadata has no {FORMAT!r}); give a file "
                         "written by `protobooth pretrain-encoder`.")
    encoder = ObjectEncoder(EncoderShape(**meta["shape"]))
    own = {name: t for name, t in tensors.items() if not name.startswith(LORA_PREFIX)}
    encoder.load_state_dict(own)
    lora = {name[len(LORA_PREFIX):]: t for name, t in tensors.items() if name.startswith(LORA_PREFIX)}
    return encoder.to(device).eval(), lora, meta.get("notes", {})


def vision_features(vision_model, pixels: torch.Tensor) -> torch.Tensor:
    """The encoder's input: a transformers CLIP vision tower's last hidden state for normalised pixels."""
    return vision_model(pixel_values=pixels).last_hidden_state


def crop_features(towers):
    """`features_of` for object_vectors: one crop [3, h, w] in 0..1 through a ClipTowers' vision side."""
    return lambda crop: vision_features(towers.vision_model, towers.preprocess(crop))
