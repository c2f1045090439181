"""Pretraining the object encoder once (research/methods.md §4.3), on Hugging Face accelerate: one process by default,
several processes or machines under `accelerate launch` (data-parallel), with gradient accumulation, mixed precision
where the device has it, checkpoint/resume and deterministic seeds.

Each sample of a step is drawn from (seed, its global index) alone, so the data does not depend on how many processes
share the step: two processes of batch B see exactly the samples one process of batch 2B sees (tested).

The paper's regularised joint training:
- cross-reference pairs: the encoder sees one picture of an identity, the UNet denoises another picture of it, whose
  caption names it by the trigger word and its class word ("a zqobj circle on the left, ...");
- object-embedding dropping: with `drop_probability` the object's vectors are the learned null ones instead, and a
  `general_share` of samples are ordinary captioned pictures without the object, so text-only prompts keep working;
- identity preservation: at timesteps below `identity_below`, 1 − cos between identity features of the predicted
  clean picture's object and of the reference object, weighted by `identity_weight`. The identity network is the CLIP
  vision tower the encoder reads (for ShapesWorld its own CLIP), never the benchmark's instance encoder, which grades;
- optionally a LoRA on the UNet's attention, trained along and shipped in the encoder's file.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..compat import set_token_table, token_table
from ..prototype import masked_object_crop
from ..text.vocabulary import ConceptVocabulary, class_word_vectors, vocabulary_norm
from ..train.fields import check_fields, setting
from ..train.losses import diffusion_target, latent_mask, masked_mse
from .encode import CROP_PADDING
from .model import EncoderShape, ObjectEncoder, save_encoder, vision_features

log = logging.getLogger("protobooth")
TOKEN = "zqobj"  # the trigger word of every pretraining caption (a concept later takes the user's own)


@dataclass
class PretrainSettings:
    steps: int = setting(2000, "optimiser steps", low=1)
    batch_size: int = setting(8, "samples per step on each process", low=1)
    accumulation: int = setting(1, "micro-batches accumulated per optimiser step", low=1)
    learning_rate: float = setting(1e-4, "the encoder's learning rate", above=0)
    # The encoder's shape: EncoderShape's defaults, so the two cannot drift apart.
    queries: int = setting(EncoderShape.queries, "vectors per object (K learned queries)", low=1, high=16)
    width: int = setting(EncoderShape.width, "the encoder's width", low=8)
    layers: int = setting(EncoderShape.layers, "the encoder's layers", low=1)
    heads: int = setting(EncoderShape.heads, "attention heads (must divide the width)", low=1)
    drop_probability: float = setting(0.1, "chance an identity sample's object vectors are the null ones", low=0, high=1)
    general_share: float = setting(0.25, "share of samples that are plain captioned pictures without the object",
                                   low=0, high=1)
    identity_weight: float = setting(0.05, "weight of the identity-preservation loss (0: off)", low=0)
    identity_below: int = setting(400, "timesteps under which the identity loss applies", low=0)
    background_weight: float = setting(1.0, "diffusion-loss weight outside the object in the pictures that show one "
                                       "(1: the plain loss; below 1 the object's pixels count for more, as in the "
                                       "one-shot method's masked loss)", low=0, high=1)
    unet_lora_rank: int = setting(0, "rank of a UNet LoRA trained along and shipped with the encoder (0: none)", low=0)
    unet_lora_learning_rate: float = setting(1e-4, "learning rate of that LoRA", above=0)
    max_grad_norm: float = setting(1.0, "gradient clipping norm", above=0)
    mixed_precision: str = setting("no", "accelerate's mixed precision (bf16 or fp16 where the device has it)",
                                   choices=("no", "bf16", "fp16"))
    seed: int = setting(0, "random seed (same seed, same encoder)", low=0, high=2**31 - 1)
    checkpoint_every: int = setting(0, "steps between resumable checkpoints in the work folder (0: none)", low=0)

    def check(self) -> None:
        check_fields(self)
        if self.width % self.heads:
            from ..errors import InputError

            raise InputError(f"heads ({self.heads}) must divide the width ({self.width}).")


@dataclass
class Sample:
    """One pretraining sample: the picture the UNet denoises and its caption ("{token}" where the object is named),
    and, for identity samples, the reference picture the encoder sees and both objects' masks."""

    target: torch.Tensor  # [3, H, W] in 0..1
    caption: str
    class_word: str | None = None  # None: a general sample (no object)
    reference: torch.Tensor | None = None
    reference_mask: torch.Tensor | None = None
    target_mask: torch.Tensor | None = None


class _PerSampleRows(nn.Module):
    """A token embedding for one batch: ids from `offset` on read that sample's own object vectors [B, K, W]."""

    def __init__(self, base: nn.Module, offset: int, vectors: torch.Tensor):
        super().__init__()
        self.base, self.offset, self.vectors = base, offset, vectors

    @property
    def weight(self):
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        is_new = ids >= self.offset
        out = self.base(torch.where(is_new, torch.zeros_like(ids), ids))
        index = (ids - self.offset).clamp(0, self.vectors.shape[1] - 1)
        new = torch.gather(self.vectors, 1, index[..., None].expand(-1, -1, self.vectors.shape[2]))
        return torch.where(is_new[..., None], new.to(out.dtype), out)


class _Objective(nn.Module):
    """What the processes train together (accelerate wraps it): the encoder, and the UNet when its LoRA trains.
    The frozen parts are held outside the module tree, so nothing of theirs is synchronised."""

    def __init__(self, encoder: ObjectEncoder, model, towers, settings: PretrainSettings, vocabulary_offset: int):
        super().__init__()
        self.encoder = encoder
        if settings.unet_lora_rank:
            self.unet = model.unet
        self.frozen = [model, towers]
        self.settings, self.offset = settings, vocabulary_offset

    def conditioning(self, batch: dict):
        """The UNet's text conditioning of the batch's captions, the trigger word reading each sample's own object
        vectors (the null ones where the object was dropped)."""
        model = self.frozen[0]
        found = self.encoder(batch["features"], batch["start"])
        vectors = torch.where(batch["dropped"][:, None, None], self.encoder.dropped(batch["start"]), found)
        table = token_table(model.text_encoder)
        set_token_table(model.text_encoder, _PerSampleRows(table, self.offset, vectors))
        try:
            return model.encode(batch["ids"])
        finally:
            set_token_table(model.text_encoder, table)

    def forward(self, batch: dict) -> torch.Tensor:
        model, towers = self.frozen
        settings = self.settings
        conditioning = self.conditioning(batch)
        scheduler, timesteps = model.noise_scheduler, batch["timesteps"]
        noisy = scheduler.add_noise(batch["latents"], batch["noise"], timesteps)
        prediction = model.unet(noisy, timesteps, **model.unet_kwargs(conditioning, batch["size"])).sample
        target = diffusion_target(scheduler, batch["latents"], batch["noise"], timesteps)
        if settings.background_weight < 1:  # general pictures have an all-ones mask: their loss stays the plain one
            loss = torch.stack([masked_mse(p[None], t[None], latent_mask(m.to(p.device), p.shape[-2:]),
                                           settings.background_weight)
                                for p, t, m in zip(prediction, target, batch["target_masks"])])
        else:
            loss = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if settings.identity_weight:
            loss = loss + settings.identity_weight * self._identity_loss(model, towers, batch, noisy, prediction)
        return loss.mean()

    def _identity_loss(self, model, towers, batch, noisy, prediction) -> torch.Tensor:
        """Per sample: 1 − cos(identity of the predicted clean picture's object, identity of the reference object),
        for identity samples (object not dropped) at low noise; 0 elsewhere."""
        losses = torch.zeros(len(noisy), device=noisy.device)
        chosen = batch["identity"] & (batch["timesteps"] < self.settings.identity_below)
        if not bool(chosen.any()):
            return losses
        alphas = model.noise_scheduler.alphas_cumprod.to(noisy.device)[batch["timesteps"]].view(-1, 1, 1, 1)
        if model.noise_scheduler.config.prediction_type == "v_prediction":
            clean = alphas.sqrt() * noisy - (1 - alphas).sqrt() * prediction
        else:
            clean = (noisy - (1 - alphas).sqrt() * prediction) / alphas.sqrt()
        for index in torch.nonzero(chosen).flatten().tolist():
            picture = model.pictures(clean[index : index + 1])[0]
            crop = masked_object_crop(picture, batch["target_masks"][index], CROP_PADDING)
            losses[index] = 1 - F.cosine_similarity(towers.image_features(crop), batch["reference_identity"][index], dim=0)
        return losses


def _draw(source, settings: PretrainSettings, index: int) -> tuple[Sample, torch.Generator]:
    """The sample of global index `index`, and the generator its noise, timestep and dropping come from: both from
    (seed, index) alone, whichever process draws it."""
    generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + index)
    general = bool(torch.rand(1, generator=generator) < settings.general_share)
    return source.sample(int(torch.randint(2**62, (1,), generator=generator)), general), generator


def _batch(samples: list[Sample], generators, model, towers, vocabulary: ConceptVocabulary, settings, device):
    """Tensors for one micro-batch; everything random comes from each sample's own generator."""
    identity = torch.tensor([s.class_word is not None for s in samples])
    dropped = torch.tensor([bool(torch.rand(1, generator=g) < settings.drop_probability) for g in generators])
    with torch.no_grad():
        pixels = torch.stack([s.target * 2 - 1 for s in samples]).to(device, model.vae.dtype)
        latents = model.vae.encode(pixels).latent_dist.mean.float() * model.latent_scaling
        references = [s.reference if s.reference is not None else s.target for s in samples]
        masks = [s.reference_mask if s.reference_mask is not None else torch.ones(s.target.shape[1:]) for s in samples]
        crops = [towers.preprocess(masked_object_crop(r, m, CROP_PADDING)) for r, m in zip(references, masks)]
        features = vision_features(towers.vision_model, torch.cat(crops)).float()
        reference_identity = torch.stack([towers.image_features(masked_object_crop(r, m, CROP_PADDING))
                                          for r, m in zip(references, masks)])
        start = torch.stack([class_word_vectors(model.text_encoder, vocabulary.tokenizer, s.class_word or "object",
                                                settings.queries) for s in samples])
    noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in generators])
    timesteps = torch.stack([torch.randint(0, model.noise_scheduler.config.num_train_timesteps, (), generator=g)
                             for g in generators])
    captions = [s.caption.format(token=TOKEN) for s in samples]
    return {"features": features, "start": start.to(device), "dropped": (dropped & identity).to(device),
            "identity": (identity & ~dropped).to(device), "ids": vocabulary.input_ids(captions).to(device),
            "latents": latents, "noise": noise.to(device), "timesteps": timesteps.to(device),
            "size": samples[0].target.shape[-1], "reference_identity": reference_identity.to(device),
            "target_masks": [s.target_mask if s.target_mask is not None else torch.ones(s.target.shape[1:])
                             for s in samples]}


def pretrain(model, towers, source, settings: PretrainSettings, out: Path, work: Path | None = None,
             resume: bool = False, progress=None) -> list[float]:
    """Train an object encoder for `model` (a DiffusionModel) reading `towers` (ClipTowers) on `source`'s samples
    (`source.sample(seed: int, general: bool) → Sample`; sources.py); write it to `out`. Returns the loss of every step (the
    mean over all processes). Under `accelerate launch` every process runs this same call."""
    from accelerate import Accelerator

    settings.check()
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=settings.mixed_precision,
                              gradient_accumulation_steps=settings.accumulation)
    device = accelerator.device
    model.to(device)
    towers.vision_model.to(device), towers.visual_projection.to(device)
    for module in (model.unet, model.vae, model.text_encoder, towers.vision_model, towers.visual_projection):
        module.requires_grad_(False)
    torch.manual_seed(settings.seed)  # the same starting weights in every process
    shape = EncoderShape(vision_width=towers.vision_model.config.hidden_size, text_width=sum(model.text_widths),
                         family=model.family, queries=settings.queries, width=settings.width, layers=settings.layers,
                         heads=settings.heads, lora_alpha=float(settings.unet_lora_rank),
                         max_norm=vocabulary_norm(model.text_encoder))
    encoder = ObjectEncoder(shape).to(device)
    vocabulary = ConceptVocabulary(model.tokenizer, [TOKEN], [torch.zeros(settings.queries, shape.text_width)])
    groups = [{"params": list(encoder.parameters()), "lr": settings.learning_rate}]
    remove_lora = None
    if settings.unet_lora_rank:
        named, remove_lora = _add_unet_lora(model.unet, settings)
        groups.append({"params": [p for _, p in named], "lr": settings.unet_lora_learning_rate})
    objective = _Objective(encoder, model, towers, settings, vocabulary.offset)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    objective, optimizer = accelerator.prepare(objective, optimizer)
    work = Path(work or Path(out).with_suffix(".work"))
    step, losses = 0, []
    if resume and (work / "state.json").is_file():
        accelerator.load_state(str(work / "checkpoint"))
        saved = json.loads((work / "state.json").read_text())
        step, losses = saved["step"], saved["losses"]
    per_step = settings.batch_size * accelerator.num_processes * settings.accumulation
    while step < settings.steps:
        step_losses = []
        for micro in range(settings.accumulation):
            first = step * per_step + micro * settings.batch_size * accelerator.num_processes
            first += accelerator.process_index * settings.batch_size
            samples, generators = zip(*(_draw(source, settings, index)
                                        for index in range(first, first + settings.batch_size)))
            batch = _batch(samples, generators, model, towers, vocabulary, settings, device)
            with accelerator.accumulate(objective):
                with accelerator.autocast():
                    loss = objective(batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(objective.parameters(), settings.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_losses.append(float(accelerator.gather(loss.detach()[None]).mean()))
        step += 1
        losses.append(sum(step_losses) / len(step_losses))
        if progress is not None:
            progress(step, settings.steps, losses[-1])
        if settings.checkpoint_every and step % settings.checkpoint_every == 0 and step < settings.steps:
            accelerator.save_state(str(work / "checkpoint"))
            if accelerator.is_main_process:
                (work / "state.json").write_text(json.dumps({"step": step, "losses": losses}))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        trained = accelerator.unwrap_model(objective)
        save_encoder(trained.encoder, out, lora=_unet_lora(model.unet, settings),
                     notes={"settings": asdict(settings), "base_fingerprint": model.fingerprint,
                            "processes": accelerator.num_processes, "final_loss": losses[-1]})
    if remove_lora is not None:  # the model is the caller's again as it came (the LoRA ships in the encoder's file)
        remove_lora()
    return losses


UNET_ADAPTER = "protobooth_encoder"


def _add_unet_lora(unet, settings: PretrainSettings):
    from peft import LoraConfig

    from ..train.methods.base import attach_lora
    from ..train.methods.object_driven import LORA_TARGETS

    config = LoraConfig(r=settings.unet_lora_rank, lora_alpha=settings.unet_lora_rank, init_lora_weights="gaussian",
                        target_modules=LORA_TARGETS)
    return attach_lora(unet, config, UNET_ADAPTER, settings.seed)


def _unet_lora(unet, settings: PretrainSettings) -> dict[str, torch.Tensor]:
    if not settings.unet_lora_rank:
        return {}
    from peft.utils import get_peft_model_state_dict

    from ..concept.concept import peft_to_kohya

    state = get_peft_model_state_dict(unet, adapter_name=UNET_ADAPTER)
    return peft_to_kohya(state, alpha=settings.unet_lora_rank)
