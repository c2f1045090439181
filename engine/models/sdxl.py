"""SDXL's text side as one text encoder, so every method trains on SDXL through the same code as on SD1/SD2.

SDXL reads a prompt with two CLIP text encoders (OpenAI CLIP-L, 768 wide, and OpenCLIP bigG, 1280 wide, with a
text projection) and gives the UNet:
- the context: both encoders' penultimate hidden states side by side (2048 wide for the real model);
- the pooled text embedding: bigG's projected state at the prompt's end token;
- the micro-conditioning (original size, crop corner, target size), as time ids.

`SDXLTextEncoder` wraps the two: its token table is both tables side by side, so a new word is one vector of
their joint width (CLIP-L's part first) that the vocabulary, the prototype and the norm bounds treat like SD1's;
the embedding file splits it into `clip_l` and `clip_g`, the layout ComfyUI and kohya read. Both encoders share
CLIP's BPE vocabulary; bigG's tokenizer pads with "!" (id 0) where CLIP-L's pads with the end token, so the ids
for bigG are CLIP-L's with every padding position set to 0 (what ComfyUI and diffusers feed it).
"""
from __future__ import annotations

import torch
from torch import nn

from ..text.tokenizer import END_TOKEN_ID, START_TOKEN_ID

BIG_G_PAD_ID = 0  # "!": what SDXL's second tokenizer pads with
TIME_IDS = 6  # original height, width, crop top, left, target height, width


def _eos_positions(input_ids: torch.Tensor) -> torch.Tensor:
    """Each prompt's first end token (the pooling position, as in ComfyUI and diffusers)."""
    return (input_ids == END_TOKEN_ID).int().argmax(dim=-1)


def big_g_ids(input_ids: torch.Tensor) -> torch.Tensor:
    """CLIP-L's ids (padded with the end token) as bigG's tokenizer gives them: padded with 0 after the end token."""
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
    after_end = positions[None] > _eos_positions(input_ids)[:, None]
    return torch.where(after_end, torch.full_like(input_ids, BIG_G_PAD_ID), input_ids)


class JointEmbedding(nn.Module):
    """The two encoders' token tables side by side: a lookup gives [.., width_l + width_g]."""

    def __init__(self, first: nn.Module, second: nn.Module):
        super().__init__()
        self.parts = nn.ModuleList([first, second])

    @property
    def weight(self) -> torch.Tensor:  # the joint table; built on demand (reads are rare: norms, class words)
        first, second = (part.weight for part in self.parts)
        return torch.cat([first, second.to(first.dtype)], dim=1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        first, second = (part(ids) for part in self.parts)
        return torch.cat([first, second.to(first.dtype)], dim=-1)


class _Half(nn.Module):
    """One encoder's columns of a joint embedding layer (the layer installed on the wrapper, new rows included)."""

    def __init__(self, joint: nn.Module, start: int, stop: int, own: nn.Module):
        super().__init__()
        self.joint, self.start, self.stop = joint, start, stop
        self.own = [own]  # a list: the encoder's own table is not a submodule of this view

    @property
    def weight(self) -> torch.Tensor:  # transformers reads dtype and device through it
        return self.own[0].weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.joint(ids)[..., self.start:self.stop].to(self.own[0].weight.dtype)


class SDXLTextEncoder(nn.Module):
    """CLIP-L and bigG as one text encoder: forward(input_ids) → (context, pooled)."""

    def __init__(self, clip_l, clip_g):
        super().__init__()
        self.clip_l, self.clip_g = clip_l, clip_g
        self._tables = (clip_l.get_input_embeddings(), clip_g.get_input_embeddings())
        self._installed: nn.Module | None = None

    @property
    def widths(self) -> tuple[int, int]:
        return tuple(table.weight.shape[1] for table in self._tables)

    @property
    def parts(self) -> dict[str, nn.Module]:
        """The two encoders by the names their embedding halves and LoRA prefixes use."""
        return {"clip_l": self.clip_l, "clip_g": self.clip_g}

    @property
    def dtype(self) -> torch.dtype:
        return self.clip_l.dtype

    @property
    def device(self) -> torch.device:
        return self.clip_l.device

    def get_input_embeddings(self) -> nn.Module:
        return self._installed if self._installed is not None else JointEmbedding(*self._tables)

    def set_input_embeddings(self, module: nn.Module) -> None:
        """Install a joint-width embedding layer (the vocabulary's, with new rows); the plain joint table restores."""
        if isinstance(module, JointEmbedding):
            self._installed = None
            self.clip_l.set_input_embeddings(self._tables[0])
            self.clip_g.set_input_embeddings(self._tables[1])
            return
        self._installed = module
        width_l, width_g = self.widths
        self.clip_l.set_input_embeddings(_Half(module, 0, width_l, self._tables[0]))
        self.clip_g.set_input_embeddings(_Half(module, width_l, width_l + width_g, self._tables[1]))

    def forward(self, input_ids: torch.Tensor):
        ids_g = big_g_ids(input_ids)
        out_l = self.clip_l(input_ids=input_ids, output_hidden_states=True)
        out_g = self.clip_g(input_ids=ids_g, output_hidden_states=True)
        context = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2].to(out_l.hidden_states[-2].dtype)], dim=-1)
        # Pooled at the first end token here, not by transformers: with the legacy eos_token_id=2 of some configs it
        # would pool at the largest id, a new word's.
        final = out_g.last_hidden_state
        pooled = self.clip_g.text_projection(final[torch.arange(final.shape[0], device=final.device), _eos_positions(ids_g)])
        return context, pooled


def time_ids(size: int, batch: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """SDXL's micro-conditioning for a square picture of `size` pixels, uncropped: what diffusers' pipeline sends."""
    return torch.tensor([[size, size, 0, 0, size, size]] * batch, device=device, dtype=dtype)


def text_configs(*, width_l: int, width_g: int, layers_l: int, layers_g: int, heads_l: int, heads_g: int, projection: int,
                 intermediate_l: int | None = None, intermediate_g: int | None = None, vocab_size: int = 49408,
                 max_position_embeddings: int = 77):
    """transformers configs of SDXL's two text encoders (CLIP-L: quick_gelu, end-token padding; bigG: gelu, '!')."""
    from transformers import CLIPTextConfig

    def config(width, layers, heads, intermediate, activation, pad_id, projection_dim):
        return CLIPTextConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=intermediate or 4 * width,
                              num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=max_position_embeddings,
                              projection_dim=projection_dim, hidden_act=activation, layer_norm_eps=1e-5,
                              bos_token_id=START_TOKEN_ID, eos_token_id=END_TOKEN_ID, pad_token_id=pad_id)

    return (config(width_l, layers_l, heads_l, intermediate_l, "quick_gelu", END_TOKEN_ID, width_l),
            config(width_g, layers_g, heads_g, intermediate_g, "gelu", BIG_G_PAD_ID, projection))
