"""The trainer every method shares: one photo, its masks and new words in; a Concept out.

It owns what every method needs (methods/base.py says what a method adds): the photo cropped, resized and encoded
once (and mirrored, augmented or recomposed when those are on: augment.py); the new tokens, their vectors spliced
into the text encoder and trained by AdamW with the method's own parameters; each step's example (a random non-empty
subset of the objects named in a random template, a view, noise and a timestep, uniform or SNR-weighted); gradient
clipping, loss scaling for fp16, progress, cancel, resumable checkpoints and seeds (same seed, same result). The
model is restored when training ends, however it ends.
"""
from __future__ import annotations

import contextlib
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..concept.concept import Concept, ConceptObject
from ..errors import InputError, TrainingCancelled
from ..images import check_masks, load_image
from ..models.diffusion_model import Conditioning
from ..models.families import TRAINABLE
from ..models.precision import autocast_dtype
from ..text.vocabulary import ConceptVocabulary, check_objects, class_word_vectors, eos_pooled, vocabulary_norm
from . import augment
from .class_prior import ClassImages
from .losses import diffusion_target, latent_mask, sample_timesteps, snr_timestep_weights
from .methods import method_of
from .photo import square_crop, training_size
from .resume import load_checkpoint, save_checkpoint
from .settings import StepReport, TrainSettings

log = logging.getLogger("protobooth")


@dataclass
class TrainResult:
    concept: Concept
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    class_images: ClassImages | None = None  # what the class prior's images cost (None: the method has no prior)


@dataclass
class Example:
    """One step's training example: which objects it names (indices), its prompt, the view of the photo (latent
    mean and std, each object's latent mask, the augmented view) and the instance latents drawn from that view."""

    subset: list[int]
    prompt: str
    view: dict
    latents: torch.Tensor
    named: list[int]  # the vocabulary's tokens in the prompt: the objects', then augmentation tokens (they alone move)

    def loss_mask(self, use_mask: bool) -> torch.Tensor:
        """What a masked loss covers: the named objects, and a companion (recomposition beside another object: it
        must keep its own look); everything when use_mask is off."""
        masks = self.view["masks"]
        if not use_mask:
            return torch.ones_like(masks[0])
        companion = [] if self.view["companion_mask"] is None else [self.view["companion_mask"]]
        return torch.stack([masks[i] for i in self.subset] + companion).amax(0)


class OneShotTrainer:
    """Use as a context manager: the model is restored on exit (method's trainables removed, embeddings untouched).

    Entering prepares everything that stays fixed, which includes the method's frozen state (for object-driven,
    drawing class images on a cache miss: minutes on a real model): prepare_progress(done, total) follows it and
    should_cancel() can stop it (TrainingCancelled; nothing cached, the model as it was). should_cancel also stops
    train() unless that is given its own. weights_key: see class_prior.class_latents (what is patched on top of the
    base weights).
    """

    def __init__(self, model, image, masks, tokens, class_words, settings: TrainSettings | None = None,
                 init_vectors: list[torch.Tensor] | None = None, prior_cache: Path | None = None, *,
                 weights_key: str | None = None, prepare_progress=None, should_cancel=None):
        self.model = model
        self.settings = settings = settings or TrainSettings()
        settings.check()
        if model.family not in TRAINABLE:
            raise InputError(f"model family {model.family!r} is not supported yet (supported: {', '.join(TRAINABLE)}).")
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
        self.size = training_size(model, settings.resolution)
        side = min(self.image.shape[-2:])
        if side < self.size / 2:
            log.warning("the photo is only %dx%d pixels, far below the training size %d: it is scaled up and the "
                        "object may come out soft; use a larger photo if you have one.", self.image.shape[-1],
                        self.image.shape[-2], self.size)
        self.prior_cache = prior_cache
        self.weights_key = weights_key
        self.prepare_progress = prepare_progress
        self.should_cancel = should_cancel
        # Augmentation tokens train beside the objects' (after them: the concept keeps only the objects').
        self.augment_tokens = augment.tokens_of(settings.augmentations) if settings.augment_probability > 0 else []
        clash = sorted(set(self.tokens) & set(self.augment_tokens))
        if clash:
            raise InputError(f"token {clash[0]!r} is an augmentation token; choose another name.")
        vectors = list(init_vectors) + [class_word_vectors(model.text_encoder, model.tokenizer, augment.TOKENS[token],
                                                           len(model.tokenizer(augment.TOKENS[token], add_special_tokens=False).input_ids))
                                        for token in self.augment_tokens]
        self.vocabulary = ConceptVocabulary(model.tokenizer, self.tokens + self.augment_tokens, vectors)
        self.norm_bounds = [max(vocabulary_norm(model.text_encoder), float(v.norm(dim=1).max())) for v in vectors]
        self.device = model.device
        # A model whose UNet already computes in half precision (weights kept so, as in a ComfyUI graph on a GPU)
        # trains in it; a full-precision one autocasts as the setting says.
        self.compute_dtype = model.unet.dtype
        self.autocast = autocast_dtype(settings.mixed_precision, self.device) if self.compute_dtype == torch.float32 else None
        self.method = method_of(settings.method)(self)
        self.method.check_model()
        self.losses: list[float] = []
        self.class_images: ClassImages | None = None  # set by a method that draws class images
        self.step = 0
        self._frozen_prompts: dict[str, Conditioning] = {}
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

    def on_exit(self, callback) -> None:
        """Call `callback` when training ends, however it ends (last registered, first called)."""
        self._exit.callback(callback)

    def _prepare(self) -> None:
        model, settings, size = self.model, self.settings, self.size
        image, masks = square_crop(self.image, self.masks)
        image = F.interpolate(image[None], size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        masks = [F.interpolate(m[None, None], size=(size, size), mode="bilinear", antialias=True)[0, 0] for m in masks]
        # Frozen state first, while the model is still the base model.
        with torch.no_grad():
            photo = augment.View(image[0], masks)
            views = [photo] + ([augment.View(image[0].flip(-1), [m.flip(-1) for m in masks])] if settings.flip else [])
            if settings.augment_probability > 0:
                views += augment.views(photo, settings.augmentations, settings.augment_probability,
                                       settings.augment_views, settings.seed)[1:]
            recomposed = (augment.recomposed_views(photo, settings.recompose_resize, settings.augment_views, settings.seed)
                          if settings.recompose > 0 else [])
            encoded = [self._encoded_view(view) for view in views + recomposed]
            self.instance, self.recomposed = encoded[: len(views)], encoded[len(views) :]
            self.method.prepare()
            self.beside_a_copy, self.beside_another = ([self._encoded_view(v) for v in found] for found in self._beside(photo))
        self.snr_weights = (
            snr_timestep_weights(model.noise_scheduler.alphas_cumprod.float()) if settings.timestep_sampling == "snr" else None
        )
        self._offload_frozen()
        groups = self._attach_trainables()
        if settings.train_tokens:
            groups.append({"params": list(self.vocabulary.vectors), "lr": settings.token_learning_rate, "weight_decay": 0.0})
        self.optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.rng = random.Random(settings.seed)
        # fp16 gradients underflow without loss scaling; bf16 and fp32 need none.
        self.scaler = torch.amp.GradScaler(self.device.type) if torch.float16 in (self.autocast, self.compute_dtype) else None
        self._prepared = True

    def _beside(self, photo: augment.View) -> tuple[list[augment.View], list[augment.View]]:
        """The one-object photo recomposed beside a copy of its object (recompose_copies) and beside objects cut out of
        the method's class images (recompose_companions)."""
        settings = self.settings
        copies, others = settings.recompose_copies > 0, settings.recompose_companions > 0
        if len(photo.masks) > 1 and (copies or others):
            log.info("recompose_copies, recompose_companions: the photo's objects already stand beside each other")
        if settings.recompose == 0 or len(photo.masks) > 1 or not (copies or others):
            return [], []
        drawn = (settings.recompose_resize, settings.augment_views, settings.seed)
        beside_a_copy = augment.views_beside_a_copy(photo, *drawn) if copies else []
        found = []
        if others:
            found = augment.companions(self.model.pictures(self.method.class_pictures()[self.class_words[0]]).cpu())
            log.info("recompose_companions: %d class images have a plain background to cut a companion from", len(found))
        return beside_a_copy, augment.views_beside_another(photo, found, self.class_words[0], *drawn) if found else []

    def text_is_frozen(self) -> bool:
        """Nothing in the text path trains: a prompt's conditioning is fixed and can be cached."""
        return not self.settings.train_tokens and not self.method.trains_text_encoder

    def _offload_frozen(self) -> None:
        """offload_frozen: the VAE (and a frozen text encoder) to the CPU once the photo is encoded; back on exit."""
        if not self.settings.offload_frozen or self.device.type == "cpu":
            return
        modules = [self.model.vae] + ([self.model.text_encoder] if self.text_is_frozen() else [])
        for module in modules:
            module.to("cpu")
            self.on_exit(lambda module=module: module.to(self.device))
        log.info("offload_frozen: the %s wait on the CPU while the UNet trains",
                 "VAE and text encoder" if len(modules) > 1 else "VAE")

    def _attach_trainables(self) -> list[dict]:
        model, settings = self.model, self.settings
        flags = {p: p.requires_grad for m in (model.unet, model.text_encoder, model.vae) for p in m.parameters()}
        self.on_exit(lambda: [p.requires_grad_(f) for p, f in flags.items()])
        for module in (model.unet, model.text_encoder, model.vae):
            module.requires_grad_(False)
        self.vocabulary.vectors.to(self.device)
        self.vocabulary.vectors.requires_grad_(settings.train_tokens)
        self._exit.enter_context(self.vocabulary.installed(model.text_encoder))
        groups = self.method.trainables()
        if settings.gradient_checkpointing and not model.unet.is_gradient_checkpointing:
            model.unet.enable_gradient_checkpointing()
            log.info("gradient_checkpointing: the UNet recomputes its activations in the backward pass")
            self.on_exit(model.unet.disable_gradient_checkpointing)
        return groups

    # ----------------------------------------------------------------------------------------------
    # text, for the trainer and its method

    def pooled(self, prompts: list[str]) -> torch.Tensor:
        """CLIP's pooled text state of each prompt (the new words as they are now)."""
        return eos_pooled(lambda ids: self.model.text_encoder(input_ids=ids.to(self.device))[0],
                          self.vocabulary.input_ids(prompts), self.vocabulary.tokenizer.eos_token_id).float()

    def encode_frozen(self, prompts: list[str]) -> Conditioning:
        """The UNet's text conditioning for prompts without the new words, through the model's own tokenizer."""
        return self.model.encode_prompts(prompts, self.device)

    def train(self, progress=None, should_cancel=None, checkpoint_dir: Path | None = None, resume: bool = False) -> TrainResult:
        """Run the remaining steps. progress(StepReport) after each; should_cancel() → TrainingCancelled.

        should_cancel defaults to the one the trainer was made with."""
        if not self._prepared:
            raise RuntimeError("use OneShotTrainer as a context manager (with ...:)")
        settings = self.settings
        should_cancel = should_cancel or self.should_cancel
        if resume and checkpoint_dir is not None:
            load_checkpoint(self, Path(checkpoint_dir))
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
                save_checkpoint(self, Path(checkpoint_dir))
        return TrainResult(self.concept(), list(self.losses), time.perf_counter() - started, self.class_images)

    def _encoded_view(self, view: augment.View) -> dict:
        """A view as steps use it: its latent distribution and its masks at latent size."""
        dist = self.model.vae.encode((view.pixels[None] * 2 - 1).to(self.device, self.model.vae.dtype)).latent_dist
        latent_size = tuple(dist.mean.shape[-2:])
        return {"mean": dist.mean.float(), "std": dist.std.float(), "view": view,
                "masks": [latent_mask(m, latent_size).to(self.device) for m in view.masks],
                "companion_mask": None if view.companion_mask is None else latent_mask(view.companion_mask,
                                                                                       latent_size).to(self.device)}

    def _draw(self, shape, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator).to(like.device, like.dtype)

    def _example(self) -> Example:
        rng, model = self.rng, self.model
        subset = sorted(rng.sample(range(len(self.tokens)), rng.randint(1, len(self.tokens))))
        phrase = " and ".join(f"{self.tokens[i]} {self.class_words[i]}" for i in subset)
        template = rng.choice(self.settings.templates)
        pool = self.instance
        if self.recomposed and rng.random() < self.settings.recompose:
            copies, others = self.settings.recompose_copies, self.settings.recompose_companions
            share = rng.random() if self.beside_a_copy or self.beside_another else 1.0  # one draw: shares of the same steps
            pool = (self.beside_a_copy if share < copies else self.beside_another if share < copies + others else []
                    ) or self.recomposed
        view = pool[rng.randrange(len(pool))]
        latents = (view["mean"] + view["std"] * self._draw(view["mean"].shape, view["mean"])) * model.latent_scaling
        words = view["view"].prefix + view["view"].suffix
        named = subset + [len(self.tokens) + self.augment_tokens.index(word) for word in words]
        return Example(subset, view["view"].prompt(template, phrase), view, latents, named)

    def _train_step(self) -> float:
        model, settings = self.model, self.settings
        example = self._example()
        extra = self.method.extra_rows(example)
        batch = example.latents if extra is None else torch.cat([example.latents, extra[0]])
        noise = self._draw(batch.shape, batch)
        timesteps = sample_timesteps(len(batch), model.noise_scheduler.config.num_train_timesteps, self.generator,
                                     self.snr_weights).to(self.device)
        noisy = model.noise_scheduler.add_noise(batch, noise, timesteps)
        target = diffusion_target(model.noise_scheduler, batch, noise, timesteps)

        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            conditioning = self._encode_prompt(example.prompt)
            if extra is not None:
                conditioning = conditioning.cat(extra[1])
            with self.method.unet_call(example):
                prediction = model.unet(noisy.to(self.compute_dtype), timesteps,
                                        **model.unet_kwargs(conditioning, self.size)).sample
        loss = self.method.loss(example, prediction, target)

        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        # Tokens that this prompt does not name must not move at all (not even by AdamW momentum).
        for index, vectors in enumerate(self.vocabulary.vectors):
            if index not in example.named:
                vectors.grad = None
        trainable = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(trainable, settings.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.vocabulary.clamp_norms(self.norm_bounds, example.named)
        return float(loss.detach())

    def _encode_prompt(self, prompt: str) -> Conditioning:
        """The UNet's conditioning for a training prompt; cached when nothing in the text path trains (it is then
        fixed), computed wherever the text encoder is (offload_frozen) and kept on the UNet's device."""
        if not self.text_is_frozen():
            return self.model.encode(self.vocabulary.input_ids([prompt]).to(self.device))
        if prompt not in self._frozen_prompts:
            with torch.no_grad():
                ids = self.vocabulary.input_ids([prompt]).to(self.model.text_encoder.device)
                self._frozen_prompts[prompt] = Conditioning(*(t if t is None else t.to(self.device)
                                                              for t in self.model.encode(ids)))
        return self._frozen_prompts[prompt]

    def token_positions(self, prompt: str, subset: list[int]) -> dict[int, torch.Tensor]:
        """Per named object, the positions of its vectors in the encoded prompt."""
        ids = self.vocabulary.input_ids([prompt])[0]
        return {index: torch.nonzero(torch.isin(ids, self.vocabulary.token_ids[index]), as_tuple=True)[0].to(self.device)
                for index in subset}

    # ----------------------------------------------------------------------------------------------
    # results

    def concept(self) -> Concept:
        objects = [ConceptObject(t, c, v.detach().float().cpu().clone())
                   for t, c, v in zip(self.tokens, self.class_words, self.vocabulary.vectors)]
        widths = self.model.text_widths
        return Concept(objects, self.method.lora(), self.model.family, self.model.fingerprint, self.settings.as_dict(),
                       text_widths=widths if len(widths) > 1 else ())

    def preview_sample(self, seed: int = 0, sampler_steps: int = 5):
        """A quick picture with the concept as it stands now: the first template naming every object, one seed,
        few DDIM steps at the training size. Training's own random state is untouched (same seed, same result)."""
        phrase = " and ".join(f"{token} {word}" for token, word in zip(self.tokens, self.class_words))
        with self.trained_pipeline() as pipeline:
            return pipeline(self.settings.templates[0].format(phrase), height=self.size,
                            width=self.size, num_inference_steps=sampler_steps,
                            generator=torch.Generator().manual_seed(seed)).images[0]

    @contextlib.contextmanager
    def trained_pipeline(self, scheduler=None):
        """A diffusers pipeline over the model as it is now (trained LoRA active, tokens installed); modules that
        offload_frozen keeps on the CPU join the UNet for the block."""
        offloaded = [m for m in (self.model.vae, self.model.text_encoder) if next(m.parameters()).device != self.device]
        for module in offloaded:
            module.to(self.device)
        pipeline = self.model.pipeline(scheduler, tokenizer=self.vocabulary.tokenizer)
        pipeline.set_progress_bar_config(disable=True)
        try:
            with torch.no_grad():
                yield pipeline
        finally:
            for module in offloaded:
                module.to("cpu")

def train_concept(model, image, masks, tokens, class_words, settings: TrainSettings | None = None, *,
                  init_vectors=None, prior_cache=None, weights_key=None, prepare_progress=None, should_cancel=None,
                  **kwargs) -> TrainResult:
    """Train and return the concept; the model is left as it was. should_cancel stops the preparation and the
    training; the other keywords are OneShotTrainer's, and kwargs go to OneShotTrainer.train."""
    with OneShotTrainer(model, image, masks, tokens, class_words, settings, init_vectors, prior_cache,
                        weights_key=weights_key, prepare_progress=prepare_progress, should_cancel=should_cancel) as trainer:
        return trainer.train(**kwargs)
