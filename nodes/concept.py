"""Save, Load and Apply Concept: concepts as the two files stock tools load (engine.concept).

Save Concept writes `models/loras/<name>.safetensors` (kohya keys) and `models/embeddings/<name>.safetensors`,
so a graph without ProtoBooth can use them with LoraLoader and `embedding:<name>`. Load Concept lists the
embeddings that carry ProtoBooth's metadata. Apply Concept puts a concept on a MODEL and CLIP (clones).
"""
from __future__ import annotations

import os

import folder_paths

from ..engine.concept.concept import check_concept_name, concept_files, load_concept, read_concept_metadata, save_concept
from ..engine.errors import InputError
from ..engine.fileio import check_output
from .bridge import apply_concept
from .common import CATEGORY, node_errors

EXTENSION = ".safetensors"


def concept_names() -> list[str]:
    """Saved ProtoBooth concepts: embedding files with ProtoBooth metadata, named without the extension."""
    names = []
    for filename in folder_paths.get_filename_list("embeddings"):
        if filename.endswith(EXTENSION) and read_concept_metadata(folder_paths.get_full_path("embeddings", filename)):
            names.append(filename[: -len(EXTENSION)])
    return sorted(names)


def concept_paths(name: str) -> tuple[str | None, str | None]:
    """(LoRA file, embedding file) of a saved concept; None where there is none."""
    filename = name + EXTENSION
    return folder_paths.get_full_path("loras", filename), folder_paths.get_full_path("embeddings", filename)


class ProtoBoothSaveConcept:
    DESCRIPTION = (
        "Saves a concept as models/loras/<name>.safetensors and models/embeddings/<name>.safetensors. Without "
        "ProtoBooth, use them with LoraLoader and 'embedding:<name>' in the prompt; a concept of several objects "
        "also gets models/embeddings/<name>_<token>.safetensors per object, for 'embedding:<name>_<token>'."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "concept": ("PROTOBOOTH_CONCEPT", {"tooltip": "the concept to save, from Train Concept"}),
                "name": ("STRING", {"default": "my_concept", "tooltip": "file name in models/loras and "
                                    "models/embeddings (letters, digits, - and _)"}),
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": "replace a concept of this name; off: refuse "
                                          "and keep the old files"}),
            }
        }

    def save(self, concept, name, overwrite):
        with node_errors("Save Concept"):
            name = check_concept_name(name)
            lora = os.path.join(folder_paths.get_folder_paths("loras")[0], name + EXTENSION)
            embedding = os.path.join(folder_paths.get_folder_paths("embeddings")[0], name + EXTENSION)
            files = concept_files(lora, embedding, concept.tokens)
            taken = [str(path) for path in files if path.exists()]
            if taken and not overwrite:
                raise InputError(f"{' and '.join(taken)} already exist(s); choose another name or switch overwrite on.")
            check_output(os.path.dirname(lora), [os.path.basename(p) for p in files[:1]], what="the loras folder")
            check_output(os.path.dirname(embedding), [os.path.basename(p) for p in files[1:]], what="the embeddings folder")
            try:
                save_concept(concept, lora, embedding)
            except OSError as error:  # a full disk: the concept itself is still in the graph
                raise InputError(f"could not write {getattr(error, 'filename', None) or lora} ({error.strerror or error}); "
                                 "the trained concept is still in the graph: free some space and queue again (Train "
                                 "Concept reuses its result, nothing trains again).") from None
        written = [str(path) for path in files if path.exists()]
        triggers = ", ".join(f"{o.token} {o.class_word}" for o in concept.objects)
        return {"ui": {"text": [f"saved {' and '.join(written)}; write {triggers} in prompts"]}}


class ProtoBoothLoadConcept:
    DESCRIPTION = ("Loads a concept saved by Save Concept (the embedding file and, when it has one, its LoRA), checking "
                   "that the two files belong together.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("PROTOBOOTH_CONCEPT",)
    RETURN_NAMES = ("concept",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"concept_name": (concept_names(), {"tooltip": "a concept Save Concept wrote (its "
                                                                  "embedding in models/embeddings)"})}}

    @classmethod
    def IS_CHANGED(cls, concept_name):
        # a concept saved again under the same name must be read again
        return [os.path.getmtime(path) if path else None for path in concept_paths(concept_name)]

    def load(self, concept_name):
        with node_errors("Load Concept"):
            lora, embedding = concept_paths(check_concept_name(concept_name))
            if embedding is None:
                raise InputError(f"no concept named {concept_name!r} in models/embeddings; save one with Save Concept.")
            return (load_concept(embedding, lora),)


class ProtoBoothApplyConcept:
    DESCRIPTION = (
        "Applies a concept to a MODEL and CLIP (returned as copies): its LoRA at strength_model, and its trigger "
        "words, which then work in any CLIPTextEncode. strength_clip moves the trigger words from their class "
        "word (0) to the learned object (1) and scales a text-encoder LoRA (TextBoost concepts have one), as "
        "stock Load LoRA does. Chain several to use several concepts in one picture."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP")
    RETURN_NAMES = ("model", "clip")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "the base model the concept was trained on"}),
                "clip": ("CLIP", {"tooltip": "its text encoder: the concept's words are added to it"}),
                "concept": ("PROTOBOOTH_CONCEPT", {"tooltip": "from Train Concept or Load Concept"}),
                "strength_model": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.05,
                                             "tooltip": "strength of the concept's LoRA on the UNet (as Load LoRA)"}),
                "strength_clip": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.05,
                                            "tooltip": "strength of its LoRA on the text encoder, where it has one"}),
            }
        }

    def apply(self, model, clip, concept, strength_model, strength_clip):
        with node_errors("Apply Concept"):
            return apply_concept(model, clip, concept, strength_model, strength_clip)


NODE_CLASS_MAPPINGS = {
    "ProtoBoothSaveConcept": ProtoBoothSaveConcept,
    "ProtoBoothLoadConcept": ProtoBoothLoadConcept,
    "ProtoBoothApplyConcept": ProtoBoothApplyConcept,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ProtoBoothSaveConcept": "Save Concept",
    "ProtoBoothLoadConcept": "Load Concept",
    "ProtoBoothApplyConcept": "Apply Concept",
}
