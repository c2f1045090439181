"""One-setting sweep for the object-driven method on ShapesWorld held-out instances.

    python benchmarks/shapesworld/sweep.py                          # instances 0-3, LoRA lr 5e-4, 1e-3, 2e-3, 3e-3
    python benchmarks/shapesworld/sweep.py --setting prior_weight --values 0.25 0.5 1
    python benchmarks/shapesworld/sweep.py --instances 7 --values 5e-4 2e-3
    python benchmarks/shapesworld/sweep.py --setting recompose --values 0 0.5 --per-scene

Prints fidelity, editability and the class-prompt columns (evaluate.Scores) per setting, averaged over the chosen instances (six new scenes x two
seeds each, 300 steps); this is how evaluate.py's LoRA learning rate was chosen. --setting names any numeric TrainSettings
field; the others stay as evaluate.py sets them. The instances are among
the eight the full benchmark reports, so the choice is not independent of that table: say so with it.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import evaluate as ev  # noqa: E402  (also makes `protobooth` this checkout)

from protobooth.engine.shapesworld import world  # noqa: E402
from protobooth.engine.train import TrainSettings  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--instances", type=int, nargs="+", default=[0, 1, 2, 3], help="indices into HELD_OUT")
    parser.add_argument("--setting", default="lora_learning_rate", help="the setting to vary (a numeric field of TrainSettings or of the method's settings)")
    parser.add_argument("--values", type=float, nargs="+", default=[5e-4, 1e-3, 2e-3, 3e-3], help="its values")
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    parser.add_argument("--per-scene", action="store_true", help="also fidelity per kind of new scene: the photo's "
                        "side or the far one, alone or with a companion")
    args = parser.parse_args(argv)
    defaults = TrainSettings()
    numeric = {f.name: type(getattr(owner, f.name)) for owner in (defaults, defaults.method)
               for f in dataclasses.fields(owner) if type(getattr(owner, f.name)) in (int, float)}
    if args.setting not in numeric:
        parser.error(f"--setting must be a numeric setting: {', '.join(sorted(numeric))}")
    torch.set_num_threads(args.threads)
    bench = ev.Bench.load(seeds=[0, 1], steps=args.steps, seed=0)
    kinds = SCENE_KINDS if args.per_scene else {}
    print(f"| {args.setting} | fidelity | editability | harmonic mean | class attributes | class likeness | train s |"
          + "".join(f" {kind} |" for kind in kinds) + "\n|---|---|---|---|---|---|---|" + "---|" * len(kinds), flush=True)
    for value in args.values:
        value = numeric[args.setting](value)
        method = ev.Method(f"{args.setting} {value:g}", {args.setting: value})
        scores = ev.Scores()
        per_kind = {kind: [] for kind in kinds}
        for index in args.instances:
            instance = world.HELD_OUT[index]
            fidelity, _ = bench.measure(method, [instance], [(s, [k]) for s, k in ev.recontextualisations(instance, index)],
                                        scores)
            per_scene = fidelity.view(-1, len(bench.seeds))  # the pictures come scene by scene, seeds inside
            for kind, scenes in kinds.items():
                per_kind[kind] += per_scene[list(scenes)].flatten().tolist()
        row = scores.row()  # every instance has as many pictures, so this is the mean over instances too
        print(f"| {value:g} | {row['fidelity']:.3f} | {row['editability']:.3f} | {row['harmonic mean']:.3f} | "
              f"{row['class attributes']:.3f} | {row['class likeness']:.3f} | {row['train seconds']:.0f} |"
              + "".join(f" {sum(v) / len(v):.3f} |" for v in per_kind.values()), flush=True)
    return 0


# evaluate.recontextualisations' six scenes by kind (the photo has the instance alone on the left of gray)
SCENE_KINDS = {"same side": (1,), "far side": (0, 2, 3), "companion, same side": (4,), "companion, far side": (5,)}


if __name__ == "__main__":
    raise SystemExit(main())
