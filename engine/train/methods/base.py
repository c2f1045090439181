"""What a method is: the hooks the shared trainer (train/trainer.py) calls.

The trainer owns what every method shares: the photo's views and their latents, the new tokens and their vectors,
noise, timesteps, the optimiser, gradient clipping and loss scaling, progress, cancel, checkpoints and seeds. A
method says what else is frozen (prepare), what trains (trainables), what joins the UNet batch (extra_rows), what
happens around the UNet call (unet_call), what the loss is (loss), and what it exports (lora) — kohya LoRA keys,
which stock ComfyUI and diffusers load, so applying any method's concept is the same everywhere.

A method that trains nothing per concept (an encoder that maps a photo to vectors in one pass) is not a Method:
it makes a Concept without the trainer.
"""
from __future__ import annotations

import contextlib
from typing import ClassVar

import torch


class Method:
    name: ClassVar[str]  # the --method value and the settings' owner
    label: ClassVar[str]  # how the node and help name it
    description: ClassVar[str]  # one paragraph for the node's help
    settings_class: ClassVar[type]  # its MethodSettings dataclass
    # Its ComfyUI node's widgets, in the order saved workflows store their values: append, never reorder (an old
    # workflow file then fills the first ones by position and leaves a new one at its default).
    widgets: ClassVar[tuple[str, ...]] = ("steps", "token_learning_rate", "resolution", "seed")
    # Its own optional inputs, after every Train node's (options.OPTIONAL_WIDGETS): a workflow may leave them out.
    optional_widgets: ClassVar[tuple[str, ...]] = ()
    # Shared settings whose default differs for this method (TextBoost: fewer steps, SNR timesteps, augmentation on).
    shared_defaults: ClassVar[dict] = {}
    # The largest LoRA strength that still makes sense for its concepts (a warning beyond it); None: no limit known.
    sensible_strength: ClassVar[float | None] = None
    trains_text_encoder: ClassVar[bool] = False  # its trainables sit in the text encoder (it cannot be offloaded)

    def __init__(self, trainer):
        self.trainer = trainer
        self.model = trainer.model
        self.settings = trainer.settings.method

    def check_model(self) -> None:
        """Refuse, before anything is prepared, a model the settings do not fit (a LoRA rank above a layer's width)."""

    def prepare(self) -> None:
        """Compute what stays fixed, once, while the model is still the base model (no gradients)."""

    def class_pictures(self) -> dict[str, torch.Tensor]:
        """The class images it drew in prepare(), per class word, as latents (recompose_companions cuts its
        companions out of them); none for a method without a class prior."""
        return {}

    def trainables(self) -> list[dict]:
        """Attach what this method trains to the model and return it as AdamW parameter groups (LoRA and the like;
        the tokens' vectors are the trainer's). Undo every change through self.trainer.on_exit(callback)."""
        return []

    def extra_rows(self, example) -> tuple[torch.Tensor, "Conditioning"] | None:  # noqa: F821 (models.diffusion_model)
        """(latents, text conditioning) to add to this step's UNet batch after the instance row, or None."""
        return None

    def unet_call(self, example):
        """A context around this step's UNet forward pass."""
        return contextlib.nullcontext()

    def loss(self, example, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The step's loss from the UNet's prediction and target for every row of the batch."""
        raise NotImplementedError

    def lora(self) -> dict[str, torch.Tensor]:
        """What the concept's LoRA file holds: kohya keys (lora_unet_*, lora_te_*, with alphas); empty for none."""
        return {}

    def checkpoint_state(self) -> dict:
        """The trainable state to save for resuming (besides the tokens and optimiser, which the trainer keeps)."""
        return {}

    def load_checkpoint_state(self, state: dict) -> None:
        """Put back what checkpoint_state saved."""


def check_lora_rank(module: torch.nn.Module, targets: list[str], rank: int, where: str) -> None:
    """A LoRA of `rank` on the `targets` layers of `module` must not be wider than the narrowest of them."""
    from ...errors import InputError

    widths = [min(m.in_features, m.out_features) for name, m in module.named_modules()
              if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)]
    if widths and rank > min(widths):
        raise InputError(f"LoRA rank {rank} is above {min(widths)}, the width of the narrowest layer it adapts in "
                         f"{where}; use at most {min(widths)} (4 to 16 is usual).")


def attach_lora(module: torch.nn.Module, config, adapter: str, seed: int):
    """Add the peft LoRA `adapter` (a LoraConfig) to a UNet or text encoder, its initial values drawn from `seed`, and
    make it the active one, trainable in fp32. Returns its (name, parameter) pairs and the function that takes it off
    again (remove_adapter)."""
    had_peft = bool(getattr(module, "peft_config", None))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # peft draws the LoRA init from the global RNG
        module.add_adapter(config, adapter_name=adapter)
    module.set_adapter(adapter)
    named = [(n, p) for n, p in module.named_parameters() if f".{adapter}." in n]
    for _, p in named:
        p.data = p.data.float()
        p.requires_grad_(True)
    return named, lambda: remove_adapter(module, adapter, had_peft)


def remove_adapter(module: torch.nn.Module, adapter: str, had_peft: bool) -> None:
    """Take the training's LoRA `adapter` off a UNet or text encoder: its adapter alone where the module had others, else every
    LoRA layer back to the plain layer it wraps (transformers' delete_adapter leaves the wrappers, which rename the
    weights) and the module unmarked (diffusers before 0.33 leaves it marked, and a second add_adapter then fails)."""
    if had_peft:
        (module.delete_adapters if hasattr(module, "delete_adapters") else module.delete_adapter)(adapter)
        return
    from diffusers.utils.peft_utils import recurse_remove_peft_layers

    recurse_remove_peft_layers(module)
    for attribute in ("peft_config", "_hf_peft_config_loaded"):
        if attribute in vars(module):
            delattr(module, attribute)
