"""Make the name `protobooth` mean this checkout in a benchmark script, whatever is pip-installed.

The repository root is the package `protobooth`, so a link with that name to the root goes first on
sys.path, and on PYTHONPATH too, so that child processes import the same code.
"""
from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def import_this_checkout() -> None:
    spec = importlib.util.find_spec("protobooth")
    if spec is not None and spec.origin and Path(spec.origin).resolve() == REPO / "__init__.py":
        return
    link_dir = Path(tempfile.mkdtemp(prefix="protobooth-bench-"))
    atexit.register(shutil.rmtree, link_dir, ignore_errors=True)  # removes the link, never what it points to
    (link_dir / "protobooth").symlink_to(REPO, target_is_directory=True)
    sys.path.insert(0, str(link_dir))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(link_dir), os.environ.get("PYTHONPATH")]))
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(name, "1")
