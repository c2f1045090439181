"""ShapesWorld quality benchmark: one-shot personalisation methods side by side on held-out instances.

    python benchmarks/shapesworld/evaluate.py            # every held-out instance (about 40 min on 2 cores)
    python benchmarks/shapesworld/evaluate.py --quick    # two instances, fewer prompts and steps (under 5 min)

For every held-out instance (never in pretraining) one reference photo is rendered: the instance on the
left of a gray background, with its mask. Every method learns from that photo alone with the same step
budget, then renders a fixed set of new scenes (other backgrounds, the other side, a companion object)
from fixed seeds. Pictures are scored by the ShapesWorld metric models (metrics.py): fidelity (is it
that instance?) and editability (does the scene hold?), and their harmonic mean. "ground truth" scores
renders of the same scenes with the real instance: the ceiling. Methods:

- base model (class words): no training; the prompt names the instance's main colour and class.
- textual inversion: only a new token (class-word start), plain diffusion loss, no regularisation.
- DreamBooth-LoRA: UNet LoRA under a frozen rare identifier, plain loss, class-image prior.
- object-driven (ours): ProtoBooth's default: prototype-initialised token + UNet LoRA, object-masked
  loss, class-characterising regularisation; and its ablations without each of the three.
- object-driven, two objects: two instances learned from one photo, rendered swapped and recoloured.

Writes results/<name>.md (the table, with the command and timings) and one grid PNG per method.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from checkout import import_this_checkout  # noqa: E402

import_this_checkout()

from protobooth.benchmarks.shapesworld import metrics, world  # noqa: E402
from protobooth.engine.generate import generate  # noqa: E402
from protobooth.engine.images import load_image  # noqa: E402
from protobooth.engine.prototype import PrototypeSettings, prototype_embeddings  # noqa: E402
from protobooth.engine.shapesworld import GUIDANCE, SAMPLER_STEPS, clip_towers, load_shapesworld  # noqa: E402
from protobooth.engine.tokens import class_word_vectors  # noqa: E402
from protobooth.engine.train import OneShotTrainer, TrainSettings  # noqa: E402

RESULTS = HERE / "results"  # the committed results; --results writes elsewhere
REFERENCE_SIDE, REFERENCE_BACKGROUND = "left", "gray"
TOKEN = "zqobj"
# Chosen by sweep.py (instances 0-3, 300 steps; results/sweep.md): SD's 1e-4 barely moves this small UNet in that budget.
LORA_LEARNING_RATE, TOKEN_LEARNING_RATE = 2e-3, 5e-4
RARE_WORD = "sks"  # DreamBooth's identifier


@dataclass
class Method:
    name: str
    settings: dict = field(default_factory=dict)
    init: str = "prototype"  # "prototype", "class" (class word), "rare" (frozen rare word)
    trains: bool = True


METHODS = [
    Method("base model (class words)", trains=False),
    Method("textual inversion", dict(train_lora=False, use_mask=False, prior_weight=0.0, text_anchor_weight=0.0,
                                     token_learning_rate=5e-3), init="class"),
    Method("DreamBooth-LoRA", dict(train_tokens=False, use_mask=False, prior_weight=1.0, text_anchor_weight=0.0), init="rare"),
    Method("object-driven (ours)"),
    Method("ours, no prototype init", init="class"),
    Method("ours, no class regularisation", dict(prior_weight=0.0, text_anchor_weight=0.0)),
    Method("ours, no object mask", dict(use_mask=False)),
]
TWO_OBJECTS = Method("object-driven, two objects")


def recontextualisations(instance: world.Instance, index: int) -> list[tuple[world.Scene, int]]:
    """New scenes for an instance: (scene, index of the instance in scene.objects). Deterministic."""
    companions = [i for i in world.all_instances() if i.shape != instance.shape and i.colour != instance.colour
                  and i.accent == "none"]
    first, second = companions[(7 * index) % len(companions)], companions[(7 * index + 11) % len(companions)]
    place = lambda inst, side: world.Placed(inst, side)  # noqa: E731
    return [
        (world.Scene("black", (place(instance, "right"),)), 0),
        (world.Scene("pink", (place(instance, "left"),)), 0),
        (world.Scene("brown", (place(instance, "right"),)), 0),
        (world.Scene("gray", (place(instance, "right"),)), 0),
        (world.Scene("black", (place(instance, "left"), place(first, "right"))), 0),
        (world.Scene("pink", (place(second, "left"), place(instance, "right"))), 1),
    ]


def reference_photo(instances: list[world.Instance]) -> tuple[torch.Tensor, list[torch.Tensor], world.Scene]:
    sides = [REFERENCE_SIDE] if len(instances) == 1 else ["left", "right"]
    scene = world.Scene(REFERENCE_BACKGROUND, tuple(world.Placed(i, s) for i, s in zip(instances, sides)))
    images, masks = world.render([scene])
    return images[0], [(masks[0, k] > 0.5).float() for k in range(len(instances))], scene


def train_once(model, towers, method: Method, image, masks, tokens, classes, steps: int, seed: int, cache: Path,
               reference_scene: world.Scene):
    """Train `method` on one photo; returns (concept, seconds)."""
    started = time.perf_counter()
    if method.init == "prototype":
        found = prototype_embeddings(towers, model.text_encoder, model.tokenizer, image, masks, tokens, classes,
                                     PrototypeSettings(steps=100))
        init = [p.vectors for p in found]
    elif method.init == "rare":
        init = [class_word_vectors(model.text_encoder, model.tokenizer, RARE_WORD, 1) for _ in tokens]
    else:
        init = None
    # The templates caption the reference photo's scene, as a user would: the new words carry only the object.
    # No mirrored views: in this world a mirror image moves the object to the other side and mirrors its accent.
    where = "on the left, " if len(tokens) == 1 else ""
    common = dict(steps=steps, lora_rank=4, seed=seed, flip=False, lora_learning_rate=LORA_LEARNING_RATE,
                  token_learning_rate=TOKEN_LEARNING_RATE, prior_images=4, prior_steps=SAMPLER_STEPS, prior_guidance=GUIDANCE,
                  templates=(f"a photo of a {{}} {where}{reference_scene.background} background",))
    settings = TrainSettings(**{**common, **method.settings})
    with OneShotTrainer(model, image, masks, tokens, classes, settings, init, prior_cache=cache) as trainer:
        result = trainer.train()
    return result.concept, time.perf_counter() - started


def render_scenes(model, concept, prompts: list[str], seeds: list[int]) -> torch.Tensor:
    pictures = generate(model, prompts, concept=concept, seeds=seeds, steps=SAMPLER_STEPS, guidance=GUIDANCE)
    return torch.stack([load_image(p) for p in pictures])


@dataclass
class Scores:
    fidelity: list[float] = field(default_factory=list)
    editability: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    grid_rows: list[torch.Tensor] = field(default_factory=list)

    def row(self) -> dict:
        f = sum(self.fidelity) / len(self.fidelity)
        e = sum(self.editability) / len(self.editability)
        hm = 0.0 if f + e == 0 else 2 * f * e / (f + e)
        return {"fidelity": f, "editability": e, "harmonic mean": hm,
                "train seconds": sum(self.seconds) / len(self.seconds) if self.seconds else 0.0}


def score(encoder, classifier, pictures, scenes_per_picture, concept_index, reference_embeddings):
    """Fidelity of each learned object at its side, and editability of each picture's scene."""
    fidelities = []
    for k, embedding in enumerate(reference_embeddings):
        sides = [scene.objects[concept_index[n][k]].position for n, scene in enumerate(scenes_per_picture)]
        fidelities.append(metrics.fidelity(encoder, pictures, sides, embedding))
    concept_sides = [{scene.objects[i].position for i in concept_index[n]} for n, scene in enumerate(scenes_per_picture)]
    edit = metrics.editability(classifier, pictures, scenes_per_picture, concept_sides)
    return torch.stack(fidelities).mean(0), edit


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    model, towers = load_shapesworld(), clip_towers()
    classifier, encoder = metrics.load_classifier(), metrics.load_encoder()
    instances = list(world.HELD_OUT[: args.instances])
    seeds = list(range(args.seeds))
    cache = Path(tempfile.mkdtemp(prefix="shapesworld-prior-"))
    table: dict[str, Scores] = {m.name: Scores() for m in [Method("ground truth"), *METHODS, TWO_OBJECTS]}
    started = time.perf_counter()

    for index, instance in enumerate(instances):
        image, masks, reference_scene = reference_photo([instance])
        reference = metrics.embed(encoder, image[None], [REFERENCE_SIDE])[0]
        scenes = [s for s, _ in recontextualisations(instance, index)][: args.prompts]
        where = [k for _, k in recontextualisations(instance, index)][: args.prompts]
        per_picture = [s for s in scenes for _ in seeds]
        concept_index = [[k] for k in where for _ in seeds]
        truth, _ = world.render(per_picture)
        f, e = score(encoder, classifier, truth, per_picture, concept_index, [reference])
        table["ground truth"].fidelity += f.tolist()
        table["ground truth"].editability += e.tolist()
        table["ground truth"].grid_rows.append(torch.cat([image[None], truth[:: len(seeds)]]))
        for method in METHODS:
            if method.trains:
                concept, seconds = train_once(model, towers, method, image, masks, [TOKEN], [instance.shape], args.steps,
                                              args.seed, cache, reference_scene)
                words = f"{TOKEN} {instance.shape}"
                table[method.name].seconds.append(seconds)
            else:
                concept, words = None, instance.words
            prompts = [s.caption({k: words}) for s, k in zip(scenes, where)]
            pictures = render_scenes(model, concept, prompts, seeds)
            f, e = score(encoder, classifier, pictures, per_picture, concept_index, [reference])
            table[method.name].fidelity += f.tolist()
            table[method.name].editability += e.tolist()
            table[method.name].grid_rows.append(torch.cat([image[None], pictures[:: len(seeds)]]))
            print(f"[{time.perf_counter() - started:5.0f} s] {instance.key}: {method.name}: fidelity {f.mean():.3f}, "
                  f"editability {e.mean():.3f}", flush=True)

    for pair in range(args.pairs):
        first, second = world.HELD_OUT[(2 * pair) % len(world.HELD_OUT)], world.HELD_OUT[(2 * pair + 3) % len(world.HELD_OUT)]
        image, masks, reference_scene = reference_photo([first, second])
        references = list(metrics.embed(encoder, image[None].repeat(2, 1, 1, 1), ["left", "right"]))
        tokens = ["zqone", "zqtwo"]
        concept, seconds = train_once(model, towers, TWO_OBJECTS, image, masks, tokens, [first.shape, second.shape],
                                      args.steps, args.seed, cache, reference_scene)
        companion = [i for i in world.all_instances() if i.accent == "none" and i.shape not in (first.shape, second.shape)][pair]
        scenes = [  # (scene, index of the first object, index of the second; -1: absent)
            (world.Scene("black", (world.Placed(second, "left"), world.Placed(first, "right"))), (1, 0)),
            (world.Scene("pink", (world.Placed(first, "left"), world.Placed(second, "right"))), (0, 1)),
            (world.Scene("brown", (world.Placed(second, "left"), world.Placed(first, "right"))), (1, 0)),
            (world.Scene("black", (world.Placed(first, "left"), world.Placed(companion, "right"))), (0, -1)),
        ][: max(2, args.prompts - 2)]
        prompts = []
        for scene, (a, b) in scenes:
            words = {a: f"{tokens[0]} {first.shape}"}
            if b >= 0:
                words[b] = f"{tokens[1]} {second.shape}"
            prompts.append(scene.caption(words))
        pictures = render_scenes(model, concept, prompts, seeds)
        per_picture = [s for s, _ in scenes for _ in seeds]
        fid, edit = [], []
        for n, (scene, (a, b)) in enumerate(s for s in scenes for _ in seeds):
            present = [(a, references[0])] + ([(b, references[1])] if b >= 0 else [])
            fid.append(sum(float(metrics.fidelity(encoder, pictures[n : n + 1], [scene.objects[i].position], r)[0])
                           for i, r in present) / len(present))
            concept_sides = {scene.objects[i].position for i, _ in present}
            edit.append(float(metrics.editability(classifier, pictures[n : n + 1], [scene], [concept_sides])[0]))
        table[TWO_OBJECTS.name].fidelity += fid
        table[TWO_OBJECTS.name].editability += edit
        table[TWO_OBJECTS.name].seconds.append(seconds)
        table[TWO_OBJECTS.name].grid_rows.append(torch.cat([image[None], pictures[:: len(seeds)]]))
        print(f"[{time.perf_counter() - started:5.0f} s] pair {pair}: fidelity {sum(fid) / len(fid):.3f}, "
              f"editability {sum(edit) / len(edit):.3f}", flush=True)

    separation = metrics.validate(encoder, instances, scenes_per_instance=4 if args.quick else 6)
    return {"rows": {name: s.row() for name, s in table.items() if s.fidelity}, "grids": {n: s.grid_rows for n, s in table.items()},
            "separation": dataclasses.asdict(separation), "seconds": time.perf_counter() - started}


def write_report(results: dict, args, command: str) -> Path:
    out = args.results
    out.mkdir(parents=True, exist_ok=True)
    name = "quick" if args.quick else "full"
    rows = results["rows"]
    truth = rows["ground truth"]["fidelity"]
    base_edit = rows["base model (class words)"]["editability"]
    lines = [f"# ShapesWorld one-shot benchmark ({name})", "",
             f"Command: `{command}`  ", f"Held-out instances: {args.instances}; prompts per instance: {args.prompts}; "
             f"seeds: {args.seeds}; training steps per method: {args.steps}; sampler: DDIM {SAMPLER_STEPS} steps, "
             f"guidance {GUIDANCE}; whole run {results['seconds'] / 60:.1f} min.", "",
             "| method | fidelity | ÷ ground truth | editability | ÷ base | harmonic mean | train s |",
             "|---|---|---|---|---|---|---|"]
    for method, row in rows.items():
        lines.append(f"| {method} | {row['fidelity']:.3f} | {row['fidelity'] / truth:.2f} | {row['editability']:.3f} | "
                     f"{row['editability'] / base_edit:.2f} | {row['harmonic mean']:.3f} | {row['train seconds']:.1f} |")
    sep = results["separation"]
    lines += ["", "Metric check on ground-truth renders (instance encoder cosine): same instance in other scenes "
              f"{sep['same_instance']:.3f}; other instances of the same class and main colour {sep['same_class_other_instance']:.3f}; "
              f"any other instance of the class {sep['same_class_any_instance']:.3f}; worst gap (min same − max look-alike) "
              f"{sep['worst_gap']:.3f}.", "",
              "Grids: one per method (`grid_<method>.png`); each row is an instance: its reference photo, then the "
              "first seed of every prompt."]
    path = out / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    for method, grid_rows in results["grids"].items():
        if grid_rows:
            world.save_grid(grid_rows, out / f"{name}_grid_{slug(method)}.png")
    (out / f"{name}.json").write_text(json.dumps({k: v for k, v in results.items() if k != "grids"}, indent=2))
    return path


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-").replace("--", "-")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 instances, 3 prompts, 2 seeds, 1 pair, fewer steps")
    parser.add_argument("--instances", type=int, default=len(world.HELD_OUT), help="held-out instances to learn")
    parser.add_argument("--prompts", type=int, default=6, help="new scenes per instance")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per prompt")
    parser.add_argument("--pairs", type=int, default=2, help="two-object photos")
    parser.add_argument("--steps", type=int, default=300, help="training steps for every method")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for the table, grids and numbers")
    args = parser.parse_args(argv)
    if args.quick:
        args.instances, args.prompts, args.seeds, args.pairs, args.steps = 2, 3, 2, 1, 120
    command = "python benchmarks/shapesworld/evaluate.py" + (" --quick" if args.quick else "") + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:]) if a != "--quick")
    results = run(args)
    path = write_report(results, args, command)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
