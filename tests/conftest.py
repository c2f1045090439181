"""Shared test set-up.

The repository root is the `protobooth` package (ComfyUI needs `__init__.py` at the top of a custom-node
folder). So that the tests exercise this checkout whatever is pip-installed, a link named `protobooth`
pointing here is put first on sys.path and PYTHONPATH (also for the CLI subprocesses the tests start).
"""
from __future__ import annotations

import atexit
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_link_dir = Path(tempfile.mkdtemp(prefix="protobooth-tests-"))
atexit.register(shutil.rmtree, _link_dir, ignore_errors=True)  # removes the link, never what it points to
(_link_dir / "protobooth").symlink_to(ROOT, target_is_directory=True)
sys.path.insert(0, str(_link_dir))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_link_dir), os.environ.get("PYTHONPATH")]))
# Class images and other caches of this run stay out of the user's ~/.cache.
os.environ["PROTOBOOTH_CACHE"] = str(_link_dir / "cache")

# Nothing may reach a model hub: make the libraries fail fast instead of trying.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"


@pytest.fixture(autouse=True, scope="session")
def refuse_network():
    """Any connection from the test process to a non-loopback address is an error."""
    original_connect = socket.socket.connect

    def connect(sock, address):
        host = address[0] if isinstance(address, tuple) else address
        if sock.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost"):
            raise OSError(f"test tried to reach the network: {address!r}")
        return original_connect(sock, address)

    socket.socket.connect = connect
    yield
    socket.socket.connect = original_connect


def run_python(code: str, timeout: float = 120, **kwargs):
    """Run `code` in a fresh interpreter (the same venv, the test kit importable), returning the CompletedProcess."""
    import subprocess

    env = kwargs.pop("env", os.environ)
    env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests"), env.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=kwargs.pop("cwd", ROOT),
        env=env, **kwargs
    )


@pytest.fixture(scope="session")
def comfy_tiny():
    """The ComfyUI-detectable SD1 model (about 233 M parameters): built once per test session."""
    from kit.models import comfy_tiny_model

    return comfy_tiny_model(seed=0)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    # Every test that uses the ComfyUI server carries the `comfyui` marker, so `-m "not comfyui"` works.
    for item in items:
        if "comfyui" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.comfyui)


def _long_runs_build() -> str:
    from comfyui_harness import CURRENT

    return "2024-03" if CURRENT.unavailable() else "current"


# The slowest end-to-end graphs (whole example workflows, the prototype search's movement) run against one build
# only, the current one users run (the 2024-03 one where the current archive is absent); every quicker test runs
# against both. Use as a decorator.
long_run_on_one_build = pytest.mark.parametrize("comfyui", [_long_runs_build()], indirect=True)


@pytest.fixture(scope="session", params=["2024-03", "current"])
def comfyui(request):
    """One real ComfyUI server per build for the session (tests/comfyui_harness.py), this checkout loaded as a
    pack: every test that uses it runs against the 2024-03 ComfyUI and the current one.

    Fails, never skips, when a build that can be had here has not been prepared: CI must exercise it. The current
    build skips, with the reason, only where its source archive is absent (outside this workplace).
    """
    from comfyui_harness import BUILDS, ComfyUIServer

    build = BUILDS[request.param]
    reason = build.unavailable()
    if reason:
        pytest.skip(reason)
    try:
        server, not_prepared = ComfyUIServer(build), None
    except FileNotFoundError as error:
        not_prepared = str(error)
    if not_prepared:
        pytest.fail(not_prepared, pytrace=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def comfyui_checkpoint(comfyui, comfy_tiny) -> str:
    """Name of a tiny SD1.5-layout checkpoint in the server's models/checkpoints, written once a session."""
    from kit.checkpoints import write_single_file

    name = "protobooth-tiny-sd15.safetensors"
    write_single_file(comfy_tiny, comfyui.models("checkpoints") / name)
    return name


@pytest.fixture(scope="session")
def comfyui_sdxl_checkpoint(comfyui) -> str:
    """Name of the smallest SDXL-family checkpoint the server's loader detects (kit.models.comfy_smallest_sdxl_model:
    2 GB in fp16, random weights), written once a session at test time. Only slow tests use it."""
    from kit.checkpoints import write_single_file
    from kit.models import comfy_smallest_sdxl_model

    name = "protobooth-smallest-sdxl.safetensors"
    write_single_file(comfy_smallest_sdxl_model(seed=0), comfyui.models("checkpoints") / name)
    return name


# Model files for the pack's nodes and the example workflows (tests/comfyui_models.py), written once a session.


@pytest.fixture(scope="session")
def comfyui_sam(comfyui) -> str:
    """Name of the tiny SAM in the server's models/sams (a name that says nothing about its size)."""
    from comfyui_models import write_sam

    name = "protobooth-tiny-sam.pth"
    write_sam(comfyui.models("sams") / name)
    return name


@pytest.fixture(scope="session")
def comfyui_clip_vision(comfyui, comfy_tiny) -> str:
    """Name of a random full CLIP ViT-L/14 file in the server's models/clip_vision, as users keep the published
    one: Load CLIP Vision reads its vision tower, Prototype Init its text projection. Its text tower is the
    tiny checkpoint's text encoder, as SD1's text encoder is CLIP ViT-L/14's text tower."""
    from comfyui_models import write_clip

    name = "protobooth-random-clip-vit-l-14.safetensors"
    write_clip(comfyui.models("clip_vision") / name, comfy_tiny.text_encoder)
    return name


@pytest.fixture(scope="session")
def comfyui_controlnet(comfyui, comfy_tiny) -> str:
    """Name of a ControlNet for the tiny checkpoint's UNet in the server's models/controlnet."""
    from comfyui_models import write_controlnet

    name = "protobooth-tiny-controlnet.safetensors"
    write_controlnet(comfy_tiny.unet, comfyui.models("controlnet") / name)
    return name
