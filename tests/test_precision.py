"""Weights stored in one dtype, used in another (engine/models/precision.py): exact, without copies, and trainable."""
from __future__ import annotations


import pytest
import torch
from torch import nn

from protobooth.engine.models import tiny
from protobooth.engine.models.precision import compute_in
from protobooth.engine.train.class_prior import class_latents
from protobooth.engine.train import train_concept

STORED = [torch.float16, torch.bfloat16, torch.float8_e4m3fn]


def stored_as(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    for parameter in module.parameters():
        parameter.data = parameter.data.to(dtype)
    return module.requires_grad_(False)


@pytest.mark.parametrize("dtype", STORED, ids=str)
@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Linear(6, 5), (3, 6)),
    (lambda: nn.Conv2d(4, 6, 3, padding=1, stride=2), (2, 4, 9, 9)),
    (lambda: nn.LayerNorm(6), (3, 6)),
    (lambda: nn.GroupNorm(2, 4), (2, 4, 5, 5)),
], ids=["linear", "conv", "layer_norm", "group_norm"])
def test_each_layer_computes_what_its_weights_cast_to_the_input_dtype_give(make, shape, dtype):
    torch.manual_seed(0)
    layer = stored_as(make(), dtype)
    for parameter in layer.parameters():  # norm weights start at 1 and 0: make them say something
        parameter.data = (parameter.data.float() + torch.randn(parameter.shape)).to(dtype)
    reference = stored_as(make(), torch.float32)
    reference.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    compute_in(layer, torch.float32)

    x = torch.randn(shape, requires_grad=True)
    x_reference = x.detach().clone().requires_grad_(True)
    out, expected = layer(x), reference(x_reference)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(x.grad, x_reference.grad, rtol=1e-5, atol=1e-5)
    assert all(p.dtype == dtype for p in layer.parameters())  # still stored as they were


def test_the_backward_pass_keeps_no_cast_copy_of_a_weight():
    unet = compute_in(stored_as(tiny.tiny_unet(0), torch.float16), torch.float32)
    weight_shapes = {tuple(p.shape) for p in unet.parameters() if p.ndim >= 2}
    copies = []

    def pack(tensor):
        if tensor.dtype == torch.float32 and tuple(tensor.shape) in weight_shapes:
            copies.append(tuple(tensor.shape))
        return tensor

    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    states = torch.randn(1, 77, 32)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = unet(x, 500, encoder_hidden_states=states).sample
    out.square().mean().backward()
    assert copies == []
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_a_view_reports_its_compute_dtype_so_pipelines_feed_it_that(tmp_path):
    # The current ComfyUI's CPU default: the text encoder stored in fp16, the UNet in fp32. Class images are drawn by
    # a diffusers pipeline, which takes its input dtype from the modules' `dtype`.
    model = tiny.tiny_model(0)
    compute_in(stored_as(model.text_encoder, torch.float16), torch.float32)
    assert model.text_encoder.dtype == torch.float32 and type(model.text_encoder).__name__ == "CLIPTextModel"
    latents = class_latents(model, "a photo of a cat", 1, 64, seed=0, steps=2, directory=tmp_path)
    assert latents.shape == (1, 4, 8, 8) and torch.isfinite(latents).all()


def test_a_module_owning_weights_of_a_class_it_cannot_cast_is_refused():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.factor = nn.Parameter(torch.ones(3, dtype=torch.float16))

    with pytest.raises(TypeError, match="Scale keeps factor"):
        compute_in(nn.Sequential(nn.Linear(3, 3), Scale()), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float8_e4m3fn], ids=str)
def test_training_over_weights_stored_in_half_or_fp8(dtype, tmp_path):
    from test_train import FAST, scene

    image, cat, _ = scene()
    settings = FAST.replace(steps=80, prior_weight=0.0, text_anchor_weight=0.0, lora_learning_rate=3e-3,
                                   flip=False)
    losses = {}
    for stored in (torch.float32, dtype):
        model = tiny.tiny_model(0)
        compute_in(stored_as(model.unet, stored), torch.float32)
        before = {name: p.clone() for name, p in model.unet.state_dict().items()}
        result = train_concept(model, image, [cat], ["zqcat"], ["cat"], settings, prior_cache=tmp_path)
        assert all(torch.equal(before[name], p) for name, p in model.unet.state_dict().items())  # untouched
        lora = result.concept.lora
        assert all(t.dtype == torch.float32 for t in lora.values())
        losses[stored] = result.losses
    first, last = sum(losses[dtype][:20]) / 20, sum(losses[dtype][-20:]) / 20
    assert last < 0.8 * first, (first, last)
    # The weights are the fp32 ones rounded: the run follows the fp32 run closely.
    assert abs(sum(losses[dtype]) - sum(losses[torch.float32])) < 0.05 * sum(losses[torch.float32])


def test_a_model_computing_in_fp16_trains_with_loss_scaling(tmp_path):
    from test_train import FAST, scene

    image, cat, _ = scene()
    model = tiny.tiny_model(0)
    for module in (model.unet, model.text_encoder):
        stored_as(module, torch.float16)
    settings = FAST.replace(steps=80, prior_weight=0.0, text_anchor_weight=0.0, lora_learning_rate=3e-3,
                                   flip=False)
    result = train_concept(model, image, [cat], ["zqcat"], ["cat"], settings, prior_cache=tmp_path)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    first, last = sum(result.losses[:20]) / 20, sum(result.losses[-20:]) / 20
    assert last < 0.8 * first, (first, last)


@pytest.mark.parametrize("setting, has_units, dtype, message", [
    ("bf16", False, torch.bfloat16, "no bf16 matrix units"),  # 70-110x slower: warn, and name the fix
    ("bf16", True, torch.bfloat16, None),
    ("auto", True, None, "mixed precision bf16 would train"),  # stays fp32, says bf16 would be faster
    ("auto", False, None, None),
])
def test_on_a_cpu_bf16_is_chosen_only_when_asked_and_said_once_where_it_hurts_or_helps(
        monkeypatch, caplog, setting, has_units, dtype, message):
    from protobooth.engine.models import precision

    precision._warn_slow_bf16.cache_clear()
    precision._suggest_bf16.cache_clear()
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: has_units)
    with caplog.at_level("INFO"):
        for _ in range(2):
            assert precision.autocast_dtype(setting, torch.device("cpu")) is dtype
            assert precision.weights_dtype(setting, torch.device("cpu")) is (dtype or torch.float32)
    said = [r.getMessage() for r in caplog.records if r.name == precision.log.name]
    if message is None:
        assert not said
    else:
        assert len(said) == 1 and message in said[0], said
        assert setting == "auto" or "mixed precision no" in said[0]
