"""Write a page and its image folder so that no reader sees a half-written report.

The images go to a temporary folder next to the final one, which then replaces the old folder (two renames:
old out of the way, new in place); the page itself is written last, atomically, so it never names an image that
is not there yet. Thumbnails of an earlier run do not linger: the whole folder is replaced.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping

from nnunet_ood.errors import OODInputError
from nnunet_ood.io.atomic import atomic_write_bytes, atomic_write_text


def replace_folder(folder: str, files: Mapping[str, bytes]) -> None:
    """Make ``folder`` hold exactly ``files`` (name -> bytes, names without folders)."""
    parent = os.path.dirname(os.path.abspath(folder))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise OODInputError(f"cannot write the report's images: {folder} is a file; move it away")
    os.makedirs(parent, exist_ok=True)
    fresh = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(folder)}.", suffix=".tmp")
    old = moved = None
    try:
        for name, data in files.items():
            atomic_write_bytes(os.path.join(fresh, name), data)
        os.chmod(fresh, 0o777 & ~_umask())  # mkdtemp creates 0700; a normal folder's permissions
        if os.path.isdir(folder):
            old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(folder)}.", suffix=".old")
            moved = os.path.join(old, "previous")
            os.replace(folder, moved)
        os.replace(fresh, folder)
    except BaseException:
        if moved is not None and os.path.isdir(moved) and not os.path.exists(folder):
            os.replace(moved, folder)  # the new folder could not take its place: keep the old one
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read the umask is to set it
    os.umask(mask)
    return mask


def write_page(output_folder: str, page_name: str, page: str, files_folder: str, files: Mapping[str, bytes]) -> str:
    """Write ``files`` into ``output_folder/files_folder`` and then the page ``output_folder/page_name``; returns
    the page's path."""
    replace_folder(os.path.join(output_folder, files_folder), files)
    path = os.path.join(output_folder, page_name)
    atomic_write_text(path, page)
    return path
