"""Resumable training: a checkpoint holds everything needed to continue exactly where a run stopped (the step, the
losses, the token vectors, the method's state, the optimiser and both random generators), keyed by what decides the
run so that another run's checkpoint is refused."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from ..errors import InputError
from ..fileio import atomic_path, read_torch_file
from .settings import TrainSettings

log = logging.getLogger("protobooth")
# What a checkpoint written by save_checkpoint holds.
CHECKPOINT_KEYS = {"run", "step", "losses", "vectors", "method", "optimizer", "generator", "rng"}


def run_key(trainer) -> str:
    """What decides a run: the base model, words, settings, photo and masks."""
    fields = {"model": trainer.model.fingerprint, "tokens": trainer.tokens, "classes": trainer.class_words,
              "settings": settings_record(trainer.settings),
              "image": hashlib.sha256(trainer.image.numpy().tobytes()).hexdigest(),
              "masks": [hashlib.sha256(m.numpy().tobytes()).hexdigest() for m in trainer.masks]}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def save_checkpoint(trainer, directory: Path) -> None:
    state = {  # CHECKPOINT_KEYS, and the settings for a check before the model loads
        "run": run_key(trainer),
        "settings": settings_record(trainer.settings),
        "step": trainer.step,
        "losses": torch.tensor(trainer.losses, dtype=torch.float64),
        "vectors": [v.detach().cpu() for v in trainer.vocabulary.vectors],
        "method": trainer.method.checkpoint_state(),
        "optimizer": trainer.optimizer.state_dict(),
        "generator": trainer.generator.get_state(),
        "rng": trainer.rng.getstate(),
    }
    with atomic_path(directory / "checkpoint.pt") as tmp:
        torch.save(state, tmp)

def load_checkpoint(trainer, directory: Path) -> None:
    """Continue from the checkpoint in `directory` (none there: start from step 0)."""
    path = directory / "checkpoint.pt"
    if not path.is_file():
        log.info("no checkpoint in %s; starting from step 0", directory)
        return
    state = read_torch_file(path, "checkpoint")
    if not isinstance(state, dict) or not CHECKPOINT_KEYS <= set(state):
        raise InputError(f"checkpoint {path} is not a ProtoBooth training checkpoint; remove it or give another "
                         "checkpoint folder.")
    if state["run"] != run_key(trainer):
        raise InputError(f"checkpoint {path} belongs to a different run (model, image, masks, tokens or settings "
                         "differ); use another checkpoint folder or the same inputs.")
    with torch.no_grad():
        for vectors, saved in zip(trainer.vocabulary.vectors, state["vectors"]):
            vectors.copy_(saved)
    trainer.method.load_checkpoint_state(state["method"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.generator.set_state(state["generator"])
    trainer.rng.setstate(_as_tuples(state["rng"]))
    trainer.step = int(state["step"])
    trainer.losses = state["losses"].tolist()
    log.info("resumed from %s at step %d", path, trainer.step)


def settings_record(settings: TrainSettings) -> dict:
    """The settings that decide a run (not checkpoint_every), as plain JSON values."""
    values = {k: v for k, v in settings.as_dict().items() if k != "checkpoint_every"}
    return json.loads(json.dumps(values, sort_keys=True, default=str))


def _as_tuples(value):
    """random.setstate wants tuples all the way down; a checkpoint round trip may give lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
