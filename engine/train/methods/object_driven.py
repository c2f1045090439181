"""Object-driven one-shot fine-tuning (arXiv 2401.15708; research/methods.md §1.3 stage B), ProtoBooth's default.

A LoRA on the UNet's attention projections, trained with the new tokens (the trainer's) by:
- an object-specific loss: the diffusion error weighted by the union mask of the objects the prompt names
  (normalised by mask area, optional background weight); several objects per photo, each step naming a random
  non-empty subset of them (the trainer's);
- class-characterising regularisation: a prior term on class images the frozen model drew (prior_weight, the
  paper's λ_class), and a text-space term anchoring "a photo of a <tok> <class>" to the frozen "a photo of a <class>";
- optionally, Break-A-Scene's cross-attention loss (arXiv 2305.16311): each named token's cross-attention map,
  averaged over the UNet's cross-attention layers, pulled onto its object's mask, so that tokens learned from one
  photo of several objects stay bound to their own object.
The text-space term anchors the new words rather than the class prompt itself: only the new token rows train, so
the encoder's output for a prompt without them cannot drift from the frozen one. What can drift is "<tok> <class>",
which the term keeps close to the class, so the class word keeps its meaning in the concept's prompts.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...concept.concept import peft_to_kohya
from ...errors import InputError
from ...text.templates import check_template
from ..class_prior import ClassImages, cache_entry, class_latents
from ..losses import masked_mse
from ..fields import MethodSettings, setting
from .base import Method, attach_lora, check_lora_rank

ADAPTER = "protobooth"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@dataclass
class ObjectDrivenSettings(MethodSettings):
    lora_rank: int = setting(8, "LoRA rank", label="LoRA rank", low=1, high=128, aliases=("--rank",))
    lora_alpha: float | None = setting(None, "LoRA alpha (unset: the rank, a LoRA scale of 1)", label="LoRA alpha",
                                       above=0, aliases=("--alpha",))
    lora_learning_rate: float = setting(1e-4, "learning rate of the LoRA", low=0, high=1, aliases=("--lr",),
                                        widget={"step": 1e-5})
    train_lora: bool = setting(True, "train the UNet LoRA (off: only the tokens, as textual inversion)")
    use_mask: bool = setting(True, "weight the loss by the objects' masks (off: the plain loss, as DreamBooth)",
                             aliases=("--no-mask",))
    background_weight: float = setting(0.0, "loss weight outside the masks", low=0, high=1, widget={"step": 0.05})
    prior_weight: float = setting(1.0, "weight of the class-image prior, the paper's lambda_class (0: off)", low=0,
                                  high=10, aliases=("--lambda-class",), widget={"step": 0.05})
    prior_images: int = setting(4, "class images drawn per class word (cached)", low=0)
    prior_steps: int = setting(25, "sampling steps per class image", low=0)
    prior_guidance: float = setting(7.5, "guidance scale of the class images", low=0)
    class_prompt: str = setting("a photo of a {}", "prompt of the class images and the text anchor, {} = the class "
                                "word; naming what your prompts will call the class (a photo of a red {}) keeps those "
                                "words from drifting towards the object")
    text_anchor_weight: float = setting(0.1, "weight of the text-space class term (0: off)", low=0,
                                        aliases=("--text-anchor",))
    attention_weight: float = setting(0.0, "weight of the cross-attention loss that pulls each token's attention onto "
                                      "its mask (Break-A-Scene; 0: off)", low=0)

    def check(self, shared) -> None:
        if not (self.train_lora or shared.train_tokens):
            raise InputError("nothing to train: enable the LoRA, the tokens, or both.")
        if self.prior_weight > 0 and self.prior_images < 1:
            raise InputError(f"prior images must be at least 1 while the class prior is on (got {self.prior_images}); "
                             "set the prior weight (lambda class) to 0 to train without class images.")
        if self.prior_weight > 0 and self.prior_steps < 1:
            raise InputError(f"prior steps (sampling steps per class image) must be at least 1 while the class prior is "
                             f"on (got {self.prior_steps}).")
        check_template(self.class_prompt, "class prompt", "the class word")


class ObjectDriven(Method):
    name = "object-driven"
    label = "object-driven"
    description = (
        "Teaches the model the object(s) in one photo: a LoRA on the UNet plus one new trigger word per mask, trained "
        "with the loss limited to the masked object and a class prior that keeps the class word intact."
    )
    settings_class = ObjectDrivenSettings
    widgets = ("steps", "lora_learning_rate", "token_learning_rate", "lora_rank", "prior_weight", "background_weight",
               "resolution", "seed")
    optional_widgets = ("class_prompt", "attention_weight")

    # ----------------------------------------------------------------------------------------------
    # frozen state

    def prepare(self) -> None:
        settings, trainer = self.settings, self.trainer
        self.prior = self._prior_latents() if settings.prior_weight > 0 else None
        anchored = settings.text_anchor_weight > 0 and trainer.settings.train_tokens
        self.anchor_targets = list(self._pooled_class_prompts(trainer.class_words)) if anchored else None

    def class_pictures(self) -> dict[str, torch.Tensor]:
        return {} if self.prior is None else {word: latents for word, (latents, _) in self.prior.items()}

    def _prior_latents(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per class word: cached class latents and the frozen encoding of its class prompt."""
        settings, trainer, prior = self.settings, self.trainer, {}
        classes = list(dict.fromkeys(trainer.class_words))
        per_class = settings.prior_images * settings.prior_steps
        entry = dict(count=settings.prior_images, size=trainer.size, seed=trainer.settings.seed, steps=settings.prior_steps,
                     guidance=settings.prior_guidance, directory=trainer.prior_cache, weights_key=trainer.weights_key)
        started, drawn = time.perf_counter(), 0
        for number, class_word in enumerate(classes):
            # One progress scale over every class word's sampling steps.
            report = None if trainer.prepare_progress is None else (
                lambda done, _total, offset=number * per_class: trainer.prepare_progress(offset + done, len(classes) * per_class))
            prompt = settings.class_prompt.format(class_word)
            drawn += not cache_entry(self.model.fingerprint, prompt, **entry)[0].is_file()
            latents = class_latents(self.model, prompt, progress=report, should_cancel=trainer.should_cancel, **entry)
            prior[class_word] = (latents.to(trainer.device), trainer.encode_frozen([prompt]))
        trainer.class_images = ClassImages(len(classes), drawn, time.perf_counter() - started)
        return prior

    def _pooled_class_prompts(self, words: list[str]) -> torch.Tensor:
        return self.trainer.pooled([self.settings.class_prompt.format(word) for word in words])

    # ----------------------------------------------------------------------------------------------
    # what trains

    def check_model(self) -> None:
        if self.settings.train_lora:
            check_lora_rank(self.model.unet, LORA_TARGETS, self.settings.lora_rank, "this model's UNet")

    def trainables(self) -> list[dict]:
        from peft import LoraConfig

        settings, trainer, unet = self.settings, self.trainer, self.model.unet
        self.lora_parameters = []
        if settings.train_lora:
            config = LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_alpha or settings.lora_rank,
                                init_lora_weights="gaussian", target_modules=LORA_TARGETS)
            named, remove = attach_lora(unet, config, ADAPTER, trainer.settings.seed)
            trainer.on_exit(remove)
            # peft puts the LoRA in the dtype of the layer it wraps; over weights stored in half or fp8 that rounds
            # its initial values, so they are drawn again, in fp32, the way peft draws them.
            if any(m.base_layer.weight.dtype != torch.float32 for m in unet.modules() if hasattr(m, "lora_A")):
                generator = torch.Generator().manual_seed(trainer.settings.seed)
                for name, p in named:
                    p.data = (torch.randn(p.shape, generator=generator) / settings.lora_rank if ".lora_A." in name
                              else torch.zeros(p.shape)).to(p.device)
            self.lora_parameters = [p for _, p in named]
        self._attention_positions, self._attention_maps = None, []
        if settings.attention_weight > 0:
            for name, module in unet.named_modules():
                if name.endswith("attn2"):  # the cross-attention of every transformer block
                    handle = module.register_forward_pre_hook(self._record_attention, with_kwargs=True)
                    trainer.on_exit(handle.remove)
        if not settings.train_lora:
            return []
        return [{"params": self.lora_parameters, "lr": settings.lora_learning_rate, "weight_decay": 1e-2}]

    # ----------------------------------------------------------------------------------------------
    # a step

    def extra_rows(self, example):
        if self.prior is None:
            return None
        rng = self.trainer.rng
        class_word = self.trainer.class_words[rng.choice(example.subset)]
        latents, states = self.prior[class_word]
        return latents[rng.randrange(len(latents))][None], states

    @contextlib.contextmanager
    def unet_call(self, example):
        if self.settings.attention_weight > 0:
            self._attention_positions = self.trainer.token_positions(example.prompt, example.subset)
        try:
            yield
        finally:
            self._attention_positions = None  # a recomputing backward (checkpointing) records nothing

    def loss(self, example, prediction, target):
        settings = self.settings
        loss = masked_mse(prediction[:1], target[:1], example.loss_mask(settings.use_mask), settings.background_weight)
        if settings.attention_weight > 0:
            loss = loss + settings.attention_weight * self._attention_loss(example.view, example.subset)
        if self.prior is not None:
            loss = loss + settings.prior_weight * F.mse_loss(prediction[1:].float(), target[1:].float())
        if self.anchor_targets is not None:
            loss = loss + settings.text_anchor_weight * self._anchor_loss(example.subset)
        return loss

    def _record_attention(self, attn, args, kwargs) -> None:
        """Forward pre-hook on a cross-attention module: keep, for the instance row, each named object's share of
        the attention at every position (summed over its vectors, averaged over heads)."""
        if self._attention_positions is None:
            return
        hidden = (args[0] if args else kwargs["hidden_states"])[:1]
        context = kwargs.get("encoder_hidden_states")
        if context is None:
            context = args[1]
        context = context[:1]
        heads = attn.heads
        query = attn.to_q(hidden).unflatten(-1, (heads, -1)).transpose(1, 2)
        key = attn.to_k(context).unflatten(-1, (heads, -1)).transpose(1, 2)
        probabilities = (query @ key.transpose(-1, -2) * attn.scale).float().softmax(-1).mean(1)[0]  # [pixels, text]
        side = math.isqrt(probabilities.shape[0])
        self._attention_maps.append({index: probabilities[:, where].sum(-1).view(1, 1, side, side)
                                     for index, where in self._attention_positions.items()})

    def _attention_loss(self, view: dict, subset: list[int]) -> torch.Tensor:
        """Break-A-Scene's cross-attention loss: each named object's attention map (every cross-attention layer
        resized to the latent grid and averaged, then scaled to a peak of 1) against its mask, averaged over the
        named objects. Break-A-Scene averages only SD's 16x16 layers and sums over objects; every layer is
        used here so that models without a 16x16 layer (ShapesWorld's 8x8 latents) work alike."""
        maps, self._attention_maps = self._attention_maps, []
        losses = []
        for index in subset:
            mask = view["masks"][index]
            size = tuple(mask.shape[-2:])
            average = torch.stack([F.interpolate(m[index], size=size, mode="bilinear", align_corners=False)
                                   for m in maps]).mean(0)
            losses.append(F.mse_loss(average / average.amax().clamp(min=1e-8), mask.float()))
        return torch.stack(losses).mean()

    def _anchor_loss(self, subset: list[int]) -> torch.Tensor:
        trainer = self.trainer
        pooled = self._pooled_class_prompts([f"{trainer.tokens[i]} {trainer.class_words[i]}" for i in subset])
        targets = torch.stack([self.anchor_targets[i] for i in subset])
        return (1 - F.cosine_similarity(pooled, targets, dim=-1)).mean()

    # ----------------------------------------------------------------------------------------------
    # results

    def lora(self) -> dict[str, torch.Tensor]:
        from peft.utils import get_peft_model_state_dict

        if not self.settings.train_lora:
            return {}
        state = get_peft_model_state_dict(self.model.unet, adapter_name=ADAPTER)
        return peft_to_kohya(state, self.settings.lora_alpha or self.settings.lora_rank)

    def checkpoint_state(self) -> dict:
        from peft.utils import get_peft_model_state_dict

        return {"lora": get_peft_model_state_dict(self.model.unet, adapter_name=ADAPTER) if self.settings.train_lora else {}}

    def load_checkpoint_state(self, state: dict) -> None:
        from peft.utils import set_peft_model_state_dict

        if self.settings.train_lora:
            set_peft_model_state_dict(self.model.unet, state["lora"], adapter_name=ADAPTER)
