"""The ProtoBooth engine: segmentation, prototype initialisation, one-shot training and concept files.

Plain PyTorch on diffusers/transformers/peft/segment-anything. It never imports ComfyUI, so it works
from the CLI, a notebook or a test anywhere; the ComfyUI nodes are thin adapters over it. Its folders follow
the pipeline: models/ (families, loading, precision), segment/, text/, prototype.py, train/ (settings, the
shared trainer, methods/), concept/, generate.py; learn.py runs the whole job and cli/ is the command line.

The names below are imported on first use, so `import protobooth.engine` stays fast.
"""
from __future__ import annotations

import importlib

from .version import __version__

_PUBLIC = {
    "InputError": "errors",
    "DiffusionModel": "models.diffusion_model",
    "load_model": "models.loading",
    "load_image": "images",
    "load_mask": "images",
    "ClipTowers": "prototype",
    "PrototypeSettings": "prototype",
    "prototype_embeddings": "prototype",
    "TrainSettings": "train",
    "ObjectDrivenSettings": "train",
    "OneShotTrainer": "train",
    "TrainingCancelled": "errors",
    "train_concept": "train",
    "weights_dtype": "models.precision",
    "Concept": "concept",
    "save_concept": "concept",
    "load_concept": "concept",
    "concept_applied": "concept",
    "generate": "generate",
    "load_sam": "segment",
    "Segmenter": "segment",
    "ObjectPrompt": "segment",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
