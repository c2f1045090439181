"""What every ProtoBooth node shares: its menu category, error naming, and the photo-with-objects check."""
from __future__ import annotations

import contextlib

import torch

from ..engine.errors import InputError
from ..engine.images import check_masks
from ..engine.text.tokenizer import clip_tokenizer
from ..engine.text.vocabulary import check_objects

CATEGORY = "ProtoBooth"


def register_models_folder(name: str, extensions: set[str]) -> None:
    """Add models/<name> to ComfyUI's folder list `name`, keeping paths registered before (extra_model_paths.yaml,
    other packs, or ComfyUI itself where a newer one has the entry)."""
    import os

    import folder_paths

    default = os.path.join(folder_paths.models_dir, name)
    paths, known = folder_paths.folder_names_and_paths.get(name, ([], set()))
    if default not in paths:
        paths = [*paths, default]
    # a fresh set: an existing entry may share its set object with other folders
    folder_paths.folder_names_and_paths[name] = (paths, set(known) | extensions)


@contextlib.contextmanager
def node_errors(node: str):
    """Re-raise the engine's input errors with the node's display name in front."""
    try:
        yield
    except InputError as error:
        raise InputError(f"{node}: {error}") from None


def image_from_batch(image: torch.Tensor, what: str = "image") -> torch.Tensor:
    """ComfyUI's IMAGE [1, H, W, C] → the engine's [3, H, W]; a batch of several is refused."""
    if image.ndim != 4 or image.shape[0] != 1:
        count = image.shape[0] if image.ndim == 4 else "an unbatched"
        raise InputError(f"{what} is a batch of {count} images; give exactly one photo (pick one from a batch with "
                         "'Latent/ImageFromBatch' or load a single image).")
    return image[0, ..., :3].movedim(-1, 0).float().cpu()


def split_words(text: str) -> list[str]:
    return [word.strip() for word in text.split(",")]


def photo_objects(image, masks, tokens: str, class_words: str):
    """(photo [3,H,W], one mask per object, tokens, class words), checked as the engine checks them.

    tokens and class_words are comma-separated, one per mask, in mask order.
    """
    picture = image_from_batch(image)
    tokens, class_words = check_objects(clip_tokenizer(), split_words(tokens), split_words(class_words))
    masks = masks if masks.ndim == 3 else masks[None]
    if len(masks) != len(tokens):
        raise InputError(f"got {len(masks)} mask(s) but {len(tokens)} token(s); give one token and one class word per "
                         "mask (comma-separated), in the order of the masks.")
    masks = check_masks([m.float().cpu() for m in masks], picture, tokens)
    return picture, masks, tokens, class_words
