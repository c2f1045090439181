"""ComfyUI nodes: thin adapters over the engine. The only code in ProtoBooth that imports ComfyUI.

One module per node family; each holds its NODE_CLASS_MAPPINGS and NODE_DISPLAY_NAME_MAPPINGS.
"""
from importlib import import_module

FAMILIES = ("segment", "prototype", "train", "concept", "encoder")

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for _family in FAMILIES:
    _module = import_module(f".{_family}", __name__)
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
