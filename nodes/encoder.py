"""Load Object Encoder and Encode Object: a concept from one photo in one forward pass of a pretrained object encoder
(engine.encoder; Taming Encoder, arXiv 2304.02642), no training. Encoders live in models/protobooth_encoders.

The concept is an ordinary one (token vectors, plus the UNet LoRA the encoder was pretrained with, if any): Save
Concept and Apply Concept take it, and its token_init output gives Train Concept the encoder's vectors as a head start.
"""
from __future__ import annotations

import torch

import folder_paths

from ..engine.encoder.encode import check_encoder_fits, encoder_concept, object_vectors
from ..engine.encoder.model import load_encoder
from ..engine.errors import InputError
from ..engine.models.families import FAMILIES
from ..engine.prototype import Prototype
from ..engine.text.tokenizer import clip_tokenizer
from .bridge import base_fingerprint, check_clip, load_whole, model_family, text_encoder_view
from .common import CATEGORY, node_errors, photo_objects, register_models_folder

ENCODERS = "protobooth_encoders"
register_models_folder(ENCODERS, {".safetensors"})


class ProtoBoothLoadObjectEncoder:
    DESCRIPTION = ("Loads a pretrained object encoder (protobooth pretrain-encoder) from models/protobooth_encoders, for "
                   "Encode Object.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("PROTOBOOTH_OBJECT_ENCODER",)
    RETURN_NAMES = ("encoder",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"encoder_name": (folder_paths.get_filename_list(ENCODERS), {
            "tooltip": "the encoder file in models/protobooth_encoders"})}}

    def load(self, encoder_name):
        path = folder_paths.get_full_path(ENCODERS, encoder_name)
        if path is None:
            raise InputError(f"Load Object Encoder: {encoder_name!r} is not in models/{ENCODERS}; choose a file from "
                             "the list (reload the page after adding files).")
        with node_errors("Load Object Encoder"):
            encoder, lora, notes = load_encoder(path)
        return ((encoder, lora, encoder_name),)


class ProtoBoothEncodeObject:
    DESCRIPTION = (
        "A concept from one photo without training: the object encoder turns each masked object into its token "
        "vectors in one forward pass (well under a second). Chain the concept into Save Concept or Apply Concept like a "
        "trained one; token_init starts Train Concept from these vectors, to tune them for a few dozen steps. The "
        "encoder must have been pretrained for this model's family with this CLIP vision model."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("PROTOBOOTH_CONCEPT", "PROTOBOOTH_TOKEN_INIT")
    RETURN_NAMES = ("concept", "token_init")
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "the base model the concept is for (its family and identity go in the file)"}),
            "clip": ("CLIP", {"tooltip": "its text encoder, from the same checkpoint"}),
            "clip_vision": ("CLIP_VISION", {"tooltip": "the CLIP vision model the encoder was pretrained with (Load CLIP "
                                            "Vision)"}),
            "encoder": ("PROTOBOOTH_OBJECT_ENCODER", {"tooltip": "from Load Object Encoder"}),
            "image": ("IMAGE", {"tooltip": "the one photo of the object(s)"}),
            "masks": ("MASK", {"tooltip": "one mask per object, in the order of the tokens (Segment Objects)"}),
            "tokens": ("STRING", {"default": "zqcat", "tooltip": "the new trigger word of each object, comma-separated"}),
            "class_words": ("STRING", {"default": "cat", "tooltip": "each object's class word, comma-separated"}),
        }}

    def encode(self, model, clip, clip_vision, encoder, image, masks, tokens, class_words):
        node = "Encode Object"
        encoder, lora, name = encoder
        with node_errors(node):
            family, _ = model_family(model)
            check_clip(clip, family)
            picture, masks, tokens, class_words = photo_objects(image, masks, tokens, class_words)
        load_whole([clip.patcher])
        device = torch.device(clip.patcher.load_device)
        with torch.inference_mode(False), node_errors(node):
            text_model = text_encoder_view(clip, family, device)
            widths = tuple(getattr(text_model, "widths", None) or (text_model.get_input_embeddings().weight.shape[1],))

            def features_of(crop: torch.Tensor) -> torch.Tensor:
                features = clip_vision.encode_image(crop.movedim(0, -1)[None].float())["last_hidden_state"].float()
                check_encoder_fits(encoder, family, sum(widths), features.shape[-1], f"encoder {name}")
                return features

            vectors = object_vectors(encoder, features_of, text_model, clip_tokenizer(pad_token=FAMILIES[family].pad_token),
                                     picture, masks, class_words)
            concept = encoder_concept(encoder, lora, vectors, tokens, class_words, family, base_fingerprint(model, clip),
                                      widths, name)
        starts = [Prototype(t, c, v, "encoder") for t, c, v in zip(tokens, class_words, vectors)]
        return concept, starts


NODE_CLASS_MAPPINGS = {"ProtoBoothLoadObjectEncoder": ProtoBoothLoadObjectEncoder,
                       "ProtoBoothEncodeObject": ProtoBoothEncodeObject}
NODE_DISPLAY_NAME_MAPPINGS = {"ProtoBoothLoadObjectEncoder": "Load Object Encoder",
                              "ProtoBoothEncodeObject": "Encode Object"}
