"""A tiny object-encoder pretraining run, for the test that compares one process with two (torch.distributed.run).

    python encoder_job.py BATCH OUT.safetensors [STEPS]

Every process builds the same tiny seeded model; the main one writes the encoder and OUT.safetensors.json, the loss
of every step (the mean over all processes).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from protobooth.engine.encoder.pretrain import PretrainSettings, pretrain
from protobooth.engine.encoder.sources import ShapesWorldPairs
from protobooth.engine.models import tiny
from protobooth.engine.prototype import ClipTowers


def tiny_setup():
    model = tiny.tiny_model(0)
    return model, ClipTowers.from_clip_model(tiny.tiny_clip(model.text_encoder))


def tiny_settings(**changes) -> PretrainSettings:
    """Small and quick; every sample takes the identity loss (threshold above every timestep)."""
    return PretrainSettings(**{"steps": 3, "batch_size": 2, "width": 32, "layers": 2, "heads": 4,
                               "identity_below": 1000, "learning_rate": 1e-3, **changes})


if __name__ == "__main__":
    torch.set_num_threads(1)
    batch, out = int(sys.argv[1]), Path(sys.argv[2])
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    model, towers = tiny_setup()
    losses = pretrain(model, towers, ShapesWorldPairs(), tiny_settings(batch_size=batch, steps=steps), out)
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        Path(str(out) + ".json").write_text(json.dumps(losses))
