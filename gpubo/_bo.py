"""Buffer objects: a handle on bytes that live on the device or in the store.

A :class:`BufferObject` holds its state and the public surface; what its
methods do is done by a :class:`BufferOps` (the protocol below, implemented
by :class:`gpubo._ops.BufferOps`), so this module needs nothing above it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from gpubo._state import ALLOWED_MOVES, State
from gpubo._units import format_bytes
from gpubo.store.base import Entry

__all__ = ["ALLOWED_MOVES", "BufferObject", "BufferOps", "GroupLike", "ReadOnly", "State"]


class GroupLike(Protocol):
    """What the pieces below the manager need of a BO's group
    (:class:`gpubo.Group`): its limits, its charge and its eviction count."""

    name: str
    charged_bytes: int
    max_bytes: int | None
    low_bytes: int
    min_bytes: int
    evictions: int


class BufferOps(Protocol):
    """The operations behind a BO's methods (each validates its arguments
    and raises what the method's docstring says)."""

    def set_purgeable(self, bo: BufferObject, value: bool) -> bool: ...
    def busy(self, bo: BufferObject) -> bool: ...
    def write(self, bo: BufferObject, data: Any, offset: int) -> None: ...
    def read(
        self,
        bo: BufferObject,
        dtype: npt.DTypeLike,
        count: int,
        offset: int,
        out: np.ndarray | None,
        restore: bool = True,
    ) -> np.ndarray: ...
    def pin(self, bo: BufferObject) -> Any: ...
    def array(
        self, bo: BufferObject, shape: int | tuple[int, ...], dtype: npt.DTypeLike, readonly: bool
    ) -> Any: ...
    def unpin(self, bo: BufferObject, *, handed_out: bool, wrote: bool) -> None: ...
    def evict(self, bo: BufferObject) -> None: ...
    def restore(self, bo: BufferObject) -> None: ...
    def sync(self, bo: BufferObject) -> None: ...
    def prefetch(self, bo: BufferObject) -> Future[None]: ...
    def free(self, bo: BufferObject) -> None: ...


class BufferObject:
    """A managed device buffer of ``nbytes`` bytes.

    Created by :meth:`Manager.alloc`. Every method that touches the bytes
    (read, write, pin, restore, being passed to :meth:`Manager.launch`) makes
    the BO resident first, and counts as a use for LRU order. The work is
    done by its :class:`BufferOps`; this class holds the state and the
    public surface.

    Notes:
        Thread-safe. Fields are grouped by what protects them:

        * constant after init: ``manager`` (the :class:`Manager` it belongs
          to), ``ops``, ``id``, ``nbytes``, ``name``, ``priority``,
          ``group``, ``store_footprint``;
        * ``lock`` (the BO lock, held while the BO's bytes move or are read or
          written): ``buf``, ``entry`` (the swapped content, or for a resident
          BO a clean copy kept in the store: the swap cache), ``known_zero``
          (untouched since allocation, so all zeros);
        * the resource lock (:class:`gpubo._resource.Resource`):
          ``pin_count``, ``events``, ``is_purgeable``, ``used_at``; ``state`` is written
          with both locks held, so either one is enough to read it.
    """

    __slots__ = (
        "__weakref__",
        "buf",
        "entry",
        "events",
        "group",
        "id",
        "is_purgeable",
        "known_zero",
        "lock",
        "manager",
        "name",
        "nbytes",
        "ops",
        "pin_count",
        "priority",
        "state",
        "store_footprint",
        "used_at",
    )

    def __init__(
        self,
        manager: Any,
        ops: BufferOps,
        bo_id: int,
        nbytes: int,
        name: str | None,
        priority: int,
        store_footprint: int,
        buf: Any,
        entry: Entry | None = None,
        group: GroupLike | None = None,
    ) -> None:
        self.manager = manager
        self.ops = ops
        self.id = bo_id
        self.nbytes = nbytes
        self.name = name
        self.priority = priority
        self.store_footprint = store_footprint
        self.used_at = 0.0  # last LRU use (resource lock; the system monotonic clock)
        self.lock = threading.Lock()
        self.buf: Any = buf  # the backend's device buffer, None unless resident
        self.entry: Entry | None = entry
        self.known_zero = entry is None
        self.state = State.RESIDENT if buf is not None else State.SWAPPED
        self.pin_count = 0
        self.events: list[Any] = []  # the backend's events of kernels that may use it
        self.group = group
        self.is_purgeable = False

    # -- public API ---------------------------------------------------------

    @property
    def pinned(self) -> bool:
        """True while inside a ``with bo.pin()`` block (or a launch is enqueuing it)."""
        return self.pin_count > 0

    @property
    def purgeable(self) -> bool:
        """True if the content may be dropped under pressure instead of swapped out.

        Set it to say so (like i915's madvise): shrinkers then drop the BO
        first, with no I/O, and it becomes :attr:`State.PURGED`. Setting it
        back to False keeps a purged BO purged; :meth:`set_purgeable` also
        says whether the content was retained.
        """
        return self.is_purgeable

    @purgeable.setter
    def purgeable(self, value: bool) -> None:
        self.set_purgeable(value)

    def set_purgeable(self, value: bool) -> bool:
        """Set :attr:`purgeable`; return whether the content is still there
        (False once the BO was purged).

        Raises:
            TypeError: ``value`` is not a bool.
            BufferFreed: the BO was freed.
        """
        return self.ops.set_purgeable(self, value)

    @property
    def busy(self) -> bool:
        """True while a launched kernel that uses this BO has not completed."""
        return self.ops.busy(self)

    def write(self, data: Any, offset: int = 0) -> None:
        """Copy ``data`` (a numpy array or bytes-like) into the BO at byte ``offset``.

        Restores the BO first if it is swapped (a write that covers the whole
        BO skips reading the old bytes back). Writing to a purged BO revives
        it, zero-filled, with ``data`` written.

        Raises:
            TypeError: ``data`` is not bytes-like or is an object array.
            ValueError: ``data`` is not C-contiguous, or ``offset`` is negative
                or the bytes do not fit.
            BufferFreed: the BO was freed.
            OutOfDeviceMemory, StoreFull, IntegrityError: making it resident failed.
        """
        self.ops.write(self, data, offset)

    def read(
        self,
        dtype: npt.DTypeLike = np.uint8,
        count: int = -1,
        offset: int = 0,
        *,
        out: np.ndarray | None = None,
        restore: bool = True,
    ) -> np.ndarray:
        """Return a copy of ``count`` items of ``dtype`` starting at byte ``offset``.

        ``count=-1`` reads to the end of the BO (whose remaining size must then
        be a multiple of the item size). With ``out`` (a writable, C-contiguous
        numpy array of any dtype and shape) ``out.nbytes`` bytes are read into
        it instead, and ``out`` is returned; ``dtype`` and ``count`` are then
        not used.

        ``restore=False``: a swapped BO is read straight from its store
        entry (verified against its checksums, if it has any) and stays
        swapped, without a device buffer or a use in LRU order; a resident
        BO is read as usual. For sending a BO's bytes elsewhere.

        Raises:
            TypeError: ``dtype`` is not a numpy dtype or holds objects; ``out``
                is not a numpy array or holds objects.
            ValueError: ``offset`` or ``count`` out of range; ``out`` is not
                writable or not C-contiguous, or does not fit.
            BufferFreed: the BO was freed.
            Purged: the BO was purgeable and its content was dropped.
            OutOfDeviceMemory, StoreFull, IntegrityError: making it resident failed.
        """
        return self.ops.read(self, dtype, count, offset, out, restore)

    @contextmanager
    def pin(self) -> Iterator[Any]:
        """Make the BO resident and keep it so for the ``with`` block.

        Yields the ``pyopencl.Buffer``; it is valid only inside the block.
        Commands on it belong on ``manager.queue``: the end of the block
        puts a marker after them, and the buffer is not evicted, freed or
        reused before they complete.

        Raises:
            BufferFreed: the BO was freed.
            OutOfDeviceMemory, StoreFull, IntegrityError: making it resident failed.
        """
        buf = self.ops.pin(self)
        try:
            yield buf
        finally:
            self.ops.unpin(self, handed_out=True, wrote=True)

    @contextmanager
    def array(
        self, shape: int | tuple[int, ...], dtype: npt.DTypeLike = np.uint8, *, readonly: bool = False
    ) -> Iterator[Any]:
        """A ``pyopencl.array.Array`` of ``shape`` and ``dtype`` over the BO's
        buffer, pinned for the ``with`` block.

        pyopencl's array operations and reductions work on it, and it can be
        passed to :meth:`Manager.launch` inside the block (after it, launch
        refuses it). ``readonly=True`` promises the block only reads, so the
        BO's clean store copy stays valid (an eviction after the block costs
        no copy); a launch with the array still follows the kernel's
        signature (a parameter not declared ``const`` dirties the BO). The
        array's operations run on ``manager.queue``; those still queued when
        the block ends are waited for before the buffer is evicted, freed or
        reused.

        Raises:
            TypeError, ValueError: bad ``shape`` or ``dtype``, or the array
                does not fit the BO.
            BufferFreed, Purged, OutOfDeviceMemory, StoreFull, IntegrityError:
                see :meth:`pin`.
        """
        arr = self.ops.array(self, shape, dtype, readonly)
        try:
            yield arr
        finally:
            self.ops.unpin(self, handed_out=True, wrote=not readonly)

    def evict(self) -> None:
        """Swap the BO out now (waiting for kernels using it). No-op if swapped.

        The device buffer it leaves goes to the manager's pool for the next
        allocation or restore of the same size (it still counts against the
        budget); :meth:`Manager.evict` gives device memory back for real.

        Raises:
            BufferBusy: the BO is pinned.
            BufferFreed: the BO was freed.
            StoreFull: the store has no room; the BO stays resident.
        """
        self.ops.evict(self)

    def restore(self) -> None:
        """Make the BO resident now. No-op if it is resident.

        Raises:
            BufferFreed: the BO was freed.
            OutOfDeviceMemory, StoreFull, IntegrityError: see :meth:`read`.
        """
        self.ops.restore(self)

    def sync(self) -> None:
        """Make the BO's current content its name's durable record.

        The content is written to the store (if the store has no clean copy
        of it yet) and flushed, then the record is committed atomically; a
        resident BO stays resident. A new Manager on the same store path can
        then ``open`` the name, also after this process is killed.

        Raises:
            ValueError: the BO has no name.
            BufferFreed: the BO was freed.
            StoreFull: no room for the copy or the record; the old record stands.
            StoreError: the store failed; the old record stands.
        """
        self.ops.sync(self)

    def prefetch(self) -> Future[None]:
        """Start restoring the BO in the background (see :meth:`Manager.prefetch`)."""
        return self.ops.prefetch(self)

    def free(self) -> None:
        """Give back the BO's device memory and store space. Idempotent.

        Waits for kernels still using the BO.

        Raises:
            BufferBusy: the BO is pinned.
        """
        self.ops.free(self)

    def __enter__(self) -> BufferObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.free()

    def __repr__(self) -> str:
        label = f"#{self.id}" + (f" {self.name!r}" if self.name else "")
        extra = (f" group={self.group.name!r}" if self.group else "") + (
            " purgeable" if self.is_purgeable else ""
        )
        return (
            f"<BufferObject {label} {format_bytes(self.nbytes)} {self.state.name}"
            f" prio={self.priority} pins={self.pin_count} pending_events={len(self.events)}{extra}>"
        )

    def label(self) -> str:
        """A short name for messages: ``'weights' (#3)`` or ``#3``."""
        return f"{self.name!r} (#{self.id})" if self.name else f"#{self.id}"


@dataclass(frozen=True)
class ReadOnly:
    """A buffer object passed to :meth:`Manager.launch` that the kernel only
    reads; made by :func:`gpubo.readonly`."""

    bo: BufferObject
