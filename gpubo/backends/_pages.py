"""Transparent huge pages for the memory of a CPU device's buffers.

On a CPU device (PoCL) a device buffer is host memory, allocated by the
driver in 4 KiB pages. Every copy in and out of it (an eviction's
``pwrite`` from its mapping, a restore's ``preadv`` into it, a D2H or H2D,
a kernel's loads) then walks one page-table entry per 4 KiB, where the
host arrays it is measured against (numpy advises the kernel to back its
allocations of 4 MiB and more with huge pages, since numpy 1.16) walk one
per 2 MiB. :func:`advise_huge_pages` gives a buffer's memory the same
advice, ``madvise(MADV_HUGEPAGE)``, before its first page is touched, so
that the kernel backs it with 2 MiB pages where it can. It is advice: a
system with transparent huge pages off (``never`` in
``/sys/kernel/mm/transparent_hugepage/enabled``) ignores it, and a failure
is logged, not raised. ``python benchmarks/huge_pages.py`` measures an
advised buffer against a plain one (figures in BENCHMARKS.md).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import sys
from collections.abc import Callable

__all__ = ["HUGE_PAGES_MIN_BYTES", "HUGE_PAGE_BYTES", "advise_huge_pages", "huge_pages_possible"]

log = logging.getLogger(__name__)

HUGE_PAGE_BYTES = 2 << 20
#: Buffers at least this big are advised: they hold at least one aligned
#: huge page, wherever the driver's allocation starts.
HUGE_PAGES_MIN_BYTES = 2 * HUGE_PAGE_BYTES

_MADV_HUGEPAGE: int | None = getattr(mmap, "MADV_HUGEPAGE", None)


def _load_madvise() -> Callable[[int, int, int], int] | None:
    if not sys.platform.startswith("linux") or _MADV_HUGEPAGE is None:
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    madvise: Callable[[int, int, int], int] = fn
    return madvise


_madvise = _load_madvise()


def huge_pages_possible() -> bool:
    """Whether this system takes the advice at all (Linux with ``madvise``)."""
    return _madvise is not None


def advise_huge_pages(address: int, nbytes: int) -> bool:
    """Advise huge pages for the whole 2 MiB pages inside ``nbytes`` bytes
    at ``address``; whether the advice was given (False: none fit, or the
    system refused it, logged)."""
    if _madvise is None or _MADV_HUGEPAGE is None:
        return False
    start = -(-address // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    end = (address + nbytes) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    if end <= start:
        return False
    if _madvise(start, end - start, _MADV_HUGEPAGE) != 0:
        err = ctypes.get_errno()
        log.debug("madvise(MADV_HUGEPAGE) of %d bytes failed: %s", end - start, os.strerror(err))
        return False
    return True
