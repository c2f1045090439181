"""Train Concept: one-shot training inside the graph, on the graph's own MODEL, CLIP and VAE (engine.train), one
node per training method in the registry ("Train Concept" for the default, object-driven; "Train Concept (<method>)"
for the others), each showing its method's widgets.

The engine trains a diffusers view of ComfyUI's weights (nodes/bridge.py): the same tensors, no second
copy of the UNet. ComfyUI's ProgressBar advances every step, and every preview_every steps it carries a live preview
(loss curve and a sample) through ComfyUI's own preview path, which both frontends show on the node without custom
JS; its Cancel raises out of the training loop,
the engine takes its LoRA and tokens off the view on the way out, and nothing has been written. The
MODEL and CLIP that come out are clones with the concept applied, as Apply Concept would give them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

import comfy.model_management
import comfy.utils
import folder_paths

from ..engine.errors import InputError
from ..engine.train.class_prior import cache_dir
from ..engine.report import live_preview, loss_curve
from ..engine.train import OneShotTrainer
from ..engine.train.methods import default_method, registry
from ..engine.train.options import OPTIONAL_WIDGETS, settings_from_widgets, widget_specs
from .bridge import apply_concept, base_fingerprint, check_clip, diffusion_model_view, model_family
from .common import CATEGORY, node_errors, photo_objects

log = logging.getLogger("protobooth")

CACHED_RESULTS = 4  # concepts are small (a few MB); the last few runs are kept for re-runs of the graph
PREVIEW_EVERY = 20  # a 400-step run updates its picture 20 times
PREVIEW_MAX_SIZE = 768  # pixels: the loss curve (512) beside the sample (256)
PREVIEW_HELP = ("steps between live previews on the node: the loss curve so far beside a quick sample with the concept "
                "as it stands (its first prompt template, seed 0, 5 sampler steps); 0: off. At the default the previews "
                "cost about 6% of the training time (measured on ShapesWorld, benchmarks/preview_cost.py)")


class _MemoryWatch:
    """Memory the training adds on top of the loaded models: peak CUDA allocation, or peak process RSS on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
            self.start = torch.cuda.memory_allocated(device)
        else:
            import psutil

            self.process = psutil.Process()
            self.start = self.peak = self.process.memory_info().rss

    def sample(self) -> None:
        if not self.cuda:
            self.peak = max(self.peak, self.process.memory_info().rss)

    def extra_bytes(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) - self.start
        self.sample()
        return self.peak - self.start


def _tensor_digest(digest, value, cheap: bool = False) -> None:
    """Feed tensors (nested in tuples/lists/dicts, as ComfyUI's patches are) and plain values to a hash.

    cheap: a tensor counts by its shape, dtype, sum and first and last values instead of every byte.
    """
    if isinstance(value, torch.Tensor):
        digest.update(str((value.dtype, tuple(value.shape))).encode())
        flat = value.detach().flatten()
        if cheap:
            summary = [flat.double().sum().reshape(1), flat[:16].double(), flat[-16:].double()]
            digest.update(torch.cat(summary).cpu().numpy().tobytes())
        else:
            digest.update(flat.to("cpu", torch.float32).contiguous().numpy().tobytes())
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            digest.update(str(key).encode())
            _tensor_digest(digest, value[key], cheap)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _tensor_digest(digest, item, cheap)
    elif hasattr(value, "weights"):  # newer ComfyUI wraps a patch's tensors in an adapter object
        digest.update(type(value).__name__.encode())
        _tensor_digest(digest, value.weights, cheap)
    else:
        digest.update(repr(value).encode())


def _patches_key(model, clip) -> str | None:
    """What ComfyUI patches onto the MODEL's and CLIP's weights (an upstream LoRA): keys, strengths and a
    cheap digest of the patch tensors; None without patches. It keys the class-image cache, since the base
    fingerprint ignores attention weights on purpose and a LoRA'd model draws other class images than the
    plain one (which shares its entries with the CLI's on the same checkpoint)."""
    patches = [getattr(patcher, "patches", {}) for patcher in (model, clip.patcher)]
    if not any(patches):
        return None
    digest = hashlib.sha256()
    _tensor_digest(digest, patches, cheap=True)
    return digest.hexdigest()[:24]


def _run_key(model, clip, vae, picture, masks, tokens, class_words, settings, init_vectors) -> str:
    """What decides the result: the weights (and the patches on them), the photo, masks, words, settings."""
    digest = hashlib.sha256(base_fingerprint(model, clip).encode())
    _tensor_digest(digest, next(iter(vae.first_stage_model.state_dict().values())))
    for patcher in (model, clip.patcher, vae.patcher):
        _tensor_digest(digest, getattr(patcher, "patches", {}))
        _tensor_digest(digest, {k: repr(v) for k, v in getattr(patcher, "object_patches", {}).items()})
    digest.update(str(clip.layer_idx).encode())
    _tensor_digest(digest, [picture, masks, init_vectors])
    digest.update(json.dumps([tokens, class_words, settings.as_dict()], sort_keys=True, default=str).encode())
    return digest.hexdigest()


HELP = (
    " Outputs the MODEL and CLIP with the concept applied (write 'a photo of <token> <class word> ...'), the concept to "
    "save, and the loss curve. tokens and class_words: comma-separated, one per mask, in mask order. It trains in the "
    "precision ComfyUI runs the model in (fp32, fp16, bf16; fp8-stored UNets are cast on use), LoRA and token "
    "vectors in fp32, and loads the models whole for the run (low-VRAM mode would leave parts unpatched). Memory "
    "for SD1.5 at 512 px with the class prior: training adds about 4.8 GB on a CPU (measured, "
    "benchmarks/training_memory.py; 1.4-2.0 GB at 256 px) on top of the models (2 GB in fp16, 4 GB in fp32); on "
    "a GPU computing in fp16 or bf16 expect about half, 2.5 GB (an estimate: not yet measured on a GPU). SDXL models "
    "train too, with every method: a trigger word then has a CLIP-L and an OpenCLIP bigG half, saved as clip_l and "
    "clip_g. At SDXL size and 512 px training adds about 9.8 GB on a CPU, 4.8 GB with gradient checkpointing "
    "(measured, benchmarks/results/training_memory.md; the CLI's --gradient-checkpointing, not yet a widget here)."
)


class TrainNode:
    """One Train node per method (made from the registry below): the photo and words, then the method's widgets."""

    METHOD = None  # the Method it trains with
    NODE = ""  # its display name, which its error messages start with
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP", "PROTOBOOTH_CONCEPT", "IMAGE")
    RETURN_NAMES = ("model", "clip", "concept", "loss_curve")
    FUNCTION = "train"
    _results: OrderedDict  # per node class: the last few results, for re-runs of the graph

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "the base model to learn the object(s) for (its weights are not changed)"}),
                "clip": ("CLIP", {"tooltip": "its text encoder, from the same checkpoint"}),
                "vae": ("VAE", {"tooltip": "its VAE, from the same checkpoint"}),
                "image": ("IMAGE", {"tooltip": "the one photo of the object(s)"}),
                "masks": ("MASK", {"tooltip": "one mask per object, in the order of the tokens (Segment Objects)"}),
                "tokens": ("STRING", {"default": "zqcat", "tooltip": "the new trigger word of each object, comma-separated"}),
                "class_words": ("STRING", {"default": "cat", "tooltip": "each object's class word, comma-separated"}),
                **widget_specs(cls.METHOD),
            },
            "optional": {
                "token_init": ("PROTOBOOTH_TOKEN_INIT", {"tooltip": "starting vectors from Prototype Init (without: each "
                                                                    "class word's)"}),
                "preview_every": ("INT", {"default": PREVIEW_EVERY, "min": 0, "max": 100000, "tooltip": PREVIEW_HELP}),
                **widget_specs(cls.METHOD, OPTIONAL_WIDGETS + cls.METHOD.optional_widgets),
            },
        }

    def train(self, model, clip, vae, image, masks, tokens, class_words, token_init=None, preview_every=PREVIEW_EVERY,
              **widgets):
        node = self.NODE
        with node_errors(node):
            family, _ = model_family(model)
            check_clip(clip, family)
            picture, masks, tokens, class_words = photo_objects(image, masks, tokens, class_words)
            init_vectors = _initial_vectors(token_init, tokens)
            settings = settings_from_widgets(self.METHOD, widgets)
            settings.check()
        key = _run_key(model, clip, vae, picture, masks, tokens, class_words, settings, init_vectors)
        if key in self._results:
            log.info("%s: same inputs and seed as an earlier run; reusing its result.", node)
            self._results.move_to_end(key)
            concept, losses, summary = self._results[key]
        else:
            concept, losses, summary = _train(node, model, clip, vae, picture, masks, tokens, class_words, settings,
                                              init_vectors, preview_every)
            self._results[key] = (concept, losses, summary)
            while len(self._results) > CACHED_RESULTS:
                self._results.popitem(last=False)
        with node_errors(node):
            trained_model, trained_clip = apply_concept(model, clip, concept)
        curve = torch.from_numpy(np.asarray(loss_curve(losses), dtype=np.float32) / 255.0)[None, ..., :3]
        return {"ui": {"text": [summary]}, "result": (trained_model, trained_clip, concept, curve)}


def _initial_vectors(token_init, tokens: list[str]) -> list[torch.Tensor] | None:
    if token_init is None:
        return None
    made_for = [prototype.token for prototype in token_init]
    if made_for != tokens:
        raise InputError(f"token_init was made for the tokens {', '.join(made_for)} but this node trains "
                         f"{', '.join(tokens)}; give Prototype Init and Train Concept the same tokens in the same order.")
    return [prototype.vectors.detach().float().cpu() for prototype in token_init]


def class_image_cache() -> Path:
    """Where the node caches class images: in ComfyUI's user directory (user/protobooth/class-latents), which
    outlives restarts (the temp folder is emptied at every start, and the images cost minutes to draw), belongs to
    this ComfyUI install (removed with it, and found beside its other user data rather than in a home-folder cache
    a portable install never uses), and is kept under the engine's size bound. $PROTOBOOTH_CACHE still wins."""
    user = getattr(folder_paths, "get_user_directory", lambda: folder_paths.user_directory)()
    return cache_dir(default=Path(user) / "protobooth" / "class-latents")


def _train(node, model, clip, vae, picture, masks, tokens, class_words, settings, init_vectors, preview_every):
    bar = comfy.utils.ProgressBar(settings.steps)

    with torch.inference_mode(False), node_errors(node):
        diffusion = diffusion_model_view(model, clip, vae)
        log.info("%s: training %s for %d steps on %s", node, ", ".join(tokens), settings.steps, diffusion.device)
        memory = _MemoryWatch(diffusion.device)
        started = time.perf_counter()

        # Cancel raises ComfyUI's own interrupt from these callbacks, so the UI reports "interrupted".
        def preparing(done: int, total: int) -> None:  # drawing class images: the bar fills once, then again
            bar.update_absolute(done, total)
            comfy.model_management.throw_exception_if_processing_interrupted()

        try:
            with OneShotTrainer(diffusion, picture, masks, tokens, class_words, settings, init_vectors,
                                class_image_cache(), weights_key=_patches_key(model, clip),
                                prepare_progress=preparing) as trainer:
                def progress(report) -> None:
                    memory.sample()
                    preview = None
                    if preview_every and (report.step % preview_every == 0 or report.step == report.total):
                        preview = ("JPEG", live_preview(trainer.losses, report.total, trainer.preview_sample()),
                                   PREVIEW_MAX_SIZE)
                    bar.update_absolute(report.step, report.total, preview)
                    comfy.model_management.throw_exception_if_processing_interrupted()

                result = trainer.train(progress=progress)
        finally:
            extra = memory.extra_bytes()
            comfy.model_management.soft_empty_cache()  # the training's activations go back to the device's pool
        seconds = time.perf_counter() - started
        unet_bytes = sum(p.numel() * p.element_size() for p in diffusion.unet.parameters())
    summary = (f"{', '.join(tokens)}: {settings.steps} steps in {seconds:.0f} s"
               f"{'' if result.class_images is None else f' ({result.class_images})'}, loss {np.mean(result.losses[:10]):.4f} "
               f"-> {np.mean(result.losses[-10:]):.4f} (first and last 10 steps); memory added by training "
               f"{extra / 2**20:.0f} MiB "
               f"({'CUDA' if memory.cuda else 'process'}; the UNet's weights are {unet_bytes / 2**20:.0f} MiB)")
    log.info("%s: %s", node, summary)
    return result.concept, result.losses, summary


def _node_name(method) -> tuple[str, str]:
    """(class name, display name): the default method keeps the first node's, which saved workflows name."""
    if method is default_method():
        return "ProtoBoothTrainConcept", "Train Concept"
    return "ProtoBoothTrain" + "".join(part.capitalize() for part in re.split(r"[^A-Za-z0-9]+", method.name)), \
        f"Train Concept ({method.label})"


NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}
for _method in registry().values():
    _key, _display = _node_name(_method)
    NODE_CLASS_MAPPINGS[_key] = type(_key, (TrainNode,), {"METHOD": _method, "NODE": _display, "DESCRIPTION":
                                                          _method.description + HELP, "_results": OrderedDict()})
    NODE_DISPLAY_NAME_MAPPINGS[_key] = _display
