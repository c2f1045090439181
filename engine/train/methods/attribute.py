"""OSTAF (arXiv 2403.11053; research/methods.md §3): learn one attribute of a photo (its appearance, shape or
drawing style) through a hypernetwork, with an intensity λ.

Two ideas. The UNet's encoder (down path) carries shape and its decoder (up path) appearance and style, so only the
attention projections of the matching half are adapted. And those adaptations are not trained directly: a small
hypernetwork, shared by every target layer, maps each layer's learned code (and a fixed description of the layer) to
low-rank factors A (rank x in) and B (out x rank), ΔW = B·A, with B's head zero-initialised so training starts from
the base model. A forward hook adds λ·B·A·x to each target layer's output (λ = 1 while training).

Because every ΔW is low-rank, the concept's file is an ordinary kohya LoRA of the hypernetwork's output: λ is then
the LoRA strength (Apply Concept's strength_model, stock Load LoRA's strength, diffusers' adapter weight), and the
hypernetwork itself is not needed again, so it is not kept (a checkpoint holds it while training). `direct` trains
the factors themselves instead (a plain LoRA on the same layers): the paper's ablation.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...concept.concept import peft_to_kohya
from ...errors import InputError
from ..fields import MethodSettings, setting
from ..losses import masked_mse
from .base import Method, check_lora_rank

PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
# Which half of the UNet each attribute is adapted in (the paper's observation).
HALF_OF = {"appearance": "decoder", "shape": "encoder", "style": "decoder"}
PARTS = {"encoder": ("down_blocks",), "decoder": ("up_blocks",), "both": ("down_blocks", "up_blocks")}


@dataclass
class AttributeSettings(MethodSettings):
    attribute: str = setting("appearance", "what to learn from the photo: appearance (material, texture, colour "
                             "pattern), shape, or style", choices=tuple(HALF_OF))
    layers: str = setting("auto", "the UNet half adapted: auto (decoder for appearance and style, encoder for shape), "
                          "decoder, encoder or both", choices=("auto", "decoder", "encoder", "both"))
    include_mid: bool = setting(False, "adapt the middle block's attention too")
    hyper_rank: int = setting(4, "rank of each predicted offset (ΔW = B·A)", low=1, high=64)
    hyper_hidden: int = setting(128, "width of the hypernetwork's body", low=8, high=1024)
    hyper_learning_rate: float = setting(1e-4, "learning rate of the hypernetwork (or of the factors, with direct)",
                                         low=0, high=1, widget={"step": 1e-5})
    direct: bool = setting(False, "train the low-rank factors directly (a plain LoRA on the same layers) instead of "
                           "through the hypernetwork: the paper's ablation")
    use_mask: bool = setting(True, "limit the loss to the masked region that carries the attribute")

    def half(self) -> str:
        return HALF_OF[self.attribute] if self.layers == "auto" else self.layers


def target_layers(unet: nn.Module, settings: AttributeSettings) -> list[tuple[str, nn.Linear]]:
    """The attention projections the attribute is learned in, in the UNet's order."""
    parts = PARTS[settings.half()] + (("mid_block",) if settings.include_mid else ())
    return [(name, module) for name, module in unet.named_modules()
            if isinstance(module, nn.Linear) and name.split(".")[0] in parts and ".attn" in name
            and any(name.endswith("." + projection) for projection in PROJECTIONS)]


def _descriptor(name: str, depth: float) -> list[float]:
    """A fixed description of a layer: its projection, self- or cross-attention, UNet part, depth in 0..1."""
    projection = [float(name.endswith("." + p)) for p in PROJECTIONS]
    kind = [float(".attn1." in name), float(".attn2." in name)]
    part = [float(name.startswith(p)) for p in ("down_blocks", "mid_block", "up_blocks")]
    return projection + kind + part + [depth]


class OffsetNetwork(nn.Module):
    """Low-rank factors (A, B) for every target layer: predicted by the hypernetwork from each layer's code, or (direct)
    held as parameters of their own."""

    def __init__(self, layers: list[tuple[str, nn.Linear]], rank: int, hidden: int, direct: bool, seed: int):
        super().__init__()
        self.shapes = [(module.in_features, module.out_features) for _, module in layers]
        self.rank, self.direct = rank, direct
        generator = torch.Generator().manual_seed(seed)
        if direct:  # peft's gaussian LoRA init: A ~ N(0, 1/rank), B = 0
            self.down = nn.ParameterList([nn.Parameter(torch.randn(rank, d_in, generator=generator) / rank)
                                          for d_in, _ in self.shapes])
            self.up = nn.ParameterList([nn.Parameter(torch.zeros(d_out, rank)) for _, d_out in self.shapes])
            return
        code_size = 64
        self.codes = nn.Parameter(torch.randn(len(layers), code_size, generator=generator) * 0.1)
        depths = [index / max(1, len(layers) - 1) for index in range(len(layers))]
        self.register_buffer("descriptors", torch.tensor([_descriptor(n, d) for (n, _), d in zip(layers, depths)]))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.body = nn.Sequential(nn.Linear(code_size + self.descriptors.shape[1], hidden), nn.SiLU(),
                                      nn.Linear(hidden, hidden), nn.SiLU())
            self.down_heads = nn.ModuleDict({str(d): nn.Linear(hidden, rank * d) for d in sorted({i for i, _ in self.shapes})})
            self.up_heads = nn.ModuleDict({str(d): nn.Linear(hidden, rank * d) for d in sorted({o for _, o in self.shapes})})
        for head in self.up_heads.values():  # ΔW = 0 at the start: training starts from the base model
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self.direct:
            return list(zip(self.down, self.up))
        features = self.body(torch.cat([self.codes, self.descriptors], dim=-1))
        return [(self.down_heads[str(d_in)](features[index]).view(self.rank, d_in),
                 self.up_heads[str(d_out)](features[index]).view(d_out, self.rank))
                for index, (d_in, d_out) in enumerate(self.shapes)]


class Attribute(Method):
    name = "attribute"
    label = "Attribute"
    description = (
        "OSTAF: learns one attribute of the photo (appearance, shape or style) rather than the whole object, in the "
        "UNet half that carries it (decoder for appearance and style, encoder for shape), through a hypernetwork that "
        "predicts low-rank attention offsets. The concept is an ordinary LoRA plus a trigger word: its strength is the "
        "attribute's intensity λ (1 as trained; above 2 overshoots). Prompts: 'a teapot made of zqmat material', "
        "'a tiger shaped like zqshape', 'a painting in zqstyle style'."
    )
    settings_class = AttributeSettings
    widgets = ("steps", "hyper_learning_rate", "token_learning_rate", "attribute", "layers", "resolution", "seed")
    sensible_strength = 2.0  # λ beyond this overshoots the attribute

    def check_model(self) -> None:
        layers = target_layers(self.model.unet, self.settings)
        if not layers:
            raise InputError(f"this model's UNet has no attention layers in its {self.settings.half()}; choose other "
                             "layers.")
        check_lora_rank(self.model.unet, [name for name, _ in layers], self.settings.hyper_rank, "this model's UNet")

    def trainables(self) -> list[dict]:
        settings, trainer = self.settings, self.trainer
        self.layers = target_layers(self.model.unet, settings)
        self.offsets = OffsetNetwork(self.layers, settings.hyper_rank, settings.hyper_hidden, settings.direct,
                                     trainer.settings.seed).to(trainer.device)
        self._factors, self._frozen = None, None
        self.strength = 1.0  # λ: 1 while training; a preview may set another (the LoRA strength it stands for)
        for index, (_, module) in enumerate(self.layers):
            handle = module.register_forward_hook(lambda m, args, out, index=index: self._add_offset(index, args[0], out))
            trainer.on_exit(handle.remove)
        return [{"params": list(self.offsets.parameters()), "lr": settings.hyper_learning_rate, "weight_decay": 1e-2}]

    def _add_offset(self, index: int, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        factors = self._factors
        if factors is None:  # outside a training step (a preview): the offsets as they are now, without gradients
            if self._frozen is None or self._frozen[0] != self.trainer.step:
                with torch.no_grad():
                    self._frozen = (self.trainer.step, self.offsets())
            factors = self._frozen[1]
        down, up = factors[index]
        return out + self.strength * F.linear(F.linear(x, down.to(x.dtype)), up.to(x.dtype))

    @contextlib.contextmanager
    def unet_call(self, example):
        self._factors = self.offsets()  # once per step, shared by every layer's hook (and a recomputing backward)
        try:
            yield
        finally:
            self._factors = None

    def loss(self, example, prediction, target):
        return masked_mse(prediction[:1], target[:1], example.loss_mask(self.settings.use_mask), 0.0)

    def lora(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            factors = self.offsets()
        state = {}
        for (name, _), (down, up) in zip(self.layers, factors):
            state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = down, up
        return peft_to_kohya(state, self.settings.hyper_rank)  # alpha = rank: the offset is exactly B·A at strength 1

    def checkpoint_state(self) -> dict:
        return {"offsets": {k: v.detach().cpu() for k, v in self.offsets.state_dict().items()}}

    def load_checkpoint_state(self, state: dict) -> None:
        self.offsets.load_state_dict(state["offsets"])
