"""`protobooth segment`: boxes and clicks on a photo -> object mask PNGs (segment-anything)."""
from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from ..learn import progress_bar
from .common import HelpFormatter, cancel_requested, device_name

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
        formatter_class=HelpFormatter,
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
    from ..segment import ObjectPrompt

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
    from ..segment import parse_prompts

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
    from ..fileio import check_output, save_png
    from ..images import check_image_file, check_masks, load_image, to_pil
    from ..segment import Segmenter, load_sam, overlay_masks, refine_mask
    from ..segment.masks import check_not_emptied, check_refine_settings

    check_refine_settings(args.dilate, args.feather)
    check_image_file(args.image, "IMAGE")
    out_dir = Path(args.out) if args.out else Path(args.image).with_name(Path(args.image).stem + "_masks")
    check_output(out_dir, ["preview.png"], fix="choose a shorter --out")
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
        device = device_name(args.device)
        print(f"loading {args.sam} ...", flush=True)
        sam = load_sam(args.sam, device)
        print(f"SAM {sam.protobooth_config.describe()} on {device}")
        segmenter = Segmenter(sam)
        with progress_bar("image embedding", "block", cancel_requested) as progress:
            segmenter.set_image(image, progress)
        with progress_bar("objects", "object", cancel_requested) as progress:
            masks += segmenter.segment(
                prompts, multimask=not args.single_mask, dilate=args.dilate, feather=args.feather, progress=progress
            )
        sources += [f"SAM, predicted IoU {score:.2f}" for score in segmenter.scores]
    masks += user_masks
    sources += [f"from {path}" for path in args.masks or []]
    check_not_emptied(masks, args.dilate)
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
