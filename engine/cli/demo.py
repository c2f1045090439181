"""`protobooth demo`: the whole job on the embedded default model, with nothing to download."""
from __future__ import annotations

from pathlib import Path

from ..learn import learn
from .common import HelpFormatter


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
    from ..demo import shapesworld_demo, tiny_demo
    from ..fileio import save_png
    from ..images import to_pil

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

