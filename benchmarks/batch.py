"""Batch throughput on ShapesWorld: the 8 held-out instances as one manifest, at the quality benchmark's settings.

    python benchmarks/batch.py            # serial, Ray with 2 workers, Ray with a worker killed (about 25 min on 2 cores)
    python benchmarks/batch.py --quick    # 2 instances, 40 steps (for checking the script)

Measures: serial in-process time (one torch thread, the same as each Ray worker gets); Ray with 2 local workers of
1 thread each, and its speed-up against the ideal 2x; Ray's start-up; and a Ray run in which one worker is killed
(SIGKILL) once a concept is halfway, against the same run unharmed. Writes benchmarks/results/batch.md.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "shapesworld"))
import evaluate as ev  # noqa: E402  (makes `protobooth` this checkout)

from protobooth.engine.batch.manifest import read_manifest  # noqa: E402
from protobooth.engine.batch.runner import BatchContext, run_in_process, run_on_ray  # noqa: E402
from protobooth.engine.cli.batch import model_identity  # noqa: E402
from protobooth.engine.fileio import read_torch_file, save_png  # noqa: E402
from protobooth.engine.images import to_pil  # noqa: E402
from protobooth.engine.shapesworld import GUIDANCE, SAMPLER_STEPS, world  # noqa: E402

RESULTS = HERE / "results"


def write_manifest(folder: Path, instances: int, steps: int) -> Path:
    """The held-out instances' reference photos and masks, and a manifest at the benchmark's object-driven settings."""
    settings = dict(steps=steps, seed=0, flip=False, lora_rank=4, lora_learning_rate=ev.LORA_LEARNING_RATE,
                    token_learning_rate=ev.TOKEN_LEARNING_RATE, prior_images=4, prior_steps=SAMPLER_STEPS,
                    prior_guidance=GUIDANCE, checkpoint_every=max(1, steps // 10))
    lines = [{"defaults": {"method": "object-driven", "settings": settings}}]
    for index, instance in enumerate(world.HELD_OUT[:instances]):
        image, masks, scene = ev.reference_photo([instance])
        save_png(to_pil(image), folder / f"{instance.key}.png")
        save_png(to_pil(masks[0]), folder / f"{instance.key}-mask.png")
        lines.append({"image": f"{instance.key}.png", "mask": f"{instance.key}-mask.png", "token": f"zqobj{index}",
                      "class": instance.shape, "name": instance.key,
                      "settings": {"templates": [f"a photo of a {{}} on the left, {scene.background} background"]}})
    path = folder / "manifest.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def kill_one_worker_halfway(checkpoints: Path, steps: int, stop: threading.Event, killed: list) -> None:
    """Watch the checkpoints; once one is at half its steps, SIGKILL one running concept task."""
    import psutil

    while not stop.is_set() and not killed:
        for path in checkpoints.glob("*/checkpoint.pt"):
            try:
                step = read_torch_file(path, "checkpoint")["step"]
            except Exception:  # being replaced right now
                continue
            if step >= steps // 2:
                for process in psutil.process_iter(["cmdline"]):
                    if "ray::protobooth-concept" in " ".join(process.info["cmdline"] or []):
                        os.kill(process.pid, signal.SIGKILL)
                        killed.append((path.parent.name, step))
                        return
        time.sleep(0.2)


def check_whole(items, out: Path) -> None:
    """Every concept loads whole from OUT, and OUT's loras/ and embeddings/ hold nothing else."""
    from protobooth.engine.concept.concept import load_concept

    for item in items:
        load_concept(out / "embeddings" / f"{item.name}.safetensors", out / "loras" / f"{item.name}.safetensors")
    for sub in ("loras", "embeddings"):
        found = sorted(p.name for p in (out / sub).iterdir())
        if found != sorted(f"{item.name}.safetensors" for item in items):
            raise SystemExit(f"{out / sub} holds {found}: not exactly the batch's concepts")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 instances, 40 steps")
    args = parser.parse_args(argv)
    instances, steps = (2, 40) if args.quick else (len(world.HELD_OUT), 300)
    import ray

    folder = Path(tempfile.mkdtemp(prefix="protobooth-batch-bench-"))
    items = read_manifest(write_manifest(folder, instances, steps), model_identity("shapesworld"), has_sam=False)

    def context(name: str) -> BatchContext:
        return BatchContext("shapesworld", folder / name, clip="shapesworld", threads=1, prototype_steps=100,
                            sampler_steps=SAMPLER_STEPS, guidance=GUIDANCE)

    timings, ray_starts = {}, []

    def fresh_cache(name: str) -> dict:
        """Every run starts with no class images drawn, so none profits from another's cache."""
        os.environ["PROTOBOOTH_CACHE"] = str(folder / f"cache-{name}")
        return {"TQDM_DISABLE": "1", "PROTOBOOTH_CACHE": os.environ["PROTOBOOTH_CACHE"]}

    fresh_cache("serial")
    started = time.perf_counter()
    serial = run_in_process(items, context("serial"))
    timings["serial"] = time.perf_counter() - started

    def on_ray(name: str, kill: bool = False) -> tuple[list, list]:
        """A run on a local Ray instance of its own (fresh workers: none has a model loaded from an earlier run)."""
        started = time.perf_counter()
        ray.init(num_cpus=2, log_to_driver=False, runtime_env={"env_vars": fresh_cache(name)})
        ray_starts.append(time.perf_counter() - started)
        stop, killed = threading.Event(), []
        watcher = threading.Thread(target=kill_one_worker_halfway,
                                   args=(context(name).reports / "checkpoints", steps, stop, killed))
        if kill:
            watcher.start()
        try:
            started = time.perf_counter()
            results = run_on_ray(items, context(name), "auto")
            timings[name] = time.perf_counter() - started
        finally:
            stop.set()
            if kill:
                watcher.join()
            ray.shutdown()
        return results, killed

    on_ray("ray")
    after_kill, killed = on_ray("ray-killed", kill=True)
    for name in ("serial", "ray", "ray-killed"):
        check_whole(items, context(name).out)
    per_concept = sum(r.seconds for r in serial) / len(serial)
    speedup = timings["serial"] / timings["ray"]
    lost = timings["ray-killed"] - timings["ray"]
    command = "python benchmarks/batch.py" + (" --quick" if args.quick else "")
    lines = [f"# Batch: {instances} ShapesWorld concepts ({'quick' if args.quick else 'full'})", "", f"Command: `{command}`  ",
             f"Each concept: object-driven, {steps} steps, the quality benchmark's settings (benchmarks/shapesworld/"
             f"evaluate.py), prototype start, a checkpoint every {max(1, steps // 10)} steps, one preview; one torch "
             f"thread per concept. Machine: {os.cpu_count()} CPU cores.", "",
             "| run | seconds | per concept | ratio |", "|---|---|---|---|",
             f"| serial, in-process | {timings['serial']:.1f} | {timings['serial'] / instances:.1f} | 1.00 |",
             f"| Ray, 2 local workers | {timings['ray']:.1f} | {timings['ray'] / instances:.1f} | {speedup:.2f}x speed-up "
             f"({speedup / 2:.0%} of the ideal 2x) |",
             f"| Ray, one worker killed halfway | {timings['ray-killed']:.1f} | — | {lost:+.1f} s against the "
             "unharmed Ray run |", "",
             "Each run starts cold: its own empty class-image cache, and each Ray run its own local Ray instance (fresh "
             "workers, no model loaded). Seconds count from the first concept to the last, Ray's start-up apart.",
             f"Ray start-up (a local instance, `ray.init`): {', '.join(f'{t:.1f}' for t in ray_starts)} s. Mean time per "
             f"concept (serial, from its start to its files): {per_concept:.1f} s.",
             f"Killed (SIGKILL): one running concept task, when the checkpoint {killed[0][0] if killed else 'none'} reached "
             f"step {killed[0][1] if killed else '—'} of {steps}; statuses after the kill: {', '.join(sorted(r.status for r in after_kill))}. Every concept of every run "
             "loaded whole afterwards, and nothing else was in loras/ or embeddings/ (checked)."]
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / ("batch_quick.md" if args.quick else "batch.md")
    path.write_text("\n".join(lines) + "\n")
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
