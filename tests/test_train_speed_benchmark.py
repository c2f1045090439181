"""The training-speed benchmark: its reference and bare loops really train, and its quick run reports."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from protobooth.engine.models import tiny

SCRIPT = ROOT / "benchmarks" / "train_speed.py"


@pytest.fixture(scope="module")
def bench():
    """The benchmark script as a module (registered first: its dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location("train_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def test_reference_loop_trains_only_its_lora(bench):
    model = tiny.tiny_model(0)
    generator = torch.Generator().manual_seed(1)
    instance, class_image = torch.randint(0, 256, (2, 3, 64, 64), generator=generator, dtype=torch.uint8)
    vae_before, text_before = snapshot(model.vae), snapshot(model.text_encoder)
    unet_before = snapshot(model.unet)
    loop = bench.DreamBoothLoraReference(model, instance, class_image, "a photo of zqcat cat", "a photo of a cat",
                                         rank=4, learning_rate=1e-2)
    lora_before = [p.detach().clone() for p in loop.lora_parameters]
    losses = [loop.step() for _ in range(3)]

    assert all(torch.isfinite(torch.tensor(losses)))
    assert lora_before and all(p.dtype == torch.float32 for p in loop.lora_parameters)
    assert any(not torch.equal(before, p) for before, p in zip(lora_before, loop.lora_parameters))
    for before, module in ((vae_before, model.vae), (text_before, model.text_encoder)):
        assert all(torch.equal(before[name], value) for name, value in module.state_dict().items())
    # peft renames a wrapped layer's weight to base_layer.weight; every base weight must be unchanged.
    for name, value in model.unet.state_dict().items():
        if "lora_" not in name:
            assert torch.equal(unet_before[name.replace(".base_layer", "")], value), name


def test_bare_loop_moves_its_lora(bench):
    model = tiny.tiny_model(0)
    loop = bench.BareUNetLoop(model, resolution=64, rank=4, learning_rate=1e-2)
    before = [p.detach().clone() for p in loop.lora_parameters]
    assert loop.latents.shape == (2, 4, 8, 8) and loop.states.shape == (2, 77, 32)
    assert torch.isfinite(torch.tensor(loop.step()))
    assert any(not torch.equal(b, p) for b, p in zip(before, loop.lora_parameters))


@pytest.mark.slow
def test_quick_run_ends_with_the_two_ratio_lines():
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, timeout=400,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-2:]
    assert re.fullmatch(r"time ratio: \d+\.\d\d", last[0]), result.stdout
    assert re.fullmatch(r"memory ratio: \d+\.\d\d", last[1]), result.stdout
    assert "ours" in result.stdout and "reference" in result.stdout and "bare" in result.stdout


def test_gpu_check_dry_run_measures_every_side_and_a_concept_on_the_cpu():
    """The GPU script's plumbing, on the CPU with the tiny model in bf16 (it needs CUDA only for real numbers)."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run"], capture_output=True,
                            text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split()[1]: line for line in result.stdout.splitlines() if line.startswith("bf16 ")}
    assert set(rows) == {"ours", "ours-frozen", "ours-offload", "reference", "bare", "concept"}, result.stdout
    assert re.search(r"bf16 concept end to end: class images \(1 × 2 sampler steps\) [\d.]+ s, 3 steps", result.stdout)
    assert re.search(r"bf16\s+reference\s+[\d.]+ s\s+n/a \(CPU\)\s+1\.00", rows["reference"]), rows["reference"]


def test_preview_cost_compares_runs_with_and_without_previews():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "preview_cost.py"), "--size", "tiny", "--steps", "4",
                             "--every", "2", "--rounds", "1"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"tiny, 4 steps, a preview every 2 \(2 previews\): [\d.]+ s without, [\d.]+ s with; "
                     r"preview cost ratio: \d+\.\d{3}$", result.stdout.strip()), result.stdout
