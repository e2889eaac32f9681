"""Hand the heap pages a case's scoring freed back to the operating system before nnU-Net exports the case.

The case scorer computes full-size volumes slab by slab (:mod:`nnunet_ood.slabs`); its temporaries of 4-32 MB
each come from the C heap, not from ``mmap``, and glibc keeps their pages when they are freed between longer-lived
allocations. At 512 x 512 x 300 voxels about 300 MB stayed resident into nnU-Net's export, the peak of a stock
prediction. ``malloc_trim(0)`` returns every whole free page of every arena (a few milliseconds); elsewhere
(macOS, Windows, musl) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform
import sys
from collections.abc import Callable


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # no glibc (e.g. musl has no malloc_trim)
        return None


def return_freed_heap() -> bool:
    """Release the free pages of the C heap to the operating system; True where glibc's ``malloc_trim`` ran."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)  # its result only says whether a page was released this time
    return True
