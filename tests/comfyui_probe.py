"""A test-only ComfyUI node, linked into the harness server's custom_nodes beside the pack.

It reports facts about the server process that HTTP does not show, such as which node classes the
ProtoBooth pack registered (the old ComfyUI's /object_info does not name a node's module).
"""
import sys

import torch


class ProtoBoothTestProbe:
    CATEGORY = "testing"
    RETURN_TYPES = ()
    FUNCTION = "report"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    @classmethod
    def IS_CHANGED(cls):
        return float("nan")  # never equal to the last value, so never served from ComfyUI's cache

    def report(self):
        from transformers.utils import is_torchvision_available

        pack = sys.modules.get("protobooth")
        facts = {
            "pack_file": getattr(pack, "__file__", None),
            "pack_nodes": sorted(getattr(pack, "NODE_CLASS_MAPPINGS", {})),
            "torchvision_modules": sorted(n for n in sys.modules if n.split(".")[0] == "torchvision"),
            "transformers_sees_torchvision": is_torchvision_available(),
            "inference_mode": torch.is_inference_mode_enabled(),
        }
        return {"ui": {"facts": [facts]}}


NODE_CLASS_MAPPINGS = {"ProtoBoothTestProbe": ProtoBoothTestProbe}
