"""Training settings: what every method shares (TrainSettings), holding the chosen method's own settings (a
MethodSettings, defined beside its method in methods/). Fields are described in fields.py's way."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..errors import InputError
from ..text.templates import DEFAULT_TEMPLATES, check_template
from .augment import AUGMENTATIONS
from .fields import MethodSettings, check_fields, setting
from .methods import default_method, method_class, method_of


def _default_method() -> MethodSettings:
    return default_method().settings_class()


@dataclass
class TrainSettings:
    steps: int = setting(400, "training steps", low=1, high=100000)
    token_learning_rate: float = setting(5e-4, "learning rate of the new tokens' vectors", low=0, high=1,
                                         aliases=("--token-lr",), widget={"step": 1e-5})
    train_tokens: bool = setting(True, "train the new tokens' vectors (off: they stay where they start)")
    n_vectors: int = setting(1, "vectors per token when no initial vectors are given", label="vectors per token",
                             low=1, high=8, aliases=("--vectors",))
    templates: tuple[str, ...] = setting(DEFAULT_TEMPLATES, "a training prompt template, {} = the objects; repeat for "
                                         "several", aliases=("--template",))
    resolution: int | None = setting(None, "training size in pixels (unset: the model's native size)", low=8, high=4096,
                                     widget={"min": 0, "max": 2048, "step": 64, "tooltip": "training size in pixels; 0: "
                                             "the model's own (512 for SD1.x, 1024 for SDXL)"}, from_widget=lambda value: value or None)
    flip: bool = setting(True, "also train on the mirrored photo")
    augment_probability: float = setting(0.0, "paired augmentation: the chance a view is changed geometrically, then "
                                         "in colour, with words in its prompt that say so (0: off)", low=0, high=1,
                                         widget={"step": 0.05})
    augmentations: tuple[str, ...] = setting(AUGMENTATIONS, "an augmentation a view may take; repeat for several (of "
                                             + ", ".join(AUGMENTATIONS) + ")", aliases=("--augmentation",))
    augment_views: int = setting(16, "augmented views of the photo prepared for training", low=1, high=256)
    recompose: float = setting(0.0, "recomposition: the share of steps that see the photo recomposed, its objects cut "
                               "out by their masks and set on the other side over the background filled in where they "
                               "stood, with left and right swapped in the prompt (0: off)", low=0, high=1,
                               widget={"step": 0.05})
    recompose_resize: float = setting(0.0, "with recomposition: how much a recomposed object's size may change (0.2: from "
                                      "0.8 to 1.2 times; 0: kept)", low=0, high=0.9, widget={"step": 0.05})
    recompose_copies: float = setting(0.0, "with recomposition, one object: the share of recomposed steps whose photo "
                                      "shows the object twice, side by side, the prompt naming it on the left and on "
                                      "the right (0: none)", low=0, high=1, widget={"step": 0.05})
    recompose_companions: float = setting(0.0, "with recomposition, one object and a class prior: the share of "
                                          "recomposed steps whose photo shows another object of the class where the "
                                          "object stood, cut out of a class image with a plain background, named by "
                                          "the class word and covered by the loss so that it keeps its own look (0: "
                                          "none)", low=0, high=1, widget={"step": 0.05})
    timestep_sampling: str = setting("uniform", "how training timesteps are drawn: uniform, or snr (noisy steps more "
                                     "often, as TextBoost)", choices=("uniform", "snr"), aliases=("--timesteps",))
    max_grad_norm: float = setting(1.0, "gradient clipping norm", above=0)
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass: less memory, more time")
    offload_frozen: bool = setting(False, "on a GPU, keep the VAE on the CPU while the UNet trains, and the text encoder "
                                   "too when nothing in it trains (train_tokens off, a UNet-only method): its prompts are "
                                   "encoded there once and cached. Less GPU memory (SDXL: about 1.7 GB in fp16); no "
                                   "effect on a CPU")
    mixed_precision: str = setting("auto", "training precision: auto is bf16 on a GPU that has it (else fp16) and fp32 on "
                                   "a CPU; bf16 on a CPU pays only with bf16 matrix units (e.g. AMX); fp16 needs a CUDA "
                                   "GPU. A model ProtoBooth loads is stored in it (what trains stays fp32); a model "
                                   "already in half precision (a ComfyUI graph's) trains in its own; a full-precision "
                                   "model handed in autocasts", choices=("auto", "no", "fp16", "bf16"))
    # ComfyUI's seeds go up to 2**64 - 1; the engine's class images use seed + i, so it keeps below 2**63.
    seed: int = setting(0, "random seed (same seed, same result)", low=0, high=2**63 - 1,
                        widget={"max": 0xFFFFFFFFFFFFFFFF}, from_widget=lambda value: value % 2**63)
    checkpoint_every: int = setting(0, "steps between resumable checkpoints (0: none)", low=0)
    method: MethodSettings = field(default_factory=_default_method)

    @classmethod
    def from_values(cls, method: str | None = None, **values) -> TrainSettings:
        """Settings of the named method (default: the default method) with `values`, each where it belongs."""
        chosen = method_class(method) if method is not None else default_method()
        return cls(method=chosen.settings_class()).replace(**{**chosen.shared_defaults, **values})

    @property
    def method_name(self) -> str:
        return method_of(self.method).name

    def check(self) -> None:
        """Refuse settings that cannot work, before anything runs (they would fail deep inside torch)."""
        method_of(self.method)  # settings of a method the registry knows, else an InputError naming those there are
        check_fields(self)
        check_fields(self.method)
        if not self.templates:
            raise InputError("no prompt template given; give at least one, such as 'a photo of {}'.")
        unknown = [name for name in self.augmentations if name not in AUGMENTATIONS]
        if unknown:
            raise InputError(f"augmentation {unknown[0]!r} does not exist; choose from {', '.join(AUGMENTATIONS)}.")
        for template in self.templates:
            check_template(template, "prompt template", "the objects")
        for name in ("recompose_copies", "recompose_companions"):
            if getattr(self, name) > 0 and self.recompose == 0:
                raise InputError(f"{name} {getattr(self, name):g} is a share of the recomposed steps, and "
                                 f"recomposition is off; set recompose above 0 too (e.g. 0.5), or {name} to 0.")
        if self.recompose_copies + self.recompose_companions > 1:
            raise InputError(f"recompose_copies {self.recompose_copies:g} and recompose_companions "
                             f"{self.recompose_companions:g} are shares of the same recomposed steps and add up to "
                             "more than 1; lower one of them.")
        if self.recompose_companions > 0 and not getattr(self.method, "prior_weight", 0):
            raise InputError(f"recompose_companions cuts its companions out of the class prior's images, and the "
                             f"{self.method_name} settings draw none; set prior_weight above 0 (object-driven), or "
                             "recompose_companions to 0.")
        self.method.check(self)

    def replace(self, **changes) -> TrainSettings:
        """A copy with `changes` applied, each to the settings that own it (these, or the method's)."""
        own = {f.name for f in dataclasses.fields(self)}
        method_fields = {f.name for f in dataclasses.fields(self.method)}
        unknown = sorted(set(changes) - own - method_fields)
        if unknown:
            raise InputError(f"unknown setting(s) {', '.join(unknown)} for the {self.method_name} method; settings are: "
                             f"{', '.join(sorted((own - {'method'}) | method_fields))}.")
        shared = {k: v for k, v in changes.items() if k in own}
        mine = {k: v for k, v in changes.items() if k in method_fields and k not in own}
        return dataclasses.replace(self, **{**shared, "method": dataclasses.replace(shared.get("method", self.method), **mine)})

    def as_dict(self) -> dict:
        """Every setting by name, JSON-ready, the method's under "method" with its name (kept in a concept's file)."""
        values = dataclasses.asdict(self)
        values["templates"] = list(values["templates"])
        values["method"] = {"name": self.method_name, **values["method"]}
        return values


@dataclass
class StepReport:
    step: int
    total: int
    loss: float
    elapsed: float
