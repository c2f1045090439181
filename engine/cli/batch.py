"""`protobooth batch`: many concepts from a manifest, in this process or on a Ray cluster."""
from __future__ import annotations

import time
from pathlib import Path

from ..errors import InputError
from .common import HelpFormatter, cancel_requested, device_name


def register_batch(subparsers) -> None:
    p = subparsers.add_parser(
        "batch",
        help="learn many concepts, one per line of a JSONL manifest",
        formatter_class=HelpFormatter,
        description="Learn one concept per line of MANIFEST (JSON Lines) into the models folder OUT (loras/,\n"
        "embeddings/), so they appear in ComfyUI's stock loaders. Each line: image, token, class and mask\n"
        "(or box/points with --sam), optional name, method and settings; or \"objects\": [...] for several\n"
        "objects. An optional first line {\"defaults\": {...}} fills what lines leave out. The whole manifest is\n"
        "checked first. Concepts already made from the same inputs are skipped; one that was cut off resumes\n"
        "from its checkpoint. Previews, loss curves, summary.md and contact-sheet.png go to OUT/protobooth-batch/.\n\n"
        "example line: {\"image\": \"mug.jpg\", \"token\": \"zqmug\", \"class\": \"mug\", \"mask\": \"mug-mask.png\"}\n"
        "example: protobooth batch products.jsonl --model sd15.safetensors --out ComfyUI/models --ray auto",
    )
    p.add_argument("manifest", help="the .jsonl manifest (paths in it are relative to its folder)")
    p.add_argument("--model", required=True, help="base model: a diffusers folder, a .safetensors/.ckpt SD1.x, SD2.x or "
                   "SDXL file, or 'shapesworld' (the embedded demo model)")
    p.add_argument("--out", required=True, help="models folder (e.g. ComfyUI/models); on a cluster, one every worker sees")
    p.add_argument("--sam", help="segment-anything checkpoint, for lines that give a box or points")
    p.add_argument("--clip", help="CLIP model folder for the prototype initialisation ('shapesworld': the demo "
                   "model's); without it tokens start from their class words")
    p.add_argument("--prototype-steps", type=int, default=200, help="steps of the prototype search (with --clip)")
    p.add_argument("--preview-prompt", default="a photo of {} on the beach", help="the preview picture's prompt; {} = "
                   "the concept's objects")
    p.add_argument("--sampler-steps", type=int, default=25, help="sampling steps of the previews")
    p.add_argument("--guidance", type=float, default=7.5, help="guidance of the previews")
    p.add_argument("--overwrite", action="store_true", help="replace concepts of the same name made from other inputs")
    p.add_argument("--ray", metavar="ADDRESS", help="run one Ray task per concept: auto (the cluster on this machine, "
                   "or a new local one) or a cluster's host:port; needs pip install 'protobooth[ray]'")
    p.add_argument("--threads", type=int, help="torch threads per concept (on Ray without GPUs: CPUs per task, "
                   "default 1)")
    p.add_argument("--device", default="auto", help="cpu, cuda, … for in-process runs (on Ray: a GPU per task where "
                   "the cluster has GPUs)")
    p.set_defaults(run=run_batch)


def model_identity(model: str) -> str:
    """What stands for the base model in the inputs hash: its name, size and change time (a file is not read)."""
    if model == "shapesworld":
        from ..shapesworld.model import MODEL_DIR as path
    else:
        path = Path(model)
        if not path.exists():
            raise InputError(f"--model {model} does not exist; give the path of the file (or folder) you downloaded.")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return f"{path.name}:" + ",".join(f"{p.relative_to(path) if path.is_dir() else p.name}={p.stat().st_size}"
                                      for p in files)


def run_batch(args) -> int:
    from ..batch.manifest import read_manifest
    from ..batch.runner import BatchContext, check_outputs, run_in_process, run_on_ray, write_summary

    for flag, value in (("--threads", args.threads), ("--sampler-steps", args.sampler_steps),
                        ("--prototype-steps", args.prototype_steps)):
        if value is not None and value < 1:
            raise InputError(f"{flag} {value}: give a whole number of 1 or more.")
    if "{}" not in args.preview_prompt:
        raise InputError(f"--preview-prompt {args.preview_prompt!r} has no {{}} for the concept's words; e.g. "
                         "'a photo of {} on the beach'.")
    for flag, path in (("--sam", args.sam), ("--clip", args.clip)):
        if path and path != "shapesworld" and not Path(path).exists():
            raise InputError(f"{flag} {path} does not exist; give the path of the file (or folder) you downloaded.")
    items = read_manifest(args.manifest, model_identity(args.model), has_sam=bool(args.sam))
    out = Path(args.out)
    check_outputs(items, out, args.overwrite)
    context = BatchContext(args.model, out, args.sam, args.clip, device_name(args.device), args.threads,
                           args.prototype_steps, args.preview_prompt, args.sampler_steps, args.guidance)
    args.cancel_note = lambda: f"finished concepts kept; run the same command again to resume ({context.reports})"
    started = time.perf_counter()
    results = run_on_ray(items, context, args.ray) if args.ray else run_in_process(items, context, cancel_requested)
    summary = write_summary(results, context, time.perf_counter() - started)
    print(summary.read_text(), end="")
    print(f"summary and contact sheet in {context.reports}")
    return 0
