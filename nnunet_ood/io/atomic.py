"""Write files under a temporary name in the same folder and rename, so no reader sees half a file."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from nnunet_ood.errors import OODInputError

if TYPE_CHECKING:
    import torch


def _current_umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read the umask is to set it
    os.umask(mask)
    return mask


def _check_parent(path: Path) -> None:
    for folder in (path.parent, *path.parent.parents):
        if folder.exists():
            if not folder.is_dir():
                raise OODInputError(f"cannot write {path}: {folder} is a file, not a folder; choose another path")
            break
    path.parent.mkdir(parents=True, exist_ok=True)


def _atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """``write(tmp)`` writes the file's content to ``tmp`` (a new file beside ``path``), which is then synced to disk
    and renamed to ``path``; nothing is left behind when ``write`` fails."""
    path = Path(path)
    _check_parent(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # data on disk before the rename makes it visible
        finally:
            os.close(fd)
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp creates 0600; give it a normal file's permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (parent folders are created)."""
    _atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                        metadata: Mapping[str, str]) -> None:
    """Write a safetensors file atomically: ``tensors`` (copied to the CPU where needed) plus string ``metadata``.

    Streamed into the file by safetensors (no in-memory copy of the whole file: the Mahalanobis state is D x D
    float64, 170 MB for D = 4608); tensors that share memory are copied apart, as safetensors requires.
    """
    from safetensors.torch import save_file

    cpu, seen = {}, set()
    for key, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen or tensor.numel() * tensor.element_size() != storage.nbytes():
            tensor = tensor.clone()  # a view of a larger tensor, or memory shared with another entry
        seen.add(tensor.untyped_storage().data_ptr())
        cpu[key] = tensor
    _atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata=dict(metadata)))
