"""Prototype Init: start each new token where CLIP sees the object (engine.prototype, arXiv 2401.15708).

The CLIP text tower is the graph's own text encoder (a transformers view of the CLIP's weights over all
its layers, see bridge), so the vectors found are in the embedding space the diffusion model reads. The
image side is ComfyUI's CLIP_VISION model, whose image features are projected into CLIP's joint space;
the text features must be projected into the same space. SD2 checkpoints carry OpenCLIP-H's text
projection; SD1 and SDXL checkpoints leave CLIP-L's out (ComfyUI holds an identity or unset matrix instead), so
the node reads it from a CLIP model file the user chooses, for instance the full CLIP file Load CLIP Vision loads.
SDXL's token vectors have a second half, for OpenCLIP bigG: searched the same way when the optional clip_vision_g
input has bigG's image tower (the checkpoint carries bigG's text projection), else started from the class word's
vectors, as training without Prototype Init starts.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import comfy.model_management
import comfy.utils
import folder_paths

from ..engine.compat import token_table
from ..engine.errors import InputError
from ..engine.prototype import ClipTowers, PrototypeSettings, load_text_projection, prototype_embeddings
from ..engine.text.tokenizer import clip_tokenizer
from ..engine.models.families import FAMILIES
from .bridge import clip_family, load_whole, text_encoder_view, text_tower_view
from .common import CATEGORY, node_errors, photo_objects

log = logging.getLogger("protobooth")

NODE = "Prototype Init"
FROM_CHECKPOINT = "(from the checkpoint)"
PROJECTION_FOLDERS = ("clip_vision", "clip")  # newer ComfyUI calls "clip" text_encoders and keeps the old name
SAFETENSORS = (".safetensors", ".sft")  # only these are read: no pickles


def vision_width(clip_vision) -> int:
    """Width of the CLIP_VISION model's projected image features; refuses other image encoders."""
    projection = getattr(getattr(clip_vision, "model", None), "visual_projection", None)
    weight = getattr(projection, "weight", None)
    if not callable(getattr(clip_vision, "encode_image", None)) or not isinstance(weight, torch.Tensor):
        raise InputError(f"{NODE}: clip_vision is not a CLIP image encoder with a projection into CLIP's joint "
                         f"space ({type(clip_vision).__name__}); load a CLIP vision file with Load CLIP Vision: "
                         f"for SD1.x and SDXL {FAMILIES['sd1'].clip_vision}, for SD2.x {FAMILIES['sd2'].clip_vision}.")
    return weight.shape[0]


def projection_files() -> list[str]:
    """The text_projection_file choices: the checkpoint's own, then "<folder>/<file>" for each safetensors file there."""
    choices = [FROM_CHECKPOINT]
    for folder in PROJECTION_FOLDERS:
        choices += [f"{folder}/{name}" for name in folder_paths.get_filename_list(folder) if name.lower().endswith(SAFETENSORS)]
    return choices


def projection_fix(family: str) -> str:
    return (f"choose the full CLIP model file in text_projection_file (the {FAMILIES[family].full_clip}, in models/clip_vision: "
            "Load CLIP Vision loads the same file, so both can point at it), or leave Prototype Init out so that "
            "training starts from the class word.")


def _is_identity(weight: torch.Tensor) -> bool:
    return weight.shape[0] == weight.shape[1] and torch.equal(weight, torch.eye(weight.shape[0]))


def text_projection(encoder, family: str, choice: str) -> torch.nn.Linear:
    """A float32 copy of the projection of the text features into CLIP's joint space, the image features' space.

    `choice` is text_projection_file: the checkpoint's own projection, or the one in a CLIP model file
    (read alone; the file's text tower is not used). An identity matrix is refused wherever it comes from:
    with it the unprojected text state would be compared with projected image features.
    """
    fix = projection_fix(family)
    if choice == FROM_CHECKPOINT:
        weight = encoder.transformer.text_projection.weight.detach().float().cpu()
        # ComfyUI projects the pooled text state only where the model uses it (SD2); newer builds then leave an SD1
        # CLIP's projection unset, older ones hold an identity matrix.
        projects = encoder.options_default[2] and FAMILIES[family].checkpoint_text_projection
        if _is_identity(weight) or not projects:
            raise InputError(f"{NODE}: this {family.upper()} checkpoint holds no CLIP text projection ({family.upper()} "
                             "checkpoints can leave it out, and ComfyUI then holds an identity or unset matrix in its "
                             "place), so its text features are not in CLIP's joint space with the image features; "
                             f"{fix}")
    else:
        folder, _, name = choice.partition("/")
        path = folder_paths.get_full_path(folder, name) if folder in PROJECTION_FOLDERS else None
        if path is None:
            raise InputError(f"{NODE}: text_projection_file {choice!r} is not in ComfyUI's clip_vision or clip models "
                             "folder; choose a file from the list (reload the page after adding files).")
        width = encoder.transformer.get_input_embeddings().weight.shape[1]
        with node_errors(f"{NODE}: text_projection_file"):
            weight = load_text_projection(path, width, fix)
        if _is_identity(weight):
            raise InputError(f"{NODE}: text_projection_file: the text projection in {name} is an identity matrix, not "
                             f"CLIP's (a text encoder saved without its projection); {fix}")
        log.info("%s: text projection %s read from %s", NODE, list(weight.shape), choice)
    return _frozen_linear(weight)


def _frozen_linear(weight: torch.Tensor) -> torch.nn.Linear:
    with torch.inference_mode(False):  # a normal tensor: the search backpropagates through it
        projection = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        projection.weight = torch.nn.Parameter(weight.detach().float().cpu().clone(), requires_grad=False)
    return projection


def big_g_towers(text_model, clip_vision_g, device) -> "ComfyClipTowers":
    """The bigG half's towers: SDXL's bigG text tower with the checkpoint's own projection (SDXL uses it for its pooled
    text embedding), and ComfyUI's bigG CLIP_VISION."""
    projection = _frozen_linear(text_model.text_projection.weight).to(device)
    width = vision_width(clip_vision_g)
    if width != projection.out_features:
        raise InputError(f"{NODE}: clip_vision_g gives {width}-wide image features but SDXL's bigG text encoder gives "
                         f"{projection.out_features}-wide text features; load OpenCLIP ViT-bigG/14 (CLIP-ViT-bigG-14-laion2B-39B-b160k) "
                         "with Load CLIP Vision, "
                         "or leave clip_vision_g unconnected (the bigG half then starts from the class word).")
    return ComfyClipTowers(text_model=text_model, text_projection=projection, vision_model=None, visual_projection=None,
                           image_size=0, clip_vision=clip_vision_g)


@dataclass
class ComfyClipTowers(ClipTowers):
    """ClipTowers whose image side is ComfyUI's CLIP_VISION model (its own preprocessing and projection)."""

    clip_vision: object = None

    @property
    def device(self) -> torch.device:
        return token_table(self.text_model).weight.device

    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        embeds = self.clip_vision.encode_image(image.movedim(0, -1)[None].float())["image_embeds"]
        return F.normalize(embeds.float(), dim=-1)[0]


class ProtoBoothPrototypeInit:
    DESCRIPTION = (
        "Finds starting vectors for each new token: the text embedding of 'a photo of <token>' is moved towards "
        "what CLIP sees in the photo and the masked object, blended with the class word. Feed the result to "
        "Train Concept's token_init. tokens and class_words: comma-separated, one per mask, in mask order. "
        "text_projection_file: SD1 and SDXL checkpoints leave out CLIP's text projection, which puts text and image "
        "features in one space; choose the full CLIP file (model.safetensors of openai/clip-vit-large-patch14, in "
        "models/clip_vision; Load CLIP Vision loads the same file). SD2 checkpoints carry theirs. SDXL: that one file "
        "(CLIP ViT-L/14) is all it needs: the CLIP-L half of each token starts where CLIP sees the object, the bigG "
        "half from the class word, unless clip_vision_g has OpenCLIP ViT-bigG/14's image tower (the "
        "CLIP-ViT-bigG-14-laion2B-39B-b160k file, loaded with Load CLIP Vision), which starts that half where bigG sees "
        "the object."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("PROTOBOOTH_TOKEN_INIT",)
    RETURN_NAMES = ("token_init",)
    FUNCTION = "initialise"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "the text encoder of the model you will train"}),
                "clip_vision": ("CLIP_VISION", {"tooltip": "CLIP ViT-L/14 vision (Load CLIP Vision; SD2: ViT-H/14): the "
                                                "picture side of the prototype"}),
                "image": ("IMAGE", {"tooltip": "the one photo of the object(s)"}),
                "masks": ("MASK", {"tooltip": "one mask per object, in the order of the tokens (Segment Objects)"}),
                "tokens": ("STRING", {"default": "zqcat", "tooltip": "the new trigger word of each object, "
                                      "comma-separated (the same as on Train Concept)"}),
                "class_words": ("STRING", {"default": "cat", "tooltip": "each object's class word, comma-separated"}),
                "vectors": ("INT", {"default": 1, "min": 1, "max": 8, "tooltip": "token vectors per object (the same "
                                    "as Train Concept's n_vectors)"}),
                "steps": ("INT", {"default": 200, "min": 1, "max": 5000, "tooltip": "steps of the search for the "
                                  "vectors whose CLIP text feature matches the object's picture"}),
                "learning_rate": ("FLOAT", {"default": 0.005, "min": 1e-5, "max": 1.0, "step": 0.0005,
                                            "tooltip": "learning rate of that search"}),
            },
            "optional": {
                "text_projection_file": (projection_files(), {
                    "default": FROM_CHECKPOINT,
                    "tooltip": "where CLIP's text projection comes from: SD1 and SDXL checkpoints have none, so choose "
                               "the full CLIP file (the one Load CLIP Vision can load too)"}),
                "clip_vision_g": ("CLIP_VISION", {"tooltip": "SDXL only: OpenCLIP ViT-bigG/14 vision (Load CLIP Vision "
                                                  "of CLIP-ViT-bigG-14-laion2B-39B-b160k) to search the bigG half of "
                                                  "each token too; without it that half starts from the class word"}),
            },
        }  # fmt: skip

    def initialise(self, clip, clip_vision, image, masks, tokens, class_words, vectors, steps, learning_rate,
                   text_projection_file=FROM_CHECKPOINT, clip_vision_g=None):
        with node_errors(NODE):
            family = clip_family(clip)
            picture, masks, tokens, class_words = photo_objects(image, masks, tokens, class_words)
            if clip_vision_g is not None and family != "sdxl":
                raise InputError(f"{NODE}: clip_vision_g is for SDXL's bigG text encoder and this is a "
                                 f"{family.upper()} CLIP; leave clip_vision_g unconnected.")
        image_width = vision_width(clip_vision)
        # the encoder CLIP's image features fit (SDXL: CLIP-L; bigG has its own towers below)
        encoder = getattr(clip.cond_stage_model, FAMILIES[family].comfy_text_encoders[0])
        projection = text_projection(encoder, family, text_projection_file)
        if image_width != projection.out_features:
            raise InputError(f"{NODE}: the CLIP vision model gives {image_width}-wide image features but this "
                             f"{family.upper()} checkpoint's text encoder gives {projection.out_features}-wide text "
                             f"features (through the text projection {text_projection_file}); load the CLIP vision "
                             f"file that fits it, with the text projection of the same CLIP model: "
                             f"{FAMILIES[family].clip_vision}.")
        settings = PrototypeSettings(n_vectors=vectors, steps=steps, learning_rate=learning_rate)
        load_whole([clip.patcher])
        with torch.inference_mode(False), node_errors(NODE):
            device = torch.device(clip.patcher.load_device)
            if family == "sdxl":  # both towers with every layer (the engine searches each part that has towers)
                text_model = text_encoder_view(clip, family, device)
                tower_l = text_model.clip_l
            else:  # the whole tower: CLIP's joint-space text features come from its last layer, not SD2's penultimate one
                text_model = tower_l = text_tower_view(clip, family, device)
            towers = ComfyClipTowers(text_model=tower_l, text_projection=projection.to(device), vision_model=None,
                                     visual_projection=None, image_size=0, clip_vision=clip_vision)
            if family == "sdxl":
                towers = [towers, big_g_towers(text_model.clip_g, clip_vision_g, device) if clip_vision_g else None]
            bar = comfy.utils.ProgressBar(len(tokens) * steps * (1 + (clip_vision_g is not None)))
            finished = [0]  # the steps of the parts searched before this one (each part reports from 0)

            def report(step: int, total: int) -> None:
                bar.update_absolute(finished[0] + step, bar.total)
                if step == total:
                    finished[0] += total

            results = prototype_embeddings(
                towers, text_model, clip_tokenizer(pad_token=FAMILIES[family].pad_token), picture, masks, tokens,
                class_words, settings, progress=report,
            )  # fmt: skip
        return (results,)


NODE_CLASS_MAPPINGS = {"ProtoBoothPrototypeInit": ProtoBoothPrototypeInit}
NODE_DISPLAY_NAME_MAPPINGS = {"ProtoBoothPrototypeInit": "Prototype Init"}
