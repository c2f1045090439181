"""The end-to-end job for console users: prototype search, training, concept files, loss curve and preview grid,
with progress bars. The CLI's train and demo call it; so can a notebook."""
from __future__ import annotations

import contextlib
from pathlib import Path


@contextlib.contextmanager
def progress_bar(description: str, unit: str = "step"):
    """A tqdm bar on stderr, driven by the engine's progress(done, total) callbacks; extra keywords show beside it.

    The bar appears on the first report, so a phase that has nothing to do (cached class images) shows none.
    """
    from tqdm import tqdm

    bars = []

    def update(done: int, total: int, **shown) -> None:
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
          towers=None, prototype=None, resume: bool = False, preview_seeds=(0,), render_options: dict | None = None):
    """Prototype search (when a CLIP model is given) → training → concept files, loss curve, preview grid."""
    from .concept.concept import concept_files, models_folder_paths, save_concept
    from .fileio import save_png
    from .generate import render
    from .images import check_masks, load_image
    from .prototype import prototype_embeddings
    from .report import image_grid, loss_curve
    from .train import OneShotTrainer

    image = load_image(image)
    masks = check_masks(masks, image, tokens)
    init = None
    if towers is not None:
        with progress_bar("prototype") as update:
            found = prototype_embeddings(towers, model.text_encoder, model.tokenizer, image, masks, tokens, class_words,
                                         prototype, progress=update)
        init = [p.vectors for p in found]
    with contextlib.ExitStack() as stack:
        with progress_bar("class images") as update:  # drawn on the first run only, then cached
            trainer = stack.enter_context(OneShotTrainer(model, image, masks, tokens, class_words, settings, init,
                                                         prepare_progress=update))
        with progress_bar("train") as update:
            result = trainer.train(progress=lambda r: update(r.step, r.total, loss=f"{r.loss:.4f}"),
                                   checkpoint_dir=out / f"{name}-checkpoint", resume=resume)
        with trainer.trained_pipeline() as pipeline:
            previews = render(pipeline, preview_prompts, list(preview_seeds), **(render_options or {}))
    lora_path, embedding_path = models_folder_paths(out, name)
    save_concept(result.concept, lora_path, embedding_path)
    save_png(loss_curve(result.losses), out / f"{name}-loss.png")
    save_png(image_grid(previews, [p for p in preview_prompts for _ in preview_seeds], columns=len(preview_seeds),
                        scale=max(1, 128 // previews[0].width)), out / f"{name}-preview.png")
    print(f"trained {settings.steps} steps in {result.seconds:.1f} s; final loss {result.losses[-1]:.4f}")
    for path in (*concept_files(lora_path, embedding_path, trainer.tokens), out / f"{name}-loss.png",
                 out / f"{name}-preview.png"):
        if path.exists():  # a concept trained without a LoRA has no LoRA file
            print(f"wrote {path}")
    print("use it with the words: " + ", ".join(f"'{t} {c}'" for t, c in zip(trainer.tokens, trainer.class_words)))
    return result


def default_preview_prompts(tokens: list[str], class_words: list[str]) -> list[str]:
    subject = " and ".join(f"{t} {c}" for t, c in zip(tokens, class_words))
    return [f"a photo of {subject} on the beach", f"a photo of {subject} in the snow", f"a painting of {subject}"]
