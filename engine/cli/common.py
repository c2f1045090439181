"""What every subcommand shares: the help layout and the device option."""
from __future__ import annotations

import argparse
import threading

from ..errors import InputError

# Set by Ctrl-C or `kill` while a command runs. The KeyboardInterrupt the signal raises is lost when it lands inside
# an object's finaliser (__del__), so long loops also ask cancel_requested() between steps.
signalled = threading.Event()
cancel_requested = signalled.is_set


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show every option's default, keep hand-written line breaks in descriptions."""


def device_name(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: this PyTorch sees no CUDA GPU; use --device cpu.")
    return str(device)
