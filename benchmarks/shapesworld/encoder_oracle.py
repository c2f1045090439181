"""The ceiling of the object encoder's road on ShapesWorld (issue 24): what if the encoder were perfect?

The zero-shot encoder stays at the class words' fidelity (results/encoder_probe.md). This asks whether the encoder is
to blame: an *oracle* takes its place, which is given each instance's true attributes (its main colour, accent and
accent colour) and turns them into the object's vectors through three learned tables, one row per value. Nothing
has to be read from a picture, and every held-out instance is a new combination of values the tables have all seen.
The oracle is pretrained exactly as the encoder is (engine/encoder/pretrain.py: the same samples, captions, dropping,
losses, and a UNet LoRA trained along); only the encoder module and its input are swapped, here, by patching the
pretraining module (a diagnostic: nothing in the engine knows of oracles). Two ways in:

- tokens (the shipped encoder's): the vectors are the trigger word's token vectors, through the text encoder;
- context (issue 24's switch): the caption names only the class ("a circle on the left, ..."), and the vectors are
  appended to the cross-attention context after the text encoder; dropped objects and plain captioned pictures
  get the learned null vectors, which the negative prompt and class-word prompts also carry when judged.

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \\
        benchmarks/shapesworld/encoder_oracle.py pretrain --out ORACLE.safetensors [--context] [--lora-rank 4] ...
    python benchmarks/shapesworld/encoder_oracle.py judge ORACLE.safetensors

`judge` scores the oracle's vectors zero-shot on held-out instances 0-3 (the tuning instances), all four kinds of
photo, six new scenes x two seeds, beside the base model's class words: encoder_probe.md's setting.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from checkout import import_this_checkout  # noqa: E402

import_this_checkout()

import protobooth.engine.encoder.pretrain as pretraining  # noqa: E402
from protobooth.engine.encoder.model import LORA_PREFIX, METADATA_KEY, EncoderShape, ObjectEncoder  # noqa: E402
from protobooth.engine.encoder.sources import ShapesWorldPairs  # noqa: E402
from protobooth.engine.models.diffusion_model import Conditioning  # noqa: E402
from protobooth.engine.shapesworld import world  # noqa: E402

COLOURS, ACCENTS = list(world.COLOURS), list(world.ACCENTS)
TRIGGER = "zqobj "  # how the benchmark's prompts name the learned object (evaluate.TOKEN and a space)


def attributes(instance: world.Instance) -> tuple[int, int, int]:
    """(main colour, accent, accent colour or 'none') as table rows."""
    second = COLOURS.index(instance.accent_colour) if instance.accent_colour else len(COLOURS)
    return COLOURS.index(instance.colour), ACCENTS.index(instance.accent), second


class OracleEncoder(nn.Module):
    """The object encoder's interface (forward(features, start), dropped, null), fed attribute rows for features."""

    def __init__(self, shape: EncoderShape):
        super().__init__()
        self.shape = shape
        k, w = shape.queries, shape.text_width
        self.colour = nn.Parameter(torch.zeros(len(COLOURS), k, w))
        self.accent = nn.Parameter(torch.zeros(len(ACCENTS), k, w))
        self.accent_colour = nn.Parameter(torch.zeros(len(COLOURS) + 1, k, w))
        self.null = nn.Parameter(torch.zeros(k, w))

    def offset(self, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.long()
        return self.colour[rows[:, 0]] + self.accent[rows[:, 1]] + self.accent_colour[rows[:, 2]]

    def forward(self, rows: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        return self._bounded(start.float() + self.offset(rows), start)

    def dropped(self, start: torch.Tensor) -> torch.Tensor:
        return self._bounded(start.float() + self.null, start)

    _bounded = ObjectEncoder._bounded


class OracleSource(ShapesWorldPairs):
    """The encoder's ShapesWorld pairs, each also carrying its instance's attribute rows."""

    def sample(self, seed: int, general: bool):
        sample = super().sample(seed, general)
        # ShapesWorldPairs draws the instance first from the same seed: draw it again to know which it was.
        sample.rows = (0, 0, 0) if general else attributes(world.SceneSampler(seed, self.instances).instance())
        return sample


def _context_conditioning(self, batch: dict) -> Conditioning:
    """_Objective.conditioning with the vectors appended to the context (dropped and general samples: the null ones)."""
    found = self.encoder(batch["features"], batch["start"])
    vectors = torch.where(batch["identity"][:, None, None], found, self.encoder.null.expand_as(found))
    text = self.frozen[0].encode(batch["ids"])
    return Conditioning(torch.cat([text.context, vectors.to(text.context.dtype)], 1), text.pooled)


def patch_pretraining(context: bool, wide_lora: bool) -> None:
    """Swap the encoder for the oracle (and, with `context`, the way its vectors reach the UNet)."""
    batch_of = pretraining._batch

    def batch_with_rows(samples, generators, model, towers, vocabulary, settings, device):
        batch = batch_of(samples, generators, model, towers, vocabulary, settings, device)
        batch["features"] = torch.tensor([s.rows for s in samples], device=device)
        if context:  # no start offset and no trigger word: the class word stays in the caption
            batch["start"] = torch.zeros_like(batch["start"])
            captions = [" ".join(s.caption.format(token="").split()) for s in samples]
            batch["ids"] = vocabulary.input_ids(captions).to(device)
        return batch

    pretraining._batch = batch_with_rows
    pretraining.ObjectEncoder = OracleEncoder
    if context:
        pretraining._Objective.conditioning = _context_conditioning
        OracleEncoder._bounded = lambda self, vectors, start: vectors  # context vectors have no word length to keep
    if wide_lora:
        from protobooth.engine.train.methods import object_driven

        object_driven.LORA_TARGETS = object_driven.LORA_TARGETS + ["ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]


def run_pretrain(args) -> int:
    from protobooth.engine.shapesworld import clip_towers, load_shapesworld

    patch_pretraining(args.context, args.wide_lora)
    settings = pretraining.PretrainSettings(
        steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate, unet_lora_rank=args.lora_rank,
        unet_lora_learning_rate=args.lora_learning_rate, background_weight=args.background_weight,
        identity_weight=0.0 if args.context else args.identity_weight, queries=args.queries, seed=args.seed)
    torch.set_num_threads(1)

    def progress(step: int, total: int, loss: float) -> None:
        if step % 200 == 0 or step == total:
            print(f"step {step}/{total}: loss {loss:.4f}", flush=True)

    pretraining.pretrain(load_shapesworld(), clip_towers(), OracleSource(), settings, Path(args.out), progress=progress)
    return 0


def run_judge(args) -> int:
    import evaluate
    from safetensors import safe_open
    from safetensors.torch import load_file

    from protobooth.engine.concept.concept import concept_applied
    from protobooth.engine.images import load_image
    from protobooth.engine.text.vocabulary import class_word_vectors

    with safe_open(args.oracle, framework="pt") as handle:
        meta = json.loads(handle.metadata()[METADATA_KEY])
    context = args.context
    tensors = load_file(args.oracle)
    oracle = OracleEncoder(EncoderShape(**meta["shape"]))
    oracle.load_state_dict({k: v for k, v in tensors.items() if not k.startswith(LORA_PREFIX)})
    if context:
        OracleEncoder._bounded = lambda self, vectors, start: vectors
    lora = {k[len(LORA_PREFIX):]: v for k, v in tensors.items() if k.startswith(LORA_PREFIX)}
    judged = {}

    def oracle_vectors(model, towers, method, image, masks, tokens, classes, encoder_file=None):
        start = class_word_vectors(model.text_encoder, model.tokenizer, classes[0], oracle.shape.queries)
        start = torch.zeros_like(start) if context else start
        with torch.no_grad():
            return [oracle(torch.tensor([attributes(judged["instance"])]), start[None])[0]]

    render = evaluate.render_scenes

    def render_with_context(model, concept, prompts, seeds):
        """Pictures with the oracle's vectors appended to the named object's prompts, the null ones to the rest."""
        if concept is None or not context:
            return render(model, concept, prompts, seeds)
        pipeline = model.pipeline()
        pipeline.set_progress_bar_config(disable=True)

        def embeds(prompt: str, extra: torch.Tensor) -> torch.Tensor:
            return torch.cat([model.encode_prompts([prompt]).context, extra[None]], 1)

        pictures = []
        with torch.no_grad(), concept_applied(pipeline, concept, 1.0):
            negative = embeds("", oracle.null)
            for prompt in prompts:
                named = TRIGGER in prompt
                positive = embeds(prompt.replace(TRIGGER, ""), concept.objects[0].vectors if named else oracle.null)
                for seed in seeds:
                    out = pipeline(prompt_embeds=positive, negative_prompt_embeds=negative,
                                   num_inference_steps=evaluate.SAMPLER_STEPS, guidance_scale=evaluate.GUIDANCE,
                                   generator=torch.Generator().manual_seed(seed))
                    pictures.append(load_image(out.images[0]))
        return torch.stack(pictures)

    evaluate.initial_vectors = oracle_vectors
    evaluate.object_encoder = lambda path: (SimpleNamespace(shape=oracle.shape), lora, {})
    evaluate.render_scenes = render_with_context
    torch.set_num_threads(args.threads)
    bench = evaluate.Bench.load(list(range(args.seeds)), 0, 0)
    rows = [evaluate.Method(evaluate.BASE_ROW, trains=False),
            evaluate.Method("oracle (no training)", trains=False, init="encoder")]
    parts: dict[str, list] = {}
    for index in args.instances:
        judged["instance"] = world.HELD_OUT[index]
        for kind in evaluate.PHOTO_KINDS:
            for name, scores in evaluate.photo_job(bench, index, kind, 6, lambda *a: None, rows)["scores"].items():
                parts.setdefault(name, []).append(scores)
    base = evaluate.Scores.merged(parts[evaluate.BASE_ROW])
    print(f"{args.oracle} ({'context' if context else 'tokens'}), instances {args.instances}:")
    for name, scores in parts.items():
        row = evaluate.Scores.merged(scores).row(base)
        likeness = "" if row["class likeness"] is None else f", class likeness {row['class likeness']:.3f}"
        print(f"  {name}: fidelity {row['fidelity']:.3f}, editability {row['editability']:.3f}{likeness}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("pretrain", help="pretrain an oracle as the encoder is pretrained")
    train.add_argument("--out", required=True)
    train.add_argument("--context", action="store_true", help="append the vectors to the context (else: token vectors)")
    train.add_argument("--wide-lora", action="store_true", help="the LoRA on the feed-forward and projections too")
    train.add_argument("--queries", type=int, default=4,
                       help="vectors per object (four in o1-o3; the shipped encoder has one)")
    train.add_argument("--steps", type=int, default=4000)
    train.add_argument("--batch-size", type=int, default=4, help="per process")
    train.add_argument("--learning-rate", type=float, default=3e-3, help="the tables' learning rate")
    train.add_argument("--lora-rank", type=int, default=4)
    train.add_argument("--lora-learning-rate", type=float, default=1e-3)
    train.add_argument("--background-weight", type=float, default=0.1)
    train.add_argument("--identity-weight", type=float, default=0.05,
                       help="tokens only (the context road runs without it, as o2 in results/encoder_probe.md did)")
    train.add_argument("--seed", type=int, default=0)
    judge = commands.add_parser("judge", help="score an oracle zero-shot on held-out instances")
    judge.add_argument("oracle")
    judge.add_argument("--context", action="store_true", help="the oracle was pretrained with --context")
    judge.add_argument("--instances", type=int, nargs="+", default=[0, 1, 2, 3])
    judge.add_argument("--seeds", type=int, default=2)
    judge.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    return run_pretrain(args) if args.command == "pretrain" else run_judge(args)


if __name__ == "__main__":
    sys.exit(main())
