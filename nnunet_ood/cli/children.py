"""Worker processes die with the command that started them (Linux), even when it is killed with SIGKILL.

nnU-Net's prediction starts preprocessing workers, a manager process and export pools; when the command
is killed outright they would run on as orphans. On Linux, ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` makes
the kernel kill a child when its parent dies. It has to be set in each child: forked children get it
from an ``os.register_at_fork`` hook, spawned ones when they import this command's entry module (spawned
children of a console script import its ``__main__``, which imports the command's module). Elsewhere
(macOS, Windows) nothing is done.
"""

from __future__ import annotations

import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask the kernel to kill this process when its parent dies; exit at once if the parent is already gone."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import multiprocessing

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # the parent died before prctl took effect
        os._exit(1)


_guarded = False


def guard_worker_processes() -> None:
    """Call in the command's main process: every process forked from now on dies with its parent."""
    global _guarded
    if sys.platform.startswith("linux") and not _guarded:
        os.register_at_fork(after_in_child=die_with_parent)
        _guarded = True


def guard_if_spawned_worker() -> None:
    """Call at import of the command's module: a spawned worker process dies with its parent."""
    import multiprocessing

    if multiprocessing.parent_process() is not None:
        die_with_parent()
