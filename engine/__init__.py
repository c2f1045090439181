"""The ProtoBooth engine: segmentation, prototype initialisation, one-shot training and concept files.

Plain PyTorch on diffusers/transformers/peft/segment-anything. It never imports ComfyUI, so it works
from the CLI, a notebook or a test anywhere; the ComfyUI nodes are thin adapters over it.
"""
from .version import __version__

__all__ = ["__version__"]
