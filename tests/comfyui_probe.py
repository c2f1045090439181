"""Test-only ComfyUI nodes, linked into the harness server's custom_nodes beside the pack.

ProtoBoothTestProbe reports facts about the server process that HTTP does not show, such as which node
classes the ProtoBooth pack registered (the old ComfyUI's /object_info does not name a node's module).
The others let tests see what the pack's custom types hold and hand the pack inputs no file provides.
"""
import sys
from types import SimpleNamespace

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
        import folder_paths
        from transformers.utils import is_torchvision_available

        sams = folder_paths.folder_names_and_paths.get("sams", ([], set()))
        pack = sys.modules.get("protobooth")
        facts = {
            "pack_file": getattr(pack, "__file__", None),
            "pack_nodes": sorted(getattr(pack, "NODE_CLASS_MAPPINGS", {})),
            "torchvision_modules": sorted(n for n in sys.modules if n.split(".")[0] == "torchvision"),
            "transformers_sees_torchvision": is_torchvision_available(),
            "inference_mode": torch.is_inference_mode_enabled(),
            "sams_folder": {"paths": list(sams[0]), "extensions": sorted(sams[1]), "models_dir": folder_paths.models_dir},
        }
        return {"ui": {"facts": [facts]}}


class ProtoBoothTestTokenInitReport:
    """Shows what a PROTOBOOTH_TOKEN_INIT holds (one entry per token)."""

    CATEGORY = "testing"
    RETURN_TYPES = ()
    FUNCTION = "report"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"token_init": ("PROTOBOOTH_TOKEN_INIT",)}}

    def report(self, token_init):
        entries = [{"token": p.token, "class_word": p.class_word, "method": p.method, "shape": list(p.vectors.shape),
                    "finite": bool(torch.isfinite(p.vectors).all()), "cosine_start": p.cosine_start,
                    "cosine_final": p.cosine_final} for p in token_init]
        return {"ui": {"token_init": entries}}


class ProtoBoothTestFakeVision:
    """A CLIP_VISION that is not the ViT-L/14 an SD1 checkpoint needs: 1024-wide (like ViT-H/14) or without a
    projection into CLIP's joint space (like image encoders of other kinds)."""

    CATEGORY = "testing"
    RETURN_TYPES = ("CLIP_VISION",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"kind": (["1024 wide", "no projection"],)}}

    def make(self, kind):
        def encode_image(image):
            return {"image_embeds": torch.zeros(image.shape[0], 1024)}

        projection = torch.nn.Linear(1024, 1024, bias=False) if kind == "1024 wide" else torch.nn.Identity()
        return (SimpleNamespace(model=SimpleNamespace(visual_projection=projection), encode_image=encode_image),)


NODE_CLASS_MAPPINGS = {
    "ProtoBoothTestProbe": ProtoBoothTestProbe,
    "ProtoBoothTestTokenInitReport": ProtoBoothTestTokenInitReport,
    "ProtoBoothTestFakeVision": ProtoBoothTestFakeVision,
}
