"""An exclusive lock on an output folder, so that parallel runs writing into it take turns.

``nnUNetv2_predict_ood -num_parts N -part_id K`` starts N runs on one output folder, often on several machines
sharing it. Each rebuilds the score tables from every case record at its end, and with ``--report`` rewrites
``review.html`` and ``review_files/``. Unserialised, a run could write tables it collected before another run's
last record landed (after that run's complete tables), and two reports could swap ``review_files/`` at once.
Under the lock, the last run to take it collects after every other run finished, so the folder always ends
complete.

The lock is a POSIX record lock (``fcntl.lockf``, which also works on NFS) on the empty file
:data:`LOCK_NAME` in the folder; ``msvcrt.locking`` on Windows. The lock file stays: removing it would let a
waiting run lock a file that is no longer the folder's.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from nnunet_ood.errors import OODInputError

LOCK_NAME = ".nnunet_ood.lock"

try:  # POSIX
    import fcntl

    def _lock(fd: int) -> None:
        fcntl.lockf(fd, fcntl.LOCK_EX)  # blocks until the lock is free

    def _unlock(fd: int) -> None:
        fcntl.lockf(fd, fcntl.LOCK_UN)

except ImportError:  # pragma: no cover - Windows
    import msvcrt

    def _lock(fd: int) -> None:
        while True:
            try:
                msvcrt.locking(fd, msvcrt.LK_LOCK, 1)  # retries for about 10 s, then raises
                return
            except OSError:
                continue

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


def lock_path(folder: str) -> str:
    """The lock file of ``folder``."""
    return os.path.join(folder, LOCK_NAME)


@contextmanager
def folder_lock(folder: str) -> Iterator[None]:
    """Hold the exclusive lock of ``folder`` (which must exist) for the duration of the block; waits for it."""
    try:
        fd = os.open(lock_path(folder), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise OODInputError(f"cannot create the lock file {lock_path(folder)} ({e.strerror}); make the output "
                            "folder writable") from None
    try:
        _lock(fd)
        try:
            yield
        finally:
            _unlock(fd)
    finally:
        os.close(fd)
