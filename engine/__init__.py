"""The ProtoBooth engine: segmentation, prototype initialisation, one-shot training and concept files.

Plain PyTorch on diffusers/transformers/peft/segment-anything. It never imports ComfyUI, so it works
from the CLI, a notebook or a test anywhere; the ComfyUI nodes are thin adapters over it.

The names below are imported on first use, so `import protobooth.engine` stays fast.
"""
from __future__ import annotations

import importlib

from .version import __version__

_PUBLIC = {
    "InputError": "errors",
    "DiffusionModel": "models",
    "load_model": "loading",
    "load_image": "images",
    "load_mask": "images",
    "ClipTowers": "prototype",
    "PrototypeSettings": "prototype",
    "prototype_embeddings": "prototype",
    "TrainSettings": "train",
    "OneShotTrainer": "train",
    "TrainingCancelled": "train",
    "train_concept": "train",
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
