"""Where pretraining samples come from. A source has `sample(seed, general) → Sample`: an identity sample (two
pictures of one object: the reference and the one to denoise) or, when `general`, an ordinary captioned picture."""
from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..shapesworld import world
from ..train.photo import square_crop
from .pretrain import Sample


class ShapesWorldPairs:
    """ShapesWorld's pretraining instances (the benchmark's held-out ones never appear): the reference shows the
    instance alone on a random side and background; the target shows it in another random scene (half the time
    beside a companion), captioned with the trigger word in place of its colour."""

    def __init__(self):
        self.instances = world.all_instances()  # without the held-out instances

    def sample(self, seed: int, general: bool) -> Sample:
        sampler = world.SceneSampler(seed, self.instances)
        if general:
            scene = sampler.scene()
            images, _ = world.render([scene])
            return Sample(target=images[0], caption=scene.caption())
        instance = sampler.instance()
        reference = world.Scene(world.BACKGROUNDS_LIST[int(sampler.rng.integers(len(world.BACKGROUNDS_LIST)))],
                                (sampler.placed(instance, world.POSITIONS[int(sampler.rng.integers(2))]),))
        target, _ = sampler.featuring(instance)
        images, masks = world.render([reference, target])
        caption = target.caption({0: "{token} " + instance.shape})
        return Sample(target=images[1], caption=caption, class_word=instance.shape, reference=images[0],
                      reference_mask=masks[0, 0], target_mask=masks[1, 0])


PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MASK_SUFFIX = ".mask.png"


class IdentityFolders:
    """Pretraining pairs from folders, for any model (the identity-pair datasets of research/methods.md §4.3).

        DATA/objects/<identity>/class.txt       the object's class word ("dog")
        DATA/objects/<identity>/<photo>.jpg     two or more photos of that one object (png, jpg, jpeg, webp)
        DATA/objects/<identity>/<photo>.mask.png  each photo's mask (white = the object)
        DATA/objects/<identity>/<photo>.txt     optional caption naming the object "{token} <class word>"
        DATA/general/<picture>.jpg + .txt       ordinary captioned pictures (for the dropped-embedding samples)

    The reference is one photo of an identity, the target another; each is cut to the square around its object and
    resized to `size` pixels (set it once the model is known: its training size). Everything is checked when the
    folder is read, before any model work."""

    def __init__(self, root, need_general: bool, size: int = 512):
        from ..images import check_image_file

        self.root, self.size = Path(root), size
        self.captions: dict[Path, str] = {}  # every photo's caption, read and checked once
        objects = self.root / "objects"
        if not objects.is_dir():
            raise InputError(f"--data {root} has no objects/ folder; it needs objects/<identity>/ folders of two or more "
                             "photos of one object each, with <photo>.mask.png masks and a class.txt.")
        self.identities = []
        for folder in sorted(p for p in objects.iterdir() if p.is_dir()):
            photos = _photos(folder)
            class_file = folder / "class.txt"
            class_word = class_file.read_text().strip() if class_file.is_file() else ""
            if not class_word or len(class_word.split()) != 1:
                raise InputError(f"{class_file} must hold the object's class word, one word (e.g. dog).")
            if len(photos) < 2:
                raise InputError(f"{folder} has {len(photos)} photo(s); an identity needs two or more (the encoder "
                                 "sees one, the model learns to draw another).")
            for photo in photos:
                check_image_file(photo)
                mask = photo.with_name(photo.stem + MASK_SUFFIX)
                if not mask.is_file():
                    raise InputError(f"{photo} has no mask {mask.name} beside it (white = the object).")
                self.captions[photo] = _caption(photo, f"a photo of {{token}} {class_word}", needs_token=True)
            self.identities.append((class_word, photos))
        if not self.identities:
            raise InputError(f"--data {root}: objects/ holds no identity folders.")
        general = self.root / "general"
        self.general = _photos(general) if general.is_dir() else []
        for picture in self.general:
            check_image_file(picture)
            self.captions[picture] = _caption(picture, None, needs_token=False)
        if need_general and not self.general:
            raise InputError(f"--data {root} has no general/ pictures (with .txt captions) for the general share of "
                             "samples; add some, or pass --general-share 0.")

    def sample(self, seed: int, general: bool) -> Sample:
        from ..images import load_image, load_mask

        rng = random.Random(seed)
        if general:
            picture = rng.choice(self.general)
            image = load_image(picture, str(picture))
            side = min(image.shape[-2:])
            top, left = (image.shape[1] - side) // 2, (image.shape[2] - side) // 2
            return Sample(target=_resized(image[:, top : top + side, left : left + side], self.size),
                          caption=self.captions[picture])
        class_word, photos = rng.choice(self.identities)
        reference, target = rng.sample(photos, 2)
        cut = []
        for photo in (reference, target):
            image = load_image(photo, str(photo))
            mask = load_mask(photo.with_name(photo.stem + MASK_SUFFIX), f"the mask of {photo}")
            if mask.shape != image.shape[1:]:
                raise InputError(f"the mask of {photo} is {mask.shape[1]}x{mask.shape[0]} but the photo is "
                                 f"{image.shape[2]}x{image.shape[1]}; make them the same size.")
            image, (mask,) = square_crop(image, [(mask > 0.5).float()])
            cut.append((_resized(image, self.size), (_resized(mask[None], self.size)[0] > 0.5).float()))
        (reference_image, reference_mask), (target_image, target_mask) = cut
        return Sample(target=target_image, caption=self.captions[target],
                      class_word=class_word, reference=reference_image, reference_mask=reference_mask,
                      target_mask=target_mask)


def _photos(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES and not p.name.endswith(MASK_SUFFIX))


def _caption(photo: Path, default: str | None, needs_token: bool) -> str:
    """The photo's caption file, or `default`; a caption of an object must name it "{token}"."""
    path = photo.with_suffix(".txt")
    if not path.is_file():
        if default is None:
            raise InputError(f"{photo} has no caption {path.name} beside it.")
        return default
    caption = path.read_text().strip()
    try:
        named = caption.format(token="zq") != caption
    except (KeyError, IndexError, ValueError):
        raise InputError(f"{path}: the only braces a caption may hold are {{token}} (where the object is named); "
                         f"got {caption!r}.") from None
    if needs_token and not named:
        raise InputError(f"{path} must name the object as {{token}} followed by its class word, e.g. "
                         f"'a photo of {{token}} dog on the grass'; got {caption!r}.")
    if named and not needs_token:
        raise InputError(f"{path} is a general picture's caption: it names no object, so no {{token}}; got {caption!r}.")
    return caption


def _resized(image: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)
