"""ProtoBooth: teach Stable Diffusion one object from one photo.

This folder is both a ComfyUI custom-node pack (ComfyUI imports this file) and the Python package
`protobooth` (library and CLI). Node classes are registered only when ComfyUI is the importer, so the
library works anywhere without ComfyUI installed.
"""
import sys

from .engine.version import __version__

WEB_DIRECTORY = "./js"
NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}


def _inside_comfyui() -> bool:
    # ComfyUI imports its model management and folder registry before it loads custom nodes.
    return "folder_paths" in sys.modules and "comfy.model_management" in sys.modules


if _inside_comfyui():
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F811

__all__ = ["__version__", "WEB_DIRECTORY", "NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
