"""The methods seam: a new method is one class plus one registry line, and then the CLI, the library and the
ComfyUI nodes offer it without other edits.

The test's method trains only a bias added to the UNet's output. Its registry line is an entry point in a
plugin folder put on the path (the way a package outside ProtoBooth adds a method; a method inside ProtoBooth
adds its class to METHODS in engine/train/methods/__init__.py instead).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from comfyui_harness import OLD, ComfyUIServer
from protobooth.engine.models import tiny
from protobooth.engine.train import OneShotTrainer, TrainSettings
from protobooth.engine.train.methods import registry
from protobooth.engine.train.options import widget_specs

PLUGIN = '''
from dataclasses import dataclass

import torch

from protobooth.engine.train.fields import MethodSettings, setting
from protobooth.engine.train.losses import masked_mse
from protobooth.engine.train.methods.base import Method


@dataclass
class BiasOnlySettings(MethodSettings):
    bias_learning_rate: float = setting(1e-2, "learning rate of the bias", low=0, high=1)


class BiasOnly(Method):
    name = "bias-only"
    label = "bias only"
    description = "Trains one bias added to the UNet's output (a test of the methods seam)."
    settings_class = BiasOnlySettings
    widgets = ("steps", "bias_learning_rate", "seed")

    def trainables(self):
        self.bias = torch.nn.Parameter(torch.zeros(self.model.unet.config.out_channels))
        handle = self.model.unet.conv_out.register_forward_hook(lambda _m, _i, out: out + self.bias.view(1, -1, 1, 1))
        self.trainer.on_exit(handle.remove)
        return [{"params": [self.bias], "lr": self.settings.bias_learning_rate}]

    def loss(self, example, prediction, target):
        return masked_mse(prediction[:1], target[:1], torch.ones_like(example.view["masks"][0]), 1.0)
'''
ENTRY_POINTS = "[protobooth.methods]\nbias-only = bias_only_method:BiasOnly\n"


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    """A folder holding the method's module and the dist-info that registers it (its one registry line)."""
    folder = tmp_path_factory.mktemp("plugin")
    (folder / "bias_only_method.py").write_text(textwrap.dedent(PLUGIN))
    info = folder / "protobooth_bias_only-0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: protobooth-bias-only\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    return folder


@pytest.fixture
def registered(plugin, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin))
    registry.cache_clear()
    yield registry()["bias-only"]
    monkeypatch.undo()
    registry.cache_clear()


def test_a_registered_method_trains_through_the_library(registered):
    model = tiny.tiny_model(0)
    image = torch.full((3, 64, 64), 0.5)
    mask = torch.zeros(64, 64)
    mask[16:48, 16:48] = 1
    settings = TrainSettings.from_values("bias-only", steps=30, bias_learning_rate=0.05, train_tokens=False)
    before = {name: p.clone() for name, p in model.unet.state_dict().items()}
    with OneShotTrainer(model, image, [mask], ["zqbox"], ["box"], settings) as trainer:
        result = trainer.train()
        assert trainer.method.bias.abs().max() > 0.01  # the one thing it trains moved
    assert result.concept.lora == {} and result.concept.settings["method"]["name"] == "bias-only"
    assert all(torch.equal(before[name], p) for name, p in model.unet.state_dict().items())  # the model as it was
    assert not model.unet.conv_out._forward_hooks
    assert widget_specs(registered)["bias_learning_rate"] == (
        "FLOAT", {"default": 1e-2, "tooltip": "learning rate of the bias", "min": 0, "max": 1, "step": 0.01})


def test_a_registered_method_is_a_cli_choice_with_its_own_flags(plugin):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin), os.environ["PYTHONPATH"]])}
    result = subprocess.run([sys.executable, "-m", "protobooth.engine.cli", "train", "--help"], capture_output=True,
                            text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert "{object-driven,textboost,attribute,bias-only}" in result.stdout and "--bias-learning-rate" in result.stdout
    assert "bias-only method settings" in result.stdout


@pytest.mark.comfyui
def test_a_registered_method_gets_its_own_node(plugin, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(plugin), os.environ["PYTHONPATH"]]))
    with ComfyUIServer(OLD) as comfyui:
        info = comfyui.object_info()
    node = info["ProtoBoothTrainBiasOnly"]
    assert node["display_name"] == "Train Concept (bias only)" and node["category"] == "ProtoBooth"
    assert list(node["input"]["required"])[-3:] == ["steps", "bias_learning_rate", "seed"]
    assert "ProtoBoothTrainConcept" in info  # the default method's node is still there, under its old name
