"""TextBoost (arXiv 2409.08248; research/methods.md §2): tune only the text side.

A LoRA on the text encoder's attention (q, k, v, out; rank 4, alpha = rank) and the new tokens learn the object; the
UNet and VAE stay frozen, so the concept is a small file. Three parts, each a setting:
- paired augmentation with augmentation tokens (the trainer's, train/augment.py; on by this method's defaults);
- the knowledge-preservation loss: 1 - cos between the tuned and the frozen text encoder's hidden states, every
  position, on prompts that do not name the object (everyday captions, with an empty prompt and a class prompt
  mixed in), weight 0.1;
- SNR-weighted timesteps, p(t) proportional to log SNR(t_min) - log SNR(t): the trainer's timestep_sampling "snr",
  which computes exactly that (the official code's flag bug left its own sampler uniform).
The loss on the photo is the plain diffusion loss, as the paper's, or the object-masked one with use_mask.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ...concept.concept import peft_to_kohya
from ...models.families import family
from ..fields import MethodSettings, setting
from ..losses import masked_mse
from .base import Method, attach_lora, check_lora_rank

ADAPTER = "protobooth_text"
# The text encoder's layers the LoRA adapts. The official code's HEAD adapts q, k, v; out_proj is added because
# diffusers (0.42) recognises a kohya text-encoder LoRA only by its out_proj keys, so a q/k/v-only file would not
# load there. "attention+mlp" is the paper's first version (0.66M parameters on SD1.5).
TEXT_LORA_LAYERS = {"attention": ["q_proj", "k_proj", "v_proj", "out_proj"],
                    "attention+mlp": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]}
# kohya's names for text-encoder LoRA keys (the family's prefix, then this), which ComfyUI maps onto SD1's CLIP-L,
# SD2's OpenCLIP-H and SDXL's two encoders alike.
TEXT_MODEL_PREFIX = "text_model_"
KNOWLEDGE_PROMPTS_FILE = Path(__file__).parents[2] / "data" / "knowledge_prompts.txt"


def everyday_captions() -> tuple[str, ...]:
    lines = KNOWLEDGE_PROMPTS_FILE.read_text(encoding="utf-8").splitlines()
    return tuple(line for line in lines if line and not line.startswith("#"))


@dataclass
class TextBoostSettings(MethodSettings):
    text_lora_rank: int = setting(4, "rank of the text encoder's LoRA (alpha = rank)", label="text LoRA rank", low=1,
                                  high=128)
    text_lora_layers: str = setting("attention", "the text encoder's layers its LoRA adapts: attention (q, k, v, out) or "
                                    "attention+mlp (also fc1, fc2, as the paper's first version)",
                                    choices=tuple(TEXT_LORA_LAYERS))
    text_lora_learning_rate: float = setting(5e-5, "learning rate of the text encoder's LoRA", low=0, high=1,
                                             widget={"step": 1e-5})
    knowledge_weight: float = setting(0.1, "weight of the knowledge-preservation loss (0: off)", low=0, high=10,
                                      widget={"step": 0.05})
    knowledge_batch: int = setting(8, "prompts per step for the knowledge-preservation loss", low=1, high=64)
    null_prompt_probability: float = setting(0.1, "share of empty prompts among them", low=0, high=1)
    class_prompt_probability: float = setting(0.1, "share of class prompts ('a photo of a <class>') among them",
                                              low=0, high=1)
    knowledge_prompts: tuple[str, ...] = setting((), "an everyday caption for the knowledge-preservation loss; repeat "
                                                 "for several (unset: the built-in 60)")
    use_mask: bool = setting(False, "weight the loss by the objects' masks (off: the plain loss, as TextBoost)")

    def check(self, shared) -> None:
        from ...errors import InputError

        if self.null_prompt_probability + self.class_prompt_probability > 1:
            raise InputError(f"null prompt probability ({self.null_prompt_probability}) and class prompt probability "
                             f"({self.class_prompt_probability}) add up to more than 1; lower one of them.")


class TextBoost(Method):
    name = "textboost"
    label = "TextBoost"
    description = (
        "TextBoost: learns the object(s) in one photo in the text encoder alone (a small LoRA on its attention and one "
        "new trigger word per mask), with augmented views whose prompts name the change, a loss that keeps ordinary "
        "language as it was, and noisy timesteps drawn more often. The UNet is untouched; the concept file is small."
    )
    settings_class = TextBoostSettings
    trains_text_encoder = True
    widgets = ("steps", "text_lora_learning_rate", "token_learning_rate", "text_lora_rank", "knowledge_weight",
               "augment_probability", "resolution", "seed")
    shared_defaults = {"steps": 250, "token_learning_rate": 1e-3, "timestep_sampling": "snr", "augment_probability": 0.5,
                       "flip": False}

    def prepare(self) -> None:
        """The frozen text encoder's states for every knowledge-preservation prompt (none names a new word)."""
        settings, trainer = self.settings, self.trainer
        self.captions = list(settings.knowledge_prompts or everyday_captions())
        self.class_prompts = [f"a photo of a {word}" for word in dict.fromkeys(trainer.class_words)]
        prompts = ["", *self.captions, *self.class_prompts]
        self.frozen = dict(zip(prompts, trainer.encode_frozen(prompts).context)) if settings.knowledge_weight > 0 else {}

    def check_model(self) -> None:
        for encoder in self.model.text_encoders:
            check_lora_rank(encoder, TEXT_LORA_LAYERS[self.settings.text_lora_layers], self.settings.text_lora_rank,
                            "this model's text encoder")

    def trainables(self) -> list[dict]:
        """A LoRA on every text encoder (SDXL: both), each seeded alike."""
        from peft import LoraConfig

        settings, trainer = self.settings, self.trainer
        config = LoraConfig(r=settings.text_lora_rank, lora_alpha=settings.text_lora_rank, init_lora_weights="gaussian",
                            target_modules=TEXT_LORA_LAYERS[settings.text_lora_layers])
        self.lora_parameters = []
        for encoder in self.model.text_encoders:
            named, remove = attach_lora(encoder, config, ADAPTER, trainer.settings.seed)
            trainer.on_exit(remove)
            self.lora_parameters += [p for _, p in named]
        return [{"params": self.lora_parameters, "lr": settings.text_lora_learning_rate, "weight_decay": 1e-2}]

    def loss(self, example, prediction, target):
        settings = self.settings
        loss = masked_mse(prediction[:1], target[:1], example.loss_mask(settings.use_mask), 0.0)
        if settings.knowledge_weight > 0:
            loss = loss + settings.knowledge_weight * self._knowledge_loss()
        return loss

    def _knowledge_loss(self) -> torch.Tensor:
        """1 - cos between the tuned and the frozen text encoder's states, every position of every prompt."""
        settings, rng = self.settings, self.trainer.rng
        prompts = []
        for _ in range(settings.knowledge_batch):
            draw = rng.random()
            if draw < settings.null_prompt_probability:
                prompts.append("")
            elif draw < settings.null_prompt_probability + settings.class_prompt_probability:
                prompts.append(rng.choice(self.class_prompts))
            else:
                prompts.append(rng.choice(self.captions))
        ids = self.trainer.vocabulary.input_ids(prompts).to(self.trainer.device)
        tuned = self.model.text_encoder(input_ids=ids)[0].float()
        frozen = torch.stack([self.frozen[p] for p in prompts]).float()
        return (1 - F.cosine_similarity(tuned, frozen, dim=-1)).mean()

    def _lora_states(self) -> list[dict[str, torch.Tensor]]:
        """Each text encoder's LoRA, in the model's order."""
        from peft.utils import get_peft_model_state_dict

        # Never the embedding table: peft would add it ("auto") once an earlier run left the encoder marked as
        # adapted, and the trainer's token vectors are saved as the embedding, not in the LoRA.
        return [get_peft_model_state_dict(encoder, adapter_name=ADAPTER, save_embedding_layers=False)
                for encoder in self.model.text_encoders]

    def lora(self) -> dict[str, torch.Tensor]:
        prefixes, lora = family(self.model.family).text_lora_prefixes, {}
        for prefix, state in zip(prefixes, self._lora_states()):
            # transformers 5 nests CLIPTextModelWithProjection's layers under text_model. (SDXL's bigG), not
            # CLIPTextModel's: kohya names both from the text model down.
            state = {name.removeprefix("text_model."): value for name, value in state.items()}
            lora.update(peft_to_kohya(state, self.settings.text_lora_rank, prefix + TEXT_MODEL_PREFIX))
        return dict(sorted(lora.items()))

    def checkpoint_state(self) -> dict:
        return {"lora": self._lora_states()}

    def load_checkpoint_state(self, state: dict) -> None:
        from peft.utils import set_peft_model_state_dict

        for encoder, saved in zip(self.model.text_encoders, state["lora"]):
            set_peft_model_state_dict(encoder, saved, adapter_name=ADAPTER)
