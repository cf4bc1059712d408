"""The device buffer pool: buffers of freed or evicted BOs kept for reuse by
the next allocation or restore of the same size (as TTM's ``ttm_pool``
keeps pages).

Owns: the pooled buffers by size and ``pooled_bytes``. A pooled buffer is
still charged to the budget (:class:`gpubo._resource.Resource`); taking one
moves its charge to the BO that gets it, and releasing one (done by the
caller, :meth:`gpubo._move.Mover.drain_pool`) gives the charge back. Every
method is called with the resource lock held.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["Pool"]


class Pool:
    """Pooled device buffers by size (see the module docstring)."""

    def __init__(self) -> None:
        self._bufs: dict[int, list[Any]] = {}
        self.pooled_bytes = 0

    def put_locked(self, buf: Any, nbytes: int) -> None:
        self._bufs.setdefault(nbytes, []).append(buf)
        self.pooled_bytes += nbytes

    def take_locked(self, nbytes: int) -> Any | None:
        """A pooled buffer of exactly ``nbytes`` (content undefined), or None."""
        bufs = self._bufs.get(nbytes)
        if not bufs:
            return None
        self.pooled_bytes -= nbytes
        return bufs.pop()

    def take_many_locked(self, target: int | None) -> list[tuple[Any, int]]:
        """Buffers of at least ``target`` bytes in all (None: every one), for
        the caller to release."""
        taken: list[tuple[Any, int]] = []
        released = 0
        for size in list(self._bufs):
            bufs = self._bufs[size]
            while bufs and (target is None or released < target):
                taken.append((bufs.pop(), size))
                released += size
                self.pooled_bytes -= size
            if not bufs:
                del self._bufs[size]
        return taken

    def owns_locked(self, handle: int, handle_of: Callable[[Any], int]) -> bool:
        """True if the device buffer whose handle is ``handle`` is pooled."""
        return any(handle_of(buf) == handle for bufs in self._bufs.values() for buf in bufs)
