"""`protobooth train` and `protobooth generate`: learn a concept from one photo, draw pictures with it."""
from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from ..learn import default_preview_prompts, learn, progress_bar
from .common import HelpFormatter, cancel_requested, device_name


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
    p.add_argument("--model", required=True,
                   help="base model: a diffusers folder or a .safetensors/.ckpt SD1.x, SD2.x or SDXL file")
    p.add_argument("--token", action="append", required=True, help="trigger word for an object (made up, e.g. zqcat); repeat per object")
    p.add_argument("--class", dest="class_words", action="append", required=True, help="the object's class word (e.g. cat); repeat per object")
    p.add_argument("--mask", action="append", help="mask image of an object (white = object); repeat per object")
    p.add_argument("--box", action="append", nargs=4, type=float, metavar=("X0", "Y0", "X1", "Y1"),
                   help="box around an object in image pixels, segmented with --sam; repeat per object")
    p.add_argument("--sam", help="segment-anything checkpoint (sam_vit_b/l/h .pth) for --box")
    p.add_argument("--clip", help="CLIP model folder (transformers CLIPModel) for the prototype initialisation; "
                   "without it tokens start from their class words")
    p.add_argument("--clip-g", help="SDXL: OpenCLIP ViT-bigG/14 folder (transformers CLIPModel, e.g. "
                   "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k) for the bigG half of each token's vectors; without it that "
                   "half starts from the class word")
    p.add_argument("--encoder", help="start each token from a pretrained object encoder's vectors for it (protobooth "
                   "pretrain-encoder) instead of the prototype search; --clip then names the CLIP vision model it reads")
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
        from ..segment import ObjectPrompt, Segmenter, load_sam

        prompts = [ObjectPrompt(box=list(box)).check(f"--box {i}", (image.shape[-1], image.shape[-2]))
                   for i, box in enumerate(args.box, 1)]
        segmenter = Segmenter(load_sam(args.sam, device_name(args.device)))
        with progress_bar("image embedding", "block", cancel_requested) as update:
            segmenter.set_image(image, update)
        masks += segmenter.segment(prompts)
    if len(masks) != len(args.token):
        raise InputError(f"{len(args.token)} token(s) but {len(masks)} mask(s)/box(es); give one --mask or --box per --token.")
    return masks


def check_train_inputs(args):
    """Everything about a train command that is cheap to check, before a model loads or SAM runs: words, name,
    settings, every input file's header, the output folder and the resume checkpoint. Returns (name, settings,
    prototype settings, device)."""
    import torch

    from ..concept.concept import check_concept_name, concept_files, models_folder_paths
    from ..fileio import check_output
    from ..images import check_image_file
    from ..learn import output_files
    from ..models.precision import autocast_dtype
    from ..prototype import PrototypeSettings
    from ..text.tokenizer import clip_tokenizer
    from ..text.vocabulary import check_objects
    from ..train.options import settings_from_args

    tokens, _ = check_objects(clip_tokenizer(), list(args.token), list(args.class_words))
    if args.name is not None:
        name = check_concept_name(args.name)
    else:
        try:
            name = check_concept_name(args.token[0])
        except InputError as error:
            raise InputError(f"the concept is named after its first token by default, and {error} Give --name.") from None
    settings = settings_from_args(args)
    prototype = PrototypeSettings(n_vectors=settings.n_vectors, steps=args.prototype_steps)
    settings.check()
    for flag, folder, example in (("--clip", args.clip, "openai/clip-vit-large-patch14"),
                                  ("--clip-g", args.clip_g, "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k")):
        if folder:
            prototype.check()
            if not (Path(folder) / "config.json").is_file():
                raise InputError(f"{flag} {folder} is not a CLIP model folder (it has no config.json); give the folder "
                                 f"of a transformers CLIPModel, e.g. {example}, or leave {flag} out.")
    if args.encoder and not (args.clip and Path(args.encoder).is_file()):
        raise InputError(f"--encoder {args.encoder} needs the encoder file to exist and --clip to name the CLIP vision "
                         "model it was pretrained with.")
    check_image_file(args.image, "image")
    for index, mask in enumerate(args.mask or [], 1):
        check_image_file(mask, f"--mask {index}")
    if args.box and not args.sam:
        raise InputError("--box needs --sam (a segment-anything checkpoint) to turn boxes into masks.")
    for flag, path in (("--sam", args.sam), ("--model", args.model)):
        if path and not Path(path).exists():
            raise InputError(f"{flag} {path} does not exist; give the path of the file (or folder) you downloaded.")
    if len(args.mask or []) + len(args.box or []) != len(args.token):
        raise InputError(f"{len(args.token)} token(s) but {len(args.mask or []) + len(args.box or [])} mask(s)/box(es); "
                         "give one --mask or --box per --token.")
    out = Path(args.out)
    check_output(out, output_files(name, tokens))
    if not args.overwrite and any(p.exists() for p in concept_files(*models_folder_paths(out, name), args.token)):
        raise InputError(f"concept {name!r} already exists in {out}; pass --overwrite or choose another --name.")
    if args.resume:
        check_resume(out / f"{name}-checkpoint" / "checkpoint.pt", settings)
    device = device_name(args.device)
    autocast_dtype(settings.mixed_precision, torch.device(device))  # refuses fp16 without a GPU
    return name, settings, prototype, device


def check_resume(path: Path, settings) -> None:
    """--resume: the checkpoint must be there and be ProtoBooth's for these settings (the model and photo are
    compared once loaded)."""
    from ..fileio import read_torch_file
    from ..train.resume import CHECKPOINT_KEYS, settings_record

    if not path.is_file():
        raise InputError(f"--resume: there is no checkpoint at {path}; leave out --resume to start from step 0 "
                         "(checkpoints are written with --checkpoint-every N).")
    state = read_torch_file(path, "checkpoint")
    if not isinstance(state, dict) or not CHECKPOINT_KEYS <= set(state):
        raise InputError(f"--resume: {path} is not a ProtoBooth training checkpoint; remove it or leave out --resume.")
    saved, mine = state.get("settings"), settings_record(settings)
    if isinstance(saved, dict) and saved != mine:
        changed = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
        raise InputError(f"--resume: the checkpoint at {path} was made with other settings ({', '.join(changed)}); use "
                         "the same settings, or leave out --resume to start again.")


def run_train(args) -> int:
    import torch

    from ..images import load_image
    from ..models.families import family
    from ..models.loading import detect_family, load_model
    from ..models.precision import weights_dtype
    from ..prototype import load_clip_towers

    name, settings, prototype, device = check_train_inputs(args)
    out = Path(args.out)
    args.cancel_note = lambda: (f"checkpoint kept at {out / f'{name}-checkpoint'} (continue with --resume)"
                                if (out / f"{name}-checkpoint" / "checkpoint.pt").is_file() else "nothing written")
    if args.clip_g and detect_family(args.model) != "sdxl":
        raise InputError(f"--clip-g is for SDXL's second text encoder, and {args.model} is "
                         f"{family(detect_family(args.model)).label}; leave --clip-g out.")
    image = load_image(args.image)
    masks = _object_masks(args, image)
    model = load_model(args.model, dtype=weights_dtype(settings.mixed_precision, torch.device(device)), device=device)
    towers, init = None, None
    if args.encoder:
        init = encoder_start(args.encoder, args.clip, model, image, masks, args.class_words, device)
    elif args.clip or args.clip_g:
        towers = load_clip_towers(args.clip, device, "--clip") if args.clip else None
        if args.clip_g:
            towers = [towers, load_clip_towers(args.clip_g, device, "--clip-g")]  # per text encoder: CLIP-L, bigG
    prompts = args.preview_prompt or default_preview_prompts(args.token, args.class_words)
    learn(model, image, masks, args.token, args.class_words, settings, out, name, prompts,
          towers=towers, prototype=prototype, resume=args.resume, init_vectors=init, should_cancel=cancel_requested)
    return 0


def encoder_start(encoder_path: str, clip: str, model, image, masks, class_words, device) -> list:
    """The object encoder's vectors for each object: training's head start."""
    from ..encoder.encode import check_encoder_fits, object_vectors
    from ..encoder.model import crop_features, load_encoder
    from ..images import check_masks, load_image
    from .encoder import vision_towers

    image = load_image(image)
    masks = check_masks(masks, image, class_words)
    encoder, _, _ = load_encoder(encoder_path, device)
    towers = vision_towers(clip, device)
    check_encoder_fits(encoder, model.family, sum(model.text_widths), towers.vision_model.config.hidden_size,
                       f"--encoder {encoder_path}")
    return object_vectors(encoder, crop_features(towers),
                          model.text_encoder, model.tokenizer, image, masks, class_words)


# The attribute method's intensity sweep (research/methods.md §3.3).
SWEEP = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25)


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
    p.add_argument("--model", required=True,
                   help="base model: a diffusers folder or a .safetensors/.ckpt SD1.x, SD2.x or SDXL file")
    p.add_argument("--concept", help="the concept's embedding file (its LoRA is found in ../loras/ by name)")
    p.add_argument("--lora", help="the concept's LoRA file, when not beside the embedding in ../loras/")
    p.add_argument("--lora-scale", type=float, action="append", help="LoRA strength (an attribute concept's intensity "
                   "lambda); repeat for a row of pictures per strength (default 1)")
    p.add_argument("--strength-sweep", action="store_true", help="one row per strength " + ", ".join(map(str, SWEEP)) +
                   " (the attribute method's lambda sweep)")
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
    from ..fileio import check_output, save_png
    from ..generate import check_concept_family, check_render_options, generate
    from ..models.loading import detect_family, load_model
    from ..report import image_grid

    seeds = args.seed or [0]
    scales = list(SWEEP) if args.strength_sweep else (args.lora_scale or [1.0])
    for scale in scales:
        check_render_options(args.steps, args.guidance, args.size, seeds, scale, args.prompts)
    if len(scales) > 1 and not args.concept:
        raise InputError("several strengths (--lora-scale, --strength-sweep) need a --concept to scale.")
    out = Path(args.out)
    check_output(out, ["grid.png"])
    if not Path(args.model).exists():
        raise InputError(f"--model {args.model} does not exist; give the path of the file (or folder) you downloaded.")
    concept = None
    if args.concept:  # read before the model: a concept file is small, a model is not
        embedding = Path(args.concept)
        lora = Path(args.lora) if args.lora else embedding.parent.parent / "loras" / embedding.name
        if args.lora and not lora.is_file():
            raise InputError(f"--lora {lora} does not exist; give the concept's LoRA file, or leave --lora out.")
        concept = load_concept(embedding, lora if lora.is_file() else None)
        check_concept_family(concept, detect_family(args.model), f"--model {args.model}")  # before the model loads
    device = device_name(args.device)
    model = load_model(args.model).to(device)
    images, names, labels = [], [], []
    with progress_bar("generate", "image", cancel_requested) as update:
        for number, scale in enumerate(scales):
            done = len(images)
            images += generate(model, args.prompts, concept, seeds, scale, steps=args.steps, guidance=args.guidance,
                               size=args.size, negative_prompt=args.negative,
                               progress=lambda n, total, done=done: update(done + n, total * len(scales)))
            part = f"-strength{scale:g}" if len(scales) > 1 else ""
            names += [f"{number * len(args.prompts) + i:03d}{part}-seed{seed}.png"
                      for i, (_, seed) in enumerate((p, s) for p in args.prompts for s in seeds)]
            labels += [(f"strength {scale:g}: " if len(scales) > 1 else "") + p for p in args.prompts for _ in seeds]
    for picture, file_name in zip(images, names):
        save_png(picture, out / file_name)
    save_png(image_grid(images, labels, columns=len(seeds)), out / "grid.png")
    print(f"wrote {len(images)} image(s) and grid.png to {out}")
    return 0
