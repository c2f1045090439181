"""Writing files so that a crash or a cancel never leaves a half-written file where a good one was."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; it replaces `path` only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
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
        save_file(tensors, str(tmp), metadata=metadata)


def save_png(image, path) -> None:
    """Save a PIL image as PNG, atomically."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
