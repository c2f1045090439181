"""`protobooth train` and `protobooth generate`: learn a concept from one photo, draw pictures with it."""
from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from ..learn import default_preview_prompts, learn, progress_bar
from .common import HelpFormatter, device_name


def register_train(subparsers) -> None:
    from ..train.options import add_setting_arguments

    p = subparsers.add_parser(
        "train",
        help="learn one or more objects from one image",
        formatter_class=HelpFormatter,
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
    p.add_argument("--prototype-steps", type=int, default=200, help="steps of the prototype search (with --clip)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in OUT/NAME-checkpoint")
    p.add_argument("--preview-prompt", action="append", help="prompt for the preview grid (default: a few new scenes)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, … (auto: cuda when available)")
    add_setting_arguments(p)
    p.set_defaults(run=run_train)


def _object_masks(args, image):
    masks = list(args.mask or [])
    if args.box:
        if not args.sam:
            raise InputError("--box needs --sam (a segment-anything checkpoint) to turn boxes into masks.")
        from ..segment import ObjectPrompt, Segmenter, load_sam

        prompts = [ObjectPrompt(box=list(box)).check(f"--box {i}", (image.shape[-1], image.shape[-2]))
                   for i, box in enumerate(args.box, 1)]
        segmenter = Segmenter(load_sam(args.sam, device_name(args.device)))
        with progress_bar("image embedding", "block") as update:
            segmenter.set_image(image, update)
        masks += segmenter.segment(prompts)
    if len(masks) != len(args.token):
        raise InputError(f"{len(args.token)} token(s) but {len(masks)} mask(s)/box(es); give one --mask or --box per --token.")
    return masks


def run_train(args) -> int:
    import torch

    from ..concept.concept import check_concept_name, concept_files, models_folder_paths
    from ..images import load_image
    from ..models.loading import load_model
    from ..models.precision import autocast_dtype
    from ..prototype import PrototypeSettings
    from ..train.options import settings_from_args

    out, name = Path(args.out), check_concept_name(args.name or args.token[0])
    settings = settings_from_args(args)
    prototype = PrototypeSettings(n_vectors=settings.n_vectors, steps=args.prototype_steps)
    # Impossible settings are refused before the slow parts (SAM, loading the model) start.
    settings.check()
    if args.clip:
        prototype.check()
    if not args.overwrite and any(p.exists() for p in concept_files(*models_folder_paths(out, name), args.token)):
        raise InputError(f"concept {name!r} already exists in {out}; pass --overwrite or choose another --name.")
    device = device_name(args.device)
    autocast_dtype(settings.mixed_precision, torch.device(device))  # refuses fp16 without a GPU
    image = load_image(args.image)
    masks = _object_masks(args, image)
    model = load_model(args.model).to(device)
    towers = _load_clip_towers(args.clip, device) if args.clip else None
    prompts = args.preview_prompt or default_preview_prompts(args.token, args.class_words)
    learn(model, image, masks, args.token, args.class_words, settings, out, name, prompts,
          towers=towers, prototype=prototype, resume=args.resume)
    return 0


def _load_clip_towers(path: str, device):
    from transformers import CLIPModel

    from ..prototype import ClipTowers

    try:
        clip = CLIPModel.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        raise InputError(f"--clip {path} is not a CLIP model folder ({error}).") from None
    return ClipTowers.from_clip_model(clip.to(device).eval())


def register_generate(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="draw pictures with a model and (optionally) a concept",
        formatter_class=HelpFormatter,
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
    from ..concept.concept import load_concept
    from ..fileio import save_png
    from ..generate import generate
    from ..models.loading import load_model
    from ..report import image_grid

    model = load_model(args.model).to(device_name(args.device))
    concept = None
    if args.concept:
        embedding = Path(args.concept)
        lora = Path(args.lora) if args.lora else embedding.parent.parent / "loras" / embedding.name
        concept = load_concept(embedding, lora if lora.is_file() else None)
    seeds = args.seed or [0]
    with progress_bar("generate", "image") as update:
        images = generate(model, args.prompts, concept, seeds, args.lora_scale, steps=args.steps, guidance=args.guidance,
                          size=args.size, negative_prompt=args.negative, progress=update)
    out = Path(args.out)
    names = [f"{i:03d}-seed{seed}.png" for i, (_, seed) in enumerate((p, s) for p in args.prompts for s in seeds)]
    for picture, file_name in zip(images, names):
        save_png(picture, out / file_name)
    save_png(image_grid(images, [p for p in args.prompts for _ in seeds], columns=len(seeds)), out / "grid.png")
    print(f"wrote {len(images)} image(s) and grid.png to {out}")
    return 0
