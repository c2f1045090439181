"""ShapesWorld quality benchmark: one-shot personalisation methods side by side on held-out instances.

    python benchmarks/shapesworld/evaluate.py            # held-out instances 4-7, four photos each
    python benchmarks/shapesworld/evaluate.py --quick    # one instance, two photos, fewer prompts and steps (under 5 min)
    python benchmarks/shapesworld/evaluate.py --workers 2  # the same tables, the photos spread over two processes

For every reported held-out instance (never in pretraining; by default 4-7, as the learning rates were chosen on
0-3) several reference photos are rendered, one per kind (PHOTO_KINDS): the instance on the left of a gray
background (the benchmark's only photo before 2026-12-07, kept for continuity), on the right, on another
background, and moved and resized on a random side and background — seeded by instance and kind, listed in the
report. Every method learns from each photo alone with the same step budget, then renders a fixed set of new
scenes (other backgrounds, both sides, a companion object) from fixed seeds. Pictures are scored by the
ShapesWorld metric models (metrics.py): fidelity (is it that instance?) and editability (does the scene hold?);
class preservation (1 − |the trained model's class likeness − the base model's|: the plain class word should not
start to look like the instance); and the harmonic means of the first two and of all three. "ground truth" scores
renders of the same scenes with the real instance: the ceiling. The tables give every kind of photo, overall, and
fidelity per new scene. Methods:

- base model (class words): no training; the prompt names the instance's main colour and class.
- textual inversion: only a new token (class-word start), plain diffusion loss, no regularisation.
- DreamBooth-LoRA: UNet LoRA under a frozen rare identifier, plain loss, class-image prior.
- object-driven (ours): ProtoBooth's default: prototype-initialised token + UNet LoRA, object-masked
  loss, class-characterising regularisation; and its ablations without each of the three; and with
  recomposition (half the steps on the photo recomposed: the object on its mirrored place), also with the
  prototype of the object alone (the demo's settings), also with the cross-attention loss on the one object; the
  object-only prototype without recomposition; recomposition from the class word; and the class images prompted
  with the object's colour ("a photo of a green {}"), also in the photo's scene.
- object-driven, two objects: two instances learned from one photo, rendered swapped and with a companion;
  also with the cross-attention loss (TrainSettings.attention_weight) that binds each token to its mask.
- object encoder (no training): the zero fine-tuning encoder's concept of the photo, in one forward pass
  (engine/encoder; the encoder was pretrained on ShapesWorld's pretraining instances, never the held-out ones:
  `protobooth pretrain-encoder`, shipped as engine/data/shapesworld/object_encoder.safetensors); and ours started
  from its vectors instead of the prototype, also at 25, 50 and 100 steps beside ours at those counts.
- TextBoost: only the text side learns (a LoRA on the text encoder's attention and the token), with paired
  augmentation, the knowledge-preservation loss and SNR-weighted timesteps, at the paper's settings (not tuned
  here); and its ablations without each of the three.

Every trained model is also asked for the same scenes by plain class words (no trigger word), to see
whether the learned instance leaks into its class (the drift class regularisation is meant to prevent).

Writes results/<name>.md (the table, with the command and timings) and one grid PNG per method.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import random
import shlex
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

from protobooth.benchmarks.shapesworld import metrics
from protobooth.engine.shapesworld import world  # noqa: E402
from protobooth.engine.concept.concept import models_folder_paths, save_concept  # noqa: E402
from protobooth.engine.encoder.encode import encoder_concept, object_vectors  # noqa: E402
from protobooth.engine.encoder.model import crop_features, load_encoder  # noqa: E402
from protobooth.engine.errors import InputError  # noqa: E402
from protobooth.engine.shapesworld.model import OBJECT_ENCODER_FILE as ENCODER_FILE  # noqa: E402
from protobooth.engine.generate import generate  # noqa: E402
from protobooth.engine.images import load_image  # noqa: E402
from protobooth.engine.prototype import PrototypeSettings, prototype_embeddings  # noqa: E402
from protobooth.engine.shapesworld import GUIDANCE, SAMPLER_STEPS, clip_towers, load_shapesworld  # noqa: E402
from protobooth.engine.text.vocabulary import class_word_vectors  # noqa: E402
from protobooth.engine.train import OneShotTrainer, TrainSettings  # noqa: E402

RESULTS = HERE / "results"  # the committed results; --results writes elsewhere
REFERENCE_SIDE, REFERENCE_BACKGROUND = "left", "gray"
TOKEN = "zqobj"
TWO_TOKENS = ["zqone", "zqtwo"]  # the two-object photo's
# Chosen by sweep.py (instances 0-3, 300 steps; results/sweep.md): SD's 1e-4 barely moves this small UNet in that budget.
LORA_LEARNING_RATE, TOKEN_LEARNING_RATE = 2e-3, 5e-4
RARE_WORD = "sks"  # DreamBooth's identifier


SHORT_STEPS = (25, 50, 100)  # the head-start rows' own step counts
RECOMPOSE = 0.5  # the share of steps on the recomposed photo (only this value was tried: results/sweep.md)
OBJECT_ONLY_PROTOTYPE = {"weights": (0.0, 1.0, 1.0), "crop_fills": (0.0, 0.5, 1.0)}


@dataclass
class Method:
    name: str
    settings: dict = field(default_factory=dict)
    init: str = "prototype"  # "prototype", "class" (class word), "rare" (frozen rare word), "encoder" (object encoder)
    trains: bool = True
    method: str = "object-driven"  # the training method (engine/train/methods) the row trains with
    prototype: dict = field(default_factory=dict)  # PrototypeSettings changes for the prototype search
    # The class images' prompt, filled in from the reference photo's object ({colour}, {position}, {background});
    # empty: the method's default ("a photo of a {}"). One-object rows only.
    class_prompt: str = ""


BASE_ROW = "base model (class words)"
METHODS = [
    Method(BASE_ROW, trains=False),
    Method("textual inversion", dict(train_lora=False, use_mask=False, prior_weight=0.0, text_anchor_weight=0.0,
                                     token_learning_rate=5e-3), init="class"),
    Method("DreamBooth-LoRA", dict(train_tokens=False, use_mask=False, prior_weight=1.0, text_anchor_weight=0.0), init="rare"),
    Method("object-driven (ours)"),
    Method("ours, no prototype init", init="class"),
    Method("ours, no class regularisation", dict(prior_weight=0.0, text_anchor_weight=0.0)),
    Method("ours, no object mask", dict(use_mask=False)),
    # Recomposition (TrainSettings.recompose), alone and with the prototype of the object alone (its crop over black,
    # grey and white; no whole-photo term): the demo's settings. Both chosen on instances 0-3 (results/photos_probe.md).
    Method("ours, recomposition", dict(recompose=RECOMPOSE)),
    Method("ours, recomposition, object-only prototype", dict(recompose=RECOMPOSE), prototype=OBJECT_ONLY_PROTOTYPE),
    # Where each piece stands alone: the object-only prototype without recomposition, and recomposition from the class
    # word (the prototype question asked again with recomposition on); and Break-A-Scene's cross-attention loss on the
    # one object (weight 0.05, chosen on 0-3: results/companion_probe.md) over the demo's settings.
    Method("ours, object-only prototype", prototype=OBJECT_ONLY_PROTOTYPE),
    Method("ours, recomposition, class-word start", dict(recompose=RECOMPOSE), init="class"),
    Method("ours, recomposition, object-only prototype, attention loss", dict(recompose=RECOMPOSE, attention_weight=0.05),
           prototype=OBJECT_ONLY_PROTOTYPE),
    # The class prior's pictures named as the class prompts that measure drift name the class (its colour), and also
    # in the photo's scene: on 0-3 they held class likeness at 0.310 and 0.150 against 0.419 (results/class_prompt_probe.md).
    Method("ours, recomposition, object-only prototype, class prompt names the colour", dict(recompose=RECOMPOSE),
           prototype=OBJECT_ONLY_PROTOTYPE, class_prompt="a photo of a {colour} {{}}"),
    Method("ours, recomposition, object-only prototype, class prompt names colour and scene", dict(recompose=RECOMPOSE),
           prototype=OBJECT_ONLY_PROTOTYPE, class_prompt="a photo of a {colour} {{}} on the {position}, {background} background"),
    Method("object encoder (no training)", trains=False, init="encoder"),
    Method("ours, encoder start", init="encoder"),
    # A few dozen steps from the encoder's vectors against the same from the prototype (steps.py --starts: the curve).
    *[Method(f"ours, encoder start, {n} steps", dict(steps=n), init="encoder") for n in SHORT_STEPS],
    *[Method(f"object-driven (ours), {n} steps", dict(steps=n)) for n in SHORT_STEPS],
    # TextBoost at its own defaults (the paper's; 5e-5 for the text LoRA, 1e-3 for the token), from the class word.
    Method("TextBoost", init="class", method="textboost"),
    Method("TextBoost, no augmentation", dict(augment_probability=0.0), init="class", method="textboost"),
    Method("TextBoost, no knowledge preservation", dict(knowledge_weight=0.0), init="class", method="textboost"),
    Method("TextBoost, uniform timesteps", dict(timestep_sampling="uniform"), init="class", method="textboost"),
]
# Two objects from one photo, as ours, and with Break-A-Scene's cross-attention loss binding each token to its
# own mask (weight 0.05: the best of 0.05 / 0.1 / 0.5 on these two pairs, 2026-12-06; results/sweep.md).
TWO_OBJECTS = [Method("object-driven, two objects"),
               Method("object-driven, two objects, attention loss", dict(attention_weight=0.05))]


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


# The kinds of reference photo each instance is learned from, one at a time.
PHOTO_KINDS = ("left, gray", "right, gray", "other background", "moved and resized")
DEFAULT_INSTANCES = (4, 5, 6, 7)  # the learning rates were chosen on 0-3 (sweep.py)


def reference_scene(instance: world.Instance, index: int, kind: str) -> world.Scene:
    """The scene of `instance`'s reference photo of a kind (PHOTO_KINDS), seeded by the kind and the instance's index."""
    rng = random.Random(f"{kind} {index}")
    if kind == "left, gray":
        return classic_scene([instance])
    if kind == "right, gray":
        return world.Scene(REFERENCE_BACKGROUND, (world.Placed(instance, "right"),))
    if kind == "other background":
        return world.Scene(rng.choice([b for b in world.BACKGROUNDS_LIST if b != REFERENCE_BACKGROUND]),
                           (world.Placed(instance, REFERENCE_SIDE),))
    if kind == "moved and resized":  # past the pretraining scenes' jitter (±0.8, ±1.5 px, 0.94-1.06)
        placed = world.Placed(instance, rng.choice(world.POSITIONS), round(rng.uniform(-1.5, 1.5), 2),
                              round(rng.uniform(-2.5, 2.5), 2), round(rng.choice([0.85, 1.15]) * rng.uniform(0.97, 1.03), 3))
        return world.Scene(rng.choice(world.BACKGROUNDS_LIST), (placed,))
    raise ValueError(f"unknown kind of photo {kind!r}")


def classic_scene(instances: list[world.Instance]) -> world.Scene:
    """The classic reference scene: the instance on the left of gray, or two instances left and right."""
    sides = [REFERENCE_SIDE] if len(instances) == 1 else ["left", "right"]
    return world.Scene(REFERENCE_BACKGROUND, tuple(world.Placed(i, s) for i, s in zip(instances, sides)))


def reference_photo(instances: list[world.Instance], scene: world.Scene | None = None
                    ) -> tuple[torch.Tensor, list[torch.Tensor], world.Scene]:
    """The reference photo (a scene's render), its objects' masks and the scene; by default the classic one."""
    scene = scene or classic_scene(instances)
    images, masks = world.render([scene])
    return images[0], [(masks[0, k] > 0.5).float() for k in range(len(instances))], scene


def photo_words(scene: world.Scene) -> str:
    """A reference scene as the report lists it."""
    placed = scene.objects[0]
    moved = f", moved ({placed.dx:+g}, {placed.dy:+g}) px, scale {placed.scale:g}" if placed.dx or placed.dy else ""
    return f"{placed.position}, {scene.background}{moved}"


def scene_label(scene: world.Scene, index: int) -> str:
    """A new scene by where the learned object stands: "black, right", "pink, left + companion"."""
    return f"{scene.background}, {scene.objects[index].position}" + (" + companion" if len(scene.objects) > 1 else "")


def initial_vectors(model, towers, method: Method, image, masks, tokens, classes, encoder_file: Path = ENCODER_FILE):
    """The tokens' starting vectors as the method's row asks (None: the trainer's class-word start)."""
    if method.init == "encoder":
        return object_vectors(object_encoder(encoder_file)[0], crop_features(towers),
                              model.text_encoder, model.tokenizer, image, masks, classes)
    if method.init == "prototype":
        found = prototype_embeddings(towers, model.text_encoder, model.tokenizer, image, masks, tokens, classes,
                                     PrototypeSettings(**{"steps": 100, **method.prototype}))
        return [p.vectors for p in found]
    if method.init == "rare":
        return [class_word_vectors(model.text_encoder, model.tokenizer, RARE_WORD, 1) for _ in tokens]
    return None


def method_settings(method: Method, steps: int, seed: int, reference_scene: world.Scene, objects: int, **extra) -> dict:
    """The TrainSettings values of a row: the benchmark's common ones, the row's own, then `extra`."""
    # The templates caption the reference photo's scene, as a user would: the new words carry only the object.
    # No mirrored views: in this world a mirror image moves the object to the other side and mirrors its accent.
    where = f"on the {reference_scene.objects[0].position}, " if objects == 1 else ""
    common = dict(steps=steps, seed=seed, flip=False,
                  templates=(f"a photo of a {{}} {where}{reference_scene.background} background",))
    if method.method == "object-driven":
        common.update(lora_rank=4, lora_learning_rate=LORA_LEARNING_RATE, token_learning_rate=TOKEN_LEARNING_RATE,
                      prior_images=4, prior_steps=SAMPLER_STEPS, prior_guidance=GUIDANCE)
    if method.class_prompt:
        placed = reference_scene.objects[0]
        common["class_prompt"] = method.class_prompt.format(colour=placed.instance.colour, position=placed.position,
                                                            background=reference_scene.background)
    return {**common, **method.settings, **extra}


@functools.lru_cache(maxsize=1)
def object_encoder(path: Path):
    """An object encoder file's encoder and its UNet LoRA (the shipped ShapesWorld one unless --encoder names another)."""
    return load_encoder(path)


def train_once(model, towers, method: Method, image, masks, tokens, classes, steps: int, seed: int, cache: Path,
               reference_scene: world.Scene, encoder_file: Path = ENCODER_FILE):
    """Train `method` on one photo; returns (concept, seconds, trainable parameters, bytes of its saved files)."""
    started = time.perf_counter()
    init = initial_vectors(model, towers, method, image, masks, tokens, classes, encoder_file)
    settings = TrainSettings.from_values(method.method, **method_settings(method, steps, seed, reference_scene, len(tokens)))
    with OneShotTrainer(model, image, masks, tokens, classes, settings, init, prior_cache=cache) as trainer:
        result = trainer.train()
        trainable = sum(p.numel() for group in trainer.optimizer.param_groups for p in group["params"])
    seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as folder:
        lora, embedding = models_folder_paths(Path(folder), "concept")
        save_concept(result.concept, lora, embedding)
        size = sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())
    return result.concept, seconds, trainable, size


def render_scenes(model, concept, prompts: list[str], seeds: list[int]) -> torch.Tensor:
    pictures = generate(model, prompts, concept=concept, seeds=seeds, steps=SAMPLER_STEPS, guidance=GUIDANCE)
    return torch.stack([load_image(p) for p in pictures])


def harmonic_mean(fidelity: float, editability: float) -> float:
    return 0.0 if fidelity + editability == 0 else 2 * fidelity * editability / (fidelity + editability)


def harmonic_mean3(fidelity: float, editability: float, preservation: float) -> float:
    values = (fidelity, editability, preservation)
    return 0.0 if min(values) <= 0 else 3 / sum(1 / v for v in values)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


@dataclass
class Scores:
    fidelity: list[float] = field(default_factory=list)
    editability: list[float] = field(default_factory=list)
    # The trained model asked for the plain class words of the learned object(s), in the same scenes:
    # does the class still come out as the words say (all attributes read back), and how much does it
    # look like the learned instance anyway (fidelity's measure; the base model's value is no drift)?
    class_attributes: list[float] = field(default_factory=list)
    class_likeness: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    trainable: list[int] = field(default_factory=list)  # parameters the optimiser moves (augmentation tokens too)
    file_bytes: list[int] = field(default_factory=list)  # the saved concept: LoRA and embedding files
    grid_rows: list[torch.Tensor] = field(default_factory=list)
    scenes: list[str] = field(default_factory=list)  # each picture's new scene (scene_label)

    def row(self, base: "Scores | None" = None) -> dict:
        """The means; with the base model's Scores of the same pictures, class preservation and the three-way mean."""
        f, e = _mean(self.fidelity), _mean(self.editability)
        likeness = _mean(self.class_likeness)
        preservation = None if base is None or likeness is None else 1 - abs(likeness - _mean(base.class_likeness))
        return {"fidelity": f, "editability": e, "harmonic mean": harmonic_mean(f, e),
                "class attributes": _mean(self.class_attributes), "class likeness": likeness,
                "class preservation": preservation,
                "harmonic mean (3)": None if preservation is None else harmonic_mean3(f, e, preservation),
                "train seconds": _mean(self.seconds) or 0.0, "trainable parameters": _mean(self.trainable),
                "file bytes": _mean(self.file_bytes),
                "per scene": {label: _mean([v for v, s in zip(self.fidelity, self.scenes) if s == label])
                              for label in dict.fromkeys(self.scenes)}}

    @classmethod
    def merged(cls, parts: list["Scores"]) -> "Scores":
        return cls(**{f.name: [v for part in parts for v in getattr(part, f.name)] for f in dataclasses.fields(cls)})


def score(encoder, classifier, pictures, scenes_per_picture, concept_index, reference_embeddings, words_name_concepts=True):
    """Per picture: the mean fidelity of the learned objects at their sides, and editability of the scene.

    With words_name_concepts=False the prompts named the objects by their class words instead, so
    editability also checks the learned objects' shape and colour.
    """
    fidelities = []
    for k, embedding in enumerate(reference_embeddings):
        present = [n for n in range(len(scenes_per_picture)) if concept_index[n][k] >= 0]
        sides = [scenes_per_picture[n].objects[concept_index[n][k]].position for n in present]
        column = torch.full((len(scenes_per_picture),), float("nan"))
        column[present] = metrics.fidelity(encoder, pictures[present], sides, embedding)
        fidelities.append(column)
    concept_sides = [{scene.objects[i].position for i in concept_index[n] if i >= 0} if words_name_concepts else set()
                     for n, scene in enumerate(scenes_per_picture)]
    edit = metrics.editability(classifier, pictures, scenes_per_picture, concept_sides)
    return torch.stack(fidelities).nanmean(0), edit


@dataclass
class Bench:
    """What every measurement shares: the world's models, the metric models, seeds and the training budget."""

    model: object
    towers: object
    classifier: object
    encoder: object
    seeds: list[int]
    steps: int
    seed: int
    cache: Path
    encoder_file: Path = ENCODER_FILE  # the object encoder the encoder rows use

    @classmethod
    def load(cls, seeds: list[int], steps: int, seed: int, encoder_file: Path = ENCODER_FILE) -> "Bench":
        return cls(load_shapesworld(), clip_towers(), metrics.load_classifier(), metrics.load_encoder(), seeds, steps,
                   seed, Path(tempfile.mkdtemp(prefix="shapesworld-prior-")), encoder_file)

    def measure(self, method: Method, instances: list[world.Instance], scenes: list[tuple[world.Scene, list[int]]],
                into: Scores, reference: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Learn `instances` with `method` from one reference photo, render `scenes` and add the scores `into`.

        scenes: (scene, per learned instance its index in scene.objects, -1 where absent). Returns the
        fidelity and editability per picture (for the progress line).
        """
        image, masks, reference_scene = reference or reference_photo(instances)
        sides = [p.position for p in reference_scene.objects]
        references = list(metrics.embed(self.encoder, image[None].repeat(len(sides), 1, 1, 1), sides))
        tokens = [TOKEN] if len(instances) == 1 else TWO_TOKENS
        if method.init == "encoder" and not method.trains:
            started = time.perf_counter()
            encoder, lora = object_encoder(self.encoder_file)[:2]
            vectors = initial_vectors(self.model, self.towers, method, image, masks, tokens, [i.shape for i in instances],
                                      self.encoder_file)
            concept = encoder_concept(encoder, lora, vectors, tokens, [i.shape for i in instances], self.model.family,
                                      self.model.fingerprint, self.model.text_widths, self.encoder_file.name)
            into.seconds.append(time.perf_counter() - started)
            learned_words = [f"{t} {i.shape}" for t, i in zip(tokens, instances)]
        elif method.trains:
            concept, seconds, trainable, size = train_once(self.model, self.towers, method, image, masks, tokens,
                                                           [i.shape for i in instances], self.steps, self.seed, self.cache,
                                                           reference_scene, self.encoder_file)
            into.seconds.append(seconds)
            into.trainable.append(trainable)
            into.file_bytes.append(size)
            learned_words = [f"{t} {i.shape}" for t, i in zip(tokens, instances)]
        else:
            concept, learned_words = None, [i.words for i in instances]
        per_picture = [s for s, _ in scenes for _ in self.seeds]
        concept_index = [where for _, where in scenes for _ in self.seeds]
        prompts = [s.caption({i: w for i, w in zip(where, learned_words) if i >= 0}) for s, where in scenes]
        pictures = render_scenes(self.model, concept, prompts, self.seeds)
        f, e = score(self.encoder, self.classifier, pictures, per_picture, concept_index, references)
        class_prompts = [s.caption() for s, _ in scenes]
        class_pictures = pictures if class_prompts == prompts else render_scenes(self.model, concept, class_prompts, self.seeds)
        likeness, attributes = score(self.encoder, self.classifier, class_pictures, per_picture, concept_index, references,
                                     words_name_concepts=False)
        into.fidelity += f.tolist()
        into.editability += e.tolist()
        into.scenes += [scene_label(s, next(i for i in where if i >= 0)) for s, where in scenes for _ in self.seeds]
        into.class_likeness += likeness.tolist()
        into.class_attributes += attributes.tolist()
        into.grid_rows.append(torch.cat([image[None], pictures[:: len(self.seeds)]]))
        return f, e


def chosen_rows(args) -> list[Method]:
    """The METHODS rows this run measures: all, or those --rows names (the base model always: class preservation
    is measured against it); a quick run leaves out the rows with step counts of their own."""
    chosen = [m for m in METHODS if not args.rows or m.name in args.rows or m.name == BASE_ROW]
    # A quick run's 60 steps make the head-start rows (25-100 steps of their own) say nothing: they are left out.
    return [m for m in chosen if not (args.quick and "steps" in m.settings)]


def photo_job(bench: Bench, index: int, kind: str, prompts: int, progress, rows: list[Method]) -> dict:
    """The rows, and the ground-truth ceiling, learned from instance `index`'s reference photo of a kind."""
    instance = world.HELD_OUT[index]
    scenes = [(s, [k]) for s, k in recontextualisations(instance, index)][:prompts]
    per_picture = [s for s, _ in scenes for _ in bench.seeds]
    truth, _ = world.render(per_picture)
    photo = reference_photo([instance], reference_scene(instance, index, kind))
    reference = metrics.embed(bench.encoder, photo[0][None], [photo[2].objects[0].position])[0]
    f, e = score(bench.encoder, bench.classifier, truth, per_picture, [w for _, w in scenes for _ in bench.seeds],
                 [reference])
    ceiling = Scores(fidelity=f.tolist(), editability=e.tolist(),
                     scenes=[scene_label(s, w[0]) for s, w in scenes for _ in bench.seeds],
                     grid_rows=[torch.cat([photo[0][None], truth[:: len(bench.seeds)]])])
    scores = {"ground truth": ceiling}
    for method in rows:
        f, e = bench.measure(method, [instance], scenes, scores.setdefault(method.name, Scores()), photo)
        progress(f"{instance.key}, {kind}: {method.name}", f, e)
    return {"scores": scores, "photo": photo_words(photo[2])}


def pair_job(bench: Bench, pair: int, prompts: int, progress, args_rows: list[str]) -> dict:
    """The TWO_OBJECTS rows on the pair's classic photo (two held-out instances, left and right of gray)."""
    first, second = world.HELD_OUT[(2 * pair) % len(world.HELD_OUT)], world.HELD_OUT[(2 * pair + 3) % len(world.HELD_OUT)]
    companion = [i for i in world.all_instances() if i.accent == "none" and i.shape not in (first.shape, second.shape)][pair]
    scenes = [  # (scene, [index of the first object, index of the second; -1: absent])
        (world.Scene("black", (world.Placed(second, "left"), world.Placed(first, "right"))), [1, 0]),
        (world.Scene("pink", (world.Placed(first, "left"), world.Placed(second, "right"))), [0, 1]),
        (world.Scene("brown", (world.Placed(second, "left"), world.Placed(first, "right"))), [1, 0]),
        (world.Scene("black", (world.Placed(first, "left"), world.Placed(companion, "right"))), [0, -1]),
    ][: max(2, prompts - 2)]
    scores = {}
    for method in [m for m in TWO_OBJECTS if not args_rows or m.name in args_rows]:
        f, e = bench.measure(method, [first, second], scenes, scores.setdefault(method.name, Scores()))
        progress(f"pair {pair}: {method.name}", f, e)
    return {"scores": scores}


def run_jobs(args, jobs: list[tuple], threads: int, started: float) -> list[dict]:
    """The jobs ("photo", index, kind) or ("pair", n), in order, in this process."""
    torch.set_num_threads(threads)
    bench = Bench.load(list(range(args.seeds)), args.steps, args.seed, args.encoder)

    def progress(label: str, f: torch.Tensor, e: torch.Tensor) -> None:
        print(f"[{time.time() - started:5.0f} s] {label}: fidelity {f.mean():.3f}, editability {e.mean():.3f}", flush=True)

    return [photo_job(bench, job[1], job[2], args.prompts, progress, chosen_rows(args)) if job[0] == "photo"
            else pair_job(bench, job[1], args.prompts, progress, args.rows) for job in jobs]


def run(args) -> dict:
    """Every job, in one process or spread over `args.workers` processes of threads / workers threads each (one
    thread per process uses two cores better than two threads in one); the tables are the same either way."""
    started = time.time()
    jobs = [("photo", index, kind) for index in args.instances for kind in args.kinds] + [("pair", n) for n in range(args.pairs)]
    if args.workers == 1:
        done = run_jobs(args, jobs, args.threads, started)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        shares = [jobs[w :: args.workers] for w in range(args.workers)]
        with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = list(pool.map(run_jobs, [args] * args.workers, shares,
                                  [max(1, args.threads // args.workers)] * args.workers, [started] * args.workers))
        by_job = {job: result for share, part in zip(shares, parts) for job, result in zip(share, part)}
        done = [by_job[job] for job in jobs]
    table = {m.name: {kind: [] for kind in args.kinds} for m in [Method("ground truth"), *chosen_rows(args)]}
    pairs = {m.name: [] for m in TWO_OBJECTS if not args.rows or m.name in args.rows}
    photos: dict[str, dict[str, str]] = {}
    for job, result in zip(jobs, done):
        for name, scores in result["scores"].items():
            (table[name][job[2]] if job[0] == "photo" else pairs[name]).append(scores)
        if job[0] == "photo":
            photos.setdefault(f"{job[1]} ({world.HELD_OUT[job[1]].key})", {})[job[2]] = result["photo"]
    table = {name: {kind: Scores.merged(parts) for kind, parts in per_kind.items()} for name, per_kind in table.items()}
    pairs = {name: Scores.merged(parts) for name, parts in pairs.items()}

    base = table[BASE_ROW]

    def base_of(name: str, kinds: list[str]) -> Scores | None:
        """The base model's scores of the same pictures (class preservation's yardstick); none for the ceiling."""
        return None if name == "ground truth" else Scores.merged([base[k] for k in kinds])

    rows, grids = {}, {}
    for name, per_kind in table.items():
        rows[name] = {"overall": Scores.merged(list(per_kind.values())).row(base_of(name, args.kinds)),
                      "kinds": {kind: scores.row(base_of(name, [kind])) for kind, scores in per_kind.items()}}
        grids[name] = [r for scores in per_kind.values() for r in scores.grid_rows]
    for name, scores in pairs.items():
        if scores.fidelity:
            rows[name], grids[name] = {"overall": scores.row(), "kinds": {}}, scores.grid_rows
    separation = metrics.validate(metrics.load_encoder(), [world.HELD_OUT[i] for i in args.instances],
                                  scenes_per_instance=4 if args.quick else 6)
    return {"rows": rows, "grids": grids, "photos": photos, "separation": dataclasses.asdict(separation),
            "seconds": time.time() - started}


def write_report(results: dict, args, command: str) -> Path:
    out = args.results
    out.mkdir(parents=True, exist_ok=True)
    name = "quick" if args.quick else "full"
    rows = {method: row["overall"] for method, row in results["rows"].items()}
    truth = rows["ground truth"]["fidelity"]
    base_edit = rows[BASE_ROW]["editability"]
    shown = lambda value, form=".3f": "—" if value is None else format(value, form)  # noqa: E731
    tuned = sorted(set(args.instances) & set(range(4)))
    lines = [f"# ShapesWorld one-shot benchmark ({name})", "",
             f"Command: `{command}`  ", f"Held-out instances: {', '.join(map(str, args.instances))}, each learned from "
             f"{len(args.kinds)} reference photo(s), one at a time; new scenes per photo: {args.prompts}; seeds: "
             f"{args.seeds}; training steps per method: {args.steps}; sampler: DDIM {SAMPLER_STEPS} steps, guidance "
             f"{GUIDANCE}; whole run {results['seconds'] / 60:.1f} min.  ",
             "Settings: the learning rates were chosen on held-out instances 0-3 (results/sweep.md); "
             + (f"this table includes instance(s) {', '.join(map(str, tuned))} of those, so it is not independent of that "
                "choice." if tuned else "none of them is reported here."), "",
             "## Overall", "",
             "| method | fidelity | ÷ ground truth | editability | ÷ base | class likeness | class preservation | "
             "harmonic mean | harmonic mean (3) | class attributes | train s | trainable params | file KB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, row in rows.items():
        size = row["file bytes"]
        lines.append(f"| {method} | {row['fidelity']:.3f} | {row['fidelity'] / truth:.2f} | {row['editability']:.3f} | "
                     f"{row['editability'] / base_edit:.2f} | {shown(row['class likeness'])} | "
                     f"{shown(row['class preservation'])} | {row['harmonic mean']:.3f} | {shown(row['harmonic mean (3)'])} | "
                     f"{shown(row['class attributes'])} | {row['train seconds']:.1f} | {_count(row['trainable parameters'])} | "
                     f"{'—' if size is None else f'{size / 1024:.0f}'} |")
    lines += ["", "Class prompts: every trained model, asked for the same scenes with the learned object(s) named by "
              "their plain class words (colour and shape, no trigger word). \"class attributes\": the share of the "
              "scene read back as asked, the learned objects' shape and colour included; \"class likeness\": "
              "fidelity's measure on those pictures, how much the plain class looks like the learned instance; "
              "\"class preservation\": 1 − |class likeness − the base model's| over the same pictures (1: the class "
              "word untouched). \"harmonic mean\" is of fidelity and editability, \"harmonic mean (3)\" of those and "
              "class preservation (two-object rows have no base row of their scenes: —)."]
    lines += ["", "## Per kind of reference photo: fidelity / harmonic mean (3)", "",
              "| method | " + " | ".join(args.kinds) + " |", "|---|" + "---|" * len(args.kinds)]
    for method, row in results["rows"].items():
        if row["kinds"]:
            lines.append(f"| {method} | " + " | ".join(
                f"{k['fidelity']:.3f} / {shown(k['harmonic mean (3)'])}" for k in row["kinds"].values()) + " |")
    labels = list(rows["ground truth"]["per scene"])
    lines += ["", "## Fidelity per new scene (where the learned object stands; every reference photo)", "",
              "| method | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for method, row in rows.items():
        if method in results["rows"] and results["rows"][method]["kinds"]:
            lines.append(f"| {method} | " + " | ".join(shown(row["per scene"].get(label)) for label in labels) + " |")
    lines += ["", "## Reference photos (seeded by kind and instance)", ""]
    lines += [f"- instance {instance}: " + "; ".join(f"{kind}: {words}" for kind, words in kinds.items())
              for instance, kinds in results["photos"].items()]
    sep = results["separation"]
    lines += ["", "Metric check on ground-truth renders (instance encoder cosine): same instance in other scenes "
              f"{sep['same_instance']:.3f}; other instances of the same class and main colour {sep['same_class_other_instance']:.3f}; "
              f"any other instance of the class {sep['same_class_any_instance']:.3f}; worst gap (min same − max look-alike) "
              f"{sep['worst_gap']:.3f}.", "",
              "Grids: one per method (`grid_<method>.png`); each row is one reference photo (kind by kind, instance by "
              "instance), then the first seed of every new scene."]
    path = out / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    for method, grid_rows in results["grids"].items():
        if grid_rows:
            world.save_grid(grid_rows, out / f"{name}_grid_{slug(method)}.png")
    (out / f"{name}.json").write_text(json.dumps({k: v for k, v in results.items() if k != "grids"}, indent=2))
    return path


def _count(number: float | None) -> str:
    """A parameter count as people write it: 5.2k, 1.3M."""
    if number is None:
        return "—"
    for size, unit in ((1e6, "M"), (1e3, "k")):
        if number >= size:
            return f"{number / size:.1f}{unit}"
    return f"{number:.0f}"


def report_command(script: str, argv: list[str] | None, first: tuple[str, ...] = ()) -> str:
    """The command line a ShapesWorld report shows: `first` up front, then the arguments as given, quoted for a shell."""
    given = sys.argv[1:] if argv is None else argv
    words = [*first, *(a for a in given if a not in first)]
    return f"python benchmarks/shapesworld/{script}" + "".join(f" {shlex.quote(w)}" for w in words)


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-").replace("--", "-")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="instance 4 from two photos, 3 prompts, 1 seed, 1 pair, "
                        "60 steps, without the rows of their own step counts; two workers")
    parser.add_argument("--instances", type=int, nargs="+", default=list(DEFAULT_INSTANCES),
                        help="held-out instances to learn (indices into HELD_OUT)")
    parser.add_argument("--kinds", nargs="+", choices=PHOTO_KINDS, default=list(PHOTO_KINDS),
                        help="kinds of reference photo, each learned alone")
    parser.add_argument("--prompts", type=int, default=6, help="new scenes per instance")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per prompt")
    parser.add_argument("--pairs", type=int, default=2, help="two-object photos")
    parser.add_argument("--steps", type=int, default=300, help="training steps for every method")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch, shared among the workers")
    parser.add_argument("--workers", type=int, default=None, help="processes the photos are spread over (2 on two cores: "
                        "one thread each; unset: 2 with --quick, else 1)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for the table, grids and numbers")
    parser.add_argument("--rows", nargs="+", default=[], metavar="ROW",
                        help="measure only these rows (method names as in the table; the base model always): a partial "
                        "run, not the benchmark")
    parser.add_argument("--encoder", type=Path, default=ENCODER_FILE, help="the object encoder file the encoder rows "
                        "use (protobooth pretrain-encoder writes one); the shipped ShapesWorld encoder by default")
    args = parser.parse_args(argv)
    if not args.encoder.is_file():
        parser.error(f"--encoder: no file {args.encoder}")
    try:  # a file that is not an object encoder stops here, before anything is trained
        object_encoder(args.encoder)
    except InputError as error:
        parser.error(f"--encoder: {error}")
    unknown = sorted(set(args.rows) - {m.name for m in [*METHODS, *TWO_OBJECTS]})
    if unknown:
        parser.error(f"--rows: no row is called {unknown[0]!r}; the rows: " + "; ".join(m.name for m in [*METHODS, *TWO_OBJECTS]))
    if args.quick:
        args.instances, args.kinds, args.prompts, args.seeds, args.pairs, args.steps = [4], ["left, gray", "moved and resized"], 3, 1, 1, 60
    args.workers = args.workers or (2 if args.quick else 1)  # a quick run's three jobs fit two workers well
    command = report_command("evaluate.py", argv, ("--quick",) if args.quick else ())
    results = run(args)
    path = write_report(results, args, command)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
