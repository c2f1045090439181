"""ShapesWorld quality per training step, and what the class prior needs.

    python benchmarks/shapesworld/steps.py            # the curve and the prior study (about 40 min on 2 cores)
    python benchmarks/shapesworld/steps.py --quick    # one instance, two step counts, one prior variant
    python benchmarks/shapesworld/steps.py --starts   # ours from each start: prototype, class word, object encoder

The curve: each method of the main table trains ONCE per instance up to the last step count; at every count on
the way its concept is taken as it stands and scored as evaluate.py scores (fidelity and editability over the
same new scenes), so each point is the same run seen earlier, not a separate run. Seconds are training time to
that step (the prototype step included, the class images excluded: they are cached once per class and model).
Each method's "enough" is the fewest steps whose harmonic mean reaches 95% of its value at the last count.

The prior study: the object-driven method at its benchmark steps with fewer class images and sampler steps per
class image than its default (4 × 25), scored with class likeness too, since that is what the prior is for.

The starts (--starts): the object-driven method from the prototype (its default), from the class word and from the
object encoder's vectors, from step 0 (the start itself, before any training) on; results/steps_starts.md.

Instances: held-out 4-7. The learning rates of evaluate.py were chosen on held-out 0-3 (sweep.py), so these
rows were not tuned on the instances they report.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import evaluate  # noqa: E402  (also puts this checkout's protobooth on the path)

import torch  # noqa: E402

from protobooth.engine.shapesworld import world  # noqa: E402
from protobooth.engine.train import OneShotTrainer, TrainSettings  # noqa: E402

CURVE_METHODS = ["textual inversion", "DreamBooth-LoRA", "object-driven (ours)", "TextBoost"]
START_METHODS = ["object-driven (ours)", "ours, no prototype init", "ours, encoder start"]
START_COUNTS = [0, 25, 50, 100, 200, 300]
STEP_COUNTS = [25, 50, 100, 200, 300, 400]
INSTANCES = range(4, 8)
PRIOR_VARIANTS = {"4 × 25 (default)": (4, 25), "2 × 25": (2, 25), "1 × 25": (1, 25), "4 × 10": (4, 10)}
ENOUGH = 0.95


def method_named(name: str) -> evaluate.Method:
    return next(m for m in evaluate.METHODS if m.name == name)


def snapshots(bench: evaluate.Bench, method: evaluate.Method, photo, counts: list[int], cache: Path,
              extra: dict | None = None) -> tuple[dict, float]:
    """Train once to max(counts). Returns {count: (a copy of the concept then, training seconds so far)} and the
    trainer's set-up seconds (the class images on a cache miss), which the training seconds leave out."""
    image, masks, reference_scene = photo
    tokens, classes = [evaluate.TOKEN], [reference_scene.objects[0].instance.shape]
    started = time.perf_counter()
    init = evaluate.initial_vectors(bench.model, bench.towers, method, image, masks, tokens, classes)
    settings = TrainSettings.from_values(method.method, **evaluate.method_settings(
        method, max(counts), bench.seed, reference_scene, len(tokens), **(extra or {})))
    taken = {}
    entered = time.perf_counter()
    with OneShotTrainer(bench.model, image, masks, tokens, classes, settings, init, prior_cache=cache) as trainer:
        set_up = time.perf_counter() - entered
        def snapshot(step: int) -> None:
            concept = trainer.concept()  # its LoRA tensors are the live ones: copied before training goes on
            concept.lora = {k: v.detach().clone() for k, v in concept.lora.items()}
            taken[step] = (concept, time.perf_counter() - started - set_up)

        if 0 in counts:  # the start itself (its LoRA is still zero)
            snapshot(0)

        def take(report):
            if report.step in counts:
                snapshot(report.step)

        trainer.train(progress=take)
    return taken, set_up


def measure(bench, concept, instance, scenes, reference, class_likeness: bool) -> dict:
    """fidelity and editability (and class likeness) of one concept over the instance's new scenes."""
    per_picture = [s for s, _ in scenes for _ in bench.seeds]
    where = [w for _, w in scenes for _ in bench.seeds]
    words = f"{evaluate.TOKEN} {instance.shape}"
    prompts = [s.caption({w[0]: words}) for s, w in scenes]
    pictures = evaluate.render_scenes(bench.model, concept, prompts, bench.seeds)
    f, e = evaluate.score(bench.encoder, bench.classifier, pictures, per_picture, where, [reference])
    result = {"fidelity": f.tolist(), "editability": e.tolist()}
    if class_likeness:
        plain = evaluate.render_scenes(bench.model, concept, [s.caption() for s, _ in scenes], bench.seeds)
        likeness, _ = evaluate.score(bench.encoder, bench.classifier, plain, per_picture, where, [reference],
                                     words_name_concepts=False)
        result["class likeness"] = likeness.tolist()
    return result


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    bench = evaluate.Bench.load(list(range(args.seeds)), max(args.counts), args.seed)
    curve = {name: {count: {"fidelity": [], "editability": [], "seconds": []} for count in args.counts}
             for name in args.methods}
    prior = {name: {"fidelity": [], "editability": [], "class likeness": [], "seconds": []} for name in args.prior}
    started = time.perf_counter()
    for index in args.instances:
        instance = world.HELD_OUT[index]
        photo = evaluate.reference_photo([instance])
        scenes = [(s, [k]) for s, k in evaluate.recontextualisations(instance, index)][: args.prompts]
        reference = evaluate.metrics.embed(bench.encoder, photo[0][None], [evaluate.REFERENCE_SIDE])[0]
        for name in args.methods:
            taken, _ = snapshots(bench, method_named(name), photo, args.counts, bench.cache)
            for count, (concept, seconds) in taken.items():
                scores = measure(bench, concept, instance, scenes, reference, class_likeness=False)
                for key, values in scores.items():
                    curve[name][count][key] += values
                curve[name][count]["seconds"].append(seconds)
            print(f"[{time.perf_counter() - started:5.0f} s] {instance.key}: {name}: " + ", ".join(
                f"{c}: {mean(curve[name][c]['fidelity'][-len(scenes) * len(bench.seeds):]):.3f}" for c in args.counts),
                flush=True)
        for name in args.prior:
            images, steps = PRIOR_VARIANTS[name]
            extra = dict(prior_images=images, prior_steps=steps)
            drawn = time.perf_counter()
            with tempfile.TemporaryDirectory() as cache:  # a miss every time: the set-up is the drawing
                taken, prior_seconds = snapshots(bench, method_named("object-driven (ours)"), photo, [args.prior_at],
                                                 Path(cache), extra)
            concept, _ = taken[args.prior_at]
            scores = measure(bench, concept, instance, scenes, reference, class_likeness=True)
            for key, values in scores.items():
                prior[name][key] += values
            prior[name]["seconds"].append(prior_seconds)
            print(f"[{time.perf_counter() - started:5.0f} s] {instance.key}: prior {name}: fidelity "
                  f"{mean(scores['fidelity']):.3f}, class likeness {mean(scores['class likeness']):.3f} "
                  f"({time.perf_counter() - drawn:.0f} s)", flush=True)
    return {"curve": curve, "prior": prior, "seconds": time.perf_counter() - started}


def summarise(results: dict, counts: list[int]) -> dict:
    """Per method: per count the means; the fewest steps reaching ENOUGH of the last count's harmonic mean."""
    summary = {}
    for name, per_count in results["curve"].items():
        rows = {}
        for count in counts:
            values = per_count[count]
            f, e = mean(values["fidelity"]), mean(values["editability"])
            rows[count] = {"fidelity": f, "editability": e, "harmonic mean": evaluate.harmonic_mean(f, e),
                           "seconds": mean(values["seconds"])}
        final = rows[counts[-1]]["harmonic mean"]
        enough = next(c for c in counts if rows[c]["harmonic mean"] >= ENOUGH * final)
        summary[name] = {"rows": rows, "enough": enough}
    return summary


def write_report(results: dict, args, command: str) -> Path:
    suffix = "_quick" if args.quick else "_starts" if args.starts else ""
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"steps{suffix}.json").write_text(json.dumps(results, indent=1))
    summary = summarise(results, args.counts)
    lines = [f"# ShapesWorld: quality per training step{' (quick)' if args.quick else ''}", "",
             f"Command: `{command}` ({results['seconds'] / 60:.0f} min). Held-out instances "
             f"{', '.join(str(i) for i in args.instances)} (the learning rates were chosen on 0-3), {args.prompts} new "
             f"scenes × {args.seeds} seeds per instance, training seed {args.seed}. Each method trained once per "
             "instance; every count is that run's concept at that step. Seconds: training to that step, prototype "
             "included, class images excluded (cached per class and model).", "",
             "| method | steps | fidelity | editability | harmonic mean | ÷ last | seconds |", "|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        final = s["rows"][args.counts[-1]]["harmonic mean"]
        for count, row in s["rows"].items():
            mark = " ◄ enough" if count == s["enough"] else ""
            lines.append(f"| {name} | {count}{mark} | {row['fidelity']:.3f} | {row['editability']:.3f} | "
                         f"{row['harmonic mean']:.3f} | {row['harmonic mean'] / final if final else 0:.2f} | "
                         f"{row['seconds']:.1f} |")
    lines += ["", f"Enough: the fewest steps whose harmonic mean reaches {ENOUGH:.0%} of the method's value at "
              f"{args.counts[-1]} steps: " + "; ".join(f"{n} {s['enough']}" for n, s in summary.items()) + "."]
    if "DreamBooth-LoRA" in summary and "object-driven (ours)" in summary:
        target = summary["DreamBooth-LoRA"]["rows"][300 if 300 in args.counts else args.counts[-1]]
        ours = summary["object-driven (ours)"]["rows"]
        reached = [c for c in args.counts if ours[c]["fidelity"] >= target["fidelity"]]
        lines.append(
            f"DreamBooth-LoRA's fidelity at {300 if 300 in args.counts else args.counts[-1]} steps: "
            f"{target['fidelity']:.3f} in {target['seconds']:.1f} s; object-driven reaches it at "
            + (f"{reached[0]} steps in {ours[reached[0]]['seconds']:.1f} s." if reached else "no count measured."))
    if results["prior"]:
        lines += ["", f"## The class prior: images × sampler steps (object-driven at {args.prior_at} steps)", "",
                  "| class images | fidelity | editability | harmonic mean | class likeness | set-up s (class images on a "
                  "cache miss) |", "|---|---|---|---|---|---|"]
        for name, values in results["prior"].items():
            f, e = mean(values["fidelity"]), mean(values["editability"])
            lines.append(f"| {name} | {f:.3f} | {e:.3f} | {evaluate.harmonic_mean(f, e):.3f} | {mean(values['class likeness']):.3f} | "
                         f"{mean(values['seconds']):.1f} |")
    lines += ["", "![fidelity and editability per step](steps" + suffix + ".png)"]
    plot(summary, args.results / f"steps{suffix}.png")
    path = args.results / f"steps{suffix}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def plot(summary: dict, path: Path, width: int = 330, height: int = 260) -> None:
    """Fidelity, editability and harmonic mean against steps, a panel each, one line per method (PIL only)."""
    from PIL import Image, ImageDraw

    keys = ("fidelity", "editability", "harmonic mean")
    legend = 16 * len(summary) + 8
    image = Image.new("RGB", (width * len(keys), height + legend), "white")
    draw = ImageDraw.Draw(image)
    counts = sorted({c for s in summary.values() for c in s["rows"]})
    for panel, key in enumerate(keys):
        left, right, top, bottom = panel * width + 36, (panel + 1) * width - 10, 20, height - 24
        draw.rectangle([left, top, right, bottom], outline=(160, 160, 160))
        draw.text((left, 4), f"{key} (0 to 1)", fill=(0, 0, 0))
        x = {c: left + (right - left) * c / counts[-1] for c in counts}
        for c in counts:
            draw.text((x[c] - 8, bottom + 6), str(c), fill=(0, 0, 0))
        for value in (0.25, 0.5, 0.75):
            y = bottom - (bottom - top) * value
            draw.line([(left, y), (right, y)], fill=(230, 230, 230))
            draw.text((left - 30, y - 6), f"{value:.2f}", fill=(0, 0, 0))
        for colour, s in zip(COLOURS, summary.values()):
            points = [(x[c], bottom - (bottom - top) * s["rows"][c][key]) for c in counts if c in s["rows"]]
            draw.line(points, fill=colour, width=2)
            for px, py in points:
                draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
    for row, (colour, name) in enumerate(zip(COLOURS, summary)):
        y = height + 4 + 16 * row
        draw.rectangle([36, y + 3, 52, y + 9], fill=colour)
        draw.text((58, y), f"{name} (enough: {summary[name]['enough']} steps)", fill=(0, 0, 0))
    image.save(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one instance, two counts, one method, one prior variant")
    parser.add_argument("--starts", action="store_true", help="ours from the prototype, the class word and the object "
                        "encoder, from step 0; no prior study")
    parser.add_argument("--prompts", type=int, default=6, help="new scenes per instance")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per prompt")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    parser.add_argument("--prior-at", type=int, default=300, help="training steps of the prior study")
    parser.add_argument("--results", type=Path, default=evaluate.RESULTS, help="folder for the table and picture")
    args = parser.parse_args(argv)
    args.instances, args.counts, args.methods, args.prior = list(INSTANCES), STEP_COUNTS, CURVE_METHODS, list(PRIOR_VARIANTS)
    if args.starts:
        args.counts, args.methods, args.prior = START_COUNTS, START_METHODS, []
    if args.quick:
        args.instances, args.counts, args.prompts, args.seeds, args.prior_at = [4], [5, 10], 2, 1, 10
        args.methods, args.prior = ["object-driven (ours)"], ["1 × 25"]
    command = evaluate.report_command("steps.py", argv)
    path = write_report(run(args), args, command)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
