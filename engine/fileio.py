"""Writing and reading files so that a crash, a cancel or a hostile file never costs the user anything.

Writes go to a temporary file beside the target, which replaces the target only when complete, with the
permissions the user's umask gives (not the owner-only mode of temporary files). A temporary file names the
process that writes it, so one left by a killed process is removed the next time its folder is written to.
Output folders and names are checked before any work starts (check_output), and weight files are read
without ever running code stored in them (read_torch_file).
"""
from __future__ import annotations

import contextlib
import os
import pickle
import re
import tempfile
import threading
from pathlib import Path

from .errors import InputError

TEMP_SUFFIX = ".protobooth-tmp"
NAME_MAX = 255  # bytes in one file name on the usual file systems (ext4, APFS, NTFS)
_umask_lock = threading.Lock()


def user_umask() -> int:
    """The process's umask (os.umask can only be read by setting it, hence the lock)."""
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _writer_pid(temp: Path) -> int | None:
    """The pid in `.<name>.<pid>.<random>.protobooth-tmp`, or None for another file."""
    parts = temp.name[: -len(TEMP_SUFFIX)].split(".")
    return int(parts[-2]) if len(parts) >= 3 and parts[-2].isdigit() else None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete temporary files in `folder` whose writing process is gone (killed mid-save); returns them."""
    removed = []
    for temp in Path(folder).glob(f".*{TEMP_SUFFIX}"):
        pid = _writer_pid(temp)
        if pid is not None and not _alive(pid):
            with contextlib.suppress(OSError):
                temp.unlink()
                removed.append(temp)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; it replaces `path` only if the block finishes, and is removed on any
    exit (an exception, Ctrl-C) otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(path.parent)
    # The target's name is cut short in the temporary one, which must fit NAME_MAX with the pid and suffix too.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:64]}.{os.getpid()}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~user_umask())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def save_safetensors(tensors: dict, path, metadata: dict[str, str] | None = None) -> None:
    """safetensors.torch.save_file, atomically (contiguous CPU copies, as the format requires).

    At most one metadata entry: safetensors keeps metadata in a hash map whose order changes from run to
    run, so two entries would make files of identical runs differ byte for byte.
    """
    from safetensors.torch import save_file

    if metadata is not None and len(metadata) > 1:
        raise ValueError("save_safetensors takes at most one metadata entry (put the rest inside it as JSON)")

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except Exception as error:  # safetensors reports a failed write (a full disk) as its own error type
            # ("... (os error 28)" since 0.5, "IoError(Os { code: 28, ...})" before)
            code = re.search(r"os error (\d+)|Os \{ code: (\d+)", str(error))
            if code is None:
                raise
            number = int(code.group(1) or code.group(2))
            raise OSError(number, os.strerror(number), str(path)) from None


def save_png(image, path) -> None:
    """Save a PIL image as PNG, atomically."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def check_output(folder, file_names: list[str], what: str = "--out", fix: str = "choose a shorter --name") -> None:
    """Before any work: `folder` (created later if missing) can receive files with these names, which may
    include subfolders ("loras/x.safetensors"). Names the input and the fix; writes nothing."""
    folder = Path(folder)
    for name in file_names:
        for part in Path(name).parts:
            size = len(part.encode("utf-8"))
            if size > NAME_MAX:
                raise InputError(f"file name {part[:40]}... is {size} bytes, over the {NAME_MAX} a file system allows; "
                                 f"{fix}.")
    targets = {folder} | {(folder / name).parent for name in file_names}
    for target in sorted(targets):
        existing = target
        while not existing.exists():
            if existing.parent == existing:
                break
            existing = existing.parent
        if existing.exists() and not existing.is_dir():
            shown = f"{what} {folder}" if existing == folder else f"{existing} (inside {what} {folder})"
            raise InputError(f"{shown} is a file, not a folder; give {what} a folder (it is created when missing).")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise InputError(f"{what} {folder}: cannot write in {existing} (permission denied); choose a folder you "
                             "can write to.")


def error_summary(error: BaseException) -> str:
    """The first line of an error, without advice to load a file unsafely (torch suggests weights_only=False)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    kept = [line for line in lines if "weights_only" not in line and "trust the source" not in line]
    return f"{type(error).__name__}: {(kept or lines or [''])[0]}"[:300]


def read_torch_file(path, what: str):
    """torch.load that never runs code stored in the file: a file that needs it is refused, any other failure
    names the file. Never suggests loading it unsafely."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Unsupported global" in str(error):  # torch's safe loader met code it would have to run
            raise InputError(f"{what} {path} can only be opened by running code stored inside it (unsafe unpickling), "
                             "which ProtoBooth refuses. Use a .safetensors version, or convert it with a tool you "
                             "trust.") from None
        raise InputError(f"{what} {path} is not a readable PyTorch file ({error_summary(error)}); it may be incomplete "
                         "or damaged, or hold more than weights: use its .safetensors version.") from None
    except Exception as error:  # any failure to read the file is the file's fault, not a bug
        raise InputError(f"{what} {path} is not a readable PyTorch file ({error_summary(error)}); it may be incomplete "
                         "or damaged.") from None
