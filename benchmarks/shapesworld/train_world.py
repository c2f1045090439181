"""Train the ShapesWorld models from scratch, reproducibly, with checkpoints and resume.

    python benchmarks/shapesworld/train_world.py all                # every stage in order
    python benchmarks/shapesworld/train_world.py unet --minutes 30  # one working stretch; run it again to go on
    python benchmarks/shapesworld/train_world.py gate               # measure the base model
    python benchmarks/shapesworld/train_world.py export             # write the shipped weights

Stages, in order: data (render the pretraining scenes), vae, clip (contrastive; its text tower becomes
the diffusion model's text encoder), metric (attribute classifier and instance encoder), unet (the
text-to-image model on frozen VAE latents and frozen text states), gate (sample captions, read the
pictures back with the attribute classifier), export (fp16 safetensors in diffusers layout into the
package). Every stage saves a checkpoint at least every few minutes into --work (outside the
repository) and continues from it when run again; the same seeds give the same weights. Step counts are
fixed per stage, so a run split into stretches ends where an unbroken one would.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from checkout import import_this_checkout  # noqa: E402

import_this_checkout()

from protobooth.benchmarks.shapesworld import models as sw_models  # noqa: E402
from protobooth.engine.shapesworld import world  # noqa: E402
from protobooth.benchmarks.shapesworld.metrics import METRIC_DIR, load_classifier, scene_accuracy  # noqa: E402
from protobooth.engine.fileio import save_safetensors  # noqa: E402
from protobooth.engine.models.loading import load_model  # noqa: E402
from protobooth.engine.models.diffusion_model import DiffusionModel  # noqa: E402
from protobooth.engine.prototype import CLIP_MEAN, CLIP_STD  # noqa: E402
from protobooth.engine.text.tokenizer import clip_tokenizer  # noqa: E402

DEFAULT_WORK = Path.home() / ".cache" / "protobooth" / "shapesworld-work"
EXPORT_DIR = HERE.parents[1] / "engine" / "data" / "shapesworld"

# How much data and how many steps; --smoke swaps in tiny numbers to check the whole pipeline in a minute.
SIZES = {"scenes": 150_000, "classifier_pool": 40_000, "classifier_validation": 4000, "encoder_views": 12}
SMOKE_SIZES = {"scenes": 256, "classifier_pool": 300, "classifier_validation": 60, "encoder_views": 4}
# --stage1: the recipe check — data, VAE, CLIP and UNet from scratch within 30 CPU-minutes, judged by the
# shipped attribute classifier (a measuring instrument, not part of the recipe).
STAGE1_SIZES = {"scenes": 30_000}
STAGE1_STEPS = {"vae": 1500, "clip": 200, "unet": 3200}
UNET_LEARNING_RATE = 1e-3
DATA_SEED, METRIC_SEED, GATE_SEED = 1, 2, 3
CHECKPOINT_SECONDS = 300
CAPTION_TOKENS = 32

# UNet batch 16: a quarter of batch 64 costs a third of the time per step (8x8 latents leave the CPU
# underused at small batches), so the same minutes buy three times the updates (results/stage1.md).
# 12,000 such steps cost 36 CPU-minutes at one thread and pass the gate (results/stage2.md); the first
# recipe, batch 64 x 9,000 at lr 5e-4, needed 3.2 CPU-hours for the same gate (rerun it with
# --unet-batch 64 --unet-steps 9000 --unet-lr 5e-4). The shipped weights are that first recipe's: one-shot
# learning took up instances better on them (results/stage2.md, "Which weights ship").
STEPS = {"vae": 5000, "clip": 1500, "classifier": 1500, "encoder": 1500, "unet": 12000}
UNET_EMA_DECAY = {"full": 0.999, "stage1": 0.99}  # 0.999 keeps 30% of the random start after 1,200 steps
BATCH = {"vae": 32, "clip": 128, "classifier": 128, "encoder": 256, "unet": 16}


# ------------------------------------------------------------------------------------------ book-keeping

class Run:
    """The work folder: data, checkpoints, and a log of how long each stage took."""

    def __init__(self, work: Path, minutes: float | None):
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.deadline = None if minutes is None else time.monotonic() + minutes * 60
        self.log_path = work / "log.json"
        self.log = json.loads(self.log_path.read_text()) if self.log_path.exists() else {}

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def add_seconds(self, stage: str, seconds: float, cpu_seconds: float) -> None:
        """Wall-clock and process CPU time (all threads) spent on a stage, summed over working stretches."""
        def add(entry):
            entry["seconds"] = entry.get("seconds", 0.0) + seconds
            entry["cpu_seconds"] = entry.get("cpu_seconds", 0.0) + cpu_seconds
        self._update(stage, add)

    def note(self, stage: str, **values) -> None:
        self._update(stage, lambda entry: entry.update(values))

    def _update(self, stage: str, change) -> None:
        # Read the file again first: stages may run in parallel processes sharing this log.
        self.log = json.loads(self.log_path.read_text()) if self.log_path.exists() else {}
        change(self.log.setdefault(stage, {}))
        tmp = self.log_path.with_name(f"log.{id(self)}.tmp")
        tmp.write_text(json.dumps(self.log, indent=2))
        tmp.replace(self.log_path)

    def save(self, name: str, state: dict) -> None:
        tmp = self.work / f"{name}.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(self.work / f"{name}.pt")

    def load(self, name: str) -> dict | None:
        path = self.work / f"{name}.pt"
        return torch.load(path, map_location="cpu", weights_only=False) if path.exists() else None


def descend(optimizer, loss, clip_params=None) -> float:
    """One optimiser step on `loss` (gradients clipped to norm 1 when clip_params is given); the loss value."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_params is not None:
        torch.nn.utils.clip_grad_norm_(clip_params, 1.0)
    optimizer.step()
    return float(loss.detach())


def train_loop(run: Run, name: str, total_steps: int, modules: dict, optimizer, step_fn, schedule=None, ema=None):
    """Run `step_fn(step, generator)` up to `total_steps`, checkpointing; resumes from `name`'s checkpoint.

    Returns True when every step is done, False when the stretch ran out of time first.
    """
    state = run.load(name)
    generator = torch.Generator().manual_seed(sum(map(ord, name)))  # a fixed seed per stage
    step = 0
    if state is not None:
        for key, module in modules.items():
            module.load_state_dict(state["modules"][key])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        step = state["step"]
        if step >= total_steps:
            return True
        print(f"[{name}] resuming at step {step}", flush=True)

    def checkpoint():
        run.save(name, {"modules": {k: m.state_dict() for k, m in modules.items()}, "optimizer": optimizer.state_dict(),
                        "generator": generator.get_state(), "ema": ema.state_dict() if ema is not None else None, "step": step})

    started = last_save = time.monotonic()
    cpu_started = time.process_time()
    losses = []
    while step < total_steps:
        if schedule is not None:
            for group in optimizer.param_groups:
                group["lr"] = schedule(step)
        try:
            losses.append(step_fn(step, generator))
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: keep everything up to the last whole step
            checkpoint()
            run.add_seconds(name, time.monotonic() - started, time.process_time() - cpu_started)
            print(f"[{name}] interrupted at step {step}; checkpoint saved, run again to continue", flush=True)
            raise SystemExit(130)
        step += 1
        if step % 200 == 0 or step == total_steps:
            recent = sum(losses[-200:]) / len(losses[-200:])
            rate = (time.monotonic() - started) / len(losses)
            print(f"[{name}] step {step}/{total_steps} loss {recent:.4f} ({rate:.3f} s/step)", flush=True)
        if time.monotonic() - last_save > CHECKPOINT_SECONDS or step == total_steps:
            checkpoint()
            last_save = time.monotonic()
        if run.out_of_time():
            checkpoint()
            run.add_seconds(name, time.monotonic() - started, time.process_time() - cpu_started)
            print(f"[{name}] stopped at step {step} for this stretch; run again to continue", flush=True)
            return False
    run.add_seconds(name, time.monotonic() - started, time.process_time() - cpu_started)
    return True


def warmup_cosine(peak: float, total: int, warmup: int, floor: float = 0.1):
    warmup = min(warmup, total // 5)  # short runs (--stage1) still spend most steps at full rate
    def lr(step: int) -> float:
        if step < warmup:
            return peak * (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
    return lr


class EMA:
    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for k, v in module.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v, 1 - self.decay)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self):
        return self.shadow

    def load_state_dict(self, state):
        self.shadow = {k: v.clone() for k, v in state.items()}


# ------------------------------------------------------------------------------------------ labels

def scene_labels(scenes: list[world.Scene]) -> dict[str, torch.Tensor]:
    """Classifier targets: background, and per side the shape and main colour (0 = nothing there)."""
    labels = {name: torch.zeros(len(scenes), dtype=torch.long) for name in sw_models.HEADS}
    shapes, colours = list(world.CLASSES), list(world.COLOURS)
    for n, scene in enumerate(scenes):
        labels["background"][n] = world.BACKGROUNDS_LIST.index(scene.background)
        for placed in scene.objects:
            labels[f"{placed.position}_shape"][n] = 1 + shapes.index(placed.instance.shape)
            labels[f"{placed.position}_colour"][n] = 1 + colours.index(placed.instance.colour)
    return labels


def images_to_float(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.permute(0, 3, 1, 2).float() / 255


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur and noise of random strength, so the metric models read generated pictures as well as renders."""
    n, channels, height, width = images.shape
    sigma = (torch.rand(n, generator=generator) * 0.9).clamp(min=0.05)
    offsets = torch.arange(-2, 3, dtype=torch.float32)
    kernels = torch.exp(-offsets[None] ** 2 / (2 * sigma[:, None] ** 2))
    kernels = (kernels / kernels.sum(1, keepdim=True)).repeat_interleave(channels, 0)  # one per image and channel
    flat = images.reshape(1, n * channels, height, width)
    flat = F.conv2d(F.pad(flat, (2, 2, 0, 0), mode="replicate"), kernels.view(-1, 1, 1, 5), groups=n * channels)
    flat = F.conv2d(F.pad(flat, (0, 0, 2, 2), mode="replicate"), kernels.view(-1, 1, 5, 1), groups=n * channels)
    noise = torch.randn(images.shape, generator=generator) * (torch.rand(n, 1, 1, 1, generator=generator) * 0.04)
    return (flat.view_as(images) + noise).clamp(0, 1)


# ------------------------------------------------------------------------------------------ stages

def stage_data(run: Run, args) -> None:
    if (run.work / "data.pt").exists():
        return
    started, cpu_started = time.monotonic(), time.process_time()
    scenes = world.SceneSampler(DATA_SEED).scenes(SIZES["scenes"])
    images, _ = world.render(scenes)
    captions = [s.caption() for s in scenes]
    unique = sorted(set(captions))
    index = {c: i for i, c in enumerate(unique)}
    run.save("data", {"images": torch.from_numpy(world.to_uint8(images)), "captions": unique,
                      "caption_index": torch.tensor([index[c] for c in captions]), "labels": scene_labels(scenes)})
    run.add_seconds("data", time.monotonic() - started, time.process_time() - cpu_started)
    run.note("data", scenes=len(scenes), unique_captions=len(unique))
    print(f"[data] {len(scenes)} scenes, {len(unique)} distinct captions", flush=True)


def _data(run: Run) -> dict:
    data = run.load("data")
    if data is None:
        raise SystemExit("run the data stage first")
    return data


def stage_vae(run: Run, args) -> bool:
    from diffusers import AutoencoderKL

    if (run.work / "vae" / "config.json").exists():
        return True
    data = _data(run)
    images = data["images"]
    torch.manual_seed(10)
    vae = AutoencoderKL(**sw_models.vae_config())
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)

    def step(i, generator):
        batch = images_to_float(images[torch.randint(len(images), (BATCH["vae"],), generator=generator)])
        posterior = vae.encode(batch * 2 - 1).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        out = (vae.decode(z).sample + 1) / 2
        loss = (out - batch).abs().mean() + F.mse_loss(out, batch) + 1e-6 * posterior.kl().mean()
        return descend(optimizer, loss, vae.parameters())

    done = train_loop(run, "vae_training", STEPS["vae"], {"vae": vae}, optimizer, step,
                      warmup_cosine(1e-3, STEPS["vae"], 200, floor=0.05))
    if not done:
        return False
    vae.eval()
    means, stds = [], []
    with torch.no_grad():
        for start in range(0, len(images), 1024):
            posterior = vae.encode(images_to_float(images[start : start + 1024]) * 2 - 1).latent_dist
            means.append(posterior.mean.half())
            stds.append(posterior.std.half())
    mean = torch.cat(means)
    scaling = float(1 / mean.float().std())
    vae.register_to_config(scaling_factor=scaling)
    run.save("latents", {"mean": mean, "std": torch.cat(stds)})
    vae.save_pretrained(run.work / "vae")
    run.note("vae", scaling_factor=scaling)
    print(f"[vae] done; latent scaling factor {scaling:.4f}", flush=True)
    return True


def world_token_ids(tokenizer, captions: list[str]) -> list[int]:
    ids = set()
    for caption in captions + [""]:
        ids.update(tokenizer(caption).input_ids)
    return sorted(ids)


def stage_clip(run: Run, args) -> bool:
    from transformers import CLIPModel

    if (run.work / "clip" / "config.json").exists():
        return True
    tokenizer = clip_tokenizer()
    data = _data(run)
    images, captions, caption_index = data["images"], data["captions"], data["caption_index"]
    # Captions are short: train on the first CAPTION_TOKENS positions (the end token is inside them), which
    # under the causal mask gives the same pooled state as all 77.
    caption_ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    longest = int((caption_ids == tokenizer.eos_token_id).int().argmax(1).max()) + 1
    assert longest <= CAPTION_TOKENS, f"a caption has {longest} tokens"
    caption_ids = caption_ids[:, :CAPTION_TOKENS]
    torch.manual_seed(11)
    clip = CLIPModel(sw_models.clip_config())
    # The text projection is the identity: the pooled text state itself lives in the joint space, so the
    # diffusion model's text encoder alone gives the prototype step its text features.
    with torch.no_grad():
        clip.text_projection.weight.copy_(torch.eye(sw_models.TEXT_WIDTH))
        table = clip.text_model.embeddings.token_embedding.weight
        used = torch.zeros(table.shape[0], dtype=torch.bool)
        used[world_token_ids(tokenizer, captions)] = True
        table[~used] = 0  # rows no caption uses stay zero: no random vectors to be "nearest words"
    clip.text_projection.weight.requires_grad_(False)
    params = [p for p in clip.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.05)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)

    def step(i, generator):
        picked = torch.randint(len(images), (BATCH["clip"],), generator=generator)
        pixels = (augment(images_to_float(images[picked]), generator) - mean) / std
        which = caption_index[picked]
        out = clip(input_ids=caption_ids[which], pixel_values=pixels)
        logits = out.logits_per_image
        # several images in a batch can share a caption: all of them are positives
        same = (which[:, None] == which[None, :]).float()
        targets = same / same.sum(1, keepdim=True)
        loss = (-(targets * logits.log_softmax(1)).sum(1).mean() - (targets.T * logits.T.log_softmax(1)).sum(1).mean()) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        table.grad[~used] = 0
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        with torch.no_grad():
            table[~used] = 0
        return float(loss.detach())

    done = train_loop(run, "clip_training", STEPS["clip"], {"clip": clip}, optimizer, step,
                      warmup_cosine(5e-4, STEPS["clip"], 200))
    if not done:
        return False
    clip.eval().save_pretrained(run.work / "clip")
    accuracy = _clip_retrieval_accuracy(clip, caption_ids, images, caption_index, mean, std)
    run.note("clip", caption_retrieval_top1=accuracy)
    print(f"[clip] done; caption retrieval top-1 {accuracy:.3f}", flush=True)
    return True


@torch.no_grad()
def _clip_retrieval_accuracy(clip, caption_ids, images, caption_index, mean, std, n: int = 2000) -> float:
    """For held-back-free images of the dataset: is the right caption the nearest of all distinct captions?"""
    text = []
    for start in range(0, len(caption_ids), 512):
        text.append(F.normalize(clip.get_text_features(input_ids=caption_ids[start : start + 512]).pooler_output, dim=-1))
    text = torch.cat(text)
    picked = torch.linspace(0, len(images) - 1, min(n, len(images))).long()
    pixels = (images_to_float(images[picked]) - mean) / std
    image = F.normalize(clip.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    return float(((image @ text.T).argmax(1) == caption_index[picked]).float().mean())


def metric_pool(seed: int, n: int) -> tuple[torch.Tensor, list[world.Scene]]:
    """Renders of scenes over every instance, the held-out ones included (the metric models must read them)."""
    sampler = world.SceneSampler(seed, world.all_instances(include_held_out=True))
    scenes = sampler.scenes(n)
    images, _ = world.render(scenes)
    return images, scenes


def stage_metric(run: Run, args) -> bool:
    return _train_classifier(run) and _train_encoder(run)


def _train_classifier(run: Run) -> bool:
    if (run.work / "classifier.safetensors").exists():
        return True
    pool = run.load("classifier_pool")
    if pool is None:
        images, scenes = metric_pool(METRIC_SEED, SIZES["classifier_pool"])
        pool = {"images": torch.from_numpy(world.to_uint8(images)), "labels": scene_labels(scenes)}
        run.save("classifier_pool", pool)
    torch.manual_seed(12)
    classifier = sw_models.AttributeClassifier()
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=2e-3, weight_decay=1e-4)
    images, labels = pool["images"], pool["labels"]
    train_n = len(images) - SIZES["classifier_validation"]

    def step(i, generator):
        picked = torch.randint(train_n, (BATCH["classifier"],), generator=generator)
        out = classifier(augment(images_to_float(images[picked]), generator))
        loss = sum(F.cross_entropy(out[k], labels[k][picked]) for k in out)
        return descend(optimizer, loss)

    if not train_loop(run, "classifier_training", STEPS["classifier"], {"classifier": classifier}, optimizer, step,
                      warmup_cosine(2e-3, STEPS["classifier"], 100, floor=0.02)):
        return False
    classifier.eval()
    held = torch.arange(train_n, len(images))
    with torch.no_grad():
        out = classifier(images_to_float(images[held]))
    accuracy = {k: float((out[k].argmax(1) == labels[k][held]).float().mean()) for k in out}
    from safetensors.torch import save_file

    save_file(classifier.state_dict(), str(run.work / "classifier.safetensors"))
    run.note("classifier", accuracy_on_renders=accuracy)
    print(f"[classifier] accuracy on unseen renders: {accuracy}", flush=True)
    return True


def encoder_pool(seed: int, scenes_per_instance: int) -> dict:
    """Every instance on its own side of several random scenes (random background, side, companion, jitter)."""
    sampler = world.SceneSampler(seed, world.all_instances(include_held_out=True))
    instances = world.all_instances(include_held_out=True)
    scenes, sides, ids = [], [], []
    for index, instance in enumerate(instances):
        for _ in range(scenes_per_instance):
            scene, side = sampler.featuring(instance)
            scenes.append(scene)
            sides.append(side)
            ids.append(index)
    images, _ = world.render(scenes)
    crops = torch.stack([sw_models.half(image, side) for image, side in zip(images, sides)])
    return {"crops": torch.from_numpy(world.to_uint8(crops)), "ids": torch.tensor(ids),
            "keys": [i.key for i in instances]}


def _train_encoder(run: Run) -> bool:
    if (run.work / "encoder.safetensors").exists():
        return True
    pool = run.load("encoder_pool")
    if pool is None:
        pool = encoder_pool(METRIC_SEED + 100, SIZES["encoder_views"])
        run.save("encoder_pool", pool)
    crops, ids = pool["crops"], pool["ids"]
    n_instances = int(ids.max()) + 1
    per_instance = len(ids) // n_instances
    torch.manual_seed(13)
    encoder = sw_models.InstanceEncoder()
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=2e-3, weight_decay=1e-4)
    train_views = per_instance - 2  # the last two scenes of every instance are kept for validation

    def step(i, generator):
        # 64 instances x 4 scenes each; supervised contrastive loss over instance identity
        instances = torch.randperm(n_instances, generator=generator)[: BATCH["encoder"] // 4]
        views = torch.stack([torch.randperm(train_views, generator=generator)[:4] for _ in instances])
        picked = (instances[:, None] * per_instance + views).flatten()
        emb = encoder(augment(images_to_float(crops[picked]), generator))
        labels = ids[picked]
        logits = emb @ emb.T / 0.1
        logits.fill_diagonal_(-1e9)
        same = (labels[:, None] == labels[None, :]).float()
        same.fill_diagonal_(0)
        loss = -(same * logits.log_softmax(1)).sum(1).div(same.sum(1)).mean()
        return descend(optimizer, loss)

    if not train_loop(run, "encoder_training", STEPS["encoder"], {"encoder": encoder}, optimizer, step,
                      warmup_cosine(2e-3, STEPS["encoder"], 100, floor=0.02)):
        return False
    encoder.eval()
    from safetensors.torch import save_file

    save_file(encoder.state_dict(), str(run.work / "encoder.safetensors"))
    print("[encoder] done", flush=True)
    return True


def _frozen_text_states(run: Run, captions: list[str]) -> torch.Tensor:
    """Last hidden states of the frozen text tower for every distinct caption, and "" last (for guidance)."""
    from transformers import CLIPModel

    tokenizer = clip_tokenizer()
    clip = CLIPModel.from_pretrained(run.work / "clip").eval()
    states = []
    with torch.no_grad():
        for start in range(0, len(captions) + 1, 256):
            chunk = (captions + [""])[start : start + 256]
            ids = tokenizer(chunk, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            states.append(clip.text_model(input_ids=ids).last_hidden_state)
    return torch.cat(states)


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """Min-SNR-γ loss weights for ε-prediction (Hang et al. 2023): min(SNR, γ) / SNR."""
    snr = alphas_cumprod[timesteps] / (1 - alphas_cumprod[timesteps])
    return snr.clamp(max=gamma) / snr


def stage_unet(run: Run, args) -> bool:
    from diffusers import DDPMScheduler, UNet2DConditionModel

    if (run.work / "unet" / "config.json").exists():
        return True
    data, latents = _data(run), run.load("latents")
    scaling = run.log["vae"]["scaling_factor"]
    states = _frozen_text_states(run, data["captions"])
    empty = len(data["captions"])
    caption_index = data["caption_index"]
    mean, std = latents["mean"], latents["std"]
    scheduler = DDPMScheduler(**sw_models.noise_scheduler_config())
    alphas = scheduler.alphas_cumprod.float()
    torch.manual_seed(14)
    unet = UNet2DConditionModel(**sw_models.unet_config())
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.unet_lr, weight_decay=0.01)
    ema = EMA(unet, UNET_EMA_DECAY["stage1" if args.stage1 else "full"])
    total = args.unet_steps or STEPS["unet"]

    def step(i, generator):
        picked = torch.randint(len(mean), (BATCH["unet"],), generator=generator)
        z0 = (mean[picked].float() + std[picked].float() * torch.randn(mean[picked].shape, generator=generator)) * scaling
        which = caption_index[picked].clone()
        which[torch.rand(len(which), generator=generator) < 0.1] = empty  # caption dropout, for guidance
        noise = torch.randn(z0.shape, generator=generator)
        t = torch.randint(0, 1000, (len(z0),), generator=generator)
        noisy = scheduler.add_noise(z0, noise, t)
        prediction = unet(noisy, t, encoder_hidden_states=states[which]).sample
        loss = ((prediction - noise) ** 2).mean(dim=(1, 2, 3)).mul(min_snr_weights(alphas, t)).mean()
        value = descend(optimizer, loss, unet.parameters())
        ema.update(unet)
        return value

    if not train_loop(run, "unet_training", total, {"unet": unet}, optimizer, step,
                      warmup_cosine(args.unet_lr, total, 500, floor=0.1), ema=ema):
        return False
    unet.load_state_dict(ema.state_dict())
    unet.eval().save_pretrained(run.work / "unet")
    print("[unet] done", flush=True)
    return True


# ------------------------------------------------------------------------------------------ the gate

def load_world_model(folder: Path, unet_state: dict | None = None):
    """An engine DiffusionModel from the work folder's parts."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPModel, CLIPTextModel

    clip = CLIPModel.from_pretrained(folder / "clip").eval()
    text_encoder = CLIPTextModel(clip.config.text_config).eval()
    text_encoder.load_state_dict(clip.text_model.state_dict())
    unet = UNet2DConditionModel(**sw_models.unet_config()) if unet_state is not None else UNet2DConditionModel.from_pretrained(folder / "unet")
    if unet_state is not None:
        unet.load_state_dict(unet_state)
    return DiffusionModel(unet=unet.eval(), vae=AutoencoderKL.from_pretrained(folder / "vae").eval(), text_encoder=text_encoder,
                          tokenizer=clip_tokenizer(), noise_scheduler=DDPMScheduler(**sw_models.noise_scheduler_config()),
                          family="sd1", name="shapesworld")


# The base-model gate: what generated samples must score, read back by the attribute classifier.
GATE = {"background": 0.9, "position": 0.9, "class": 0.7, "colour": 0.7}


def gate_scenes(n: int) -> list[world.Scene]:
    return world.SceneSampler(GATE_SEED).scenes(n)


def sample_scenes(model, scenes: list[world.Scene], guidance: float, steps: int = 25, seed: int = 0, batch: int = 32) -> torch.Tensor:
    """One picture per scene from its caption, in batches; picture n's noise comes from seed + n."""
    pipeline = model.pipeline()
    pipeline.set_progress_bar_config(disable=True)
    images = []
    for start in range(0, len(scenes), batch):
        chunk = scenes[start : start + batch]
        generators = [torch.Generator().manual_seed(seed + start + k) for k in range(len(chunk))]
        with torch.no_grad():
            out = pipeline([s.caption() for s in chunk], num_inference_steps=steps, guidance_scale=guidance,
                           generator=generators, output_type="pt", height=world.IMAGE_SIZE, width=world.IMAGE_SIZE)
        images.append(out.images.float().cpu())
    return torch.cat(images)


def stage_gate(run: Run, args) -> dict:
    if args.model:  # an exported folder (e.g. the shipped one): loaded the way users load it
        model = load_model(Path(args.model))
    else:
        unet_state = None
        if not (run.work / "unet" / "config.json").exists():
            state = run.load("unet_training")
            if state is None:
                raise SystemExit("no UNet yet: run the unet stage first")
            unet_state = state["ema"]
            print(f"[gate] using the EMA weights of the UNet checkpoint at step {state['step']}", flush=True)
        model = load_world_model(run.work, unet_state)
    classifier = load_classifier(run.work / "classifier.safetensors")
    scenes = gate_scenes(args.gate_samples)
    real, _ = world.render(scenes)
    report = {"renders": scene_accuracy(classifier, real, scenes)}
    with torch.no_grad():
        recon = (model.vae.decode(model.vae.encode(real * 2 - 1).latent_dist.mean).sample + 1) / 2
    report["vae_reconstructions"] = scene_accuracy(classifier, recon.clamp(0, 1), scenes)
    for guidance in args.guidance:
        started = time.monotonic()
        generated = sample_scenes(model, scenes, guidance)
        scores = report[f"samples_cfg{guidance:g}"] = scene_accuracy(classifier, generated, scenes)
        verdict = "met" if all(scores[k] >= v for k, v in GATE.items()) else "MISSED"
        print(f"[gate] guidance {guidance:g}: {scores} ({time.monotonic() - started:.0f} s); gate {GATE}: {verdict}", flush=True)
        if args.grid:
            shown = generated[:64]
            world.save_grid([shown[k : k + 8] for k in range(0, len(shown), 8)], run.work / f"gate_cfg{guidance:g}.png")
    print(json.dumps(report, indent=2), flush=True)
    run.note("gate", **report)
    return report


# ------------------------------------------------------------------------------------------ export

def hub_layout_names(path: Path) -> None:
    """Name a saved CLIPTextModel's tensors as the hub's SD folders do ("text_model." first): transformers 5 saves
    them without that level, which transformers 4 cannot read; the hub's names load in both."""
    from safetensors.torch import load_file

    tensors = load_file(path)
    save_safetensors({"text_model." + name.removeprefix("text_model."): t for name, t in tensors.items()}, path,
                     metadata={"format": "pt"})


def stage_export(run: Run, args) -> None:
    """fp16 safetensors in the diffusers SD1 layout into the package, plus the metric models."""
    from diffusers import DDPMScheduler
    from transformers import CLIPModel, CLIPVisionModelWithProjection

    export_dir, metric_dir = args.export_dir, args.metric_dir
    model = load_world_model(run.work)
    tmp = export_dir.with_name(export_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.unet.to(torch.float16).save_pretrained(tmp / "unet", variant="fp16")
    model.vae.to(torch.float16).save_pretrained(tmp / "vae", variant="fp16")
    model.text_encoder.to(torch.float16).save_pretrained(tmp / "text_encoder", variant="fp16")
    hub_layout_names(tmp / "text_encoder" / "model.fp16.safetensors")
    DDPMScheduler(**sw_models.noise_scheduler_config()).save_pretrained(tmp / "scheduler")
    for part in ("unet", "vae"):  # diffusers records the work folder it loaded from; it means nothing shipped
        config_file = tmp / part / "config.json"
        config = json.loads(config_file.read_text())
        config.pop("_name_or_path", None)
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    clip = CLIPModel.from_pretrained(run.work / "clip")
    vision = CLIPVisionModelWithProjection(clip.config.vision_config)
    vision.vision_model.load_state_dict(clip.vision_model.state_dict())
    vision.visual_projection.load_state_dict(clip.visual_projection.state_dict())
    vision.to(torch.float16).save_pretrained(tmp / "clip_vision", variant="fp16")
    (tmp / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "scheduler": ["diffusers", "DDPMScheduler"],
        "tokenizer": [None, None], "safety_checker": [None, None], "feature_extractor": [None, None],
        "requires_safety_checker": False}, indent=2))
    shutil.rmtree(export_dir, ignore_errors=True)
    tmp.replace(export_dir)
    metric_dir.mkdir(parents=True, exist_ok=True)
    for name in ("classifier", "encoder"):
        shutil.copyfile(run.work / f"{name}.safetensors", metric_dir / f"{name}.safetensors")
    (metric_dir / "training_log.json").write_text(json.dumps(run.log, indent=2))
    size = sum(p.stat().st_size for p in list(export_dir.rglob("*")) + list(metric_dir.rglob("*")) if p.is_file())
    print(f"[export] wrote {export_dir} and {metric_dir}: {size / 2**20:.1f} MiB in all", flush=True)


STAGES = {"data": stage_data, "vae": stage_vae, "clip": stage_clip, "metric": stage_metric, "unet": stage_unet,
          "gate": stage_gate, "export": stage_export}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("stage", choices=("all", *STAGES), help="which stage to run ('all': every stage in order)")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="folder for data and checkpoints (outside the repository)")
    parser.add_argument("--minutes", type=float, help="stop this working stretch after about this long (resume later)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    parser.add_argument("--unet-steps", type=int, help=f"UNet steps (default {STEPS['unet']})")
    parser.add_argument("--unet-batch", type=int, help=f"UNet batch (default {BATCH['unet']})")
    parser.add_argument("--unet-lr", type=float, default=UNET_LEARNING_RATE, help="peak UNet learning rate")
    parser.add_argument("--gate-samples", type=int, default=256, help="captions sampled for the gate")
    parser.add_argument("--guidance", type=float, nargs="+", default=[3.0], help="classifier-free guidance scale(s) for the gate")
    parser.add_argument("--grid", action="store_true", help="also save a grid of gate samples into --work")
    parser.add_argument("--model", help="gate: an exported model folder instead of the work folder")
    parser.add_argument("--export-dir", type=Path, default=EXPORT_DIR, help="export: where the diffusion model goes")
    parser.add_argument("--metric-dir", type=Path, default=METRIC_DIR, help="export: where the metric models go")
    parser.add_argument("--stage1", action="store_true",
                        help="the stage-1 recipe check: less data and fewer steps (about 30 CPU-minutes at one thread), "
                             "gated with the shipped classifier; 'all' then runs data, vae, clip, unet, gate")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny data and a few steps per stage, exported inside --work: checks the pipeline, not quality")
    args = parser.parse_args(argv)
    if args.unet_batch:
        BATCH["unet"] = args.unet_batch
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop like Ctrl-C: checkpoint, then exit
    if args.smoke:
        if args.work == DEFAULT_WORK:
            parser.error("--smoke needs its own --work folder")
        SIZES.update(SMOKE_SIZES)
        STEPS.update({name: 3 for name in STEPS})
        args.export_dir, args.metric_dir = args.work / "export" / "shapesworld", args.work / "export" / "metric"
        args.gate_samples = min(args.gate_samples, 4)
    stages = list(STAGES) if args.stage == "all" else [args.stage]
    if args.stage1:
        if args.work == DEFAULT_WORK:
            parser.error("--stage1 needs its own --work folder")
        SIZES.update(STAGE1_SIZES)
        STEPS.update(STAGE1_STEPS)
        stages = [s for s in stages if s not in ("metric", "export")]
        args.work.mkdir(parents=True, exist_ok=True)
        classifier = args.work / "classifier.safetensors"
        if not classifier.exists():
            shutil.copyfile(METRIC_DIR / "classifier.safetensors", classifier)
    torch.set_num_threads(args.threads)
    run = Run(args.work, args.minutes)
    for name in stages:
        if STAGES[name](run, args) is False:
            return 0  # out of time for this stretch; the next run continues
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
