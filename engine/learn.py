"""The end-to-end job for console users: prototype search, training, concept files, loss curve and preview grid,
with progress bars. The CLI's train and demo call it; so can a notebook."""
from __future__ import annotations

import contextlib
from pathlib import Path


@contextlib.contextmanager
def progress_bar(description: str, unit: str = "step", should_cancel=None):
    """A tqdm bar on stderr, driven by the engine's progress(done, total) callbacks; extra keywords show beside it.

    The bar appears on the first report, so a phase that has nothing to do (cached class images) shows none.
    should_cancel() → TrainingCancelled at the next report.
    """
    from tqdm import tqdm

    from .errors import TrainingCancelled

    bars = []

    def update(done: int, total: int, **shown) -> None:
        if should_cancel is not None and should_cancel():
            raise TrainingCancelled(f"{description} cancelled at {done} of {total}")
        if not bars:
            bars.append(tqdm(desc=description, unit=unit, dynamic_ncols=True))
        bar = bars[0]
        bar.total = total
        bar.update(done - bar.n)
        if shown:
            bar.set_postfix(shown)

    try:
        yield update
    finally:
        for bar in bars:
            bar.close()


def learn(model, image, masks, tokens, class_words, settings, out: Path, name: str, preview_prompts: list[str],
          towers=None, prototype=None, resume: bool = False, preview_seeds=(0,), render_options: dict | None = None,
          report_dir: Path | None = None, checkpoint_dir: Path | None = None, inputs_hash: str | None = None,
          quiet: bool = False, init_vectors: list | None = None, should_cancel=None):
    """Prototype search (when a CLIP model is given; `init_vectors` instead give each object's start, e.g. an
    object encoder's) → training → concept files, loss curve, preview grid.

    The concept goes to OUT's loras/ and embeddings/; the loss curve and preview to `report_dir` (default OUT);
    checkpoints to `checkpoint_dir` (default OUT/NAME-checkpoint). `inputs_hash` is kept in the concept's
    metadata (the batch's skip-if-done test); `quiet` leaves out the closing lines; should_cancel() → TrainingCancelled
    between steps."""
    from .concept.concept import concept_files, models_folder_paths, save_concept
    from .fileio import save_png
    from .generate import render
    from .images import check_masks, load_image
    from .prototype import prototype_embeddings
    from .report import loss_curve
    from .train import OneShotTrainer

    image = load_image(image)
    masks = check_masks(masks, image, tokens)
    init = init_vectors
    if towers is not None and init is None:
        with progress_bar("prototype", should_cancel=should_cancel) as update:
            found = prototype_embeddings(towers, model.text_encoder, model.tokenizer, image, masks, tokens, class_words,
                                         prototype, progress=update)
        init = [p.vectors for p in found]
    with contextlib.ExitStack() as stack:
        with progress_bar("class images") as update:  # drawn on the first run only, then cached
            trainer = stack.enter_context(OneShotTrainer(model, image, masks, tokens, class_words, settings, init,
                                                         prepare_progress=update, should_cancel=should_cancel))
        with progress_bar("train") as update:
            result = trainer.train(progress=lambda r: update(r.step, r.total, loss=f"{r.loss:.4f}"),
                                   checkpoint_dir=checkpoint_dir or out / f"{name}-checkpoint", resume=resume)
        with trainer.trained_pipeline() as pipeline:
            previews = render(pipeline, preview_prompts, list(preview_seeds), **(render_options or {}))
    result.concept.inputs_hash = inputs_hash
    report_dir = Path(report_dir or out)
    lora_path, embedding_path = models_folder_paths(out, name)
    written = concept_files(lora_path, embedding_path, trainer.tokens)
    stamps = {path: path.stat().st_mtime_ns if path.exists() else None for path in written}
    try:
        save_concept(result.concept, lora_path, embedding_path)
        save_png(loss_curve(result.losses), report_dir / f"{name}-loss.png")
        save_png(preview_grid(previews, preview_prompts, preview_seeds), report_dir / f"{name}-preview.png")
    except OSError as error:  # a full disk or a file-size limit, found only now: the result must not be lost
        for path in written:  # no half concept (a LoRA without its embedding) stays behind
            if path.exists() and path.stat().st_mtime_ns != stamps[path]:
                path.unlink()
        raise save_failed(error, result, name, out) from None
    if quiet:
        return result
    if result.class_images is not None:
        print(result.class_images)
    print(f"trained {settings.steps} steps in {result.seconds:.1f} s; final loss {result.losses[-1]:.4f}")
    for path in (*concept_files(lora_path, embedding_path, trainer.tokens), report_dir / f"{name}-loss.png",
                 report_dir / f"{name}-preview.png"):
        if path.exists():  # a concept trained without a LoRA has no LoRA file
            print(f"wrote {path}")
    print("use it with the words: " + ", ".join(f"'{t} {c}'" for t, c in zip(trainer.tokens, trainer.class_words)))
    return result


def preview_grid(previews: list, prompts: list[str], seeds):
    """The preview pictures as a grid: a row per prompt, a column per seed; small models' pictures enlarged."""
    from .report import image_grid

    return image_grid(previews, [p for p in prompts for _ in seeds], columns=len(seeds),
                      scale=max(1, 128 // previews[0].width))


def subject_words(tokens: list[str], class_words: list[str]) -> str:
    """How a prompt names a concept's objects: "zqcat cat and zqmug mug"."""
    return " and ".join(f"{t} {c}" for t, c in zip(tokens, class_words))


def default_preview_prompts(tokens: list[str], class_words: list[str]) -> list[str]:
    subject = subject_words(tokens, class_words)
    return [f"a photo of {subject} on the beach", f"a photo of {subject} in the snow", f"a painting of {subject}"]


def output_files(name: str, tokens: list[str]) -> list[str]:
    """What learn() writes under its output folder (checked before any work starts)."""
    from .concept.concept import concept_files, models_folder_paths

    return [str(path) for path in concept_files(*models_folder_paths(Path(), name), tokens)] + [
        f"{name}-loss.png", f"{name}-preview.png", f"{name}-checkpoint/checkpoint.pt"]


def save_failed(error: OSError, result, name: str, out: Path):
    """The SaveFailed for a result that could not be written to `out`: with a recovery copy of the concept in the
    temp folder where one can be written, else in memory only (SaveFailed.result)."""
    import tempfile
    import time

    from .concept.concept import models_folder_paths, save_concept
    from .errors import SaveFailed

    reason = error.strerror or str(error)
    where = getattr(error, "filename", None) or out
    recovery = Path(tempfile.gettempdir()) / "protobooth-recovery" / f"{name[:100]}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        save_concept(result.concept, *models_folder_paths(recovery, name))
    except OSError as second:
        return SaveFailed(f"could not write {where} ({reason}), nor a recovery copy in {recovery.parent} "
                          f"({second.strerror or second}); the trained concept is lost: free some space and train "
                          "again (the same seed gives the same result).", result)
    return SaveFailed(f"could not write {where} ({reason}). The trained concept is safe in {recovery}: copy its loras/ "
                      f"and embeddings/ files into {out} (or your ComfyUI models folder) once there is room.", result)
