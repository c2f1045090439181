"""`protobooth demo`: the whole job on the embedded default model, with nothing to download."""
from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from ..learn import learn
from .common import HelpFormatter, cancel_requested


def register_demo(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="learn an object on the built-in model, end to end, with nothing to download",
        formatter_class=HelpFormatter,
        description="Run the whole job on the embedded default model: prototype search, one-shot training,\n"
        "concept files, loss curve and a grid of the object in new scenes, all under --out.",
    )
    p.add_argument("--out", default="out", help="output folder")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's own)")
    p.add_argument("--model", choices=("shapesworld", "tiny"), default="shapesworld",
                   help="shapesworld: the embedded world model; tiny: random weights, a quick check of the plumbing")
    p.set_defaults(run=run_demo)


def run_demo(args) -> int:
    from PIL import Image

    from ..demo import shapesworld_demo, tiny_demo, zero_shot_previews
    from ..fileio import check_output, save_png
    from ..images import to_pil
    from ..learn import output_files, preview_grid
    from ..report import side_by_side

    if args.steps is not None and args.steps < 1:
        raise InputError(f"--steps {args.steps} must be at least 1 (or leave it out for the demo's own).")
    out = Path(args.out)
    check_output(out, output_files("demo", ["x"]) + ["reference.png", "demo-compare.png"], fix="choose another --out")
    make = shapesworld_demo if args.model == "shapesworld" else tiny_demo
    job = make() if args.steps is None else make(args.steps)
    job.settings.check()
    print(f"demo: {job.description}")
    if job.encoder is not None:
        zero_shot, seconds = zero_shot_previews(job)
        print(f"zero-shot concept from the object encoder in {seconds:.2f} s (no training)")
    learn(job.model, job.image, job.masks, job.tokens, job.class_words, job.settings, out, "demo", job.preview_prompts,
          towers=job.towers, prototype=job.prototype, preview_seeds=job.preview_seeds, render_options=job.render_options,
          should_cancel=cancel_requested)
    if job.encoder is not None:
        with Image.open(out / "demo-preview.png") as tuned:
            compare = side_by_side([preview_grid(zero_shot, job.preview_prompts, job.preview_seeds), tuned.convert("RGB")],
                                   [f"object encoder, no training ({seconds:.2f} s)", f"trained {job.settings.steps} steps"])
        save_png(compare, out / "demo-compare.png")
        print(f"wrote {out / 'demo-compare.png'}")
    # The reference pictures last: a demo that stops early leaves nothing behind.
    save_png(to_pil(job.image), out / "reference.png")
    for index, mask in enumerate(job.masks, 1):
        save_png(to_pil(mask), out / f"reference-mask-{index}.png")
    return 0
