"""`protobooth pretrain-encoder` (the object encoder's one-time training) and `protobooth encode` (a concept from one
photo in one forward pass, no training)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ..errors import InputError
from .common import HelpFormatter, cancel_requested, device_name

WORLD = "shapesworld"  # the built-in model, whose own CLIP the encoder reads


def register_pretrain_encoder(subparsers) -> None:
    from ..encoder.pretrain import PretrainSettings
    from ..train.fields import described

    p = subparsers.add_parser(
        "pretrain-encoder", formatter_class=HelpFormatter,
        help="train the zero fine-tuning object encoder once (Taming Encoder), for `protobooth encode`",
        description="Pretrain the object encoder on cross-reference pairs (the encoder sees one picture of an object, the\n"
        "model denoises another), with object-embedding dropping and an identity-preservation loss. One process here;\n"
        "several with `accelerate launch --multi_gpu --num_processes N -m protobooth.engine.cli pretrain-encoder ...`\n"
        "(on GPUs, or on CPUs where there are none; torchrun --nproc_per_node N the same): each process takes its share\n"
        "of every step, and the result is the same.")
    p.add_argument("--model", default=WORLD, help="the base model: shapesworld (built in, with its own CLIP and "
                   "pairs), or a diffusers folder or single file (then --clip and --data)")
    p.add_argument("--clip", help="the CLIP vision model folder the encoder will read (transformers "
                   "CLIPVisionModelWithProjection or CLIPModel); not needed for shapesworld")
    p.add_argument("--data", help="identity folders: DATA/objects/<identity>/ with 2+ photos of one object, their "
                   "<photo>.mask.png masks, class.txt and optional <photo>.txt captions naming it '{token} <class>'; "
                   "DATA/general/ pictures with .txt captions (README: pretraining data). shapesworld: its own pairs")
    p.add_argument("--resolution", type=int, help="training size in pixels (default: the model's native size)")
    p.add_argument("--out", required=True, help="the encoder file to write (.safetensors)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in OUT's .work folder")
    group = p.add_argument_group("pretraining settings")
    for item in described(PretrainSettings):
        kind = type(item.default)
        group.add_argument("--" + item.name.replace("_", "-"), type=kind, default=item.default,
                           choices=item.metadata["choices"], help=item.metadata["help"])
    p.set_defaults(run=run_pretrain_encoder)


def run_pretrain_encoder(args) -> int:
    from ..encoder.pretrain import PretrainSettings, pretrain
    from ..encoder.sources import IdentityFolders, ShapesWorldPairs
    from ..learn import progress_bar
    from ..train.photo import training_size

    settings = PretrainSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainSettings)})
    settings.check()
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise InputError(f"--out {out} must end in .safetensors (the encoder's file).")
    if args.model != WORLD and not args.data:
        raise InputError(f"--model {args.model} needs --data: folders of photos of the same objects (pairs exist "
                         f"built in for {WORLD} only).")
    if args.data and not Path(args.data).is_dir():
        raise InputError(f"--data {args.data} is not a folder.")
    if args.resolution is not None and not args.data:
        raise InputError(f"--resolution is for --data pictures; {WORLD}'s own pairs are drawn at its native size.")
    # the data folder is checked whole before the model loads
    source = IdentityFolders(args.data, need_general=settings.general_share > 0) if args.data else ShapesWorldPairs()
    model, towers = load_encoder_inputs(args.model, args.clip, "cpu")  # accelerate moves them to its device
    if args.data:
        source.size = training_size(model, args.resolution)
    with progress_bar("pretrain", should_cancel=cancel_requested) as update:
        losses = pretrain(model, towers, source, settings, out,
                          resume=args.resume, progress=lambda step, total, loss: update(step, total, loss=f"{loss:.4f}"))
    print(f"pretrained {settings.steps} steps; final loss {losses[-1]:.4f}; wrote {out}")
    return 0


def register_encode(subparsers) -> None:
    p = subparsers.add_parser(
        "encode", formatter_class=HelpFormatter,
        help="a concept from one photo in one forward pass of a pretrained object encoder (no training)",
        description="Encode each masked object of the photo into its token vectors (and the UNet LoRA the encoder was\n"
        "pretrained with): the same concept files `protobooth train` writes, in under a second.")
    p.add_argument("image", help="the photo")
    p.add_argument("--encoder", help="the object encoder file (protobooth pretrain-encoder); for shapesworld, the "
                   "built-in one by default")
    p.add_argument("--model", default=WORLD, help="the base model: shapesworld, or a diffusers folder or single file")
    p.add_argument("--clip", help="the CLIP vision model folder the encoder was pretrained with (transformers "
                   "CLIPVisionModelWithProjection or CLIPModel); not needed for shapesworld")
    p.add_argument("--token", action="append", required=True, help="trigger word of an object; repeat per object")
    p.add_argument("--class", dest="class_words", action="append", required=True, help="its class word; repeat")
    p.add_argument("--mask", action="append", required=True, help="mask image of an object (white = object); repeat")
    p.add_argument("--out", default="protobooth-out", help="output folder (loras/ and embeddings/ under it)")
    p.add_argument("--name", help="concept name (file names); default: the first token")
    p.add_argument("--overwrite", action="store_true", help="replace existing concept files of the same name")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, … (auto: cuda when available)")
    p.set_defaults(run=run_encode)


def load_encoder_inputs(model_path: str, clip: str | None, device: str):
    """The base model and the vision tower an encoder reads, from the command line's --model and --clip."""
    from ..models.loading import load_model
    from ..shapesworld.model import clip_towers, load_shapesworld

    if model_path == WORLD:
        model = load_shapesworld(device)
        return model, clip_towers(model.text_encoder, device)
    if not clip:
        raise InputError(f"--model {model_path} needs --clip: the CLIP vision model folder its encoder reads.")
    return load_model(model_path, device=device), vision_towers(clip, device)


def vision_towers(path: str, device):
    """ClipTowers with the vision side only, from a CLIPVisionModelWithProjection or CLIPModel folder."""
    from transformers import CLIPVisionModelWithProjection

    from ..fileio import error_summary
    from ..prototype import ClipTowers

    try:
        vision = CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True).to(device).eval()
    except Exception as error:  # a damaged, foreign or unsafe folder
        raise InputError(f"--clip {path} could not be loaded as a CLIP vision model ({error_summary(error)}); give the "
                         "folder of a transformers CLIPVisionModelWithProjection or CLIPModel.") from None
    return ClipTowers(text_model=None, text_projection=None, vision_model=vision.vision_model,
                      visual_projection=vision.visual_projection, image_size=vision.config.image_size)


def run_encode(args) -> int:
    import time

    import torch

    from ..concept.concept import check_concept_name, concept_files, models_folder_paths, save_concept
    from ..encoder.encode import check_encoder_fits, encode_concept
    from ..encoder.model import crop_features, load_encoder
    from ..images import check_masks, load_image
    from ..text.tokenizer import clip_tokenizer
    from ..text.vocabulary import check_objects

    tokens, class_words = check_objects(clip_tokenizer(), list(args.token), list(args.class_words))
    name = check_concept_name(args.name or tokens[0])
    if len(args.mask) != len(tokens):
        raise InputError(f"{len(tokens)} token(s) but {len(args.mask)} mask(s); give one --mask per --token.")
    lora_path, embedding_path = models_folder_paths(Path(args.out), name)
    if not args.overwrite and any(p.exists() for p in concept_files(lora_path, embedding_path, tokens)):
        raise InputError(f"concept {name!r} already exists in {args.out}; pass --overwrite or choose another --name.")
    device = device_name(args.device)
    if args.encoder is None:
        if args.model != WORLD:
            raise InputError(f"--model {args.model} needs --encoder: an object encoder pretrained for it.")
        from ..shapesworld.model import OBJECT_ENCODER_FILE

        args.encoder = str(OBJECT_ENCODER_FILE)
    encoder, lora, _ = load_encoder(args.encoder, device)
    image = load_image(args.image)
    masks = check_masks(args.mask, image, tokens)
    model, towers = load_encoder_inputs(args.model, args.clip, device)
    check_encoder_fits(encoder, model.family, sum(model.text_widths), towers.vision_model.config.hidden_size,
                       f"--encoder {args.encoder}")
    started = time.perf_counter()
    with torch.no_grad():
        concept = encode_concept(encoder, lora, crop_features(towers),
                                 model, image, masks, tokens, class_words, source=Path(args.encoder).name)
    seconds = time.perf_counter() - started
    save_concept(concept, lora_path, embedding_path)
    print(f"encoded {len(tokens)} object(s) in {seconds:.2f} s")
    for path in concept_files(lora_path, embedding_path, tokens):
        if path.exists():
            print(f"wrote {path}")
    print("use it with the words: " + ", ".join(f"'{t} {c}'" for t, c in zip(tokens, class_words)))
    return 0

