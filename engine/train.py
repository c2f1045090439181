"""One-shot, object-driven training (arXiv 2401.15708; research/methods.md §1.3 stage B).

From one image, a mask per object, and a (token, class word) per object, train new token vectors and a
LoRA on the UNet's attention projections with:
- an object-specific loss: the diffusion error weighted by the union mask of the objects the prompt
  names (normalised by mask area, optional background weight);
- several objects per image: every step names a random non-empty subset of the objects;
- class-characterising regularisation: a prior term on class images the frozen model drew (λ_class),
  and/or a text-space term anchoring "a photo of a <tok> <class>" to the frozen "a photo of a <class>";
- uniform or SNR-weighted timesteps;
- optionally, Break-A-Scene's cross-attention loss (arXiv 2305.16311): each named token's cross-attention
  map, averaged over the UNet's cross-attention layers, pulled onto its object's mask, so that tokens
  learned from one photo of several objects stay bound to their own object.
The text-space term anchors the new words rather than the class prompt itself: only the new token rows
train, so the encoder's output for a prompt without them cannot drift from the frozen one. What can
drift is "<tok> <class>", which the term keeps close to the class, so the class word keeps its meaning
in the concept's prompts.
Everything that does not change during training (instance latents, class latents, frozen text
encodings) is computed once. The model is restored when training ends, however it ends.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import numbers
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .concept import Concept, ConceptObject, peft_to_kohya
from .errors import InputError, TrainingCancelled
from .fileio import atomic_path
from .images import check_masks, load_image
from .losses import diffusion_target, latent_mask, masked_mse, sample_timesteps, snr_timestep_weights
from .models import SUPPORTED_FAMILIES
from .prior import class_latents
from .tokens import ConceptVocabulary, check_objects, class_word_vectors, eos_pooled, vocabulary_norm

log = logging.getLogger("protobooth")

ADAPTER = "protobooth"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
DEFAULT_TEMPLATES = (
    "a photo of {}",
    "a rendering of {}",
    "a cropped photo of {}",
    "a close-up photo of {}",
    "a bright photo of {}",
    "a good photo of {}",
)


@dataclass
class TrainSettings:
    steps: int = 400
    lora_rank: int = 8
    lora_alpha: float | None = None  # None: equal to the rank (LoRA scale 1)
    lora_learning_rate: float = 1e-4
    token_learning_rate: float = 5e-4
    train_lora: bool = True
    train_tokens: bool = True
    n_vectors: int = 1  # vectors per token when no initial vectors are given
    use_mask: bool = True  # False: plain (unmasked) diffusion loss, as DreamBooth
    background_weight: float = 0.0
    prior_weight: float = 1.0  # λ_class for the class-image prior; 0 turns it off
    prior_images: int = 4  # class images drawn per class word
    prior_steps: int = 25
    prior_guidance: float = 7.5
    text_anchor_weight: float = 0.1  # the text-space class term; 0 turns it off
    attention_weight: float = 0.0  # pulls each token's cross-attention map onto its mask (Break-A-Scene); 0: off
    timestep_sampling: str = "uniform"  # or "snr"
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    class_prompt: str = "a photo of a {}"
    resolution: int | None = None  # None: the model's native size
    flip: bool = True
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"  # "auto" (bf16 on a GPU that has it, else fp16; fp32 on CPU), "no", "fp16", "bf16"
    seed: int = 0
    checkpoint_every: int = 0  # steps between resumable checkpoints; 0: none

    def check(self) -> None:
        """Refuse settings that cannot work, before anything runs (they would fail deep inside torch)."""
        for name in ("steps", "lora_rank", "n_vectors", "prior_images", "prior_steps", "checkpoint_every", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise InputError(f"{_label(name)} must be a whole number (got {value!r}).")
        for name in ("lora_learning_rate", "token_learning_rate", "background_weight", "prior_weight", "prior_guidance",
                     "text_anchor_weight", "attention_weight", "max_grad_norm") + (("lora_alpha",) if self.lora_alpha is not None else ()):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise InputError(f"{_label(name)} must be a finite number (got {value!r}).")
        if self.steps <= 0:
            raise InputError(f"steps must be at least 1 (got {self.steps}).")
        if self.lora_rank <= 0:
            raise InputError(f"LoRA rank must be at least 1 (got {self.lora_rank}).")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise InputError(f"LoRA alpha must be above 0 (got {self.lora_alpha}); leave it unset to use the rank.")
        if self.n_vectors < 1:
            raise InputError(f"vectors per token must be at least 1 (got {self.n_vectors}).")
        if not (self.train_lora or self.train_tokens):
            raise InputError("nothing to train: enable the LoRA, the tokens, or both.")
        for name in ("lora_learning_rate", "token_learning_rate", "background_weight", "prior_weight", "text_anchor_weight",
                     "attention_weight"):
            if getattr(self, name) < 0:
                raise InputError(f"{_label(name)} must not be negative (got {getattr(self, name)}).")
        if self.prior_weight > 0 and self.prior_images < 1:
            raise InputError(f"prior images must be at least 1 while the class prior is on (got {self.prior_images}); "
                             "set the prior weight (lambda class) to 0 to train without class images.")
        if self.prior_weight > 0 and self.prior_steps < 1:
            raise InputError(f"prior steps (sampling steps per class image) must be at least 1 while the class prior is "
                             f"on (got {self.prior_steps}).")
        if self.max_grad_norm <= 0:  # 0 would stop every update, a negative value would flip them
            raise InputError(f"max grad norm must be above 0 (got {self.max_grad_norm}).")
        if self.resolution is not None and (isinstance(self.resolution, bool) or not isinstance(self.resolution, numbers.Integral)
                                            or self.resolution <= 0):
            raise InputError(f"resolution must be a positive number of pixels (got {self.resolution!r}); leave it unset "
                             "for the model's native size.")
        if self.checkpoint_every < 0:
            raise InputError(f"checkpoint every must be 0 (no checkpoints) or a number of steps (got {self.checkpoint_every}).")
        if not 0 <= self.seed < 2**63:  # torch.Generator takes < 2**64, and class image i uses seed + i
            raise InputError(f"seed must be between 0 and 2**63 - 1 (got {self.seed}).")
        if self.timestep_sampling not in ("uniform", "snr"):
            raise InputError(f"timestep sampling must be 'uniform' or 'snr' (got {self.timestep_sampling!r}).")
        if self.mixed_precision not in ("auto", "no", "fp16", "bf16"):
            raise InputError(f"mixed precision must be auto, no, fp16 or bf16 (got {self.mixed_precision!r}).")
        if not self.templates:
            raise InputError("no prompt template given; give at least one, such as 'a photo of {}'.")
        for template in self.templates:
            check_template(template, "prompt template", "the objects")
        check_template(self.class_prompt, "class prompt", "the class word")


def _label(name: str) -> str:
    return name.replace("_", " ")


def check_template(template, what: str, filled_with: str) -> None:
    """A prompt template must take one value through str.format and show it exactly once."""
    try:
        ok = isinstance(template, str) and template.format("\0").count("\0") == 1
    except (IndexError, KeyError, ValueError):  # "{} {}", "{name}", a lone "{"
        ok = False
    if not ok:
        raise InputError(f"{what} {template!r} needs exactly one '{{}}' where {filled_with} go(es), and no other "
                         "braces (write '{{' or '}}' for a literal brace).")


@dataclass
class StepReport:
    step: int
    total: int
    loss: float
    elapsed: float


@dataclass
class TrainResult:
    concept: Concept
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def _square_crop(image: torch.Tensor, masks: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The largest square that keeps the objects' bounding box as centred as the image allows."""
    height, width = image.shape[-2:]
    side = min(height, width)
    union = torch.stack(masks).amax(0)
    ys, xs = torch.nonzero(union > 0, as_tuple=True)
    cy, cx = (ys.min() + ys.max()).item() / 2, (xs.min() + xs.max()).item() / 2
    top = int(min(max(round(cy - side / 2), 0), height - side))
    left = int(min(max(round(cx - side / 2), 0), width - side))
    cut = union[top : top + side, left : left + side]
    if float(cut.sum()) < 0.98 * float(union.sum()):
        log.warning("the objects do not fit in a square crop of the image; parts outside it are not learned.")
    crop = (slice(None), slice(top, top + side), slice(left, left + side))
    return image[crop], [m[crop[1:]] for m in masks]


def _training_size(model, resolution: int | None) -> int:
    """The training size in pixels: the setting, or the model's native size; refused when the UNet cannot take it."""
    factor = model.vae_scale_factor
    native = model.unet.config.sample_size * factor
    size = resolution or native
    if size % factor:
        raise InputError(f"resolution {size} must be a multiple of {factor} (the model's native size is {native}).")
    smallest = factor * _smallest_latent_side(model.unet.config)
    if size < smallest:
        raise InputError(f"resolution {size} is too small for this model's UNet; use at least {smallest} "
                         f"(its native size is {native}).")
    return size


def _smallest_latent_side(config) -> int:
    """The smallest latent side at which every group norm of the UNet sees more than one value per group.

    Each down block halves the side (rounding up); torch refuses a group norm over a single value.
    """
    channels, groups = list(config.block_out_channels), config.norm_num_groups or 1
    side = 1
    while True:
        sides = [side]
        for _ in channels[1:]:
            sides.append((sides[-1] + 1) // 2)
        narrowest = [min(channels[max(i - 1, 0)], channels[i]) for i in range(len(channels))]
        if all(s * s * c > groups for s, c in zip(sides, narrowest)):
            return side
        side += 1


def autocast_dtype(setting: str, device: torch.device):
    """The autocast dtype for this setting on this device, or None for full precision.

    On CPU only an explicit bf16 casts: it is faster only where the CPU has bf16 matrix units (e.g. AMX),
    so auto keeps CPU runs in fp32.
    """
    if setting == "no":
        return None
    if device.type == "cuda":
        if setting == "fp16":
            return torch.float16
        if setting == "bf16" or torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16
    if setting == "fp16":
        raise InputError(f"fp16 mixed precision needs a CUDA GPU (the model is on {device}); use bf16 or no.")
    return torch.bfloat16 if setting == "bf16" else None


class OneShotTrainer:
    """Use as a context manager: the model is restored on exit (LoRA removed, embeddings untouched).

    Entering prepares everything that stays fixed, which includes drawing the class images on a cache miss
    (minutes on a real model): prepare_progress(done, total) follows it and should_cancel() can stop it
    (TrainingCancelled; nothing cached, the model as it was). should_cancel also stops train() unless that is
    given its own. weights_key: see prior.class_latents (what is patched on top of the base weights).
    """

    def __init__(self, model, image, masks, tokens, class_words, settings: TrainSettings | None = None,
                 init_vectors: list[torch.Tensor] | None = None, prior_cache: Path | None = None, *,
                 weights_key: str | None = None, prepare_progress=None, should_cancel=None):
        self.model = model
        self.settings = settings = settings or TrainSettings()
        settings.check()
        if model.family not in SUPPORTED_FAMILIES:
            raise InputError(f"model family {model.family!r} is not supported yet (supported: {', '.join(SUPPORTED_FAMILIES)}).")
        self.image = load_image(image)
        self.tokens, self.class_words = check_objects(model.tokenizer, list(tokens), list(class_words))
        self.masks = check_masks(list(masks), self.image, self.tokens)
        if len(self.masks) != len(self.tokens):
            raise InputError(f"got {len(self.masks)} mask(s) for {len(self.tokens)} token(s); give one mask per object.")
        if init_vectors is None:
            init_vectors = [class_word_vectors(model.text_encoder, model.tokenizer, c, settings.n_vectors) for c in self.class_words]
        width = model.text_encoder.get_input_embeddings().weight.shape[1]
        for token, vectors in zip(self.tokens, init_vectors):
            if vectors.ndim != 2 or vectors.shape[1] != width:
                raise InputError(f"initial vectors for {token!r} have shape {tuple(vectors.shape)}; expected [n, {width}].")
        self.size = _training_size(model, settings.resolution)
        self.prior_cache = prior_cache
        self.weights_key = weights_key
        self.prepare_progress = prepare_progress
        self.should_cancel = should_cancel
        self.vocabulary = ConceptVocabulary(model.tokenizer, self.tokens, list(init_vectors))
        self.norm_bounds = [max(vocabulary_norm(model.text_encoder), float(v.norm(dim=1).max())) for v in init_vectors]
        self.device = model.device
        # A model whose UNet already computes in half precision (weights kept so, as in a ComfyUI graph on a GPU)
        # trains in it; a full-precision one autocasts as the setting says.
        self.compute_dtype = model.unet.dtype
        self.autocast = autocast_dtype(settings.mixed_precision, self.device) if self.compute_dtype == torch.float32 else None
        self.losses: list[float] = []
        self.step = 0
        self._frozen_prompts: dict[str, torch.Tensor] = {}
        self._exit = contextlib.ExitStack()
        self._prepared = False

    # ----------------------------------------------------------------------------------------------
    # set-up and tear-down

    def __enter__(self):
        try:
            self._prepare()
        except BaseException:
            self._exit.close()
            raise
        return self

    def __exit__(self, *exc):
        self._exit.close()
        return False

    def _prepare(self) -> None:
        model, settings = self.model, self.settings
        size = self.size
        image, masks = _square_crop(self.image, self.masks)
        image = F.interpolate(image[None], size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        masks = [F.interpolate(m[None, None], size=(size, size), mode="bilinear", antialias=True)[0, 0] for m in masks]
        # Frozen state first, while the model is still the base model.
        with torch.no_grad():
            views = [(image, masks)] + ([(image.flip(-1), [m.flip(-1) for m in masks])] if settings.flip else [])
            self.instance = []
            for pixels, view_masks in views:
                dist = model.vae.encode((pixels * 2 - 1).to(self.device, model.vae.dtype)).latent_dist
                latent_size = tuple(dist.mean.shape[-2:])
                self.instance.append({
                    "mean": dist.mean.float(), "std": dist.std.float(),
                    "masks": [latent_mask(m, latent_size).to(self.device) for m in view_masks],
                })
            self.prior = self._prior_latents() if settings.prior_weight > 0 else None
            self.anchor_targets = self._anchor_targets() if settings.text_anchor_weight > 0 and settings.train_tokens else None
        self.snr_weights = (
            snr_timestep_weights(model.noise_scheduler.alphas_cumprod.float()) if settings.timestep_sampling == "snr" else None
        )
        self._attach_trainables()
        params = []
        if settings.train_lora:
            params.append({"params": self.lora_parameters, "lr": settings.lora_learning_rate, "weight_decay": 1e-2})
        if settings.train_tokens:
            params.append({"params": list(self.vocabulary.vectors), "lr": settings.token_learning_rate, "weight_decay": 0.0})
        self.optimizer = torch.optim.AdamW(params, betas=(0.9, 0.999), eps=1e-8)
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.rng = random.Random(settings.seed)
        # fp16 gradients underflow without loss scaling; bf16 and fp32 need none.
        self.scaler = torch.amp.GradScaler(self.device.type) if torch.float16 in (self.autocast, self.compute_dtype) else None
        self._prepared = True

    def _prior_latents(self):
        """Per class word: cached class latents and the frozen encoding of its class prompt."""
        settings, prior = self.settings, {}
        classes = list(dict.fromkeys(self.class_words))
        per_class = settings.prior_images * settings.prior_steps
        for number, class_word in enumerate(classes):
            # One progress scale over every class word's sampling steps.
            report = None if self.prepare_progress is None else (
                lambda done, _total, offset=number * per_class: self.prepare_progress(offset + done, len(classes) * per_class))
            prompt = settings.class_prompt.format(class_word)
            latents = class_latents(self.model, prompt, settings.prior_images, self.size, settings.seed,
                                    settings.prior_steps, settings.prior_guidance, self.prior_cache, progress=report,
                                    should_cancel=self.should_cancel, weights_key=self.weights_key)
            prior[class_word] = (latents.to(self.device), self._encode_frozen([prompt]))
        return prior

    def _anchor_targets(self) -> list[torch.Tensor]:
        """Frozen pooled text state of each object's plain class prompt."""
        return list(self._pooled([self.settings.class_prompt.format(c) for c in self.class_words]))

    def _pooled(self, prompts: list[str]) -> torch.Tensor:
        ids = self.vocabulary.input_ids(prompts).to(self.device)
        states = self.model.text_encoder(input_ids=ids)[0]
        return eos_pooled(states, ids, self.vocabulary.tokenizer.eos_token_id).float()

    def _encode_frozen(self, prompts: list[str]) -> torch.Tensor:
        ids = self.model.tokenizer(prompts, padding="max_length", max_length=self.model.tokenizer.model_max_length,
                                   truncation=True, return_tensors="pt").input_ids
        return self.model.text_encoder(input_ids=ids.to(self.device))[0]

    def _attach_trainables(self) -> None:
        from peft import LoraConfig

        model, settings = self.model, self.settings
        flags = {p: p.requires_grad for m in (model.unet, model.text_encoder, model.vae) for p in m.parameters()}
        self._exit.callback(lambda: [p.requires_grad_(f) for p, f in flags.items()])
        for module in (model.unet, model.text_encoder, model.vae):
            module.requires_grad_(False)
        self.vocabulary.vectors.to(self.device)
        self.vocabulary.vectors.requires_grad_(settings.train_tokens)
        self._exit.enter_context(self.vocabulary.installed(model.text_encoder))
        self.lora_parameters = []
        if settings.train_lora:
            had_peft = bool(getattr(model.unet, "peft_config", None))
            config = LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_alpha or settings.lora_rank,
                                init_lora_weights="gaussian", target_modules=LORA_TARGETS)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(settings.seed)  # peft draws the LoRA init from the global RNG
                model.unet.add_adapter(config, adapter_name=ADAPTER)
            self._exit.callback(self._remove_lora, had_peft)
            model.unet.set_adapter(ADAPTER)
            named = [(n, p) for n, p in model.unet.named_parameters() if f".{ADAPTER}." in n]
            # peft puts the LoRA in the dtype of the layer it wraps; over weights stored in half or fp8 that rounds
            # its initial values, so they are drawn again, in fp32, the way peft draws them.
            rounded = any(m.base_layer.weight.dtype != torch.float32 for m in model.unet.modules() if hasattr(m, "lora_A"))
            generator = torch.Generator().manual_seed(settings.seed)
            for name, p in named:
                p.data = p.data.float()
                if rounded:
                    p.data = (torch.randn(p.shape, generator=generator) / settings.lora_rank if ".lora_A." in name
                              else torch.zeros(p.shape)).to(p.device)
                p.requires_grad_(True)
            self.lora_parameters = [p for _, p in named]
        self._attention_positions, self._attention_maps = None, []
        if settings.attention_weight > 0:
            for name, module in model.unet.named_modules():
                if name.endswith("attn2"):  # the cross-attention of every transformer block
                    handle = module.register_forward_pre_hook(self._record_attention, with_kwargs=True)
                    self._exit.callback(handle.remove)
        if settings.gradient_checkpointing and not model.unet.is_gradient_checkpointing:
            model.unet.enable_gradient_checkpointing()
            self._exit.callback(model.unet.disable_gradient_checkpointing)

    def _remove_lora(self, had_peft: bool) -> None:
        if had_peft:
            self.model.unet.delete_adapters(ADAPTER)
        else:
            self.model.unet.unload_lora()

    # ----------------------------------------------------------------------------------------------
    # training

    def train(self, progress=None, should_cancel=None, checkpoint_dir: Path | None = None, resume: bool = False) -> TrainResult:
        """Run the remaining steps. progress(StepReport) after each; should_cancel() → TrainingCancelled.

        should_cancel defaults to the one the trainer was made with."""
        if not self._prepared:
            raise RuntimeError("use OneShotTrainer as a context manager (with ...:)")
        settings = self.settings
        should_cancel = should_cancel or self.should_cancel
        if resume and checkpoint_dir is not None:
            self._load_checkpoint(Path(checkpoint_dir))
        started = time.perf_counter()
        while self.step < settings.steps:
            if should_cancel is not None and should_cancel():
                raise TrainingCancelled(f"training cancelled at step {self.step} of {settings.steps}")
            loss = self._train_step()
            self.step += 1
            self.losses.append(loss)
            if progress is not None:
                progress(StepReport(self.step, settings.steps, loss, time.perf_counter() - started))
            if checkpoint_dir is not None and settings.checkpoint_every and self.step % settings.checkpoint_every == 0:
                self._save_checkpoint(Path(checkpoint_dir))
        return TrainResult(self.concept(), list(self.losses), time.perf_counter() - started)

    def _draw(self, shape, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator).to(like.device, like.dtype)

    def _train_step(self) -> float:
        model, settings, rng = self.model, self.settings, self.rng
        subset = sorted(rng.sample(range(len(self.tokens)), rng.randint(1, len(self.tokens))))
        phrase = " and ".join(f"{self.tokens[i]} {self.class_words[i]}" for i in subset)
        prompt = rng.choice(settings.templates).format(phrase)
        view = self.instance[rng.randrange(len(self.instance))]
        latents = (view["mean"] + view["std"] * self._draw(view["mean"].shape, view["mean"])) * model.latent_scaling
        if settings.use_mask:
            mask = torch.stack([view["masks"][i] for i in subset]).amax(0)
        else:
            mask = torch.ones_like(view["masks"][0])
        batch_latents, prior_class = [latents], None
        if self.prior is not None:
            prior_class = self.class_words[rng.choice(subset)]
            class_latents_, _ = self.prior[prior_class]
            batch_latents.append(class_latents_[rng.randrange(len(class_latents_))][None])
        batch = torch.cat(batch_latents)
        noise = self._draw(batch.shape, batch)
        timesteps = sample_timesteps(len(batch), model.noise_scheduler.config.num_train_timesteps, self.generator,
                                     self.snr_weights).to(self.device)
        noisy = model.noise_scheduler.add_noise(batch, noise, timesteps)
        target = diffusion_target(model.noise_scheduler, batch, noise, timesteps)

        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            states = self._encode_prompt(prompt)
            if prior_class is not None:
                states = torch.cat([states, self.prior[prior_class][1].to(states.dtype)])
            if settings.attention_weight > 0:
                self._attention_positions = self._token_positions(prompt, subset)
            prediction = model.unet(noisy.to(self.compute_dtype), timesteps,
                                    encoder_hidden_states=states.to(self.compute_dtype)).sample
            self._attention_positions = None  # a recomputing backward (checkpointing) records nothing
        loss = masked_mse(prediction[:1], target[:1], mask, settings.background_weight)
        if settings.attention_weight > 0:
            loss = loss + settings.attention_weight * self._attention_loss(view, subset)
        if prior_class is not None:
            loss = loss + settings.prior_weight * F.mse_loss(prediction[1:].float(), target[1:].float())
        if self.anchor_targets is not None:
            loss = loss + settings.text_anchor_weight * self._anchor_loss(subset)

        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        # Tokens that this prompt does not name must not move at all (not even by AdamW momentum).
        for index, vectors in enumerate(self.vocabulary.vectors):
            if index not in subset:
                vectors.grad = None
        trainable = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.vocabulary.clamp_norms(self.norm_bounds, subset)
        return float(loss.detach())

    def _encode_prompt(self, prompt: str) -> torch.Tensor:
        """Text states of a training prompt; cached when the tokens are frozen (nothing then changes them)."""
        if self.settings.train_tokens:
            return self.model.text_encoder(input_ids=self.vocabulary.input_ids([prompt]).to(self.device))[0]
        if prompt not in self._frozen_prompts:
            with torch.no_grad():
                self._frozen_prompts[prompt] = self.model.text_encoder(input_ids=self.vocabulary.input_ids([prompt]).to(self.device))[0]
        return self._frozen_prompts[prompt]

    def _token_positions(self, prompt: str, subset: list[int]) -> dict[int, torch.Tensor]:
        """Per named object, the positions of its vectors in the encoded prompt."""
        ids = self.vocabulary.input_ids([prompt])[0]
        return {index: torch.nonzero(torch.isin(ids, self.vocabulary.token_ids[index]), as_tuple=True)[0].to(self.device)
                for index in subset}

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
        pooled = self._pooled([self.settings.class_prompt.format(f"{self.tokens[i]} {self.class_words[i]}") for i in subset])
        targets = torch.stack([self.anchor_targets[i] for i in subset])
        return (1 - F.cosine_similarity(pooled, targets, dim=-1)).mean()

    # ----------------------------------------------------------------------------------------------
    # results

    def concept(self) -> Concept:
        from peft.utils import get_peft_model_state_dict

        lora = {}
        if self.settings.train_lora:
            state = get_peft_model_state_dict(self.model.unet, adapter_name=ADAPTER)
            lora = peft_to_kohya(state, self.settings.lora_alpha or self.settings.lora_rank)
        objects = [ConceptObject(t, c, v.detach().float().cpu().clone())
                   for t, c, v in zip(self.tokens, self.class_words, self.vocabulary.vectors)]
        settings = dataclasses.asdict(self.settings)
        settings["templates"] = list(settings["templates"])
        return Concept(objects, lora, self.model.family, self.model.fingerprint, settings)

    @contextlib.contextmanager
    def trained_pipeline(self, scheduler=None):
        """A diffusers pipeline over the model as it is now (trained LoRA active, tokens installed)."""
        pipeline = self.model.pipeline(scheduler)
        pipeline.tokenizer = self.vocabulary.tokenizer
        pipeline.set_progress_bar_config(disable=True)
        with torch.no_grad():
            yield pipeline

    # ----------------------------------------------------------------------------------------------
    # checkpoints: everything needed to continue exactly where a run stopped

    def _run_key(self) -> str:
        fields = {"model": self.model.fingerprint, "tokens": self.tokens, "classes": self.class_words,
                  "settings": {k: v for k, v in dataclasses.asdict(self.settings).items() if k != "checkpoint_every"},
                  "image": hashlib.sha256(self.image.numpy().tobytes()).hexdigest(),
                  "masks": [hashlib.sha256(m.numpy().tobytes()).hexdigest() for m in self.masks]}
        return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()

    def _save_checkpoint(self, directory: Path) -> None:
        from peft.utils import get_peft_model_state_dict

        state = {
            "run": self._run_key(),
            "step": self.step,
            "losses": torch.tensor(self.losses, dtype=torch.float64),
            "vectors": [v.detach().cpu() for v in self.vocabulary.vectors],
            "lora": get_peft_model_state_dict(self.model.unet, adapter_name=ADAPTER) if self.settings.train_lora else {},
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "rng": self.rng.getstate(),
        }
        with atomic_path(directory / "checkpoint.pt") as tmp:
            torch.save(state, tmp)

    def _load_checkpoint(self, directory: Path) -> None:
        from peft.utils import set_peft_model_state_dict

        path = directory / "checkpoint.pt"
        if not path.is_file():
            log.info("no checkpoint in %s; starting from step 0", directory)
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state["run"] != self._run_key():
            raise InputError(f"checkpoint {path} belongs to a different run (model, image, masks, tokens or settings "
                             "differ); use another checkpoint folder or the same inputs.")
        with torch.no_grad():
            for vectors, saved in zip(self.vocabulary.vectors, state["vectors"]):
                vectors.copy_(saved)
        if self.settings.train_lora:
            set_peft_model_state_dict(self.model.unet, state["lora"], adapter_name=ADAPTER)
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.rng.setstate(_as_tuples(state["rng"]))
        self.step = int(state["step"])
        self.losses = state["losses"].tolist()
        log.info("resumed from %s at step %d", path, self.step)


def _as_tuples(value):
    """random.setstate wants tuples all the way down; a checkpoint round trip may give lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def train_concept(model, image, masks, tokens, class_words, settings: TrainSettings | None = None, *,
                  init_vectors=None, prior_cache=None, weights_key=None, prepare_progress=None, should_cancel=None,
                  **kwargs) -> TrainResult:
    """Train and return the concept; the model is left as it was. should_cancel stops the preparation and the
    training; the other keywords are OneShotTrainer's, and kwargs go to OneShotTrainer.train."""
    with OneShotTrainer(model, image, masks, tokens, class_words, settings, init_vectors, prior_cache,
                        weights_key=weights_key, prepare_progress=prepare_progress, should_cancel=should_cancel) as trainer:
        return trainer.train(**kwargs)
