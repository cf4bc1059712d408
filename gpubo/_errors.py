"""The exception hierarchy of gpubo.

Every failure that gpubo itself detects is a :class:`GpuboError`. Errors from
pyopencl or lmdb are translated once, where gpubo calls them (the backends and
the store), and chained with ``raise ... from``, so code above them never sees
a foreign exception. Invalid arguments are plain :class:`ValueError` or
:class:`TypeError` naming the argument.
"""

from __future__ import annotations

__all__ = [
    "BufferBusy",
    "BufferFreed",
    "DeviceError",
    "GpuboError",
    "IntegrityError",
    "ManagerClosed",
    "NameNotFound",
    "OutOfDeviceMemory",
    "Purged",
    "StoreError",
    "StoreFull",
]


class GpuboError(Exception):
    """Base class of every error gpubo raises on its own account."""


class OutOfDeviceMemory(GpuboError, MemoryError):
    """The budget or the device cannot hold what was asked.

    Raised only after everything evictable was evicted (or when nothing could
    help, e.g. one BO larger than the budget, in which case nothing is
    evicted). ``nbytes`` is what was asked for, ``budget`` the manager's
    budget.
    """

    def __init__(self, message: str, *, nbytes: int = 0, budget: int = 0) -> None:
        super().__init__(message)
        self.nbytes = nbytes
        self.budget = budget


class StoreError(GpuboError):
    """The swap-slot store cannot be opened or used (I/O, permissions, format)."""


class StoreFull(StoreError):
    """The store has no room for the bytes it was asked to hold.

    Nothing was changed: a BO that was to be evicted stays resident, an
    allocation that the store could not back was not made.
    """

    def __init__(self, message: str, *, nbytes: int = 0, free_bytes: int = 0) -> None:
        super().__init__(message)
        self.nbytes = nbytes
        self.free_bytes = free_bytes


class IntegrityError(GpuboError):
    """Stored bytes do not match what was written (checksum mismatch).

    ``bo`` names the buffer object and ``offset`` is the byte offset of the
    first chunk that failed. The BO keeps its store entry and stays swapped.
    """

    def __init__(self, message: str, *, bo: str = "", offset: int = 0) -> None:
        super().__init__(message)
        self.bo = bo
        self.offset = offset


class BufferFreed(GpuboError):
    """A buffer object was used after it was freed (or its manager closed)."""


class BufferBusy(GpuboError):
    """A pinned buffer object was asked to move (evict or free)."""


class DeviceError(GpuboError):
    """The OpenCL device failed in a way that is not out-of-memory."""


class ManagerClosed(GpuboError):
    """The manager was closed; it owns no device or store any more."""


class NameNotFound(GpuboError, KeyError):
    """The store has no durable record of that name (see ``Manager.open``)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class Purged(GpuboError):
    """The BO was purgeable and its content was dropped under pressure.

    Writing to it revives it (zero-filled); reading, pinning or launching
    with it raises this.
    """


class ShareError(GpuboError):
    """A device share (``Manager(share=...)``) cannot be used: its directory
    is not private to this user, or its ledger is damaged or written by
    another version of gpubo. Nothing of the share is changed."""
