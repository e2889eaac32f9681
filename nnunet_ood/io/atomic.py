"""Write files under a temporary name in the same folder and rename, so no reader sees half a file."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from nnunet_ood.errors import OODInputError

if TYPE_CHECKING:
    import torch


def _current_umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read the umask is to set it
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (parent folders are created)."""
    path = Path(path)
    for folder in (path.parent, *path.parent.parents):
        if folder.exists():
            if not folder.is_dir():
                raise OODInputError(f"cannot write {path}: {folder} is a file, not a folder; choose another path")
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # data on disk before the rename makes it visible
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp creates 0600; give it a normal file's permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                        metadata: Mapping[str, str]) -> None:
    """Write a safetensors file atomically: contiguous CPU copies of ``tensors`` plus string ``metadata``."""
    from safetensors.torch import save

    cpu = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}  # no shared storage
    atomic_write_bytes(path, save(cpu, metadata=dict(metadata)))
