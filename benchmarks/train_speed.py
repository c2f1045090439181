"""Training speed and memory: our one-shot trainer against a DreamBooth-LoRA reference loop.

Six sides train the same model (same seeded weights, resolution, LoRA rank/alpha/target modules,
batch of 1 instance + 1 class image, fp32 unless the side says):

- ours: OneShotTrainer as in real use (class prior on, the new token trained through the text encoder,
  text anchor, object mask). Its class images are drawn once beforehand in a separate child and
  cached: that one-off cost is reported on its own, outside step time and peak memory.
- ours-ckpt: the same with gradient checkpointing on (TrainSettings.gradient_checkpointing): what the
  memory-saving switch costs in time and buys in memory.
- ours-bf16: the same in bf16 as ProtoBooth trains a model it loads (CLI, batch) with
  mixed_precision="bf16": the frozen weights stored in bf16 (no fp32 copy, no casts), the LoRA, token vectors
  and optimiser state in fp32. On a CPU bf16 pays only where it has bf16 matrix units (e.g. AMX).
- ours-autocast: bf16 autocast over the fp32 model, what the trainer does with a full-precision model handed
  to it with mixed_precision="bf16" (it keeps bf16 copies of the frozen weights for the backward pass).
- reference: a loop in the manner of diffusers' examples/dreambooth/train_dreambooth_lora.py with prior
  preservation: every step VAE-encodes the instance and class image (latent_dist.sample × scaling),
  text-encodes both prompts, runs them as one UNet batch, loss = instance MSE + prior_weight × prior
  MSE, peft LoRA, AdamW, gradient clipping. It gets its images as in-memory tensors (no per-step file
  loading or resizing), which if anything flatters it.
- bare: only the UNet with the same LoRA, forward + MSE + backward + AdamW on a batch of 2 of the same
  shapes: the floor any trainer pays.

Every side runs in its own child process, which reports its peak RSS (and peak CUDA memory on a GPU).
Steps alternate between the sides in rounds, so machine noise hits all of them alike. For the tiny model
the children stay alive for the whole run; SD1.5-size children take about 6 GB each, so only one
is alive at a time and every round starts a fresh, warmed-up child per side.

Per side the table gives the median wall-clock step time (the figure the targets use), the median CPU
time per step (with one thread, what the step costs whatever else the machine runs) and the floating-
point operations of one step (no load can change it).

    python benchmarks/train_speed.py           # tiny model, then SD1.5-size UNet/VAE/CLIP-L at 256 px
    python benchmarks/train_speed.py --quick   # tiny model only (well under two minutes)
    python benchmarks/train_speed.py --profile # where one SD1.5-size step of ours goes beyond bare's
    python benchmarks/train_speed.py --profile --profile-sides ours-autocast ours-bf16   # what autocast casts
    python benchmarks/train_speed.py --sd15-only --resolution 64 --bf16-anyway   # memory of every side

On a CPU without bf16 matrix units the bf16 sides are left out (they run 70-110x slower there); the last
command measures them anyway at a resolution small enough to finish, for their memory. On a GPU use
benchmarks/gpu_check.py.

The output ends with `time ratio: X.XX` and `memory ratio: X.XX` (ours / reference) for the last size
measured: SD1.5 size, or the tiny model with --quick. The exit status is 0 whether targets are met or not.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from checkout import import_this_checkout  # noqa: E402

import_this_checkout()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from protobooth.engine.train.losses import diffusion_target  # noqa: E402
from protobooth.engine.train import DEFAULT_TEMPLATES, LORA_TARGETS, TrainSettings  # noqa: E402

SEED = 0
LORA_RANK = 8
TOKEN, CLASS_WORD = "zqcat", "cat"
PRIOR_STEPS = 4  # sampler steps per class image; only the one-off generation depends on it
SIDES = ("ours", "ours-ckpt", "ours-bf16", "ours-autocast", "reference", "bare")
OUR_VARIANTS = {"ours": {}, "ours-ckpt": {"gradient_checkpointing": True}, "ours-bf16": {"mixed_precision": "bf16"},
                "ours-autocast": {"mixed_precision": "bf16"}}
BF16_SIDES = ("ours-bf16", "ours-autocast")
STORED_BF16 = {"ours-bf16", "prior-bf16"}  # jobs whose model is built with its weights in bf16
# (side/other, what): the limit. The fp32 ones against the reference date from the first speed issue; the
# half-precision ones and the 1.05 against bare from the fast-and-lean one.
TARGETS = {("ours", "reference", "time"): 0.6, ("ours", "reference", "memory"): 0.8, ("ours", "bare", "time"): 1.05,
           ("ours-bf16", "reference", "time"): 0.45, ("ours-bf16", "reference", "memory"): 0.6}


@dataclass(frozen=True)
class Size:
    name: str
    resolution: int
    rounds: int
    warmup: int  # untimed steps at the start of each child (at least 1: the first one counts the FLOPs)
    steps: int  # timed steps per side per round
    keep_alive: bool  # one child per side for the whole run (else a fresh one per round)


SIZES = {
    "tiny": Size("tiny", 64, rounds=5, warmup=3, steps=20, keep_alive=True),
    "sd15": Size("sd15", 256, rounds=2, warmup=1, steps=3, keep_alive=False),
}


# --------------------------------------------------------------------------------------------------
# the models


def build_model(size: str, device: str, dtype: torch.dtype = torch.float32):
    """The tiny test model, or SD1.5's UNet, VAE and CLIP-L text encoder with seeded random weights (size "sdxl":
    SDXL's UNet, VAE and two text encoders; training_memory.py measures it).

    In another dtype the weights are drawn in it (the same seed, so close to the fp32 ones but not equal): an
    fp32 model cast afterwards would put the fp32 copy into the peak memory."""
    from protobooth.engine.models import tiny

    if size == "tiny":
        with _default_dtype(dtype):
            return tiny.tiny_model(SEED).to(device)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from protobooth.engine.models.diffusion_model import DiffusionModel
    from protobooth.engine.models.families import noise_scheduler
    from protobooth.engine.text.tokenizer import clip_tokenizer

    if size == "sdxl":
        return _build_sdxl(device, dtype)
    with torch.random.fork_rng(devices=[]), _default_dtype(dtype):
        torch.manual_seed(SEED)
        unet = UNet2DConditionModel(
            sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
            cross_attention_dim=768, attention_head_dim=8,
        )
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            scaling_factor=0.18215,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        ))
    model = DiffusionModel(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(),
                           tokenizer=clip_tokenizer(pad_token="<|endoftext|>"),
                           noise_scheduler=noise_scheduler("epsilon"), family="sd1", name="sd15-random")
    return model.to(device)


def _build_sdxl(device: str, dtype: torch.dtype):
    """SDXL base's architecture (2.6 G UNet parameters, CLIP-L + bigG, its VAE) with seeded random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from protobooth.engine.models.diffusion_model import DiffusionModel
    from protobooth.engine.models.families import family, noise_scheduler
    from protobooth.engine.models.sdxl import SDXLTextEncoder, text_configs
    from protobooth.engine.text.tokenizer import clip_tokenizer

    with torch.random.fork_rng(devices=[]), _default_dtype(dtype):
        torch.manual_seed(SEED)
        unet = UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=1024,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            scaling_factor=family("sdxl").latent_scaling,
        )
        config_l, config_g = text_configs(width_l=768, width_g=1280, layers_l=12, layers_g=32, heads_l=12, heads_g=20,
                                          projection=1280)
        text_encoder = SDXLTextEncoder(CLIPTextModel(config_l).eval(), CLIPTextModelWithProjection(config_g).eval())
    model = DiffusionModel(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(),
                           tokenizer=clip_tokenizer(), noise_scheduler=noise_scheduler("epsilon"), family="sdxl",
                           name="sdxl-random")
    return model.to(device)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def scene(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A flat picture with one coloured block, and the block's mask (content does not affect speed)."""
    mask = torch.zeros(size, size)
    mask[size // 4 : 3 * size // 4, size // 5 : 3 * size // 5] = 1
    image = torch.full((3, size, size), 0.5)
    image[:, mask > 0] = torch.tensor([0.9, 0.3, 0.1])[:, None]
    return image, mask


def our_settings(resolution: int, **variant) -> TrainSettings:
    # steps is raised as the benchmark asks for more; fp32 (unless the variant says otherwise) on every
    # device so the sides compute alike.
    return TrainSettings.from_values(**{**dict(steps=1, lora_rank=LORA_RANK, prior_images=1, prior_steps=PRIOR_STEPS,
                                               resolution=resolution, mixed_precision="no", seed=SEED), **variant})


def cached_class_latents(model, resolution: int, cache: Path) -> torch.Tensor:
    """The class latents our trainer uses (the same call it makes, so the second call reads the cache)."""
    from protobooth.engine.train.class_prior import class_latents

    s = our_settings(resolution)
    prior = s.method
    return class_latents(model, prior.class_prompt.format(CLASS_WORD), prior.prior_images, resolution, s.seed,
                         prior.prior_steps, prior.prior_guidance, cache)


def attach_lora(unet, rank: int, seed: int) -> list[torch.nn.Parameter]:
    """peft LoRA on the attention projections, as diffusers' example adds it; returns the fp32 trainables."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    parameters = [p for p in unet.parameters() if p.requires_grad]
    for p in parameters:
        p.data = p.data.float()
    return parameters


# --------------------------------------------------------------------------------------------------
# the loops


class DreamBoothLoraReference:
    """DreamBooth-LoRA training with prior preservation, step for step as diffusers' example does it."""

    def __init__(self, model, instance_image: torch.Tensor, class_image: torch.Tensor, instance_prompt: str,
                 class_prompt: str, rank: int = LORA_RANK, learning_rate: float = 1e-4, prior_weight: float = 1.0,
                 max_grad_norm: float = 1.0, seed: int = SEED):
        self.model = model
        self.prior_weight = prior_weight
        self.max_grad_norm = max_grad_norm
        model.vae.requires_grad_(False)
        model.text_encoder.requires_grad_(False)
        self.lora_parameters = attach_lora(model.unet, rank, seed)
        self.optimizer = torch.optim.AdamW(self.lora_parameters, lr=learning_rate, betas=(0.9, 0.999),
                                           weight_decay=1e-2, eps=1e-8)
        # What its data loader hands over each step: uint8 pixels and token ids, instance then class.
        self.images = torch.stack([instance_image, class_image])
        self.input_ids = model.tokenizer([instance_prompt, class_prompt], padding="max_length", truncation=True,
                                         max_length=model.tokenizer.model_max_length, return_tensors="pt").input_ids
        self.generator = torch.Generator().manual_seed(seed)

    def step(self) -> float:
        model, device = self.model, self.model.device
        pixels = (self.images.float() / 127.5 - 1).to(device, model.vae.dtype)
        latents = model.vae.encode(pixels).latent_dist.sample(generator=self.generator) * model.latent_scaling
        states = model.text_encoder(self.input_ids.to(device))[0]
        noise = torch.randn(latents.shape, generator=self.generator).to(latents)
        timesteps = torch.randint(0, model.noise_scheduler.config.num_train_timesteps, (len(latents),),
                                  generator=self.generator).to(device)
        noisy = model.noise_scheduler.add_noise(latents, noise, timesteps)
        target = diffusion_target(model.noise_scheduler, latents, noise, timesteps)
        prediction = model.unet(noisy, timesteps, encoder_hidden_states=states).sample
        instance_prediction, prior_prediction = prediction.chunk(2)
        instance_target, prior_target = target.chunk(2)
        loss = F.mse_loss(instance_prediction.float(), instance_target.float())
        loss = loss + self.prior_weight * F.mse_loss(prior_prediction.float(), prior_target.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.lora_parameters, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad()
        return float(loss.detach())


class BareUNetLoop:
    """Only the LoRA'd UNet: forward + MSE + backward + AdamW on fixed inputs of the training shapes."""

    def __init__(self, model, resolution: int, batch: int = 2, rank: int = LORA_RANK, learning_rate: float = 1e-4,
                 seed: int = SEED):
        self.unet = model.unet
        self.lora_parameters = attach_lora(model.unet, rank, seed)
        self.optimizer = torch.optim.AdamW(self.lora_parameters, lr=learning_rate, weight_decay=1e-2)
        generator = torch.Generator().manual_seed(seed)
        side = resolution // model.vae_scale_factor
        config, device = model.unet.config, model.device
        text_length = model.tokenizer.model_max_length
        self.latents = torch.randn(batch, config.in_channels, side, side, generator=generator).to(device)
        self.states = torch.randn(batch, text_length, config.cross_attention_dim, generator=generator).to(device)
        self.timesteps = torch.randint(0, 1000, (batch,), generator=generator).to(device)
        self.target = torch.randn(self.latents.shape, generator=generator).to(device)

    def step(self) -> float:
        prediction = self.unet(self.latents, self.timesteps, encoder_hidden_states=self.states).sample
        loss = F.mse_loss(prediction, self.target)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


def _clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _step_times(marks: list[tuple[float, float]]) -> dict[str, list[float]]:
    """Wall-clock and CPU seconds between consecutive (wall, cpu) marks."""
    return {"wall": [b[0] - a[0] for a, b in zip(marks, marks[1:])],
            "cpu": [b[1] - a[1] for a, b in zip(marks, marks[1:])]}


def _timed_steps(step, n: int) -> dict[str, list[float]]:
    marks = [_clocks()]
    for _ in range(n):
        step()
        marks.append(_clocks())
    return _step_times(marks)


def _to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """[3,H,W] in -1..1 → uint8, as a class image saved to disk and loaded again would be."""
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def prepare_side(side: str, model, resolution: int, cache: Path, stack: contextlib.ExitStack):
    """Set up one side; returns run(n) → its n steps' wall-clock and CPU seconds."""
    image, mask = scene(resolution)
    if side in OUR_VARIANTS:
        from protobooth.engine.train import OneShotTrainer

        cached = sorted(cache.rglob("*.safetensors"))
        settings = our_settings(resolution, **OUR_VARIANTS[side])
        trainer = stack.enter_context(OneShotTrainer(model, image, [mask], [TOKEN], [CLASS_WORD], settings,
                                                     prior_cache=cache))
        if sorted(cache.rglob("*.safetensors")) != cached:
            raise RuntimeError("the trainer drew its own class images: cached_class_latents no longer makes its call")

        def run(n: int) -> dict[str, list[float]]:
            # Timed at the trainer's own progress reports, so its loop is measured too.
            trainer.settings.steps = trainer.step + n
            marks = [_clocks()]
            trainer.train(progress=lambda report: marks.append(_clocks()))
            return _step_times(marks)

        return run
    if side == "reference":
        class_latent = cached_class_latents(model, resolution, cache)[:1].to(model.device)
        with torch.no_grad():
            class_image = model.vae.decode(class_latent / model.latent_scaling).sample[0]
        loop = DreamBoothLoraReference(model, _to_uint8(image * 2 - 1), _to_uint8(class_image),
                                       DEFAULT_TEMPLATES[0].format(f"{TOKEN} {CLASS_WORD}"),
                                       our_settings(resolution).method.class_prompt.format(CLASS_WORD))
        return lambda n: _timed_steps(loop.step, n)
    if side == "bare":
        loop = BareUNetLoop(model, resolution)
        return lambda n: _timed_steps(loop.step, n)
    raise ValueError(side)


# --------------------------------------------------------------------------------------------------
# child process: a side (or the one-off class-image job) behind a line protocol on stdin/stdout


def child_main(job: str, size: str, cache: Path, threads: int, device: str, args) -> None:
    import resource

    import psutil

    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever the libraries print goes to stderr; stdout carries only replies

    def reply(**fields) -> None:
        replies.write(json.dumps(fields) + "\n")

    import diffusers  # noqa: F401  (imported before the memory baseline, like torch)
    import peft  # noqa: F401
    import transformers  # noqa: F401

    torch.set_num_threads(threads)
    import_rss = psutil.Process().memory_info().rss
    resolution = size_named(size, args).resolution
    started = time.perf_counter()
    model = build_model(size, device, torch.bfloat16 if job in STORED_BF16 else torch.float32)
    built = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if job.startswith("prior"):
            cached_class_latents(model, resolution, cache)
            run = None
        else:
            run = prepare_side(job, model, resolution, cache, stack)
        reply(ready=True, build_s=built - started, setup_s=time.perf_counter() - built)
        for line in sys.stdin:
            command, *arguments = line.split()
            if command == "run" and run is not None:
                reply(**run(int(arguments[0])))
            elif command == "flops" and run is not None:
                from torch.utils.flop_counter import FlopCounterMode

                with FlopCounterMode(display=False) as counter:
                    run(1)
                reply(flops=counter.get_total_flops())
            elif command == "profile" and run is not None:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU]) as profiled:
                    run(1)
                reply(ops={e.key: [e.self_cpu_time_total, e.count] for e in profiled.key_averages()})
            elif command == "quit":
                break
            else:
                reply(error=f"unknown command {line.strip()!r}")
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    cuda_peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    reply(peak_rss=peak_rss, import_rss=import_rss, cuda_peak=cuda_peak)


class Child:
    """One child process running a side; started at once, answers in order."""

    def __init__(self, job: str, size: str, cache: Path, args):
        self.job = job
        self.log = tempfile.TemporaryFile("w+")
        command = [sys.executable, str(Path(__file__).resolve()), "--child", job, "--size", size,
                   "--cache", str(cache), "--threads", str(args.threads), "--device", args.device]
        command += ["--resolution", str(args.resolution)] if args.resolution else []
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                        text=True)
        self._ready = None

    def _answer(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            self.log.seek(0)
            tail = self.log.read()[-3000:]
            raise RuntimeError(f"the {self.job} child stopped (exit status {self.process.returncode}):\n{tail}")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"the {self.job} child: {answer['error']}")
        return answer

    def ready(self) -> dict:
        if self._ready is None:
            self._ready = self._answer()
        return self._ready

    def ask(self, command: str) -> dict:
        self.ready()
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._answer()

    def run(self, n: int) -> dict[str, list[float]]:
        return self.ask(f"run {n}") if n else {"wall": [], "cpu": []}

    def warm_up(self, steps: int) -> int:
        """Untimed steps; the first counts its floating-point operations, a figure no machine load can change."""
        flops = self.ask("flops")["flops"]
        self.run(steps - 1)
        return flops

    def finish(self) -> dict:
        stats = self.ask("quit")
        self.process.wait()
        self.log.close()
        return {**self.ready(), **stats}


# --------------------------------------------------------------------------------------------------
# the parent: schedule the children, then report


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def measure(size: Size, cache: Path, args) -> tuple[dict, dict]:
    """Step times and memory per side, and the one-off class-image job's figures."""
    progress(f"{size.name}: drawing the class image")
    prior_stats = Child("prior", size.name, cache, args).finish()
    if STORED_BF16 & set(args.sides):
        progress(f"{size.name}: drawing it again with the bf16 model (other weights, so another cache entry)")
        Child("prior-bf16", size.name, cache, args).finish()
    sides = args.sides
    times = {side: {"wall": [], "cpu": []} for side in sides}
    stats = {side: [] for side in sides}
    flops = {}

    def take(side: str, measured: dict) -> None:
        for clock, values in measured.items():
            times[side][clock] += values

    def order(round_index: int) -> list[str]:
        shift = round_index % len(sides)  # rotate who goes first, so no side always follows the same one
        return list(sides[shift:] + sides[:shift])

    if size.keep_alive:
        children = {side: Child(side, size.name, cache, args) for side in sides}
        for side, child in children.items():
            flops[side] = child.warm_up(size.warmup)
        for round_index in range(size.rounds):
            progress(f"{size.name}: round {round_index + 1} of {size.rounds}")
            for side in order(round_index):
                take(side, children[side].run(size.steps))
        for side, child in children.items():
            stats[side].append(child.finish())
    else:
        for round_index in range(size.rounds):
            for side in order(round_index):
                progress(f"{size.name}: round {round_index + 1} of {size.rounds}, {side}")
                child = Child(side, size.name, cache, args)
                flops[side] = child.warm_up(size.warmup)
                take(side, child.run(size.steps))
                stats[side].append(child.finish())
    results = {}
    for side in sides:
        memory_key = "cuda_peak" if args.device.startswith("cuda") else "peak_rss"
        wall = times[side]["wall"]
        results[side] = {
            "median": statistics.median(wall),
            "min": min(wall),
            "max": max(wall),
            "count": len(wall),
            "cpu": statistics.median(times[side]["cpu"]),
            "flops": flops[side],
            "memory": max(s[memory_key] for s in stats[side]),
            "above_imports": max(s["peak_rss"] - s["import_rss"] for s in stats[side]),
            "setup": statistics.median(s["setup_s"] for s in stats[side]),
        }
    return results, prior_stats


def report(size: Size, results: dict, prior_stats: dict, args) -> dict:
    """Print one size's table and target verdicts; returns its ratios."""
    memory_name = "peak CUDA" if args.device.startswith("cuda") else "peak RSS"
    print(f"\n{size.name} model at {size.resolution} px: LoRA rank {LORA_RANK}, 1 instance + 1 class image, fp32 "
          f"unless the side says, "
          f"{args.device}, {args.threads} thread(s); {size.rounds} rounds × {size.steps} timed steps per side "
          f"after {size.warmup} warm-up step(s) per {'child' if size.keep_alive else 'child and round'}")
    print(f"{'side':<13} {'median step':>12} {'min–max':>17} {'CPU/step':>9} {'GFLOP/step':>11} {'steps':>6} "
          f"{memory_name:>10} {'above imports':>14} {'set-up':>8}")
    for side in args.sides:
        r = results[side]
        spread = f"{r['min']:.3f}–{r['max']:.3f} s"
        print(f"{side:<13} {r['median']:>10.3f} s {spread:>17} {r['cpu']:>7.3f} s {r['flops'] / 1e9:>11.2f} "
              f"{r['count']:>6} {r['memory'] / 2**20:>7.0f} MB {r['above_imports'] / 2**20:>11.0f} MB {r['setup']:>6.1f} s")
    print(f"class images (one-off, outside step time and peak memory): 1 image × {PRIOR_STEPS} sampler steps "
          f"in {prior_stats['setup_s']:.1f} s")

    def ratio(key: str, other: str, side: str = "ours") -> float:
        return results[side][key] / results[other][key]

    print(f"ours/reference: wall time {ratio('median', 'reference'):.2f}, CPU time {ratio('cpu', 'reference'):.2f}, "
          f"compute {ratio('flops', 'reference'):.2f}, peak memory {ratio('memory', 'reference'):.2f} "
          f"(above imports {ratio('above_imports', 'reference'):.2f})")
    print(f"ours/bare: wall time {ratio('median', 'bare'):.2f}, CPU time {ratio('cpu', 'bare'):.2f}, "
          f"compute {ratio('flops', 'bare'):.2f}")
    for variant in [side for side in ("ours-ckpt", "ours-bf16", "ours-autocast") if side in results]:
        print(f"{variant}/reference: wall time {ratio('median', 'reference', variant):.2f}, "
              f"peak memory {ratio('memory', 'reference', variant):.2f} "
              f"(above imports {ratio('above_imports', 'reference', variant):.2f}); "
              f"{variant}/ours: wall time {ratio('median', 'ours', variant):.2f}, "
              f"peak memory {ratio('memory', 'ours', variant):.2f}")
    verdicts = []
    for (side, other, what), limit in TARGETS.items():
        if side not in results:
            verdicts.append(f"{side}/{other} {what} ≤ {limit:.2f}: not measured (side left out, see above)")
            continue
        value = ratio("median" if what == "time" else "memory", other, side)
        verdicts.append(f"{side}/{other} {what} ≤ {limit:.2f}: {'met' if value <= limit else 'MISSED'} ({value:.2f})")
    print(f"targets ({size.name}, wall-clock medians):\n  " + "\n  ".join(verdicts))
    return {"time": ratio("median", "reference"), "memory": ratio("memory", "reference")}


def profile_gap(size: Size, cache: Path, args, shown: int = 20) -> None:
    """One profiled step of two sides (each after its warm-up): the ops where the first spends more, then the other."""
    side, floor = args.profile_sides
    progress(f"{size.name}: profiling one step of {side} and of {floor}")
    for prior in sorted({"prior-bf16" if name in STORED_BF16 else "prior" for name in (side, floor)}):
        Child(prior, size.name, cache, args).finish()
    ops = {}
    for name in (side, floor):
        child = Child(name, size.name, cache, args)
        child.warm_up(size.warmup)
        ops[name] = child.ask("profile")["ops"]
        child.finish()

    def self_ms(name: str, op: str) -> float:
        return ops[name].get(op, [0, 0])[0] / 1000

    def calls(name: str, op: str) -> int:
        return ops[name].get(op, [0, 0])[1]

    totals = {name: sum(v[0] for v in ops[name].values()) / 1000 for name in ops}
    print(f"\n{size.name}, one profiled step (self CPU time, profiler overhead included): {side} {totals[side]:.0f} ms, "
          f"{floor} {totals[floor]:.0f} ms, difference {totals[side] - totals[floor]:.0f} ms; the ops where {side} "
          f"spends more:")
    names = sorted(set(ops[side]) | set(ops[floor]), key=lambda op: self_ms(floor, op) - self_ms(side, op))

    def table(rows: list[str]) -> None:
        print(f"{'op':<44} {side[:9]:>9} {'calls':>6} {floor[:9]:>9} {'calls':>6} {'more ms':>8}")
        for op in rows:
            print(f"{op[:44]:<44} {self_ms(side, op):>9.1f} {calls(side, op):>6} {self_ms(floor, op):>9.1f} "
                  f"{calls(floor, op):>6} {self_ms(side, op) - self_ms(floor, op):>8.1f}")

    table(names[:shown])
    print(f"and the ops where {floor} spends more:")
    table(names[::-1][:shown // 2])


def size_named(name: str, args) -> Size:
    """A size of SIZES, the SD1.5 one at --resolution (with one round of one step: a memory check) if given."""
    size = SIZES[name]
    if name == "sd15" and args.resolution:
        return Size(size.name, args.resolution, rounds=1, warmup=1, steps=1, keep_alive=False)
    return size


def chosen_sides(args) -> tuple[str, ...]:
    """Every side, less the bf16 ones on a CPU that computes bf16 in software (they would take hours)."""
    from protobooth.engine.models.precision import cpu_has_bf16_units

    if args.device.startswith("cuda") or cpu_has_bf16_units() or args.bf16_anyway:
        return SIDES
    print(f"left out: {', '.join(BF16_SIDES)}: this CPU has no bf16 matrix units (AVX512-BF16 or AMX), so their steps "
          "would run 70-110x slower than fp32 and say nothing about bf16 where it is used (GPUs, AMX CPUs); "
          "--bf16-anyway measures them all the same (use it with --resolution 64 for the memory at SD1.5 size)",
          flush=True)
    return tuple(side for side in SIDES if side not in BF16_SIDES)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the tiny model only")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in each child (more than 1 on a busy shared CPU makes timings erratic)")
    parser.add_argument("--device", default="cpu", help="torch device for the models")
    parser.add_argument("--sd15-only", action="store_true", help="skip the tiny model")
    parser.add_argument("--resolution", type=int,
                        help="the SD1.5 size at this resolution instead, one round of one step per side (a memory check)")
    parser.add_argument("--bf16-anyway", action="store_true",
                        help="measure the bf16 sides even on a CPU without bf16 matrix units (slow)")
    parser.add_argument("--profile", action="store_true",
                        help="instead of timing: profile one step of two sides and list where the first spends more")
    parser.add_argument("--profile-sides", nargs=2, choices=SIDES, default=("ours", "bare"), metavar=("SIDE", "FLOOR"),
                        help="the two sides --profile compares (e.g. ours-autocast ours-bf16: autocast's weight casts)")
    parser.add_argument("--child", choices=("prior", "prior-bf16") + SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=tuple(SIZES), help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args.child, args.size, args.cache, args.threads, args.device, args)
        return 0
    started = time.perf_counter()
    sizes = ["tiny"] if args.quick else ["sd15"] if args.sd15_only else ["tiny", "sd15"]
    if args.profile:
        with tempfile.TemporaryDirectory(prefix="protobooth-bench-cache-") as cache:
            profile_gap(size_named(sizes[-1], args), Path(cache), args)
        return 0
    args.sides = chosen_sides(args)
    with tempfile.TemporaryDirectory(prefix="protobooth-bench-cache-") as cache:
        for size in (size_named(name, args) for name in sizes):
            results, prior_stats = measure(size, Path(cache), args)
            ratios = report(size, results, prior_stats, args)
    print(f"\nwhole run: {time.perf_counter() - started:.0f} s; the ratios below are for the {sizes[-1]} model")
    print(f"time ratio: {ratios['time']:.2f}")
    print(f"memory ratio: {ratios['memory']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
