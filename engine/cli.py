"""The `protobooth` command line. Each subcommand is a `register_*` function below plus its `run_*`."""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path

from .errors import InputError
from .version import __version__

log = logging.getLogger("protobooth")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show every option's default, keep hand-written line breaks in descriptions."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="protobooth",
        description="Teach a Stable Diffusion model your own object from one photo.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"protobooth {__version__}")
    parser.add_argument("--quiet", action="store_true", help="print only warnings and errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in _SUBCOMMANDS:
        register(subparsers)
    for subparser in subparsers.choices.values():  # --quiet also after the command name
        subparser.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                               help="print only warnings and errors")
    return parser


@contextlib.contextmanager
def _progress_bar(description: str, unit: str = "step"):
    """A tqdm bar on stderr, driven by the engine's progress(done, total) callbacks; extra keywords show beside it.

    The bar appears on the first report, so a phase that has nothing to do (cached class images) shows none.
    """
    from tqdm import tqdm

    bars = []

    def update(done: int, total: int, **shown) -> None:
        if not bars:
            bars.append(tqdm(desc=description, unit=unit, dynamic_ncols=True))
        bar = bars[0]
        bar.total = total
        bar.update(done - bar.n)
        if shown:
            bar.set_postfix(shown)

    try:
        yield update
    finally:
        for bar in bars:
            bar.close()


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: this PyTorch sees no CUDA GPU; use --device cpu.")
    return str(device)


# --------------------------------------------------------------------------------------------------
# segment

_SEGMENT_DESCRIPTION = """\
Segment objects in IMAGE with segment-anything (SAM) and write one mask per object.

examples:
  protobooth segment photo.jpg --sam sam_vit_b_01ec64.pth --object box=120,80,460,400
  protobooth segment photo.jpg --sam sam_vit_b_01ec64.pth \\
      --object point=300,220 negative=40,60 --object box=500,100,700,380 point=600,240
  protobooth segment photo.jpg --sam sam_vit_h_4b8939.pth --prompts objects.json
  protobooth segment photo.jpg --mask my_mask.png --dilate 4 --feather 3

Coordinates are pixels of IMAGE: x from the left edge, y from the top. The masks are written as
OUT/mask_1.png, mask_2.png, ... (8-bit greyscale, white = object) in the order the objects are given
(--object/--prompts first, then --mask), with OUT/preview.png showing every mask tinted, outlined and
numbered. The image embedding is computed once, however many objects there are.
"""


def register_segment(subparsers) -> None:
    parser = subparsers.add_parser(
        "segment",
        help="boxes/points on a photo -> object mask PNGs (segment-anything)",
        description=_SEGMENT_DESCRIPTION,
        formatter_class=_Formatter,
    )
    parser.add_argument("image", metavar="IMAGE", help="the photo (PNG, JPEG, WebP, ...)")
    parser.add_argument(
        "--sam",
        metavar="PATH",
        help="segment-anything checkpoint (.pth or .safetensors), e.g. sam_vit_b_01ec64.pth; vit_b, vit_l "
        "and vit_h are recognised from the file. Needed for --object and --prompts",
    )
    parser.add_argument(
        "--object",
        dest="objects",
        metavar="ITEM",
        nargs="+",
        action="append",
        help="one object, described by ITEMs: box=X0,Y0,X1,Y1 (left,top,right,bottom), point=X,Y (a click "
        "on the object, any number), negative=X,Y (a click on background); repeat --object per object",
    )
    parser.add_argument(
        "--prompts",
        metavar="JSON|FILE",
        help='all objects as JSON text or a .json file, one entry per object: [{"box": [x0, y0, x1, y1]}, '
        '{"positive": [[x, y]], "negative": [[x, y]]}, {"points": [[x, y]], "labels": [1]}]; '
        "instead of --object",
    )
    parser.add_argument(
        "--mask",
        dest="masks",
        metavar="FILE",
        action="append",
        help="a mask you made yourself (white = object, same size as IMAGE); refined and previewed like "
        "SAM's masks, no --sam needed; repeat for several",
    )
    parser.add_argument(
        "--out", metavar="DIR", help="folder for the mask PNGs and preview.png; when not given, IMAGE's name + _masks beside IMAGE"
    )
    parser.add_argument("--dilate", type=int, default=0, metavar="PIXELS", help="grow every mask by this many pixels (negative shrinks it)")
    parser.add_argument(
        "--feather",
        type=float,
        default=0.0,
        metavar="SIGMA",
        help="soften mask edges outward with a Gaussian blur of this sigma (pixels); the object stays fully "
        "white; 0 keeps masks black and white",
    )
    parser.add_argument(
        "--single-mask",
        action="store_true",
        help="use SAM's single-mask output; by default SAM proposes several masks and the one with the "
        "highest predicted IoU is kept (best for single clicks, which are ambiguous)",
    )
    parser.add_argument("--device", default="auto", help="where SAM runs: auto (a CUDA GPU when there is one, else cpu), cpu, cuda or cuda:N")
    parser.set_defaults(run=run_segment)


def _object_prompt(items: list[str], number: int, image_size: tuple[int, int]):
    """--object ITEM... → ObjectPrompt (ITEMs may also arrive as one quoted, space-separated string)."""
    from .segment import ObjectPrompt

    label = f"--object {number}"
    box, points, labels = None, [], []
    for item in (part for text in items for part in text.split()):
        key, _, value = item.partition("=")
        try:
            numbers = [float(v) for v in value.split(",")]
        except ValueError:
            numbers = None
        if key not in ("box", "point", "negative") or numbers is None:
            raise InputError(f"{label}: cannot read {item!r}; write box=X0,Y0,X1,Y1, point=X,Y or negative=X,Y (pixels).")
        if key == "box":
            if box is not None:
                raise InputError(f"{label} has two boxes; give one box per object (start another with --object).")
            box = numbers
        else:
            points.append(numbers)
            labels.append(1 if key == "point" else 0)
    return ObjectPrompt(box=box, points=points, labels=labels).check(label, image_size)


def _segment_prompts(args, image_size: tuple[int, int]) -> list:
    """The objects of --object or --prompts, checked against the image before SAM's slow embedding."""
    from .segment import parse_prompts

    if args.prompts and args.objects:
        raise InputError("give the objects either with --object or with --prompts, not both.")
    if args.objects:
        return [_object_prompt(items, number, image_size) for number, items in enumerate(args.objects, 1)]
    if not args.prompts:
        return []
    text = args.prompts.strip()
    if not text.startswith(("[", "{")):
        path = Path(text)
        if not path.is_file():
            raise InputError(f"--prompts {text!r} is neither JSON (it starts with [ or {{) nor an existing .json file.")
        text = path.read_text(encoding="utf-8")
    return parse_prompts(text, image_size)


def run_segment(args) -> int:
    from .fileio import save_png
    from .images import check_masks, load_image, to_pil
    from .segment import Segmenter, load_sam, overlay_masks, refine_mask

    image = load_image(args.image, "IMAGE")
    prompts = _segment_prompts(args, image_size=(image.shape[-1], image.shape[-2]))
    if not prompts and not args.masks:
        raise InputError("nothing to segment: give objects with --object or --prompts (and --sam), or masks with --mask.")
    if prompts and not args.sam:
        raise InputError("--sam is needed to segment --object/--prompts: give a SAM checkpoint such as sam_vit_b_01ec64.pth.")
    # User masks first: they are quick to check, so their errors come before SAM's slow image embedding.
    user_masks = []
    if args.masks:
        user_masks = [refine_mask(mask, args.dilate, args.feather) for mask in check_masks(args.masks, image, args.masks)]
    masks, sources = [], []
    if prompts:
        device = _device(args.device)
        print(f"loading {args.sam} ...", flush=True)
        sam = load_sam(args.sam, device)
        print(f"SAM {sam.protobooth_config.describe()} on {device}")
        segmenter = Segmenter(sam)
        with _progress_bar("image embedding", "block") as progress:
            segmenter.set_image(image, progress)
        with _progress_bar("objects", "object") as progress:
            masks += segmenter.segment(
                prompts, multimask=not args.single_mask, dilate=args.dilate, feather=args.feather, progress=progress
            )
        sources += [f"SAM, predicted IoU {score:.2f}" for score in segmenter.scores]
    masks += user_masks
    sources += [f"from {path}" for path in args.masks or []]

    out_dir = Path(args.out) if args.out else Path(args.image).with_name(Path(args.image).stem + "_masks")
    for number, (mask, source) in enumerate(zip(masks, sources), 1):
        path = out_dir / f"mask_{number}.png"
        save_png(to_pil(mask), path)
        print(f"wrote {path}  (object {number}: {source}, {float(mask.mean()):.1%} of the image)")
    preview = out_dir / "preview.png"
    save_png(to_pil(overlay_masks(image, masks)), preview)
    print(f"wrote {preview}")
    if (out_dir / f"mask_{len(masks) + 1}.png").exists():
        print(f"note: {out_dir} still holds mask_{len(masks) + 1}.png (and maybe more) from an earlier run; they are not from this one.")
    return 0


# Subcommands: each register_* adds its parser and sets `run` to the function that executes it.
# --------------------------------------------------------------------------------------------------
# train


def register_train(subparsers) -> None:
    from .train import TrainSettings

    defaults = TrainSettings()
    p = subparsers.add_parser(
        "train",
        help="learn one or more objects from one image",
        formatter_class=_Formatter,
        description="Learn the object(s) in IMAGE: a trigger token and LoRA weights.\n\n"
        "One object per --token/--class pair, in order, each with a --mask file or a --box (boxes need --sam).\n"
        "Writes OUT/loras/NAME.safetensors and OUT/embeddings/NAME.safetensors (the layout of ComfyUI's models\n"
        "folder, so --out can point there), OUT/NAME-loss.png and OUT/NAME-preview.png.\n\n"
        "example: protobooth train cat.jpg --model sd15.safetensors --token zqcat --class cat --mask cat_mask.png",
    )
    p.add_argument("image", help="the photo (PNG/JPEG/WebP; greyscale, RGBA and 16-bit are converted)")
    p.add_argument("--model", required=True, help="base model: a diffusers folder or a .safetensors/.ckpt SD1.x/SD2.x file")
    p.add_argument("--token", action="append", required=True, help="trigger word for an object (made up, e.g. zqcat); repeat per object")
    p.add_argument("--class", dest="class_words", action="append", required=True, help="the object's class word (e.g. cat); repeat per object")
    p.add_argument("--mask", action="append", help="mask image of an object (white = object); repeat per object")
    p.add_argument("--box", action="append", nargs=4, type=float, metavar=("X0", "Y0", "X1", "Y1"),
                   help="box around an object in image pixels, segmented with --sam; repeat per object")
    p.add_argument("--sam", help="segment-anything checkpoint (sam_vit_b/l/h .pth) for --box")
    p.add_argument("--clip", help="CLIP model folder (transformers CLIPModel) for the prototype initialisation; "
                   "without it tokens start from their class words")
    p.add_argument("--out", default="protobooth-out", help="output folder")
    p.add_argument("--name", help="concept name (file names); default: the first token")
    p.add_argument("--overwrite", action="store_true", help="replace existing concept files of the same name")
    p.add_argument("--steps", type=int, default=defaults.steps, help="training steps")
    p.add_argument("--lr", type=float, default=defaults.lora_learning_rate, help="LoRA learning rate")
    p.add_argument("--token-lr", type=float, default=defaults.token_learning_rate, help="token learning rate")
    p.add_argument("--rank", type=int, default=defaults.lora_rank, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank, i.e. scale 1)")
    p.add_argument("--lambda-class", type=float, default=defaults.prior_weight, help="weight of the class-image prior (0: off)")
    p.add_argument("--prior-images", type=int, default=defaults.prior_images, help="class images drawn per class word (cached)")
    p.add_argument("--text-anchor", type=float, default=defaults.text_anchor_weight, help="weight of the text-space class term (0: off)")
    p.add_argument("--attention-weight", type=float, default=defaults.attention_weight,
                   help="weight of the cross-attention loss that pulls each token's attention onto its mask (0: off)")
    p.add_argument("--background-weight", type=float, default=defaults.background_weight, help="loss weight outside the masks")
    p.add_argument("--no-mask", action="store_true", help="plain unmasked loss (as DreamBooth)")
    p.add_argument("--timesteps", choices=["uniform", "snr"], default=defaults.timestep_sampling, help="timestep sampling")
    p.add_argument("--vectors", type=int, default=1, help="vectors per token")
    p.add_argument("--prototype-steps", type=int, default=200, help="steps of the prototype search (with --clip)")
    p.add_argument("--template", action="append", help="training prompt template with {} for the objects; repeat for several")
    p.add_argument("--class-prompt", default=defaults.class_prompt, help="prompt of the class images, {} = class word")
    p.add_argument("--resolution", type=int, default=None, help="training size in pixels (default: the model's native size)")
    p.add_argument("--seed", type=int, default=defaults.seed, help="random seed (same seed, same result)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="save a resumable checkpoint every N steps (0: never)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in OUT/NAME-checkpoint")
    p.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    p.add_argument("--mixed-precision", choices=["auto", "no", "fp16", "bf16"], default=defaults.mixed_precision,
                   help="autocast: auto is bf16 on a GPU that has it (else fp16) and fp32 on CPU; bf16 on CPU pays off "
                        "only where it has bf16 matrix units (e.g. AMX); fp16 needs a CUDA GPU")
    p.add_argument("--preview-prompt", action="append", help="prompt for the preview grid (default: a few new scenes)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, … (auto: cuda when available)")
    p.set_defaults(run=run_train)


def _object_masks(args, image):

    masks = list(args.mask or [])
    if args.box:
        if not args.sam:
            raise InputError("--box needs --sam (a segment-anything checkpoint) to turn boxes into masks.")
        from .segment import ObjectPrompt, Segmenter, load_sam

        prompts = [ObjectPrompt(box=list(box)).check(f"--box {i}", (image.shape[-1], image.shape[-2]))
                   for i, box in enumerate(args.box, 1)]
        segmenter = Segmenter(load_sam(args.sam, _device(args.device)))
        with _progress_bar("image embedding", "block") as update:
            segmenter.set_image(image, update)
        masks += segmenter.segment(prompts)
    if len(masks) != len(args.token):
        raise InputError(f"{len(args.token)} token(s) but {len(masks)} mask(s)/box(es); give one --mask or --box per --token.")
    return masks


def _concept_paths(out: Path, name: str) -> tuple[Path, Path]:
    return out / "loras" / f"{name}.safetensors", out / "embeddings" / f"{name}.safetensors"


def run_train(args) -> int:
    import torch

    from .images import load_image
    from .loading import load_model
    from .prototype import PrototypeSettings
    from .train import DEFAULT_TEMPLATES, TrainSettings, autocast_dtype

    from .concept import check_concept_name, concept_files

    out, name = Path(args.out), check_concept_name(args.name or args.token[0])
    settings = TrainSettings(
        steps=args.steps, lora_rank=args.rank, lora_alpha=args.alpha, lora_learning_rate=args.lr,
        token_learning_rate=args.token_lr, n_vectors=args.vectors, use_mask=not args.no_mask,
        background_weight=args.background_weight, prior_weight=args.lambda_class, prior_images=args.prior_images,
        text_anchor_weight=args.text_anchor, attention_weight=args.attention_weight, timestep_sampling=args.timesteps,
        templates=tuple(args.template or DEFAULT_TEMPLATES), class_prompt=args.class_prompt, resolution=args.resolution,
        gradient_checkpointing=args.gradient_checkpointing, mixed_precision=args.mixed_precision, seed=args.seed,
        checkpoint_every=args.checkpoint_every,
    )
    prototype = PrototypeSettings(n_vectors=args.vectors, steps=args.prototype_steps)
    # Impossible settings are refused before the slow parts (SAM, loading the model) start.
    settings.check()
    if args.clip:
        prototype.check()
    if not args.overwrite and any(p.exists() for p in concept_files(*_concept_paths(out, name), args.token)):
        raise InputError(f"concept {name!r} already exists in {out}; pass --overwrite or choose another --name.")
    device = _device(args.device)
    autocast_dtype(settings.mixed_precision, torch.device(device))  # refuses fp16 without a GPU
    image = load_image(args.image)
    masks = _object_masks(args, image)
    model = load_model(args.model).to(device)
    towers = _load_clip_towers(args.clip, device) if args.clip else None
    prompts = args.preview_prompt or _preview_prompts(args.token, args.class_words)
    learn(model, image, masks, args.token, args.class_words, settings, out, name, prompts,
          towers=towers, prototype=prototype, resume=args.resume)
    return 0


def learn(model, image, masks, tokens, class_words, settings, out: Path, name: str, preview_prompts: list[str],
          towers=None, prototype=None, resume: bool = False, preview_seeds=(0,), render_options: dict | None = None):
    """Prototype search (when a CLIP model is given) → training → concept files, loss curve, preview grid."""
    from .concept import concept_files, save_concept
    from .fileio import save_png
    from .generate import render
    from .images import check_masks, load_image
    from .prototype import prototype_embeddings
    from .report import image_grid, loss_curve
    from .train import OneShotTrainer

    image = load_image(image)
    masks = check_masks(masks, image, tokens)
    init = None
    if towers is not None:
        with _progress_bar("prototype") as update:
            found = prototype_embeddings(towers, model.text_encoder, model.tokenizer, image, masks, tokens, class_words,
                                         prototype, progress=update)
        init = [p.vectors for p in found]
    with contextlib.ExitStack() as stack:
        with _progress_bar("class images") as update:  # drawn on the first run only, then cached
            trainer = stack.enter_context(OneShotTrainer(model, image, masks, tokens, class_words, settings, init,
                                                         prepare_progress=update))
        with _progress_bar("train") as update:
            result = trainer.train(progress=lambda r: update(r.step, r.total, loss=f"{r.loss:.4f}"),
                                   checkpoint_dir=out / f"{name}-checkpoint", resume=resume)
        with trainer.trained_pipeline() as pipeline:
            previews = render(pipeline, preview_prompts, list(preview_seeds), **(render_options or {}))
    lora_path, embedding_path = _concept_paths(out, name)
    save_concept(result.concept, lora_path, embedding_path)
    save_png(loss_curve(result.losses), out / f"{name}-loss.png")
    save_png(image_grid(previews, [p for p in preview_prompts for _ in preview_seeds], columns=len(preview_seeds),
                        scale=max(1, 128 // previews[0].width)), out / f"{name}-preview.png")
    print(f"trained {settings.steps} steps in {result.seconds:.1f} s; final loss {result.losses[-1]:.4f}")
    for path in (*concept_files(lora_path, embedding_path, trainer.tokens), out / f"{name}-loss.png",
                 out / f"{name}-preview.png"):
        if path.exists():  # a concept trained without a LoRA has no LoRA file
            print(f"wrote {path}")
    print("use it with the words: " + ", ".join(f"'{t} {c}'" for t, c in zip(trainer.tokens, trainer.class_words)))
    return result


def _preview_prompts(tokens: list[str], class_words: list[str]) -> list[str]:
    subject = " and ".join(f"{t} {c}" for t, c in zip(tokens, class_words))
    return [f"a photo of {subject} on the beach", f"a photo of {subject} in the snow", f"a painting of {subject}"]


def _load_clip_towers(path: str, device):
    from transformers import CLIPModel

    from .prototype import ClipTowers

    try:
        clip = CLIPModel.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        raise InputError(f"--clip {path} is not a CLIP model folder ({error}).") from None
    return ClipTowers.from_clip_model(clip.to(device).eval())


# --------------------------------------------------------------------------------------------------
# generate


def register_generate(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="draw pictures with a model and (optionally) a concept",
        formatter_class=_Formatter,
        description="Draw one picture per prompt and seed. With --concept, use the concept's trigger words in\n"
        "the prompts (e.g. 'a photo of zqcat cat on the beach').\n\n"
        "example: protobooth generate --model sd15.safetensors --concept out/embeddings/zqcat.safetensors "
        "'a photo of zqcat cat in the snow'",
    )
    p.add_argument("prompts", nargs="+", help="prompts")
    p.add_argument("--model", required=True, help="base model: a diffusers folder or a .safetensors/.ckpt SD1.x/SD2.x file")
    p.add_argument("--concept", help="the concept's embedding file (its LoRA is found in ../loras/ by name)")
    p.add_argument("--lora", help="the concept's LoRA file, when not beside the embedding in ../loras/")
    p.add_argument("--lora-scale", type=float, default=1.0, help="LoRA strength")
    p.add_argument("--seed", type=int, action="append", help="seed (repeat for several; default 0)")
    p.add_argument("--steps", type=int, default=25, help="sampling steps (DDIM)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--size", type=int, default=None, help="image size in pixels (default: the model's native size)")
    p.add_argument("--negative", default=None, help="negative prompt")
    p.add_argument("--out", default="protobooth-images", help="output folder")
    p.add_argument("--device", default="auto", help="cpu, cuda, … (auto: cuda when available)")
    p.set_defaults(run=run_generate)


def run_generate(args) -> int:
    from .concept import load_concept
    from .fileio import save_png
    from .generate import generate
    from .loading import load_model
    from .report import image_grid

    model = load_model(args.model).to(_device(args.device))
    concept = None
    if args.concept:
        embedding = Path(args.concept)
        lora = Path(args.lora) if args.lora else embedding.parent.parent / "loras" / embedding.name
        concept = load_concept(embedding, lora if lora.is_file() else None)
    seeds = args.seed or [0]
    with _progress_bar("generate", "image") as update:
        images = generate(model, args.prompts, concept, seeds, args.lora_scale, steps=args.steps, guidance=args.guidance,
                          size=args.size, negative_prompt=args.negative, progress=update)
    out = Path(args.out)
    names = [f"{i:03d}-seed{seed}.png" for i, (_, seed) in enumerate((p, s) for p in args.prompts for s in seeds)]
    for picture, file_name in zip(images, names):
        save_png(picture, out / file_name)
    save_png(image_grid(images, [p for p in args.prompts for _ in seeds], columns=len(seeds)), out / "grid.png")
    print(f"wrote {len(images)} image(s) and grid.png to {out}")
    return 0


# --------------------------------------------------------------------------------------------------
# demo


def register_demo(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="learn an object on the built-in model, end to end, with nothing to download",
        formatter_class=_Formatter,
        description="Run the whole job on the embedded default model: prototype search, one-shot training,\n"
        "concept files, loss curve and a grid of the object in new scenes, all under --out.",
    )
    p.add_argument("--out", default="out", help="output folder")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's own)")
    p.add_argument("--model", choices=("shapesworld", "tiny"), default="shapesworld",
                   help="shapesworld: the embedded world model; tiny: random weights, a quick check of the plumbing")
    p.set_defaults(run=run_demo)


def run_demo(args) -> int:
    from .demo import shapesworld_demo, tiny_demo
    from .fileio import save_png
    from .images import to_pil

    make = shapesworld_demo if args.model == "shapesworld" else tiny_demo
    job = make() if args.steps is None else make(args.steps)
    out = Path(args.out)
    print(f"demo: {job.description}")
    save_png(to_pil(job.image), out / "reference.png")
    for index, mask in enumerate(job.masks, 1):
        save_png(to_pil(mask), out / f"reference-mask-{index}.png")
    learn(job.model, job.image, job.masks, job.tokens, job.class_words, job.settings, out, "demo", job.preview_prompts,
          towers=job.towers, prototype=job.prototype, preview_seeds=job.preview_seeds, render_options=job.render_options)
    return 0


_SUBCOMMANDS: list = [register_segment, register_train, register_generate, register_demo]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.run(args)
    except InputError as error:
        print(f"protobooth {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
