"""Ctrl-C at the worst moment, for tests of cancellation."""
from __future__ import annotations

import signal
import time


class CtrlCInAFinaliser:
    """Ctrl-C that arrives while Python runs an object's __del__: the KeyboardInterrupt is raised there and lost.
    Make one and drop it (`CtrlCInAFinaliser()`) to send it."""

    def __del__(self):
        signal.raise_signal(signal.SIGINT)
        time.sleep(0.01)  # Python runs the signal's handler here, still inside __del__


def ctrl_c_in_a_finaliser_after(trainer_class, steps: int, monkeypatch) -> list[int]:
    """Patch trainer_class so Ctrl-C is lost in a finaliser after its `steps`-th training step; returns the list of
    steps run (to check that none ran after that one)."""
    steps_run, original_step = [], trainer_class._train_step

    def step_then_ctrl_c(trainer):
        loss = original_step(trainer)
        steps_run.append(trainer.step)
        if len(steps_run) == steps:
            CtrlCInAFinaliser()
        return loss

    monkeypatch.setattr(trainer_class, "_train_step", step_then_ctrl_c)
    return steps_run
