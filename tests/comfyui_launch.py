"""Start the test-only ComfyUI (see comfyui_harness.py) in this process. Test harness only.

usage: python tests/comfyui_launch.py COMFYUI_DIR SCRATCH_DIR [main.py arguments ...]

That ComfyUI imports torchvision at module level (comfy/ldm/cascade, for Stable Cascade only), and
torchvision cannot be installed beside a CPU-only torch. Its core modules are therefore imported here
inside ProtoBooth's scoped torchvision stand-in before main.py runs; main.py then finds them imported.
Its default models folder is SCRATCH_DIR/models, not the cached ComfyUI's. The server also exits when the process that started it goes away, deleting SCRATCH_DIR (the folder made
for this server alone), so a killed test run leaves neither a server nor its models behind.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import runpy
import shutil
import sys
import threading
import time
from pathlib import Path

SAM_IMPORT = Path(__file__).resolve().parents[1] / "engine" / "segment" / "sam_import.py"


def _torchvision_stand_in():
    # Loaded from this checkout by path, so that no `protobooth` module exists before ComfyUI imports the
    # pack from its custom_nodes folder, as in a user's install. sam_import needs only torch and numpy.
    spec = importlib.util.spec_from_file_location("protobooth_sam_import_for_launcher", SAM_IMPORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.torchvision_stand_in()


def _exit_when_orphaned(parent_pid: int, scratch_dir: str) -> None:
    def watch():
        while os.getppid() == parent_pid:
            time.sleep(1)
        shutil.rmtree(scratch_dir, ignore_errors=True)
        os._exit(3)

    threading.Thread(target=watch, name="exit-when-orphaned", daemon=True).start()


def main() -> None:
    comfyui_dir, scratch_dir, main_args = os.path.abspath(sys.argv[1]), sys.argv[2], sys.argv[3:]
    _exit_when_orphaned(os.getppid(), scratch_dir)
    main_py = os.path.join(comfyui_dir, "main.py")
    # comfy.cli_args parses sys.argv when first imported, so it must already hold main.py's arguments.
    sys.argv = [main_py, *main_args]
    sys.path.insert(0, comfyui_dir)

    import comfy.options

    comfy.options.enable_args_parsing()
    # The current ComfyUI has a top-level `utils` package that main.py imports first; imported later, the name
    # can resolve to comfy/utils.py instead.
    if os.path.isfile(os.path.join(comfyui_dir, "utils", "extra_config.py")):
        import utils.extra_config  # noqa: F401

    # transformers caches whether torchvision is installed; let it decide while torchvision is absent.
    from transformers.utils import is_torchvision_available

    is_torchvision_available()

    # A module-level logging call during these imports would give the root logger a default handler before the
    # current main.py sets up its own, and every line would be logged twice. (The 2024 build sets its handler up in
    # comfy.cli_args, which is imported first so that its handler stays.)
    import comfy.cli_args  # noqa: F401

    handlers = list(logging.root.handlers)
    with _torchvision_stand_in():
        import comfy.sd  # noqa: F401
        import execution  # noqa: F401
        import nodes  # noqa: F401
        import server  # noqa: F401
    logging.root.handlers[:] = handlers

    _models_in_scratch(comfyui_dir, scratch_dir)
    runpy.run_path(main_py, run_name="__main__")


def _models_in_scratch(comfyui_dir: str, scratch_dir: str) -> None:
    """Make SCRATCH_DIR/models the default models folder, where nodes that save models (Save Concept)
    write, and SCRATCH_DIR/user the user directory, so tests never write into the cached ComfyUI."""
    import folder_paths

    folder_paths.user_directory = os.path.join(scratch_dir, "user")

    ours, theirs = os.path.join(scratch_dir, "models"), os.path.join(comfyui_dir, "models")
    folder_paths.models_dir = ours
    for name, (paths, extensions) in list(folder_paths.folder_names_and_paths.items()):
        moved = [ours + path[len(theirs):] if path.startswith(theirs) else path for path in paths]
        folder_paths.folder_names_and_paths[name] = (moved, extensions)


if __name__ == "__main__":
    main()
