"""One-shot training on tiny models: what changes, what must not, and that results can be trusted."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from protobooth.engine.models import tiny
from protobooth.engine.concept.concept import concept_applied, load_concept, save_concept
from protobooth.engine.errors import InputError
from protobooth.engine.train.losses import latent_mask
from protobooth.engine.train import OneShotTrainer, TrainingCancelled, TrainSettings, train_concept


def scene():
    """A 64-px picture with two objects and their masks."""
    generator = torch.Generator().manual_seed(7)
    image = torch.rand(3, 64, 64, generator=generator) * 0.2 + 0.4
    cat = torch.zeros(64, 64)
    cat[12:44, 6:30] = 1
    pot = torch.zeros(64, 64)
    pot[30:56, 38:60] = 1
    image[:, cat > 0] = torch.tensor([0.9, 0.3, 0.1])[:, None]
    image[:, pot > 0] = torch.tensor([0.1, 0.3, 0.9])[:, None]
    return image, cat, pot


FAST = TrainSettings.from_values(steps=8, prior_images=2, prior_steps=2, lora_learning_rate=1e-3, token_learning_rate=1e-2)


@pytest.fixture
def prior_cache(tmp_path):
    return tmp_path / "class-latents"


def test_loss_falls(prior_cache):
    image, cat, _ = scene()
    settings = FAST.replace(steps=80, prior_weight=0.0, text_anchor_weight=0.0, lora_learning_rate=3e-3, flip=False)
    result = train_concept(tiny.tiny_model(0), image, [cat], ["zqcat"], ["cat"], settings, prior_cache=prior_cache)
    first, last = sum(result.losses[:20]) / 20, sum(result.losses[-20:]) / 20
    assert last < 0.8 * first, (first, last)


def test_only_lora_and_new_token_rows_change_and_model_is_restored(prior_cache):
    model = tiny.tiny_model(0)
    image, cat, _ = scene()
    before_unet = {k: v.clone() for k, v in model.unet.state_dict().items()}
    before_text = {k: v.clone() for k, v in model.text_encoder.state_dict().items()}
    embedding_module = model.text_encoder.get_input_embeddings()
    with OneShotTrainer(model, image, [cat], ["zqcat"], ["cat"], FAST, prior_cache=prior_cache) as trainer:
        start = trainer.vocabulary.vectors[0].detach().clone()
        lora_start = {n: p.detach().clone() for n, p in model.unet.named_parameters() if "lora" in n}
        trainer.train()
        lora_end = {n: p.detach().clone() for n, p in model.unet.named_parameters() if "lora" in n}
        moved = trainer.vocabulary.vectors[0].detach()
        frozen = {n for n, p in model.unet.named_parameters() if "lora" not in n and p.requires_grad}
    assert not frozen
    assert not torch.equal(start, moved)
    assert any(not torch.equal(lora_start[n], lora_end[n]) for n in lora_start)
    # The base model is exactly as it was: no LoRA layers left, embedding table and all weights bit-identical.
    assert model.text_encoder.get_input_embeddings() is embedding_module
    assert list(model.unet.state_dict()) == list(before_unet)
    for key, value in model.unet.state_dict().items():
        assert torch.equal(value, before_unet[key]), key
    for key, value in model.text_encoder.state_dict().items():
        assert torch.equal(value, before_text[key]), key


def test_background_weight_zero_makes_loss_blind_outside_mask(prior_cache):
    model = tiny.tiny_model(0)
    image, cat, _ = scene()
    settings = FAST.replace(steps=3, background_weight=0.0, flip=False)
    captured = []

    def keep_grad(_module, _inputs, output):
        output.sample.retain_grad()
        captured.append(output.sample)

    with OneShotTrainer(model, image, [cat], ["zqcat"], ["cat"], settings, prior_cache=prior_cache) as trainer:
        handle = model.unet.register_forward_hook(keep_grad)
        trainer.train()
        handle.remove()
        outside = trainer.instance[0]["masks"][0][0, 0] == 0
    assert outside.any() and (~outside).any()
    for prediction in captured:
        instance_grad = prediction.grad[0]  # row 0 is the instance; row 1 the class prior
        assert torch.count_nonzero(instance_grad[:, outside]) == 0
        assert torch.count_nonzero(instance_grad[:, ~outside]) > 0


def test_background_weight_counts_outside_when_set():
    mask = latent_mask(torch.cat([torch.ones(32, 64), torch.zeros(32, 64)]), (8, 8))
    prediction = torch.zeros(1, 4, 8, 8, requires_grad=True)
    from protobooth.engine.train.losses import masked_mse

    masked_mse(prediction, torch.ones(1, 4, 8, 8), mask, 0.25).backward()
    assert (prediction.grad[0, :, 6:] != 0).all()
    assert prediction.grad[0, :, 6:].abs().max() < prediction.grad[0, :, :2].abs().min()


def test_each_token_moves_only_on_steps_that_name_it(prior_cache):
    model = tiny.tiny_model(0)
    image, cat, pot = scene()
    settings = FAST.replace(steps=12)
    with OneShotTrainer(model, image, [cat, pot], ["zqcat", "zqpot"], ["cat", "teapot"], settings, prior_cache=prior_cache) as trainer:
        prompts, snapshots = [], [[v.detach().clone() for v in trainer.vocabulary.vectors]]
        encode = trainer._encode_prompt
        trainer._encode_prompt = lambda prompt: prompts.append(prompt) or encode(prompt)
        trainer.train(progress=lambda report: snapshots.append([v.detach().clone() for v in trainer.vocabulary.vectors]))
    assert any("zqcat" in p and "zqpot" not in p for p in prompts) and any("zqpot" in p and "zqcat" not in p for p in prompts)
    for step, prompt in enumerate(prompts):
        for index, token in enumerate(["zqcat", "zqpot"]):
            moved = not torch.equal(snapshots[step][index], snapshots[step + 1][index])
            assert moved == (token in prompt.split()), (step, prompt, token)


def test_exported_files_reproduce_the_trained_pipeline(tmp_path, prior_cache):
    model = tiny.tiny_model(0)
    image, cat, pot = scene()
    settings = FAST.replace(steps=10, lora_learning_rate=5e-3)
    prompt = "a photo of zqcat cat and zqpot teapot"
    with OneShotTrainer(model, image, [cat, pot], ["zqcat", "zqpot"], ["cat", "teapot"], settings, prior_cache=prior_cache) as trainer:
        result = trainer.train()
        with trainer.trained_pipeline() as pipeline:
            trained = pipeline(prompt, num_inference_steps=4, height=64, width=64, output_type="np",
                               generator=torch.Generator().manual_seed(3)).images
    save_concept(result.concept, tmp_path / "lora.safetensors", tmp_path / "emb.safetensors")
    concept = load_concept(tmp_path / "emb.safetensors", tmp_path / "lora.safetensors")
    assert concept.tokens == ["zqcat", "zqpot"] and concept.base_fingerprint == model.fingerprint
    pipeline = model.pipeline()
    pipeline.set_progress_bar_config(disable=True)
    with concept_applied(pipeline, concept):
        reloaded = pipeline(prompt, num_inference_steps=4, height=64, width=64, output_type="np",
                            generator=torch.Generator().manual_seed(3)).images
    plain = pipeline(prompt.replace("zqcat ", "").replace("zqpot ", ""), num_inference_steps=4, height=64, width=64,
                     output_type="np", generator=torch.Generator().manual_seed(3)).images
    assert abs(trained - reloaded).max() <= 1e-4
    assert abs(trained - plain).max() > 1e-3  # the concept does change the picture


def test_same_seed_gives_identical_files_and_resume_equals_uninterrupted(tmp_path, prior_cache):
    image, cat, _ = scene()
    settings = FAST.replace(steps=6, checkpoint_every=3)

    def run(name, **kwargs):
        result = train_concept(tiny.tiny_model(0), image, [cat], ["zqcat"], ["cat"], settings, prior_cache=prior_cache, **kwargs)
        save_concept(result.concept, tmp_path / f"{name}-lora.safetensors", tmp_path / f"{name}-emb.safetensors")
        return result

    first = run("first")
    run("second")
    for kind in ("lora", "emb"):
        assert (tmp_path / f"first-{kind}.safetensors").read_bytes() == (tmp_path / f"second-{kind}.safetensors").read_bytes()

    done = []
    with pytest.raises(TrainingCancelled, match="at step 3 of 6"):
        train_concept(tiny.tiny_model(0), image, [cat], ["zqcat"], ["cat"], settings, prior_cache=prior_cache,
                      checkpoint_dir=tmp_path / "ckpt", progress=done.append, should_cancel=lambda: len(done) == 3)
    resumed = run("resumed", checkpoint_dir=tmp_path / "ckpt", resume=True)
    assert resumed.losses == first.losses
    for kind in ("lora", "emb"):
        assert (tmp_path / f"first-{kind}.safetensors").read_bytes() == (tmp_path / f"resumed-{kind}.safetensors").read_bytes()


def test_gradient_checkpointing_gives_the_same_training_and_is_switched_off_after(prior_cache):
    image, cat, _ = scene()
    plain = train_concept(tiny.tiny_model(0), image, [cat], ["zqcat"], ["cat"], FAST, prior_cache=prior_cache)
    model = tiny.tiny_model(0)
    active = []
    checkpointed = train_concept(model, image, [cat], ["zqcat"], ["cat"],
                                 FAST.replace(gradient_checkpointing=True), prior_cache=prior_cache,
                                 progress=lambda report: active.append(model.unet.is_gradient_checkpointing))
    assert active == [True] * FAST.steps
    # Recomputing activations in the backward pass must not change a single number on CPU.
    assert checkpointed.losses == plain.losses
    for key, value in plain.concept.lora.items():
        assert torch.equal(checkpointed.concept.lora[key], value), key
    assert not model.unet.is_gradient_checkpointing


def test_bf16_autocast_on_cpu_when_asked_and_fp16_refused_there(prior_cache):
    image, cat, _ = scene()

    def trained(mixed_precision):
        return train_concept(tiny.tiny_model(0), image, [cat], ["zqcat"], ["cat"],
                             FAST.replace(mixed_precision=mixed_precision), prior_cache=prior_cache)

    plain, bf16, again = trained("auto"), trained("bf16"), trained("bf16")
    assert trained("no").losses == plain.losses  # auto is full precision on CPU
    assert bf16.losses == again.losses  # still deterministic
    assert bf16.losses != plain.losses  # the casts really happen
    assert abs(bf16.losses[0] - plain.losses[0]) < 0.05 * plain.losses[0]
    with pytest.raises(InputError, match="fp16 mixed precision needs a CUDA GPU"):
        OneShotTrainer(tiny.tiny_model(0), image, [cat], ["zqcat"], ["cat"],
                       FAST.replace(mixed_precision="fp16"), prior_cache=prior_cache / "unused")
    assert not (prior_cache / "unused").exists()


def _attention_term(trainer, prompt: str) -> float:
    """The attention loss of the photo's object at one fixed timestep and noise, measured without training."""
    view = trainer.instance[0]
    latents = view["mean"] * trainer.model.latent_scaling
    timestep = torch.tensor([500])
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    method = trainer.method
    with torch.no_grad():
        conditioning = trainer._encode_prompt(prompt)
        method._attention_positions = trainer.token_positions(prompt, [0])
        trainer.model.unet(trainer.model.noise_scheduler.add_noise(latents, noise, timestep), timestep,
                           **trainer.model.unet_kwargs(conditioning, trainer.size))
        method._attention_positions = None
        return float(method._attention_loss(view, [0]))


def test_attention_loss_pulls_the_tokens_attention_onto_its_mask_and_its_hooks_go_after(prior_cache):
    image, cat, _ = scene()
    after = {}
    for weight in (1e-9, 1.0):  # 1e-9: the same hooks and measurement, a negligible pull
        model = tiny.tiny_model(0)
        settings = FAST.replace(steps=40, attention_weight=weight, prior_weight=0.0, flip=False)
        prompt = settings.templates[0].format("zqcat cat")
        with OneShotTrainer(model, image, [cat], ["zqcat"], ["cat"], settings, prior_cache=prior_cache) as trainer:
            before = _attention_term(trainer, prompt)
            trainer.train()
            after[weight] = _attention_term(trainer, prompt)
        assert not any(module._forward_pre_hooks for module in model.unet.modules())
    assert after[1.0] < 0.6 * before and after[1.0] < 0.6 * after[1e-9], (before, after)


def test_attention_loss_finds_each_objects_own_vectors_in_the_prompt(prior_cache):
    image, cat, pot = scene()
    model = tiny.tiny_model(0)
    width = model.text_encoder.get_input_embeddings().weight.shape[1]
    init = [torch.zeros(2, width), torch.zeros(1, width)]  # two vectors for the first object, one for the second
    settings = FAST.replace(attention_weight=0.1, prior_weight=0.0)
    with OneShotTrainer(model, image, [cat, pot], ["zqcat", "zqpot"], ["cat", "teapot"], settings, init,
                        prior_cache=prior_cache) as trainer:
        prompt = "a photo of zqpot teapot and zqcat cat"
        ids = trainer.vocabulary.input_ids([prompt])[0]
        found = trainer.token_positions(prompt, [0, 1])
        words = [trainer.vocabulary.tokenizer.convert_ids_to_tokens(ids[p].tolist()) for p in (found[0], found[1])]
    assert words == [["zqcat", "zqcat_1"], ["zqpot"]]


def test_snr_timestep_sampling_prefers_noisy_steps():
    from protobooth.engine.models.families import noise_scheduler
    from protobooth.engine.train.losses import sample_timesteps, snr_timestep_weights

    weights = snr_timestep_weights(noise_scheduler().alphas_cumprod)
    assert weights[0] == 0 and torch.all(weights[1:] > 0)
    draws = sample_timesteps(20000, 1000, torch.Generator().manual_seed(0), weights).float()
    assert 540 < draws.mean() < 630  # research/methods.md §2.6: E[t] ≈ 584 for SD's schedule


def test_v_prediction_model_trains_towards_the_velocity(prior_cache):
    image, cat, _ = scene()
    model = tiny.tiny_model(0, family="sd2", prediction_type="v_prediction")
    seen = []  # per step: the clean latents, noise and timesteps of the batch, and the target the loss got
    add_noise = model.noise_scheduler.add_noise
    model.noise_scheduler.add_noise = lambda x, noise, t: seen.append([x, noise, t]) or add_noise(x, noise, t)
    with OneShotTrainer(model, image, [cat], ["zqcat"], ["cat"], FAST.replace(timestep_sampling="snr"),
                        prior_cache=prior_cache) as trainer:
        loss = trainer.method.loss
        trainer.method.loss = lambda example, prediction, target: seen[-1].append(target) or loss(example, prediction, target)
        result = trainer.train()
    assert result.concept.family == "sd2" and all(torch.isfinite(torch.tensor(result.losses)))
    assert "clip_h" in result.concept.embedding_tensors()
    alphas = model.noise_scheduler.alphas_cumprod
    for x, noise, t, target in seen:  # v = sqrt(ᾱ) ε − sqrt(1 − ᾱ) x₀ (Salimans & Ho), not the noise
        a = alphas[t].view(-1, 1, 1, 1)
        assert torch.allclose(target, a.sqrt() * noise - (1 - a).sqrt() * x, atol=1e-5)
        assert not torch.allclose(target, noise, atol=1e-3)
    assert len(seen) == FAST.steps


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(tokens=["dog"]), "already a word"),
        (dict(tokens=["zq cat"]), "no spaces"),
        (dict(tokens=["zqcat", "zqcat"], classes=["cat", "cat"], masks=2), "overlap"),
        (dict(classes=["   "]), "tokenises to nothing"),
        (dict(settings=FAST.replace(steps=0)), "steps must be at least 1"),
        (dict(masks=0), "no object mask"),
        (dict(empty_mask=True), "empty"),
        (dict(mask_size=(32, 32)), "same size"),
        (dict(nan=True), "NaN"),
        (dict(masks=2), "one mask per object"),
    ],
)
def test_bad_input_is_named_and_nothing_is_touched(change, message, prior_cache):
    model = tiny.tiny_model(0)
    image, cat, pot = scene()
    if change.get("nan"):
        image[0, 0, 0] = float("nan")
    masks = [cat, pot][: change.get("masks", 1)]
    if change.get("empty_mask"):
        masks = [torch.zeros(64, 64)]
    if "mask_size" in change:
        masks = [torch.ones(change["mask_size"])]
    tokens = change.get("tokens", ["zqcat"])
    classes = change.get("classes", ["cat"] * len(tokens))
    with pytest.raises(InputError, match=message):
        with OneShotTrainer(model, image, masks, tokens, classes, change.get("settings", FAST), prior_cache=prior_cache) as t:
            t.train()
    assert not any("lora" in k for k in model.unet.state_dict())


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(n_vectors=0), "vectors per token must be at least 1"),
        (dict(prior_images=0), "prior images must be at least 1"),
        (dict(prior_steps=0), "prior steps"),
        (dict(resolution=0), "resolution must be at least 8 or unset"),
        (dict(resolution=-64), "resolution must be at least 8 or unset"),
        (dict(lora_alpha=0.0), "LoRA alpha must be above 0"),
        (dict(lora_alpha=-4.0), "LoRA alpha must be above 0"),
        (dict(checkpoint_every=-1), "checkpoint every"),
        (dict(lora_rank=0), "LoRA rank must be at least 1"),
        (dict(lora_learning_rate=-1e-4), "lora learning rate must not be negative"),
        (dict(token_learning_rate=float("nan")), "token learning rate must be a finite number"),
        (dict(prior_weight=float("inf")), "prior weight must be a finite number"),
        (dict(attention_weight=-0.1), "attention weight must not be negative"),
        (dict(max_grad_norm=0.0), "max grad norm must be above 0"),
        (dict(steps=2.5), "steps must be a whole number"),
        (dict(seed=-1), "seed must be at least 0"),
        (dict(seed=2**64), "seed must be at most 9223372036854775807"),
        (dict(templates=()), "no prompt template"),
        (dict(templates=("a photo of {} and {}",)), "needs exactly one"),
        (dict(templates=("a {style} photo of {}",)), "needs exactly one"),
        (dict(class_prompt="a photo of a cat"), "class prompt"),
        (dict(timestep_sampling="cosine"), "timestep sampling"),
    ],
)
def test_impossible_settings_are_refused_before_anything_runs(change, message, prior_cache):
    model = tiny.tiny_model(0)
    image, cat, _ = scene()
    settings = FAST.replace(**change)
    with pytest.raises(InputError, match=message):
        OneShotTrainer(model, image, [cat], ["zqcat"], ["cat"], settings, prior_cache=prior_cache)
    assert not prior_cache.exists()


def test_settings_that_only_matter_with_the_prior_are_free_without_it(prior_cache):
    image, cat, _ = scene()
    settings = FAST.replace(steps=1, prior_weight=0.0, prior_images=0, prior_steps=0)
    result = train_concept(tiny.tiny_model(0), image, [cat], ["zqcat"], ["cat"], settings, prior_cache=prior_cache)
    assert len(result.losses) == 1 and not prior_cache.exists()


def test_a_resolution_the_unet_cannot_take_is_refused_with_the_smallest_that_works(prior_cache):
    image, cat, _ = scene()
    # The tiny UNet halves 8x8 latents once, onto 32 channels in 32 groups: 16 px leaves one value per group.
    with pytest.raises(InputError, match="resolution 16 is too small .* at least 24"):
        OneShotTrainer(tiny.tiny_model(0), image, [cat], ["zqcat"], ["cat"], FAST.replace(resolution=16))
    with pytest.raises(InputError, match="multiple of 8"):
        OneShotTrainer(tiny.tiny_model(0), image, [cat], ["zqcat"], ["cat"], FAST.replace(resolution=60))
    settings = FAST.replace(steps=1, resolution=24, prior_images=1, prior_steps=1)
    result = train_concept(tiny.tiny_model(0), image, [cat], ["zqcat"], ["cat"], settings, prior_cache=prior_cache)
    assert torch.isfinite(torch.tensor(result.losses)).all()


def test_class_image_drawing_reports_progress_and_a_second_run_reads_the_cache(prior_cache):
    image, cat, pot = scene()
    settings = FAST.replace(steps=1, prior_images=2, prior_steps=3)
    reports = []
    train_concept(tiny.tiny_model(0), image, [cat, pot], ["zqcat", "zqpot"], ["cat", "teapot"], settings,
                  prior_cache=prior_cache, prepare_progress=lambda done, total: reports.append((done, total)))
    # two class words x two images x three sampling steps, one report per step, on one scale
    assert reports == [(done, 12) for done in range(1, 13)]
    assert len(list(prior_cache.rglob("*.safetensors"))) == 2

    reports.clear()
    train_concept(tiny.tiny_model(0), image, [cat, pot], ["zqcat", "zqpot"], ["cat", "teapot"], settings,
                  prior_cache=prior_cache, prepare_progress=lambda done, total: reports.append((done, total)))
    assert reports == [(6, 12), (12, 12)]  # read from the cache: each class word at once
    assert len(list(prior_cache.rglob("*.safetensors"))) == 2


def test_cancel_while_drawing_class_images_writes_nothing_and_leaves_the_model(prior_cache):
    model = tiny.tiny_model(0)
    image, cat, _ = scene()
    before = {k: v.clone() for m in (model.unet, model.text_encoder, model.vae) for k, v in m.state_dict().items()}
    flags = [p.requires_grad for p in model.unet.parameters()]
    settings = FAST.replace(prior_images=3, prior_steps=4)
    reports = []
    with pytest.raises(TrainingCancelled, match="class image 2 of 3"):
        train_concept(model, image, [cat], ["zqcat"], ["cat"], settings, prior_cache=prior_cache,
                      prepare_progress=lambda done, total: reports.append((done, total)),
                      should_cancel=lambda: len(reports) == 6, progress=lambda report: pytest.fail("training ran"))
    assert reports == [(done, 12) for done in range(1, 7)]
    assert not prior_cache.exists() or not [p for p in prior_cache.rglob("*") if p.is_file()]
    after = {k: v for m in (model.unet, model.text_encoder, model.vae) for k, v in m.state_dict().items()}
    assert list(after) == list(before)  # no LoRA layers, no new token rows
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert [p.requires_grad for p in model.unet.parameters()] == flags


def test_class_images_are_cached_per_weights_key(prior_cache):
    from protobooth.engine.train.class_prior import class_latents

    model = tiny.tiny_model(0)
    plain = class_latents(model, "a photo of a cat", 1, 64, 0, steps=2, directory=prior_cache)
    patched = class_latents(model, "a photo of a cat", 1, 64, 0, steps=2, directory=prior_cache, weights_key="lora-a")
    assert len(list(prior_cache.rglob("*.safetensors"))) == 2  # another key, another entry, not the plain one's
    assert torch.equal(plain, patched)  # the same weights here, so the same pictures
    class_latents(model, "a photo of a cat", 1, 64, 0, steps=2, directory=prior_cache, weights_key="lora-a")
    assert len(list(prior_cache.rglob("*.safetensors"))) == 2


def test_the_class_image_cache_stays_under_its_bound_least_recently_used_out(prior_cache, monkeypatch):
    import os

    from protobooth.engine.train.class_prior import class_latents

    model = tiny.tiny_model(0)
    entry = 4 * 8 * 8 * 4  # bytes of one image's latents; the file adds its header
    monkeypatch.setenv("PROTOBOOTH_CACHE_LIMIT_MB", str(2.5 * (entry + 200) / 2**20))  # room for two entries
    files = {}
    for number, word in enumerate(("cat", "dog")):
        class_latents(model, f"a photo of a {word}", 1, 64, 0, steps=1, directory=prior_cache)
        [files[word]] = set(prior_cache.rglob("*.safetensors")) - set(files.values())
        os.utime(files[word], (1000 + number, 1000 + number))  # used in this order, a second apart
    class_latents(model, "a photo of a cat", 1, 64, 0, steps=1, directory=prior_cache)  # a hit: the cat is used again
    class_latents(model, "a photo of a bird", 1, 64, 0, steps=1, directory=prior_cache)  # a third entry: one must go
    left = set(prior_cache.rglob("*.safetensors"))
    assert files["cat"] in left and files["dog"] not in left and len(left) == 2


def test_the_cache_folder_is_the_callers_unless_the_variable_says_otherwise(tmp_path, monkeypatch):
    from protobooth.engine.train.class_prior import cache_dir

    monkeypatch.delenv("PROTOBOOTH_CACHE", raising=False)
    assert cache_dir(default=tmp_path / "comfy-user") == tmp_path / "comfy-user"
    assert cache_dir() == Path.home() / ".cache" / "protobooth" / "class-latents"
    monkeypatch.setenv("PROTOBOOTH_CACHE", str(tmp_path / "mine"))
    assert cache_dir(default=tmp_path / "comfy-user") == tmp_path / "mine" / "class-latents"


def test_greyscale_rgba_and_16_bit_images_are_converted(prior_cache):
    import numpy as np

    _, cat, _ = scene()
    grey16 = (np.random.default_rng(0).random((64, 64)) * 65535).astype(np.uint16)
    rgba = np.random.default_rng(1).integers(0, 256, (64, 64, 4), dtype=np.uint8)
    for image in (grey16, rgba):
        with OneShotTrainer(tiny.tiny_model(0), image, [cat], ["zqcat"], ["cat"], FAST, prior_cache=prior_cache) as trainer:
            assert trainer.image.shape == (3, 64, 64)


def test_the_result_says_whether_class_images_were_drawn_or_cached(prior_cache):
    image, cat, _ = scene()

    def run(settings):
        return train_concept(tiny.tiny_model(0), image, [cat], ["zqcat"], ["cat"], settings, prior_cache=prior_cache)

    first, second = run(FAST.replace(steps=1)), run(FAST.replace(steps=1))
    assert (first.class_images.classes, first.class_images.drawn) == (1, 1) and first.class_images.seconds > 0
    assert second.class_images.drawn == 0 and "from the cache" in str(second.class_images)
    assert "drawn for 1 of 1 class word" in str(first.class_images)
    assert run(FAST.replace(steps=1, prior_weight=0.0)).class_images is None  # no prior, no class images


def test_previews_while_training_show_the_concept_as_it_stands_and_change_nothing(prior_cache):
    from protobooth.engine.report import live_preview

    image, cat, _ = scene()
    settings = FAST.replace(steps=4, lora_learning_rate=2e-2)

    def run(preview_every: int):
        pictures = []
        with OneShotTrainer(tiny.tiny_model(0), image, [cat], ["zqcat"], ["cat"], settings, prior_cache=prior_cache) as trainer:
            def progress(report):
                if preview_every and report.step % preview_every == 0:
                    pictures.append(live_preview(trainer.losses, report.total, trainer.preview_sample()))
            result = trainer.train(progress=progress)
        return result, pictures

    plain, _ = run(0)
    previewed, pictures = run(2)
    assert previewed.losses == plain.losses  # the same seed gives the same run with or without previews
    assert torch.equal(previewed.concept.objects[0].vectors, plain.concept.objects[0].vectors)
    assert len(pictures) == 2 and pictures[0].size == (2 * 256 + 256, 256)
    samples = [np.asarray(p)[:, 512:].astype(float) for p in pictures]
    assert np.abs(samples[0] - samples[1]).max() > 0  # the concept moved between the two previews
