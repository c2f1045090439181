"""Test-only ComfyUI nodes, linked into the harness server's custom_nodes beside the pack.

ProtoBoothTestProbe reports facts about the server process that HTTP does not show, such as which node
classes the ProtoBooth pack registered (the old ComfyUI's /object_info does not name a node's module).
The others let tests see what the pack's custom types hold and hand the pack inputs no file provides.
"""
import sys
from types import SimpleNamespace

import torch


def _pack_part(name: str):
    """A submodule of the pack ("nodes.bridge"), whatever name ComfyUI gave the pack's module."""
    return sys.modules[f"{_pack_module().__name__}.{name}"]


def _pack_module():
    """The ProtoBooth pack's module: named "protobooth" by the 2024 ComfyUI, by its folder's full path by newer ones."""
    if "protobooth" in sys.modules:
        return sys.modules["protobooth"]
    return next((module for name, module in list(sys.modules.items())
                 if name.replace("_x_", ".").endswith("custom_nodes/protobooth")), None)


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
        pack = _pack_module()
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
                    "cosine_final": p.cosine_final, "vectors": p.vectors.flatten().tolist()} for p in token_init]
        return {"ui": {"token_init": entries}}


class ProtoBoothTestFakeVision:
    """A CLIP_VISION that is not the ViT-L/14 an SD1 checkpoint needs: 1024-wide (like ViT-H/14) or without a
    projection into CLIP's joint space (like image encoders of other kinds); or a stand-in for ViT-L/14 without its
    300 M parameters ("768 wide"), or for bigG's image tower in the tiny SDXL's width ("48 wide"), whose features are
    a fixed random projection of the downscaled picture."""

    CATEGORY = "testing"
    RETURN_TYPES = ("CLIP_VISION",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"kind": (["1024 wide", "no projection", "768 wide", "48 wide"],)}}

    def make(self, kind):
        stand_in = kind in ("768 wide", "48 wide")
        width = int(kind.split()[0]) if stand_in else 1024
        features = torch.randn(8 * 8 * 3, width, generator=torch.Generator().manual_seed(0))

        def encode_image(image):
            hidden = torch.zeros(image.shape[0], 5, width)  # (what an object encoder reads)
            if not stand_in:
                return {"image_embeds": torch.zeros(image.shape[0], width), "last_hidden_state": hidden}
            small = torch.nn.functional.interpolate(image.movedim(-1, 1).float(), size=(8, 8), mode="area")
            return {"image_embeds": small.flatten(1) @ features, "last_hidden_state": hidden}

        projection = torch.nn.Identity() if kind == "no projection" else torch.nn.Linear(width, width, bias=False)
        return (SimpleNamespace(model=SimpleNamespace(visual_projection=projection), encode_image=encode_image),)


class ProtoBoothTestBoxMasks:
    """MASK from boxes (JSON [[left, top, right, bottom], ...]) on an image's size: masks without SAM."""

    CATEGORY = "testing"
    RETURN_TYPES = ("MASK",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "boxes": ("STRING", {"default": "[[8, 8, 28, 28]]"})}}

    def make(self, image, boxes):
        import json

        masks = torch.zeros(len(json.loads(boxes)), image.shape[1], image.shape[2])
        for mask, (left, top, right, bottom) in zip(masks, json.loads(boxes)):
            mask[top:bottom, left:right] = 1
        return (masks,)


class ProtoBoothTestWeightsDigest:
    """A hash of a MODEL's UNet and a CLIP's text-encoder weights as they are stored, and their patch counts.

    `after` only orders it after another node (a concept that has to exist first)."""

    CATEGORY = "testing"
    RETURN_TYPES = ()
    FUNCTION = "report"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "clip": ("CLIP",)}, "optional": {"after": ("PROTOBOOTH_CONCEPT",)}}

    @classmethod
    def IS_CHANGED(cls, **_inputs):
        return float("nan")  # the weights can change under the same inputs (see below): never serve a cached digest

    def report(self, model, clip, after=None):
        import hashlib

        import comfy.model_management

        # Clones share one set of weights, which hold the patches of whichever clone was loaded last (until another
        # is loaded); loading this MODEL and CLIP first makes the digest theirs.
        comfy.model_management.load_models_gpu([model, clip.patcher])
        digest = hashlib.sha256()
        for module in (model.model.diffusion_model, clip.cond_stage_model):
            for name, tensor in sorted(module.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        facts = {"digest": digest.hexdigest(), "model_patches": len(model.patches), "clip_patches": len(clip.patcher.patches),
                 "tokenizer": type(clip.tokenizer).__name__}
        return {"ui": {"facts": [facts]}}


class ProtoBoothTestUNetPrediction:
    """The UNet's raw prediction for a given latent (JSON, [1,4,h,w]), timestep and conditioning, with the
    MODEL's patches (LoRA) applied the way sampling applies them."""

    CATEGORY = "testing"
    RETURN_TYPES = ()
    FUNCTION = "report"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "conditioning": ("CONDITIONING",), "latent": ("STRING", {"default": "[]"}),
                             "timestep": ("INT", {"default": 500, "min": 0, "max": 999})}}

    def report(self, model, conditioning, latent, timestep):
        import json

        import comfy.model_management

        comfy.model_management.load_models_gpu([model])
        unet = model.model.diffusion_model
        sample = torch.tensor(json.loads(latent), dtype=torch.float32)
        context = conditioning[0][0].float()
        # SDXL's size conditioning, as its sampler builds it: the pooled text embedding and the picture's size
        size = {"width": sample.shape[-1] * 8, "height": sample.shape[-2] * 8}
        added = model.model.encode_adm(pooled_output=conditioning[0][1].get("pooled_output"), **size)
        with torch.no_grad():
            prediction = unet(sample, timesteps=torch.tensor([timestep]), context=context,
                              **({} if added is None else {"y": added.float()}))
        # the whole text context: its first positions alone would hide a trigger word's later vectors
        pooled = conditioning[0][1].get("pooled_output")
        return {"ui": {"prediction": [prediction.flatten().tolist()], "context": [context.flatten().tolist()],
                       "pooled": [None if pooled is None else pooled.float().flatten().tolist()]}}


class ProtoBoothTestViewOutputs:
    """What the pack's diffusers views of a MODEL/CLIP/VAE compute: UNet prediction, text states, VAE latents."""

    CATEGORY = "testing"
    RETURN_TYPES = ()
    FUNCTION = "report"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "clip": ("CLIP",), "vae": ("VAE",), "image": ("IMAGE",),
                             "latent": ("STRING", {"default": "[]"}), "prompt": ("STRING", {"default": "a photo"})}}

    def report(self, model, clip, vae, image, latent, prompt):
        import json

        bridge = _pack_part("nodes.bridge")
        with torch.inference_mode(False), torch.no_grad():
            view = bridge.diffusion_model_view(model, clip, vae)
            ids = view.tokenizer([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
            conditioning = view.encode(ids)
            states = conditioning.context
            sample = torch.tensor(json.loads(latent), dtype=torch.float32)
            prediction = view.unet(sample, 500, **view.unet_kwargs(conditioning, sample.shape[-1] * 8)).sample
            pixels = image[0, ..., :3].movedim(-1, 0)[None] * 2 - 1
            encoded = view.vae.encode(pixels).latent_dist.mean
            shared = view.unet.conv_in.weight.data_ptr() == model.model.diffusion_model.input_blocks[0][0].weight.data_ptr()
        pooled = None if conditioning.pooled is None else conditioning.pooled.flatten().tolist()
        return {"ui": {"outputs": [{"prediction": prediction.flatten().tolist(), "states": states.flatten().tolist(),
                                    "pooled": pooled, "latent_mean": encoded.flatten().tolist(),
                                    "unet_shares_storage": shared, "fingerprint": view.fingerprint,
                                    "family": view.family, "latent_scaling": view.latent_scaling,
                                    "config_class": type(model.model.model_config).__name__}]}}


class ProtoBoothTestAsFamily:
    """The MODEL, presented as another ComfyUI model family (a config class of that name); the input is left as it is."""

    CATEGORY = "testing"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "relabel"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "config_class": ("STRING", {"default": "SDXL"})}}

    def relabel(self, model, config_class):
        import copy

        config = copy.copy(model.model.model_config)
        config.__class__ = type(config_class, (type(config),), {})
        inner = copy.copy(model.model)  # a shallow copy: same modules, its own model_config attribute
        inner.model_config = config
        relabelled = model.clone()
        relabelled.model = inner
        return (relabelled,)


class ProtoBoothTestTextTower:
    """Builds a small ComfyUI text encoder of a family (SD2: OpenCLIP-style, conditioning on the penultimate
    layer, with a text projection) and reports what ComfyUI computes beside what the pack's text views and
    Prototype Init's text features give: the conditioning view must match ComfyUI's conditioning, and the
    all-layers view through the text projection must match ComfyUI's projected pooled output."""

    CATEGORY = "testing"
    RETURN_TYPES = ()
    FUNCTION = "report"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (["sd1", "sd2"],), "last_layer": ("INT", {"default": -1, "min": -3, "max": -1})}}

    def report(self, family, last_layer):
        import json
        import os
        import tempfile
        from types import SimpleNamespace

        import comfy.sd1_clip
        import torch.nn.functional as F

        bridge = _pack_part("nodes.bridge")
        prototype = _pack_part("nodes.prototype")
        record = _pack_part("engine.models.families").FAMILIES[family]
        tokenizer = _pack_part("engine.text.tokenizer").clip_tokenizer(pad_token=record.pad_token)
        config = {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "num_hidden_layers": 4,
                  "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": record.text_activation,
                  "bos_token_id": 49406, "eos_token_id": 49407}
        with tempfile.TemporaryDirectory() as folder:  # the 2024-03 SDClipModel reads its config from a file
            path = os.path.join(folder, "config.json")
            with open(path, "w") as handle:
                json.dump(config, handle)
            layer = {"layer": "hidden", "layer_idx": -2} if family == "sd2" else {"layer": "last"}  # as SD2ClipHModel
            encoder = comfy.sd1_clip.SDClipModel(textmodel_json_config=path, dtype=torch.float32, **layer)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():  # ComfyUI leaves its layers uninitialised: random weights that keep outputs finite
            for name, parameter in encoder.transformer.named_parameters():
                scale = 0.02 if parameter.ndim == 1 or "embedding" in name else parameter.shape[-1] ** -0.5
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale + float(name.endswith("norm.weight")))
        clip = SimpleNamespace(cond_stage_model=torch.nn.ModuleDict({record.comfy_text_encoders[0]: encoder}),
                               layer_idx=None if last_layer == -1 else last_layer)
        if clip.layer_idx is not None:
            encoder.set_clip_options({"layer": clip.layer_idx})  # what CLIPSetLastLayer makes CLIP.encode do
        ids = tokenizer(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        conditioning, pooled = encoder(ids.tolist())
        with torch.inference_mode(False), torch.no_grad():
            views = {"conditioning": bridge.text_encoder_view(clip, family, torch.device("cpu")),
                     "all": bridge.text_tower_view(clip, family, torch.device("cpu"))}
            projection = prototype.text_projection(encoder, family, prototype.FROM_CHECKPOINT)
            features = {kind: prototype.ComfyClipTowers(text_model=view, text_projection=projection, vision_model=None,
                                                        visual_projection=None, image_size=0).text_features(ids)[0]
                        for kind, view in views.items()}
            states = views["conditioning"](input_ids=ids).last_hidden_state
        joint = F.normalize(pooled.float(), dim=-1)[0]
        facts = {kind: {"layers": view.config.num_hidden_layers,
                        "feature_gap": float((features[kind] - joint).abs().max())} for kind, view in views.items()}
        facts["conditioning"]["state_gap"] = float((states - conditioning).abs().max())
        return {"ui": {"facts": [facts]}}


def _init_randomly(module, generator) -> None:
    """Random weights that keep activations finite (ComfyUI's layers are left uninitialised): Linear/conv
    N(0, 1/fan_in), biases 0, norms 1 and 0, embeddings N(0, 0.02)."""
    with torch.no_grad():
        for child in module.modules():
            if isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)):
                child.weight.copy_(torch.randn(child.weight.shape, generator=generator) * child.weight[0].numel() ** -0.5)
                if child.bias is not None:
                    child.bias.zero_()
            elif isinstance(child, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and child.weight is not None:
                child.weight.fill_(1)
                child.bias.zero_()
            elif isinstance(child, torch.nn.Embedding):
                child.weight.copy_(torch.randn(child.weight.shape, generator=generator) * 0.02)


# A tiny SDXL: ComfyUI needs at least 3 text-encoder layers to read the penultimate one, and its SDXL UNet heads are
# 64 channels wide and its size ids 256 (ComfyUI hard-codes both).
TINY_SDXL = {"width_l": 32, "width_g": 48, "text_layers": 3, "text_heads": 4, "unet_channels": 64}


def _tiny_sdxl_clip(generator):
    """A CLIP made by ComfyUI's own CLIP class, SDXL tokenizer and SDXLClipModel (its layer choices, padding and
    pooling), whose two text transformers are built small from ComfyUI's own CLIP-L and bigG configs."""
    import json
    import os

    import comfy.clip_model
    import comfy.ops
    import comfy.sd
    import comfy.sd1_clip
    import comfy.sdxl_clip

    def small(encoder, config_file, width, dtype, device):
        with open(os.path.join(os.path.dirname(comfy.sd1_clip.__file__), config_file)) as handle:
            config = json.load(handle)
        config.update(hidden_size=width, intermediate_size=2 * width, num_attention_heads=TINY_SDXL["text_heads"],
                      num_hidden_layers=TINY_SDXL["text_layers"])
        encoder.transformer = comfy.clip_model.CLIPTextModel(config, dtype, device, comfy.ops.manual_cast).eval()
        encoder.transformer.requires_grad_(False)
        encoder.num_layers = TINY_SDXL["text_layers"]

    def build(dtype=None, device=None, **options):
        model = comfy.sdxl_clip.SDXLClipModel(dtype=dtype, device="meta", **options)  # full-size parts never allocated
        small(model.clip_l, "sd1_clip_config.json", TINY_SDXL["width_l"], dtype, device)
        small(model.clip_g, "clip_config_bigg.json", TINY_SDXL["width_g"], dtype, device)
        return model

    target = SimpleNamespace(params={}, clip=build, tokenizer=comfy.sdxl_clip.SDXLTokenizer)
    import folder_paths

    clip = comfy.sd.CLIP(target, embedding_directory=folder_paths.get_folder_paths("embeddings"))
    _init_randomly(clip.cond_stage_model, generator)
    return clip


# Tiny UNets in the shapes of ComfyUI's SDXL-family model configs: the base model's (mirrored output blocks,
# attention in the middle), SSD-1B's (output blocks deeper than the input ones, a middle block of one resnet) and
# KOALA's (one block per level, no middle block). Per input block and per output block (listed from the last, as
# ComfyUI's detection lists them) the transformer depth; per level the blocks.
TINY_SDXL_LAYOUTS = {
    "SDXL": {"num_res_blocks": [1, 1], "transformer_depth": [0, 1], "transformer_depth_output": [0, 0, 1, 1],
             "transformer_depth_middle": 1},
    "SSD1B": {"num_res_blocks": [2, 2], "transformer_depth": [0, 0, 1, 1],
              "transformer_depth_output": [0, 0, 0, 1, 1, 2], "transformer_depth_middle": -1},
    "KOALA_700M": {"num_res_blocks": [1, 1], "transformer_depth": [0, 2], "transformer_depth_output": [0, 0, 2, 2],
                   "transformer_depth_middle": -2},
}


def _tiny_sdxl_model(generator, layout: str):
    """A MODEL of ComfyUI's SDXL-family model config `layout` and its model class over a small UNet of that shape:
    two levels (attention on the second), linear projections, the size-conditioned label embedding."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    channels, width_l, width_g = TINY_SDXL["unet_channels"], TINY_SDXL["width_l"], TINY_SDXL["width_g"]
    unet_config = {
        "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": channels,
        "channel_mult": [1, 2], "use_spatial_transformer": True, "use_linear_in_transformer": True, "legacy": False,
        "context_dim": width_l + width_g, "num_classes": "sequential", "adm_in_channels": width_g + 6 * 256,
        "use_temporal_resblock": False, "use_temporal_attention": False, **TINY_SDXL_LAYOUTS[layout],
    }  # fmt: skip
    config = getattr(comfy.supported_models, layout)(unet_config)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, "")
    _init_randomly(model.diffusion_model, generator)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def _tiny_vae(generator):
    """ComfyUI's VAE class over a small KL autoencoder (SD's layout, 32 channels at every level, 8x downsampling)."""
    import comfy.sd

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    vae = comfy.sd.VAE(sd={}, config={"params": {"embed_dim": 4, "ddconfig": ddconfig}})
    _init_randomly(vae.first_stage_model, generator)
    return vae


class ProtoBoothTestTinySDXL:
    """A tiny SDXL MODEL, CLIP and VAE made from ComfyUI's own classes with random seeded weights. The smallest file
    ComfyUI's loader detects as SDXL is about 2 GB (its text encoders are built full size), so the quick tests run on
    these, and the slow ones on a detected file."""

    CATEGORY = "testing"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
                             "layout": (list(TINY_SDXL_LAYOUTS),)}}

    def make(self, seed, layout):
        generator = torch.Generator().manual_seed(seed)
        return _tiny_sdxl_model(generator, layout), _tiny_sdxl_clip(generator), _tiny_vae(generator)


class ProtoBoothTestTokenRows:
    """Each text encoder's token-table rows (SDXL: clip_l and clip_g) for the pieces of a word, as the pack's
    tokenizer splits it."""

    CATEGORY = "testing"
    RETURN_TYPES = ()
    FUNCTION = "report"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip": ("CLIP",), "word": ("STRING", {"default": "cat"})}}

    def report(self, clip, word):
        ids = _pack_part("engine.text.tokenizer").clip_tokenizer()(word, add_special_tokens=False).input_ids
        rows = {name: encoder.transformer.get_input_embeddings().weight[ids].float().flatten().tolist()
                for name, encoder in clip.cond_stage_model.named_children()}
        return {"ui": {"rows": [rows]}}


NODE_CLASS_MAPPINGS = {
    "ProtoBoothTestBoxMasks": ProtoBoothTestBoxMasks,
    "ProtoBoothTestWeightsDigest": ProtoBoothTestWeightsDigest,
    "ProtoBoothTestUNetPrediction": ProtoBoothTestUNetPrediction,
    "ProtoBoothTestViewOutputs": ProtoBoothTestViewOutputs,
    "ProtoBoothTestProbe": ProtoBoothTestProbe,
    "ProtoBoothTestTokenInitReport": ProtoBoothTestTokenInitReport,
    "ProtoBoothTestFakeVision": ProtoBoothTestFakeVision,
    "ProtoBoothTestAsFamily": ProtoBoothTestAsFamily,
    "ProtoBoothTestTextTower": ProtoBoothTestTextTower,
    "ProtoBoothTestTinySDXL": ProtoBoothTestTinySDXL,
    "ProtoBoothTestTokenRows": ProtoBoothTestTokenRows,
}
