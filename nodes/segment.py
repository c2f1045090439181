"""SAM Loader and Segment Objects: one mask per object in one photo, from boxes and clicks (engine.segment).

SAM checkpoints live in ComfyUI's `models/sams` folder, the one Impact Pack and other SAM packs use, so a
user's existing sam_vit_b/l/h files are listed. The model stays on the offload device between runs and
visits the compute device only while it segments: ComfyUI's memory manager does not know about it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import comfy.model_management
import comfy.utils
import folder_paths

from ..engine.errors import InputError
from ..engine.segment import Segmenter, load_sam, overlay_masks, parse_prompts
from .common import CATEGORY, image_from_batch, node_errors, register_models_folder

SAMS = "sams"
SAM_EXTENSIONS = {".pth", ".pt", ".safetensors"}
DEFAULT_PROMPTS = '[{"box": [8, 8, 56, 56]}]'


register_models_folder(SAMS, SAM_EXTENSIONS)  # the 2024 ComfyUI has no "sams" entry of its own; newer ones may


@dataclass
class LoadedSam:
    """PROTOBOOTH_SAM: a segment-anything model (on the offload device) and where it runs."""

    model: torch.nn.Module
    device: torch.device
    name: str


class ProtoBoothSAMLoader:
    DESCRIPTION = (
        "Loads a segment-anything (SAM) checkpoint from models/sams. The model size (vit_b, vit_l, vit_h) "
        "is read from the weights, so any file name works."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("PROTOBOOTH_SAM",)
    RETURN_NAMES = ("sam",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"sam_name": (folder_paths.get_filename_list(SAMS), {
            "tooltip": "a segment-anything checkpoint (sam_vit_b/l/h .pth) in models/sams"})}}

    def load(self, sam_name):
        path = folder_paths.get_full_path(SAMS, sam_name)
        if path is None:
            raise InputError(
                f"SAM Loader: {sam_name!r} is not in models/sams; put a segment-anything checkpoint "
                "(e.g. sam_vit_b_01ec64.pth) there and refresh."
            )
        offload = comfy.model_management.unet_offload_device()
        with node_errors("SAM Loader"):
            model = load_sam(path, device=offload)
        return (LoadedSam(model, comfy.model_management.get_torch_device(), sam_name),)


class ProtoBoothSegmentObjects:
    DESCRIPTION = (
        "Segments objects in one photo with SAM. prompts is JSON with one entry per object, in image pixels: "
        '[{"box": [left, top, right, bottom]}, {"positive": [[x, y]], "negative": [[x, y]]}]. '
        "Outputs one mask per object, in prompt order, and a numbered preview."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MASK", "IMAGE")
    RETURN_NAMES = ("masks", "preview")
    FUNCTION = "segment"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "the photo to pick objects in"}),
                "sam": ("PROTOBOOTH_SAM", {"tooltip": "from Load SAM"}),
                # dynamicPrompts off: the frontend would otherwise read JSON braces as {a|b} choices
                "prompts": ("STRING", {"multiline": True, "default": DEFAULT_PROMPTS, "dynamicPrompts": False,
                                       "tooltip": "one entry per object: a box and/or clicks, in image pixels; "
                                                  "the Pick objects… button writes it for you"}),
                "dilate": ("INT", {"default": 0, "min": -64, "max": 64, "step": 1,
                                   "tooltip": "grow (positive) or shrink (negative) every mask by this many pixels"}),
                "feather": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 32.0, "step": 0.5,
                                      "tooltip": "soften the mask edges: blur radius (sigma) in pixels"}),
                "multimask": ("BOOLEAN", {"default": True, "tooltip": "let SAM propose several masks and keep the "
                                          "most confident (best for a single click); off: its single mask"}),
            }
        }

    def segment(self, image, sam, prompts, dilate, feather, multimask):
        node = "Segment Objects"
        with node_errors(node):
            picture = image_from_batch(image)
            height, width = picture.shape[-2:]
            # refuse bad prompts before SAM's image encoder (the slow part) runs
            objects = parse_prompts(prompts, image_size=(width, height))
            blocks = len(sam.model.image_encoder.blocks)
            progress = comfy.utils.ProgressBar(blocks + len(objects))
            try:
                segmenter = Segmenter(sam.model.to(sam.device))
                segmenter.set_image(picture, progress=lambda done, _total: progress.update_absolute(done))
                masks = segmenter.segment(
                    objects, multimask=multimask, dilate=dilate, feather=feather,
                    progress=lambda done, _total: progress.update_absolute(blocks + done),
                )  # fmt: skip
            finally:
                sam.model.to(comfy.model_management.unet_offload_device())
            preview = overlay_masks(picture, masks)
        return (torch.stack(masks), preview.movedim(0, -1)[None])


NODE_CLASS_MAPPINGS = {
    "ProtoBoothSAMLoader": ProtoBoothSAMLoader,
    "ProtoBoothSegmentObjects": ProtoBoothSegmentObjects,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ProtoBoothSAMLoader": "SAM Loader (ProtoBooth)",
    "ProtoBoothSegmentObjects": "Segment Objects",
}
