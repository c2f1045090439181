"""Running a checked manifest: one concept after another in this process, or one Ray task per concept.

Concept files go straight into a ComfyUI models folder (OUT/loras, OUT/embeddings); previews, loss curves, the
summary, the contact sheet and resumable checkpoints go under OUT/protobooth-batch/. A concept whose files already
carry its inputs' hash is skipped; one cut off resumes from its last checkpoint, in this process or on any Ray
worker that sees OUT; files appear only whole (atomic writes), so a killed worker leaves no partial file.
"""
from __future__ import annotations

import functools
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import InputError
from .manifest import BatchItem

REPORTS = "protobooth-batch"  # under the models folder; stock loaders only look in loras/ and embeddings/


@dataclass
class BatchContext:
    """What every concept of a batch shares."""

    model: str
    out: Path
    sam: str | None = None
    clip: str | None = None
    device: str = "cpu"
    threads: int | None = None  # torch threads per concept (None: torch's default)
    prototype_steps: int = 200
    preview_prompt: str = "a photo of {} on the beach"
    sampler_steps: int = 25
    guidance: float = 7.5
    checkpoints_per_run: int = 10  # when a line sets no checkpoint_every: about this many per concept

    @property
    def reports(self) -> Path:
        return self.out / REPORTS

    def checkpoint_dir(self, item: BatchItem) -> Path:
        # The hash in the name: a checkpoint of other inputs is never resumed.
        return self.reports / "checkpoints" / f"{item.name}-{item.inputs_hash[:12]}"


@dataclass
class ConceptDone:
    name: str
    method: str
    status: str  # "trained", "resumed" or "skipped"
    seconds: float
    final_loss: float | None
    files: list[str]
    class_images: str = "none"  # "drawn" (for at least one class word), "cached" or "none" (no class prior, skipped)


def done_already(item: BatchItem, out: Path) -> bool:
    """The concept's files are there, whole, and were made from these very inputs."""
    from ..concept.concept import models_folder_paths, read_concept_metadata

    lora, embedding = models_folder_paths(out, item.name)
    meta = read_concept_metadata(embedding) if embedding.is_file() else None
    return bool(meta) and meta.get("inputs_hash") == item.inputs_hash and (lora.is_file() or not meta.get("lora"))


def check_outputs(items: list[BatchItem], out: Path, overwrite: bool) -> None:
    """Before anything runs: OUT can take every file, and no concept made from other inputs is in the way."""
    from ..concept.concept import concept_files, models_folder_paths
    from ..fileio import check_output

    names = [str(p) for item in items for p in concept_files(*models_folder_paths(Path(), item.name), item.tokens)]
    check_output(out, names + [f"{REPORTS}/{item.name}-preview.png" for item in items], fix="choose a shorter \"name\"")
    if overwrite:
        return
    taken = [f"line {item.line} ({item.name})" for item in items if _in_the_way(item, out)]
    if taken:
        raise InputError(f"{out} already holds concepts of the same name made from other inputs: {', '.join(taken)}; "
                         "pass --overwrite to replace them, or give those lines another \"name\".")


def _in_the_way(item: BatchItem, out: Path) -> bool:
    """A file of this name that another run made from other inputs (or that no batch made). A half-saved concept
    of these very inputs (its LoRA written, then the worker killed) is not in the way: it is simply saved again."""
    from ..concept.concept import models_folder_paths, read_concept_metadata

    return any(path.is_file() and (read_concept_metadata(path) or {}).get("inputs_hash") != item.inputs_hash
               for path in models_folder_paths(out, item.name))


@functools.lru_cache(maxsize=2)
def _model(path: str, device: str, dtype):
    """One base model per process and precision, shared by every concept it trains (training restores it
    afterwards)."""
    from ..models.loading import load_model
    from ..shapesworld import load_shapesworld

    return load_shapesworld(device, dtype) if path == "shapesworld" else load_model(path, dtype=dtype, device=device)


@functools.lru_cache(maxsize=2)
def _towers(clip: str, device: str, model_path: str, dtype):
    from ..prototype import load_clip_towers
    from ..shapesworld import clip_towers

    if clip == "shapesworld":
        return clip_towers(_model(model_path, device, dtype).text_encoder, device)
    return load_clip_towers(clip, device)


def _masks(item: BatchItem, image, context: BatchContext):
    from ..images import load_mask
    from ..segment import ObjectPrompt, Segmenter, load_sam

    if not item.needs_sam:
        return [load_mask(o.mask, f"{item.name}: mask of {o.token}") for o in item.objects]
    segmenter = Segmenter(load_sam(context.sam, context.device))
    segmenter.set_image(image)
    return [load_mask(o.mask) if o.mask is not None else segmenter.segment([ObjectPrompt(o.box, o.points)])[0]
            for o in item.objects]


def learn_line(item: BatchItem, context: BatchContext, quiet: bool = False, should_cancel=None) -> ConceptDone:
    """Learn one manifest line into the models folder (or skip it when done already); should_cancel() stops it
    between steps."""
    import torch

    from ..concept.concept import concept_files, models_folder_paths
    from ..images import load_image
    from ..learn import learn, subject_words
    from ..prototype import PrototypeSettings
    from ..train import TrainSettings, weights_dtype

    started = time.perf_counter()
    lora, embedding = models_folder_paths(context.out, item.name)

    def written() -> list[str]:
        return [str(p) for p in concept_files(lora, embedding, item.tokens) if p.exists()]

    if done_already(item, context.out):
        return ConceptDone(item.name, item.method, "skipped", 0.0, None, written())
    settings = TrainSettings.from_values(item.method, **item.settings)
    if not settings.checkpoint_every:
        settings = settings.replace(checkpoint_every=max(1, settings.steps // context.checkpoints_per_run))
    checkpoints = context.checkpoint_dir(item)
    resume = (checkpoints / "checkpoint.pt").is_file()
    dtype = weights_dtype(settings.mixed_precision, torch.device(context.device))
    model = _model(context.model, context.device, dtype)
    towers = _towers(context.clip, context.device, context.model, dtype) if context.clip else None
    image = load_image(item.image)
    result = learn(model, image, _masks(item, image, context), item.tokens, item.class_words, settings, context.out,
                   item.name, [context.preview_prompt.format(subject_words(item.tokens, item.class_words))], towers=towers,
                   prototype=PrototypeSettings(n_vectors=settings.n_vectors, steps=context.prototype_steps), resume=resume,
                   render_options={"steps": context.sampler_steps, "guidance": context.guidance},
                   report_dir=context.reports, checkpoint_dir=checkpoints, inputs_hash=item.inputs_hash, quiet=quiet,
                   should_cancel=should_cancel)
    shutil.rmtree(checkpoints, ignore_errors=True)  # the concept is whole: its checkpoint is no longer needed
    prior = result.class_images
    return ConceptDone(item.name, item.method, "resumed" if resume else "trained", time.perf_counter() - started,
                       result.losses[-1], written(), "none" if prior is None else "drawn" if prior.drawn else "cached")


def run_in_process(items: list[BatchItem], context: BatchContext, should_cancel=None) -> list[ConceptDone]:
    import torch

    from ..learn import progress_bar

    results, threads = [], torch.get_num_threads()
    if context.threads:
        torch.set_num_threads(context.threads)
    try:
        with progress_bar("concepts", "concept") as update:
            update(0, len(items))
            for item in items:
                results.append(learn_line(item, context, quiet=True, should_cancel=should_cancel))
                update(len(results), len(items), last=item.name)
    finally:
        torch.set_num_threads(threads)
    return results


def run_on_ray(items: list[BatchItem], context: BatchContext, address: str, retries: int = 3) -> list[ConceptDone]:
    """One Ray task per concept: a GPU each where the cluster has GPUs, else `context.threads` CPU threads.

    Ray schedules the tasks and retries one whose worker died (max_retries); the retry resumes from the concept's
    last checkpoint in OUT, which every worker must see (shared storage on a cluster).
    """
    _check_reachable(address)
    try:
        import ray
    except ImportError:
        raise InputError("--ray needs Ray: pip install 'protobooth[ray]' (or pip install ray).") from None
    from ..learn import progress_bar

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=None if address == "auto" else address, log_to_driver=False,
                 runtime_env={"env_vars": {"TQDM_DISABLE": "1"}})  # workers' own bars would garble the driver's
    try:
        gpus = ray.cluster_resources().get("GPU", 0) > 0
        threads = context.threads or 1
        remote = ray.remote(_ray_task).options(
            name="protobooth-concept", max_retries=retries,
            **({"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": threads}))
        task_context = context if not gpus else BatchContext(**{**asdict(context), "device": "cuda"})
        pending = {remote.remote(item, task_context): item for item in items}
        results = {}
        with progress_bar("concepts", "concept") as update:
            update(0, len(items))
            try:
                while pending:
                    ready, _ = ray.wait(list(pending), num_returns=1)
                    item = pending.pop(ready[0])
                    try:
                        results[item.name] = ray.get(ready[0])
                    except ray.exceptions.RayTaskError as error:  # the worker's own error, without Ray's wrapping
                        if isinstance(error.cause, InputError):
                            raise InputError(f"line {item.line} ({item.name}): {error.cause}") from None
                        raise
                    update(len(results), len(items), last=item.name)
            except BaseException:
                for ref in pending:
                    ray.cancel(ref, force=True)
                raise
        return [results[item.name] for item in items]
    finally:
        if started_here:
            ray.shutdown()


def _ray_task(item: BatchItem, context: BatchContext) -> ConceptDone:
    import torch

    torch.set_num_threads(context.threads or 1)  # the CPUs Ray gave this task, not every core of the node
    return learn_line(item, context, quiet=True)


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """A cluster address that does not answer is an error at once, not a hang in ray.init."""
    import socket

    if address == "auto":
        return
    host_port = address.removeprefix("ray://")
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"--ray {address}: give auto, or a cluster address as host:port (e.g. 10.0.0.5:6379, or "
                         "ray://10.0.0.5:10001 for Ray Client).")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as error:
        raise InputError(f"--ray {address}: nothing answers there ({error.strerror or error}); start the cluster with "
                         "`ray start --head` on that machine, or check the address and port.") from None


def write_summary(results: list[ConceptDone], context: BatchContext, seconds: float) -> Path:
    """The summary table (markdown and JSON) and a contact sheet of every concept's preview."""
    from PIL import Image

    from ..fileio import atomic_path, save_png
    from ..report import image_grid

    lines = ["| concept | method | status | seconds | class images | final loss | files |", "|---|---|---|---|---|---|---|"]
    for r in results:
        loss = "—" if r.final_loss is None else f"{r.final_loss:.4f}"
        files = ", ".join(str(Path(f).relative_to(context.out)) for f in r.files)
        lines.append(f"| {r.name} | {r.method} | {r.status} | {r.seconds:.1f} | {r.class_images} | {loss} | {files} |")
    lines.append(f"\n{len(results)} concept(s) in {seconds:.1f} s.")
    prior = [r.class_images for r in results if r.class_images != "none"]
    if prior:  # each worker caches class images per class word and model: a class it met before is a hit
        lines.append(f"Class images found in the cache for {prior.count('cached')} of the {len(prior)} trained concepts "
                     f"that use them ({prior.count('cached') / len(prior):.0%}).")
    table = "\n".join(lines) + "\n"
    context.reports.mkdir(parents=True, exist_ok=True)
    with atomic_path(context.reports / "summary.md") as tmp:
        tmp.write_text(table)
    with atomic_path(context.reports / "summary.json") as tmp:
        tmp.write_text(json.dumps({"seconds": seconds, "concepts": [asdict(r) for r in results]}, indent=2))
    previews = [(r.name, context.reports / f"{r.name}-preview.png") for r in results]
    shown = [(name, Image.open(path).convert("RGB")) for name, path in previews if path.is_file()]
    if shown:
        save_png(image_grid([picture for _, picture in shown], [name for name, _ in shown], columns=min(8, len(shown))),
                 context.reports / "contact-sheet.png")
    return context.reports / "summary.md"
