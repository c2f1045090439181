"""The GPU check: SD1.5-size training in half precision on a CUDA device, in one short run.

What it measures, for fp16 and bf16 (bf16 only where the GPU has it), at 512 px with SD1.5's UNet, VAE and
CLIP-L text encoder (seeded random weights, built on the device in the half dtype, as ProtoBooth loads a
model it trains):

- the step of ours (OneShotTrainer: class prior, token through the text encoder, object mask), of a
  diffusers-style DreamBooth-LoRA loop and of a bare UNet + LoRA step (the loops of train_speed.py, here
  with the frozen weights in the half dtype and the LoRA in fp32 under autocast, as diffusers' script
  runs with --mixed_precision): median seconds per step and peak CUDA memory of each;
- ours with the text path frozen (train_tokens off) with and without offload_frozen (the VAE and text encoder
  on the CPU while the UNet trains): the GPU memory the offload saves;
- one concept end to end as a user gets it: the class images (4 × 25 sampler steps), then 400 steps.

    python benchmarks/gpu_check.py              # on cuda, a few minutes on a recent GPU
    python benchmarks/gpu_check.py --dry-run    # the same plumbing on the CPU: tiny model, bf16, a few steps

The suite never needs a GPU: tests/test_train_speed_benchmark.py runs the dry run.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import train_speed  # noqa: E402  (also puts this checkout's protobooth on the path)

import torch  # noqa: E402


def plan(dry_run: bool) -> dict:
    if dry_run:
        return dict(device="cpu", size="tiny", resolution=64, dtypes=[torch.bfloat16], warmup=1, steps=2,
                    concept_steps=3, prior_images=1, prior_steps=2)
    return dict(device="cuda", size="sd15", resolution=512, dtypes=half_dtypes(), warmup=3, steps=10,
                concept_steps=400, prior_images=4, prior_steps=25)


def half_dtypes() -> list[torch.dtype]:
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; run it where there is one, or pass --dry-run to test it "
                         "on the CPU.")
    return [torch.float16] + ([torch.bfloat16] if torch.cuda.is_bf16_supported() else [])


def settings_name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak(device: str) -> int | None:
    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else None


def _reset(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def model_on(p: dict, dtype: torch.dtype):
    """The seeded model built directly on the device in `dtype` (no fp32 copy anywhere)."""
    with torch.device(p["device"]):
        return train_speed.build_model(p["size"], p["device"], dtype)


FROZEN_TEXT = {"train_tokens": False, "text_anchor_weight": 0.0}
OUR_SIDES = {"ours": {}, "ours-frozen": FROZEN_TEXT, "ours-offload": {**FROZEN_TEXT, "offload_frozen": True}}


def time_side(side: str, p: dict, dtype: torch.dtype, cache: Path) -> dict:
    """Median step seconds and peak memory of one side, in a model of its own."""
    _reset(p["device"])
    model = model_on(p, dtype)
    with contextlib.ExitStack() as stack:
        if side in OUR_SIDES:
            image, mask = train_speed.scene(p["resolution"])
            settings = train_speed.our_settings(p["resolution"], mixed_precision=settings_name(dtype), **OUR_SIDES[side])
            from protobooth.engine.train import OneShotTrainer

            trainer = stack.enter_context(OneShotTrainer(model, image, [mask], [train_speed.TOKEN],
                                                         [train_speed.CLASS_WORD], settings, prior_cache=cache))

            def step():
                trainer.settings.steps = trainer.step + 1
                trainer.train()
        else:
            # diffusers' script under --mixed_precision: half weights, fp32 LoRA, autocast around the forward.
            if side == "reference":
                class_image = torch.randint(0, 256, (3, p["resolution"], p["resolution"]), dtype=torch.uint8)
                image, _ = train_speed.scene(p["resolution"])
                loop = train_speed.DreamBoothLoraReference(model, train_speed._to_uint8(image * 2 - 1), class_image,
                                                           "a photo of zqcat cat", "a photo of cat")
            else:
                loop = train_speed.BareUNetLoop(model, p["resolution"])
            stack.enter_context(torch.autocast(p["device"].split(":")[0], dtype=dtype))
            step = loop.step
        seconds = []
        for index in range(p["warmup"] + p["steps"]):
            _synchronize(p["device"])
            started = time.perf_counter()
            step()
            _synchronize(p["device"])
            if index >= p["warmup"]:
                seconds.append(time.perf_counter() - started)
    result = {"median": statistics.median(seconds), "peak": _peak(p["device"])}
    del model
    return result


def one_concept(p: dict, dtype: torch.dtype, cache: Path) -> dict:
    """A concept end to end as `protobooth train` runs it: class images (not cached), then every step."""
    from protobooth.engine.train import OneShotTrainer

    _reset(p["device"])
    model = model_on(p, dtype)
    image, mask = train_speed.scene(p["resolution"])
    settings = train_speed.our_settings(p["resolution"], mixed_precision=settings_name(dtype), steps=p["concept_steps"],
                                        prior_images=p["prior_images"], prior_steps=p["prior_steps"])
    _synchronize(p["device"])
    started = time.perf_counter()
    with OneShotTrainer(model, image, [mask], [train_speed.TOKEN], [train_speed.CLASS_WORD], settings,
                        prior_cache=cache / "concept") as trainer:
        _synchronize(p["device"])
        prepared = time.perf_counter()
        result = trainer.train()
        _synchronize(p["device"])
    finished = time.perf_counter()
    if not all(torch.isfinite(torch.tensor(result.losses))):
        raise RuntimeError(f"{settings_name(dtype)}: the loss went non-finite ({result.losses[-5:]})")
    return {"prepare": prepared - started, "train": finished - prepared, "steps": len(result.losses),
            "peak": _peak(p["device"])}


def megabytes(value: int | None) -> str:
    return "n/a (CPU)" if value is None else f"{value / 2**20:.0f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU in bf16: tests the plumbing")
    args = parser.parse_args(argv)
    p = plan(args.dry_run)
    started = time.perf_counter()
    device_name = torch.cuda.get_device_name() if p["device"] == "cuda" else "CPU (dry run)"
    print(f"{device_name}, torch {torch.__version__}; {p['size']} model at {p['resolution']} px, LoRA rank "
          f"{train_speed.LORA_RANK}, 1 instance + 1 class image; {p['steps']} timed steps after {p['warmup']} warm-up")
    print(f"{'dtype':<6} {'side':<12} {'median step':>12} {'peak memory':>12} {'/reference time':>16}")
    with tempfile.TemporaryDirectory(prefix="protobooth-gpu-check-") as cache:
        cache = Path(cache)
        for dtype in p["dtypes"]:
            with torch.device(p["device"]):
                model = train_speed.build_model(p["size"], p["device"], dtype)
            train_speed.cached_class_latents(model, p["resolution"], cache)  # ours' class image, outside its steps
            del model
            sides = {side: time_side(side, p, dtype, cache) for side in (*OUR_SIDES, "reference", "bare")}
            for side, r in sides.items():
                print(f"{settings_name(dtype):<6} {side:<12} {r['median']:>10.3f} s {megabytes(r['peak']):>12} "
                      f"{r['median'] / sides['reference']['median']:>16.2f}", flush=True)
        for dtype in p["dtypes"]:
            r = one_concept(p, dtype, cache)
            print(f"{settings_name(dtype)} concept end to end: class images ({p['prior_images']} × {p['prior_steps']} "
                  f"sampler steps) {r['prepare']:.1f} s, {r['steps']} steps {r['train']:.1f} s "
                  f"({r['train'] / r['steps']:.3f} s/step), peak {megabytes(r['peak'])}", flush=True)
    print(f"whole run: {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
