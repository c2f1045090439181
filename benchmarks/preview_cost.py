"""What the Train Concept node's live preview costs: the same training run with and without previews.

The node draws, every `preview_every` steps (default 20) and at the end, a sample with the concept as it stands
(trainer.preview_sample: first template, seed 0, 5 DDIM steps with guidance, at the training size) and sets it beside
the loss curve (report.live_preview). This runs the default method twice on the same model, photo and seed, once
without and once with previews, and reports both times and their ratio. Runs alternate (plain, previewed, plain,
previewed, ...) so machine noise hits both alike; the medians are compared.

    python benchmarks/preview_cost.py                      # ShapesWorld model, 400 steps, a preview every 20
    python benchmarks/preview_cost.py --size sd15 --steps 40 --resolution 256   # SD1.5 size (random weights)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import train_speed  # noqa: E402  (also puts this checkout's protobooth on the path)

import torch  # noqa: E402

from protobooth.engine.report import live_preview  # noqa: E402
from protobooth.engine.train import OneShotTrainer  # noqa: E402


def model_of(size: str):
    if size == "shapesworld":
        from protobooth.engine.shapesworld.model import load_shapesworld

        return load_shapesworld()
    return train_speed.build_model(size, "cpu")


def timed_run(model, resolution: int | None, steps: int, every: int, cache: Path) -> float:
    picture_size = resolution or model.unet.config.sample_size * 8
    image, mask = train_speed.scene(picture_size)
    settings = train_speed.our_settings(resolution, steps=steps, prior_images=1)
    with OneShotTrainer(model, image, [mask], [train_speed.TOKEN], [train_speed.CLASS_WORD], settings,
                        prior_cache=cache) as trainer:
        def progress(report):
            if every and (report.step % every == 0 or report.step == report.total):
                live_preview(trainer.losses, report.total, trainer.preview_sample())

        started = time.perf_counter()
        trainer.train(progress=progress)
        return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("shapesworld", "tiny", "sd15"), default="shapesworld")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=20, help="steps between previews (the node's default)")
    parser.add_argument("--resolution", type=int, help="training size (default: the model's own)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = model_of(args.size)
    times = {"plain": [], "previewed": []}
    with tempfile.TemporaryDirectory() as cache:
        timed_run(model, args.resolution, 1, 0, Path(cache))  # class image drawn and cached, warm-up
        for _ in range(args.rounds):
            for side, every in (("plain", 0), ("previewed", args.every)):
                times[side].append(timed_run(model, args.resolution, args.steps, every, Path(cache)))
                print(f"{side}: {times[side][-1]:.1f} s", flush=True)
    plain, previewed = (statistics.median(times[side]) for side in ("plain", "previewed"))
    previews = -(-args.steps // args.every)
    print(f"{args.size}, {args.steps} steps, a preview every {args.every} ({previews} previews): "
          f"{plain:.1f} s without, {previewed:.1f} s with; preview cost ratio: {previewed / plain:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
