"""The manager: device budget, LRU, buffer pool and store, and the only code
that moves a buffer object's bytes (through :mod:`gpubo._transfer`).

Lock order (take them in this order, never the reverse):

1. ``Manager._room_lock`` (re-entrant): held by the one thread that is making
   room on the device, i.e. evicting other BOs, and by restores and launches,
   which may need room.
2. ``BufferObject.lock``: held while one BO's bytes are copied, read or
   written. A thread that needs room takes ``_room_lock`` *before* the BO
   lock; a thread holding ``_room_lock`` only *try*-locks victims.
3. ``Manager._lock``: bookkeeping only (LRU, byte counters, pins, events);
   never held across a copy, an allocation or a wait for the device.

Why no deadlock: the evictor never blocks on a BO lock; it skips BOs that
another thread holds and, if nothing else can be evicted, waits briefly and
walks again. Every other holder of a resident BO's lock finishes without
needing ``_room_lock`` (reads, writes, evict, free), so the wait ends.

Budget accounting: ``_charged_bytes`` is every byte of device memory the
manager holds or is about to hold: resident BOs, the buffer pool, and
buffers in flight (being allocated, restored or released). It never exceeds
the budget. Accounting only says yes or no (``_try_charge_locked``); the
callers decide what to evict.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import math
import os
import threading
import time
import weakref
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pyopencl as cl
import pyopencl.array as cl_array

from gpubo._bo import ALLOWED_MOVES, BufferObject, ReadOnly, State
from gpubo._errors import (
    BufferBusy,
    BufferFreed,
    GpuboError,
    ManagerClosed,
    NameNotFound,
    OutOfDeviceMemory,
    Purged,
    StoreError,
    StoreFull,
)
from gpubo._groups import _KEEP, Group, GroupStats, check_limits
from gpubo._lru import LRU, NUM_PRIORITIES
from gpubo._transfer import swap_in, swap_in_batch, swap_out, swap_out_batch
from gpubo._units import format_bytes, parse_bytes
from gpubo.backends.opencl import OpenCLBackend
from gpubo.shrinker import (
    DeviceShrinker,
    LinuxPressure,
    PoolShrinker,
    PressureMonitor,
    PressureSource,
    Shrinker,
    StoreCacheShrinker,
)
from gpubo.store import PAGE_BYTES, Durability, Entry, SwapStore, open_store

__all__ = ["Manager", "Stats"]

log = logging.getLogger(__name__)

_PREFETCH_THREAD = "gpubo-prefetch"
#: How long an eviction walk keeps waiting for BOs that other threads hold
#: before it gives up with OutOfDeviceMemory (a guard, not a tuning knob).
_ROOM_TIMEOUT_S = 60.0
_NO_ROOM = object()
#: BOs up to this size that need a copy are evicted in batches (gathered on
#: the device into one staging buffer that crosses to the store at once), and
#: prefetched in batches (their copies enqueued together, waited for once).
BATCH_MAX_BO_BYTES = 256 << 10
#: The most a batch moves at once: one slot-file cluster (2 MiB).
BATCH_BYTES = 2 << 20


@dataclass(frozen=True)
class Stats:
    """A snapshot of a manager's counters; every field is an int.

    ``resident_bytes`` counts BOs on the device; ``pooled_bytes`` counts freed
    or evicted device buffers kept for reuse (they count against the budget
    too, and are released before any BO is evicted).
    """

    budget: int
    resident_bytes: int
    swapped_bytes: int
    pinned_bytes: int
    bo_count: int
    evictions: int
    restores: int
    bytes_evicted: int
    bytes_restored: int
    pooled_bytes: int
    store_capacity_bytes: int
    store_used_bytes: int
    purged_bytes: int = 0
    purges: int = 0
    eviction_batches: int = 0
    restore_batches: int = 0


def _pages(nbytes: int) -> int:
    """``nbytes`` rounded up to whole pages."""
    return -(-nbytes // PAGE_BYTES) * PAGE_BYTES


def _from_environment(budget: Any, store: Any, device: Any) -> tuple[Any, Any, Any]:
    """Fill what the caller left None from GPUBO_BUDGET, GPUBO_STORE and
    GPUBO_DEVICE (the constructor's arguments win)."""
    if budget is None:
        budget = os.environ.get("GPUBO_BUDGET") or "256MiB"
    if store is False:  # explicitly private, whatever the environment says
        store = None
    elif store is None:
        store = os.environ.get("GPUBO_STORE") or None
    if device is None:
        device = os.environ.get("GPUBO_DEVICE") or None
    return budget, store, device


def _kernel_arg(arg: Any) -> Any:
    """What OpenCL gets for a launch argument (BOs are pinned by now)."""
    if isinstance(arg, ReadOnly):
        arg = arg.bo
    if isinstance(arg, BufferObject):
        return arg.buf
    if isinstance(arg, cl_array.Array):
        return arg.base_data
    return arg


class _PinnedBuffers:
    """The device buffers that the managers of this process have pinned, by
    ``cl_mem`` handle: a launch argument that is a raw buffer or array is
    matched to its BO here, whichever manager pinned it.

    Notes:
        Process-wide on purpose (a buffer can be passed to any manager);
        entries live only while their pin does. Its lock is a leaf: taken
        under a manager's lock, never the other way.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owners: dict[int, BufferObject] = {}

    def add(self, handle: int, bo: BufferObject) -> None:
        with self._lock:
            self._owners[handle] = bo

    def discard(self, handle: int) -> None:
        with self._lock:
            self._owners.pop(handle, None)

    def get(self, handle: int) -> BufferObject | None:
        with self._lock:
            return self._owners.get(handle)


_PINNED = _PinnedBuffers()


#: LMDB's largest key: a BO's name is its record's key in the store.
_MAX_NAME_BYTES = 511


def _check_name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"name must be a str or None, got {type(name).__name__}")
    try:
        size = len(name.encode())
    except UnicodeEncodeError as e:
        raise ValueError(f"name must be encodable as UTF-8: {e}") from None
    if not 0 < size <= _MAX_NAME_BYTES:
        raise ValueError(f"name must be 1 to {_MAX_NAME_BYTES} bytes of UTF-8, got {size}")
    return name


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_int(value: object, name: str, minimum: int) -> int:
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_shape(
    shape: object, name: str, minimum: int = 0, small: type[Exception] = ValueError
) -> tuple[int, ...]:
    """``shape`` (an int or a sequence of ints, each >= ``minimum``, else
    ``small`` is raised) as a tuple of Python ints."""
    if _is_int(shape):
        dims: tuple[object, ...] = (shape,)
    elif isinstance(shape, (tuple, list)):
        dims = tuple(shape)
    else:
        raise TypeError(f"{name} must be an int or a tuple of ints, got {shape!r}")
    if not all(_is_int(d) for d in dims):
        raise TypeError(f"{name} must be an int or a tuple of ints, got {shape!r}")
    out = tuple(int(d) for d in dims)  # type: ignore[call-overload]
    if any(d < minimum for d in out):
        raise small(f"{name}: every dimension must be >= {minimum}, got {shape!r}")
    return out


def _check_work_size(size: object, name: str) -> tuple[int, ...]:
    """A launch's global or local size: 1 to 3 positive ints (a bare int is 1-D)."""
    dims = _check_shape(size, name, minimum=1)
    if not 1 <= len(dims) <= 3:
        raise ValueError(f"{name} must have 1 to 3 dimensions, got {size!r}")
    if any(d >= 1 << 63 for d in dims):
        raise ValueError(f"{name}: a dimension does not fit the device's size_t, got {size!r}")
    return dims


def _check_dtype(dtype: npt.DTypeLike) -> np.dtype[Any]:
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise TypeError(f"dtype: {e}") from None
    if dt.hasobject or dt.itemsize == 0:
        raise TypeError(f"dtype must be a fixed-size numeric dtype, got {dt}")
    return dt


def _as_out_array(out: Any) -> np.ndarray:
    """A flat uint8 view of a writable, C-contiguous numpy array."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy array, got {type(out).__name__}")
    if out.dtype.hasobject:
        raise TypeError("out: arrays of Python objects cannot be read into")
    if not out.flags.c_contiguous:
        raise ValueError("out must be C-contiguous")
    if not out.flags.writeable:
        raise ValueError("out must be writable")
    return out.reshape(-1).view(np.uint8)


def _as_byte_array(data: Any) -> np.ndarray:
    """A flat uint8 view of ``data`` without copying it."""
    if isinstance(data, np.ndarray):
        if data.dtype.hasobject:
            raise TypeError("data: arrays of Python objects cannot be written")
        if not data.flags.c_contiguous:
            raise ValueError("data must be C-contiguous (use numpy.ascontiguousarray)")
        return data.reshape(-1).view(np.uint8)
    if isinstance(data, str):
        raise TypeError("data must be a numpy array or bytes-like, not str (encode it first)")
    try:
        view = memoryview(data)
    except TypeError:
        raise TypeError(f"data must be a numpy array or bytes-like, got {type(data).__name__}") from None
    if not view.c_contiguous:
        raise ValueError("data must be C-contiguous")
    if view.nbytes == 0:
        return np.empty(0, np.uint8)
    return np.frombuffer(view, np.uint8)


class Manager:
    """Owns an OpenCL device, a device-memory budget, an LRU of buffer objects
    and a swap-slot store, and moves BOs between the device and the store.

    Args:
        budget: device bytes the manager may use (int or ``"256MiB"``);
            None: ``$GPUBO_BUDGET``, else 256 MiB.
        store: None for ``$GPUBO_STORE`` if set, else a private temporary
            store deleted on close (False: that private store whatever
            ``$GPUBO_STORE`` says); the path
            of a store directory (created if missing), or a
            :class:`~gpubo.store.SwapStore` (then ``store_size``,
            ``store_backend``, ``durability`` and ``checksums`` are its own,
            and the manager closes it).
        store_size: size of the store; also bounds the bytes of live BOs the
            manager admits, so that every BO can always be swapped out.
        store_backend: ``"lmdb"`` or ``"slotfile"``; None for the backend
            of an existing store at ``store``, else ``"lmdb"``.
        durability: ``"lazy"`` (page cache), ``"sync"`` (flushed before an
            entry is committed) or ``"direct"`` (O_DIRECT, slotfile only).
        pressure: watch host memory pressure and shrink when it rises:
            True for Linux's signals, or a :class:`~gpubo.shrinker.PressureSource`
            (see :meth:`watch_pressure`); off by default.
        device: a ``pyopencl.Device`` or ``pyopencl.Context``; a string
            choosing one (``"gpu"``, ``"cpu"``, ``"0:1"`` for platform 0
            device 1, or part of its name); None: ``$GPUBO_DEVICE`` if set,
            else a GPU if present, else any OpenCL device.
        checksums: keep an xxh3-64 checksum per stored chunk and verify it on
            every restore.

    Raises:
        TypeError, ValueError: an argument is of the wrong type or out of range.
        DeviceError: no OpenCL device could be opened.
        StoreError: the store cannot be created or opened.

    Notes:
        Thread-safe; see the module docstring for the lock order. Fields:

        * constant after init: ``backend``, ``store``, ``budget``;
        * ``_lock``: ``_bos``, ``_lru``, ``_pool``, every ``*_bytes`` counter,
          the statistics, ``_closed``, and each BO's ``pin_count`` and
          ``events``.
    """

    def __init__(
        self,
        budget: int | str | None = None,
        store: str | os.PathLike[str] | SwapStore | bool | None = None,
        store_size: int | str = "2GiB",
        device: cl.Device | cl.Context | str | None = None,
        *,
        store_backend: str | None = None,
        durability: str = "lazy",
        checksums: bool = True,
        pressure: bool | PressureSource | None = None,
    ) -> None:
        budget, store, device = _from_environment(budget, store, device)
        self.budget: int = parse_bytes(budget, "budget")
        if self.budget == 0:
            raise ValueError("budget must be positive")
        store_bytes = parse_bytes(store_size, "store_size")
        if store is not None and not isinstance(store, (str, os.PathLike, SwapStore)):
            raise TypeError(f"store must be None, a path or a SwapStore, got {type(store).__name__}")
        if store_backend is not None and not isinstance(store_backend, str):
            raise TypeError(f"store_backend must be a str or None, got {type(store_backend).__name__}")
        if not isinstance(durability, (str, Durability)):
            raise TypeError(f"durability must be a str, got {type(durability).__name__}")
        if not isinstance(checksums, bool):
            raise TypeError("checksums must be a bool")
        self.backend = OpenCLBackend(device)
        if self.budget > self.backend.global_mem_bytes:
            log.warning(
                "budget %s exceeds the device's memory %s; the device will run out first",
                format_bytes(self.budget),
                format_bytes(self.backend.global_mem_bytes),
            )
        if isinstance(store, SwapStore):
            self.store: SwapStore = store
        else:
            self.store = open_store(
                store, store_bytes, backend=store_backend, checksums=checksums, durability=durability
            )
        self._close_store = weakref.finalize(self, self.store.close)

        self._room_lock = threading.RLock()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._ids = itertools.count(1)
        # Protected by _lock:
        self._closed = False
        self._bos: dict[int, BufferObject] = {}
        self._lru: LRU[BufferObject] = LRU()
        # The BOs of _lru whose store copy is valid (evicting them copies
        # nothing), in roughly the same order: the shrinker takes these first.
        self._clean: LRU[BufferObject] = LRU()
        self._pool: dict[int, list[cl.Buffer]] = {}
        self._charged_bytes = 0
        self._resident_bytes = 0
        self._pooled_bytes = 0
        self._swapped_bytes = 0
        self._pinned_bytes = 0
        self._store_committed_bytes = 0
        self._live_sizes: Counter[int] = Counter()  # nbytes -> live BOs of that size
        self._size_heap: list[int] = []  # -nbytes of _heap_sizes; stale ones popped lazily
        self._heap_sizes: set[int] = set()
        self._evictions = 0
        self._batches = 0  # eviction batches (several small BOs in one transfer)
        self._restore_batches = 0  # restores of several small BOs whose copies went together
        # The shrinker walk's staging buffer and its size, kept between its
        # batches; guarded by _room_lock.
        self._staging: tuple[cl.Buffer, int] | None = None
        self._restores = 0
        self._bytes_evicted = 0
        self._bytes_restored = 0
        self._purged_bytes = 0
        self._purges = 0
        self._purgeable_resident = 0  # resident, unpinned, purgeable BOs (a fast path hint)
        self._purgeable: set[BufferObject] = set()  # every live purgeable BO
        self._groups: dict[str, Group] = {}
        self._launch_pinned_bytes = 0  # pins held by launches in progress (brief)
        self._launch_events: list[cl.Event] = []  # launches that may still run (pruned lazily)
        self._launch_ctx = threading.local()  # .pinned: bytes this thread's launch pins
        # Shrinkers run in this order by shrink(); the registry is guarded by _lock.
        self._shrinkers: list[Shrinker] = [PoolShrinker(self), DeviceShrinker(self), StoreCacheShrinker(self)]
        self._shrink_ctx = threading.local()  # may_block of the shrink running in this thread
        self._monitor: PressureMonitor | None = None
        self._prefetcher: ThreadPoolExecutor | None = None  # created on first prefetch; guarded by _lock
        self._prefetch_threads: set[int] = set()  # its worker's thread id, once it started
        if pressure is not None and pressure is not False:
            self.watch_pressure(None if pressure is True else pressure)
        log.info(
            "gpubo manager on %s: budget %s, store %s (%s)",
            self.backend.name,
            format_bytes(self.budget),
            self.store.path,
            format_bytes(self.store.size_bytes),
        )

    # -- public API ---------------------------------------------------------

    @property
    def context(self) -> cl.Context:
        """The pyopencl context every BO lives in."""
        return self.backend.context

    @property
    def queue(self) -> cl.CommandQueue:
        """The in-order pyopencl queue gpubo copies and launches on."""
        return self.backend.queue

    def alloc(
        self, nbytes: int, name: str | None = None, priority: int = 0, *, group: Group | None = None
    ) -> BufferObject:
        """A new resident, zero-filled BO of ``nbytes``, evicting LRU BOs if needed.

        ``group`` (see :meth:`group`) puts the BO under that group's limits.

        Raises:
            TypeError, ValueError: bad ``nbytes`` (must be an int > 0),
                ``name`` (str or None), ``priority`` (0 to 3) or ``group``
                (a Group of this manager).
            OutOfDeviceMemory: ``nbytes`` exceeds the budget or the device's
                largest allocation (nothing is evicted then), or the room
                cannot be made.
            StoreFull: the store could not hold every live BO plus this one.
            ManagerClosed: the manager was closed.
        """
        nbytes = _check_int(nbytes, "nbytes", 1)
        if name is not None:
            _check_name(name)
        priority = _check_int(priority, "priority", 0)
        if priority >= NUM_PRIORITIES:
            raise ValueError(f"priority must be in 0..{NUM_PRIORITIES - 1}, got {priority}")
        if group is not None and (not isinstance(group, Group) or group.manager is not self):
            raise ValueError(f"group must be a Group of this manager, got {group!r}")
        limit = min(self.budget, self.backend.max_alloc_bytes)
        if group is not None and group.max_bytes is not None and nbytes > group.max_bytes:
            raise OutOfDeviceMemory(
                f"cannot allocate {format_bytes(nbytes)}: larger than group {group.name!r}'s max "
                f"({format_bytes(group.max_bytes)})",
                nbytes=nbytes,
                budget=self.budget,
            )
        if nbytes > limit:
            what = "budget" if nbytes > self.budget else "device's largest allocation"
            raise OutOfDeviceMemory(
                f"cannot allocate {format_bytes(nbytes)}: larger than the {what} ({format_bytes(limit)})",
                nbytes=nbytes,
                budget=self.budget,
            )
        footprint = self.store.footprint(nbytes)
        with self._lock:
            self._check_open_locked()
            self._admit_locked(nbytes, footprint)
        try:
            buf = self._new_buffer(nbytes, zero=True, group=group)
        except BaseException:
            with self._lock:
                self._unadmit_locked(nbytes, footprint)
            raise
        with self._lock:
            bo = BufferObject(self, next(self._ids), nbytes, name, priority, footprint, buf, group=group)
            if self._closed:  # close() ran while we allocated
                self._unadmit_locked(nbytes, footprint)
                bo.state = State.FREED
                closed = True
            else:
                closed = False
                self._bos[bo.id] = bo
                if group is not None:
                    group.bo_count += 1
                self._resident_delta_locked(bo, +1)
                self._lru_add_locked(bo)
        if closed:
            self._release(buf, nbytes, group)
            raise ManagerClosed("the manager was closed")
        log.debug("alloc %r", bo)
        return bo

    def launch(
        self,
        kernel: cl.Kernel,
        global_size: Sequence[int],
        local_size: Sequence[int] | None,
        *args: Any,
        wait_for: Sequence[cl.Event] | None = None,
    ) -> cl.Event:
        """Enqueue ``kernel`` with ``args``, making every BO argument resident.

        BO arguments are passed as their ``pyopencl.Buffer``; they are made
        resident together and stay busy until the returned event completes.
        An argument may also be :func:`gpubo.readonly` (a BO the kernel only
        reads) or a ``pyopencl.array.Array`` from :meth:`BufferObject.array`.
        BOs passed to ``const __global`` parameters or through ``readonly``
        are not dirtied: their clean store copy stays valid. (The qualifiers
        are read from the kernel; for a program built without
        ``-cl-kernel-arg-info`` a copy of it is built once from its source
        to read them. Only a program built from binaries has every argument
        taken as written.)

        Raises:
            TypeError: ``kernel`` is not a ``pyopencl.Kernel``.
            ValueError: a BO argument belongs to another manager.
            BufferFreed: a BO argument was freed.
            OutOfDeviceMemory: the BO arguments cannot fit the budget together
                (checked before anything is evicted), or room cannot be made.
            DeviceError: OpenCL refused the launch.
        """
        if not isinstance(kernel, cl.Kernel):
            raise TypeError(f"kernel must be a pyopencl.Kernel, got {type(kernel).__name__}")
        global_dims = _check_work_size(global_size, "global_size")
        local_dims = None if local_size is None else _check_work_size(local_size, "local_size")
        if local_dims is not None and len(local_dims) != len(global_dims):
            raise ValueError(f"local_size {local_dims} and global_size {global_dims} differ in dimensions")
        if wait_for is not None:
            if isinstance(wait_for, (str, bytes)) or not all(isinstance(e, cl.Event) for e in wait_for):
                raise TypeError("wait_for must be None or a sequence of pyopencl.Event")
            wait_for = list(wait_for)
        self._check_open()
        const = self.backend.const_args(kernel)
        bos: dict[int, BufferObject] = {}
        writes: set[int] = set()  # BOs some argument may write through
        for index, arg in enumerate(args):
            bo = self._launch_arg_bo(index, arg)
            if bo is None:
                continue
            bos[bo.id] = bo
            if not isinstance(arg, ReadOnly) and index not in const:
                writes.add(bo.id)
        total = sum(bo.nbytes for bo in bos.values())
        pinned: list[BufferObject] = []
        try:
            with self._room_lock:
                with self._lock:
                    others = self._pinned_bytes - sum(bo.nbytes for bo in bos.values() if bo.pin_count)
                if total + others > self.budget:
                    raise OutOfDeviceMemory(
                        f"kernel arguments need {format_bytes(total)} resident together; budget is "
                        f"{format_bytes(self.budget)} with {format_bytes(others)} pinned elsewhere",
                        nbytes=total,
                        budget=self.budget,
                    )
                for bo in sorted(bos.values(), key=lambda b: b.id):
                    self._bo_pin(bo, dirty=bo.id in writes)
                    pinned.append(bo)
                    with self._lock:
                        self._launch_pinned_bytes += bo.nbytes
                    self._launch_ctx.pinned = getattr(self._launch_ctx, "pinned", 0) + bo.nbytes
            cl_args = [_kernel_arg(arg) for arg in args]
            event = self.backend.launch(kernel, global_dims, local_dims, cl_args, wait_for)
            with self._lock:
                for bo in pinned:
                    self._prune_events_locked(bo)
                    bo.events.append(event)
                if len(self._launch_events) > 64:
                    self._launches_in_flight_locked()
                self._launch_events.append(event)
        finally:
            for bo in pinned:
                self._bo_unpin(bo)
            if pinned:
                released = sum(bo.nbytes for bo in pinned)
                with self._lock:
                    self._launch_pinned_bytes -= released
                    self._cond.notify_all()
                self._launch_ctx.pinned -= released
        return event

    def prefetch(self, bos: Sequence[BufferObject]) -> list[Future[None]]:
        """Start restoring ``bos`` in the background and return at once.

        Restores run on one worker thread, in order, and on the backend's
        transfer queue, so they overlap host work and the kernels already
        queued; a later use of a BO waits only for what is still in
        flight. Consecutive small BOs (up to :data:`BATCH_MAX_BO_BYTES` each,
        :data:`BATCH_BYTES` or half the budget in all) are restored together:
        their copies are enqueued at once and waited for once
        (``stats().restore_batches``). Each future completes when its BO is
        resident (or holds the error: a batch that fails is retried one BO at
        a time, so each BO reports its own; a failed prefetch is also logged,
        and the BO's next use tries again and raises).

        Raises:
            TypeError, ValueError: an item is not a BO of this manager.
            ManagerClosed: the manager was closed.
        """
        items = list(bos)
        for index, bo in enumerate(items):
            if not isinstance(bo, BufferObject) or bo.manager is not self:
                raise ValueError(f"bos[{index}] is not a buffer object of this manager: {bo!r}")
        with self._lock:
            self._check_open_locked()
            if self._prefetcher is None:
                self._prefetcher = ThreadPoolExecutor(
                    max_workers=1,
                    thread_name_prefix=_PREFETCH_THREAD,
                    initializer=lambda: self._prefetch_threads.add(threading.get_ident()),
                )
            pool = self._prefetcher
        # Small BOs go together: the first task of a run of them restores the
        # whole run in one batch, and the others' tasks then find theirs resident.
        futures = []
        i = 0
        while i < len(items):
            run = self._prefetch_run(items, i)
            futures.append(pool.submit(self._prefetch_one, items[i], run))
            futures.extend(pool.submit(self._prefetch_one, bo, []) for bo in run[1:])
            i += max(1, len(run))
        return futures

    def _prefetch_run(self, items: list[BufferObject], start: int) -> list[BufferObject]:
        """The swapped small BOs from ``items[start]`` on that are restored in
        one batch (up to :data:`BATCH_BYTES` or half the budget), or [] (their
        state is a hint: :meth:`_restore_batch` checks it under the locks)."""
        run: list[BufferObject] = []
        total, limit = 0, min(BATCH_BYTES, self.budget // 2)
        for bo in items[start:]:
            if bo.nbytes > BATCH_MAX_BO_BYTES or bo.state is not State.SWAPPED or total + bo.nbytes > limit:
                break
            run.append(bo)
            total += bo.nbytes
        return run if len(run) > 1 else []

    def _prefetch_one(self, bo: BufferObject, together: list[BufferObject]) -> None:
        try:
            if together:
                try:
                    self._restore_batch(together)
                except GpuboError as e:  # each is tried alone, and reports its own error
                    log.info("a batched prefetch failed, restoring one by one: %s", e)
            self._check_alive(bo)
            if bo.state is State.SWAPPED:
                self._bo_restore(bo)
        except GpuboError as e:
            log.info("prefetch of %s failed (its next use will retry): %s", bo.label(), e)
            raise

    def _launch_arg_bo(self, index: int, arg: Any) -> BufferObject | None:
        """The BO behind a launch argument, if any (validated).

        A ``pyopencl.Buffer`` or array that some manager handed out (``pin``,
        ``array``) is recognised by its handle: this manager's is pinned again
        and dirtied like a BO argument; another manager's is refused, since
        that manager would never learn that the kernel wrote to its BO.
        """
        if isinstance(arg, ReadOnly):
            bo = arg.bo
        elif isinstance(arg, BufferObject):
            bo = arg
        elif isinstance(arg, (cl_array.Array, cl.MemoryObjectHolder)):
            buf = arg.base_data if isinstance(arg, cl_array.Array) else arg
            handle = getattr(buf, "int_ptr", None)
            owner = _PINNED.get(handle) if handle is not None else None
            if owner is not None and owner.manager is not self:
                raise ValueError(
                    f"argument {index}: the buffer of {owner.label()}, pinned by another manager "
                    "(launch it with that manager)"
                )
            if isinstance(arg, cl_array.Array):
                if arg.offset:
                    raise ValueError(
                        f"argument {index}: an array view with an offset cannot be a kernel argument"
                    )
                if owner is None and handle is not None:
                    with self._lock:
                        if self._owns_buffer_locked(handle):
                            raise ValueError(
                                f"argument {index}: an array from bo.array() used after its with block "
                                "(its buffer may hold another BO by now)"
                            )
            return owner  # pinned by its block; launch pins it again
        else:
            return None
        if bo.manager is not self:
            raise ValueError(f"argument {index} ({bo.label()}) belongs to another manager")
        return bo

    def evict(self, nbytes: int | str) -> int:
        """Free at least ``nbytes`` of device memory if possible; return bytes freed.

        Pooled buffers go first, then the device shrinker's walk: purgeable
        BOs (dropped, no I/O), idle BOs whose content is already in the store
        (no copy), other idle BOs, and last busy ones (after waiting for their
        kernels), each in LRU order, lower priority first. Pinned BOs, BOs
        another thread is using right now, and BOs of groups within their
        ``min`` are skipped.

        Raises:
            TypeError, ValueError: bad ``nbytes``.
            StoreFull: the store refused a victim (it stays resident).
            ManagerClosed: the manager was closed.
        """
        want = parse_bytes(nbytes, "nbytes")
        self._check_open()
        with self._room_lock:
            freed = self._drain_pool(want)
            if freed < want:
                freed += self._shrink_device(want - freed, may_block=True)
        return freed

    def open(self, name: str, priority: int = 0) -> BufferObject:
        """A new BO holding the durable record ``name`` (swapped; restored on first use).

        Names need not be unique among live BOs: each ``open`` gives a new BO
        with the record's content, and whichever BO of that name syncs last
        sets the record.

        Raises:
            TypeError, ValueError: bad ``name`` or ``priority``.
            NameNotFound: the store has no record of that name.
            IntegrityError: the record is damaged (the store is then open
                for reading only; ``gpubo fsck`` lists what is wrong).
            StoreFull: the store cannot back one more live BO.
            ManagerClosed: the manager was closed.
        """
        _check_name(name)
        priority = _check_int(priority, "priority", 0)
        if priority >= NUM_PRIORITIES:
            raise ValueError(f"priority must be in 0..{NUM_PRIORITIES - 1}, got {priority}")
        with self._lock:
            self._check_open_locked()
            entry = self.store.lookup(name)
            if entry is None:
                raise NameNotFound(f"the store at {self.store.path} has no buffer named {name!r}")
            footprint = self.store.footprint(entry.nbytes)
            try:
                self._admit_locked(entry.nbytes, footprint)
            except BaseException:
                self.store.release(entry)
                raise
            bo = BufferObject(self, next(self._ids), entry.nbytes, name, priority, footprint, None, entry)
            self._bos[bo.id] = bo
            self._swapped_delta_locked(bo, +1)
        log.debug("opened %r", bo)
        return bo

    def names(self) -> list[str]:
        """Names with a durable record in the store, sorted.

        Raises:
            ManagerClosed: the manager was closed.
        """
        self._check_open()
        return self.store.names()

    def remove(self, name: str) -> bool:
        """Delete the durable record ``name``; False if there was none.

        A live BO of that name is not affected (it just has no record).

        Raises:
            TypeError, ValueError: bad ``name``.
            StoreError: the store failed; the record stands.
            ManagerClosed: the manager was closed.
        """
        _check_name(name)
        self._check_open()
        return self.store.remove_name(name)

    def hibernate(self) -> int:
        """Swap out every unpinned BO and commit every named BO's record.

        When it returns, every named BO's content survives the process (see
        :meth:`open`). Pinned BOs stay resident (a named one is still synced).
        Returns the number of BOs swapped out.

        Raises:
            StoreFull, StoreError: as :meth:`BufferObject.sync`; BOs already
                done stay done.
            ManagerClosed: the manager was closed.
        """
        self._check_open()
        with self._lock:
            live = sorted(self._bos.values(), key=lambda b: b.id)
        swapped = 0
        with self._room_lock:
            for bo in live:
                with bo.lock:
                    if bo.state is State.FREED:
                        continue
                    with self._lock:
                        pinned = bo.pin_count > 0
                    if bo.state is State.RESIDENT and not pinned:
                        self._swap_out_locked(bo, keep_buffer=False)
                        swapped += 1
                    if bo.name is not None and bo.state is not State.PURGED:
                        self._sync_locked(bo)
            self._drain_pool(None)
        return swapped

    def group(self, name: str, *, max: object = _KEEP, low: object = _KEEP, min: object = _KEEP) -> Group:
        """The group ``name``, created (with the limits given) if it does not exist.

        Limits are sizes (int or ``"256MiB"``); ``max`` None means unlimited;
        ``low`` defaults to ``min``. Given for an existing group, they replace
        those limits at once (see :meth:`Group.set_limits`).

        Raises:
            TypeError, ValueError: bad name or limits (``min <= low <= max``).
            ManagerClosed: the manager was closed.
        """
        if not isinstance(name, str):
            raise TypeError(f"group name must be a str, got {type(name).__name__}")
        if not name:
            raise ValueError("group name must not be empty")
        with self._lock:
            self._check_open_locked()
            grp = self._groups.get(name)
            if grp is None:
                limits = check_limits(
                    None if max is _KEEP else max,
                    None if low is _KEEP else low,
                    None if min is _KEEP else min,
                )
                grp = Group(self, name, *limits)
                self._groups[name] = grp
                return grp
        if not (max is _KEEP and low is _KEEP and min is _KEEP):
            grp.set_limits(max=max, low=low, min=min)
        return grp

    def groups(self) -> list[Group]:
        """Every group of this manager, by name."""
        with self._lock:
            return [self._groups[n] for n in sorted(self._groups)]

    def _set_group_limits(self, grp: Group, max_: object, low: object, min_: object) -> None:
        """Apply new limits; a lower ``max`` evicts the group's BOs down to it.
        A call that fails puts the old limits back (BOs it already evicted
        stay swapped: their bytes are safe, only where they live changed)."""
        limits = check_limits(max_, low, min_)
        new_max = limits[0]
        with self._room_lock:
            with self._lock:
                old = (grp.max_bytes, grp.low_bytes, grp.min_bytes)
                pinned = sum(bo.nbytes for bo in self._bos.values() if bo.group is grp and bo.pin_count)
                if new_max is not None and pinned > new_max:
                    raise OutOfDeviceMemory(
                        f"group {grp.name!r} has {format_bytes(pinned)} pinned, more than its new max "
                        f"{format_bytes(new_max)}; the limits are unchanged",
                        budget=self.budget,
                    )
                grp.max_bytes, grp.low_bytes, grp.min_bytes = limits
            try:
                self._evict_group_to(grp, new_max)
            except BaseException:
                with self._lock:
                    grp.max_bytes, grp.low_bytes, grp.min_bytes = old
                raise

    def _evict_group_to(self, grp: Group, new_max: int | None) -> None:
        """Evict ``grp``'s BOs until it holds at most ``new_max``. Holds ``_room_lock``."""
        if new_max is None:
            return
        while True:
            with self._lock:
                if grp.charged_bytes <= new_max:
                    return
                victim, _ = self._pick_victim_locked(for_group=grp, only_group=grp)
            if victim is None:
                raise OutOfDeviceMemory(
                    f"group {grp.name!r} holds {format_bytes(grp.charged_bytes)} that cannot be "
                    f"evicted below its new max {format_bytes(new_max)} (pinned or in use); "
                    "the limits are unchanged",
                    budget=self.budget,
                )
            try:
                if victim.is_purgeable:
                    self._purge_locked(victim)
                else:
                    self._swap_out_locked(victim, keep_buffer=False)
            finally:
                victim.lock.release()

    def _group_stats(self, grp: Group) -> GroupStats:
        with self._lock:
            return GroupStats(
                name=grp.name,
                max_bytes=grp.max_bytes,
                low_bytes=grp.low_bytes,
                min_bytes=grp.min_bytes,
                resident_bytes=grp.resident_bytes,
                swapped_bytes=grp.swapped_bytes,
                bo_count=grp.bo_count,
                evictions=grp.evictions,
            )

    # -- shrinkers and pressure ----------------------------------------------

    @property
    def shrinkers(self) -> list[Shrinker]:
        """The registered shrinkers, in the order :meth:`shrink` runs them."""
        with self._lock:
            return list(self._shrinkers)

    def register_shrinker(self, shrinker: Shrinker, *, first: bool = False) -> None:
        """Add a shrinker (anything with ``count()`` and ``scan(nbytes)``), last
        or ``first``.

        Raises:
            TypeError: ``shrinker`` lacks ``count`` or ``scan``.
        """
        if not isinstance(shrinker, Shrinker):
            raise TypeError(f"shrinker must have count() and scan(nbytes), got {type(shrinker).__name__}")
        with self._lock:
            if first:
                self._shrinkers.insert(0, shrinker)
            else:
                self._shrinkers.append(shrinker)

    def unregister_shrinker(self, shrinker: Shrinker) -> None:
        """Remove a shrinker; no-op if it is not registered."""
        with self._lock:
            if shrinker in self._shrinkers:
                self._shrinkers.remove(shrinker)

    def shrink(self, nbytes: int | str, *, may_block: bool = True) -> int:
        """Run the shrinkers in order until ``nbytes`` are freed; return bytes freed.

        A shrinker that raises is logged and skipped; the others still run.
        With ``may_block`` False (as the pressure monitor calls it) the device
        walk only try-locks and skips BOs a kernel is still using.

        Raises:
            TypeError, ValueError: bad ``nbytes``.
            ManagerClosed: the manager was closed.
        """
        want = parse_bytes(nbytes, "nbytes")
        self._check_open()
        freed = 0
        outer = self._shrink_may_block()
        self._shrink_ctx.may_block = may_block and outer  # a nested shrink never blocks more
        try:
            for shrinker in self.shrinkers:
                if freed >= want:
                    break
                try:
                    if shrinker.count() <= 0:  # nothing to give: no scan (as in the kernel)
                        continue
                    got = int(shrinker.scan(want - freed))
                except Exception:
                    log.exception("shrinker %r failed; the others still run", shrinker)
                    continue
                freed += max(0, got)
        finally:
            self._shrink_ctx.may_block = outer
        return freed

    def _shrink_may_block(self) -> bool:
        return bool(getattr(self._shrink_ctx, "may_block", True))

    def _evictable_bytes(self) -> int:
        """Resident bytes no pin holds (what the device shrinker could free)."""
        with self._lock:
            return self._resident_bytes - self._pinned_bytes

    def watch_pressure(
        self, source: PressureSource | None = None, *, interval: float = 1.0
    ) -> PressureMonitor:
        """Start a monitor thread that shrinks when ``source`` reports pressure.

        ``source`` None reads Linux's signals (:class:`~gpubo.shrinker.LinuxPressure`).
        A second call replaces the running monitor. ``close()`` stops it.

        Raises:
            ValueError: ``interval`` is not positive.
            TypeError: ``source`` has no ``read()``.
            ManagerClosed: the manager was closed.
        """
        if source is not None and not callable(getattr(source, "read", None)):
            raise TypeError(f"source must have a read() method, got {type(source).__name__}")
        self._check_open()
        monitor = PressureMonitor(self, source if source is not None else LinuxPressure(), interval)
        old, self._monitor = self._monitor, monitor
        if old is not None:
            old.stop()
        monitor.start()
        return monitor

    def stats(self) -> Stats:
        """A consistent snapshot of the counters."""
        with self._lock:
            return Stats(
                budget=self.budget,
                resident_bytes=self._resident_bytes,
                swapped_bytes=self._swapped_bytes,
                pinned_bytes=self._pinned_bytes,
                bo_count=len(self._bos),
                evictions=self._evictions,
                eviction_batches=self._batches,
                restore_batches=self._restore_batches,
                restores=self._restores,
                bytes_evicted=self._bytes_evicted,
                bytes_restored=self._bytes_restored,
                pooled_bytes=self._pooled_bytes,
                store_capacity_bytes=self.store.capacity_bytes,
                store_used_bytes=self.store.used_bytes,
                purged_bytes=self._purged_bytes,
                purges=self._purges,
            )

    def close(self) -> None:
        """Free every BO, release pooled buffers, close the store. Idempotent.

        Waits for kernels still using BOs. BOs still pinned are freed anyway
        (with a warning); their handles raise BufferFreed from then on.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            live = list(self._bos.values())
        try:
            if self._monitor is not None:
                self._monitor.stop()  # no join from the monitor's own thread
            if self._prefetcher is not None:
                # A prefetch future's done-callback runs on the prefetch thread,
                # which cannot join itself; it runs no other task meanwhile.
                on_worker = threading.get_ident() in self._prefetch_threads
                self._prefetcher.shutdown(wait=not on_worker, cancel_futures=True)
        finally:
            self._free_all_and_close_store(live)
        log.info("gpubo manager closed")

    def _free_all_and_close_store(self, live: list[BufferObject]) -> None:
        """The rest of :meth:`close`: every BO freed, the pool drained, the
        queue finished and the store closed, each whatever the others did."""
        with self._room_lock:
            for bo in live:
                try:
                    self._bo_free(bo, force=True)
                except GpuboError as e:  # keep closing; the store goes anyway
                    log.error("freeing %s at close failed: %s", bo.label(), e)
            try:
                self._drain_pool(None)
                self.backend.finish()
            except GpuboError as e:
                log.error("releasing device buffers at close failed: %s", e)
            finally:
                self._close_store()

    def __enter__(self) -> Manager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        with self._lock:
            if self._closed:
                return f"<Manager {self.backend.name} closed>"
            pinned = sum(1 for bo in self._bos.values() if bo.pin_count)
            return (
                f"<Manager {self.backend.name} resident={format_bytes(self._resident_bytes)}"
                f"/{format_bytes(self.budget)} pooled={format_bytes(self._pooled_bytes)}"
                f" swapped={format_bytes(self._swapped_bytes)} bos={len(self._bos)} pinned={pinned}>"
            )

    # -- BO operations (called by BufferObject) -----------------------------

    def _bo_busy(self, bo: BufferObject) -> bool:
        with self._lock:
            return self._prune_events_locked(bo)

    def _bo_read(
        self, bo: BufferObject, dtype: npt.DTypeLike, count: int, offset: int, out: np.ndarray | None
    ) -> np.ndarray:
        offset = _check_int(offset, "offset", 0)
        if offset > bo.nbytes:
            raise ValueError(f"offset {offset} is past the end of the {bo.nbytes}-byte buffer")
        if out is not None:
            dest = _as_out_array(out)
            if offset + dest.nbytes > bo.nbytes:
                raise ValueError(
                    f"out ({dest.nbytes} bytes) at offset {offset} reads past the end of the "
                    f"{bo.nbytes}-byte buffer"
                )
            self._read_into(bo, dest, offset)
            return out
        dt = _check_dtype(dtype)
        count = _check_int(count, "count", -1)
        if count == -1:
            count, rest = divmod(bo.nbytes - offset, dt.itemsize)
            if rest:
                raise ValueError(
                    f"count=-1: the {bo.nbytes - offset} bytes after offset {offset} are not a "
                    f"multiple of {dt} ({dt.itemsize} bytes); give count"
                )
        elif offset + count * dt.itemsize > bo.nbytes:
            raise ValueError(
                f"count {count} of {dt} at offset {offset} reads past the end of the {bo.nbytes}-byte buffer"
            )
        result = np.empty(count, dt)
        self._read_into(bo, result.view(np.uint8), offset)
        return result

    def _read_into(self, bo: BufferObject, dest: np.ndarray, offset: int) -> None:
        self._lock_resident(bo)
        try:
            if dest.nbytes:
                self.backend.download(self._buf(bo), dest, offset)
            with self._lock:
                self._lru_touch_locked(bo)
        finally:
            bo.lock.release()

    def _bo_write(self, bo: BufferObject, data: Any, offset: int) -> None:
        src = _as_byte_array(data)
        offset = _check_int(offset, "offset", 0)
        if offset + src.nbytes > bo.nbytes:
            raise ValueError(f"{src.nbytes} bytes at offset {offset} do not fit the {bo.nbytes}-byte buffer")
        whole = offset == 0 and src.nbytes == bo.nbytes
        replaced = self._lock_resident(bo, replace_with=src if whole else None, revive=True)
        try:
            if src.nbytes and not replaced:
                self._mark_dirty(bo)
                self.backend.upload(self._buf(bo), src, offset)
            with self._lock:
                self._lru_touch_locked(bo)
        finally:
            bo.lock.release()

    def _bo_pin(self, bo: BufferObject, dirty: bool) -> cl.Buffer:
        """Make ``bo`` resident and pin it; ``dirty`` unless the holder only reads."""
        self._lock_resident(bo)
        try:
            if dirty:
                self._mark_dirty(bo)  # the holder of the buffer may write to it
            with self._lock:
                bo.pin_count += 1
                if bo.pin_count == 1:
                    self._lru_remove_locked(bo)
                    self._pinned_bytes += bo.nbytes
                    _PINNED.add(self._buf(bo).int_ptr, bo)
            return self._buf(bo)
        finally:
            bo.lock.release()

    def _bo_array(
        self, bo: BufferObject, shape: int | tuple[int, ...], dtype: npt.DTypeLike, readonly: bool
    ) -> cl_array.Array:
        dt = _check_dtype(dtype)
        dims = _check_shape(shape, "shape", small=TypeError)
        # Python ints: a numpy product is fixed-width and wraps silently.
        nbytes = math.prod(dims) * dt.itemsize
        if nbytes > bo.nbytes:
            raise ValueError(
                f"an array of shape {dims} and dtype {dt} needs {nbytes} bytes; the BO has {bo.nbytes}"
            )
        buf = self._bo_pin(bo, dirty=not readonly)
        return cl_array.Array(self.queue, dims, dt, data=buf)

    def _bo_unpin(self, bo: BufferObject, handed_out: bool = False, wrote: bool = False) -> None:
        """End a pin. ``handed_out``: the holder had the raw buffer (``pin``,
        ``array``) and may have left commands on the queue that use it; a
        marker after them joins the BO's events, so that an eviction, a free
        or a reuse of the buffer waits for them. ``wrote``: the holder could
        write through it, so the BO is dirty now whatever happened inside the
        block (a sync or hibernate there left a store copy that the holder's
        later writes made stale)."""
        if wrote:
            with bo.lock:
                if bo.state is State.RESIDENT:
                    self._mark_dirty(bo)
        fence = None
        if handed_out:
            try:
                fence = self.backend.fence()
            except GpuboError as e:  # the pin must end all the same: wait for the queue instead
                log.warning("no marker after %s's pin (%s): waiting for the queue", bo.label(), e)
                with contextlib.suppress(GpuboError):
                    self.backend.finish()
        with self._lock:
            if fence is not None and bo.state is State.RESIDENT:
                self._prune_events_locked(bo)  # a BO pinned over and over keeps a short list
                bo.events.append(fence)
            if bo.state is State.FREED:  # close() freed it inside the pin
                return
            bo.pin_count -= 1
            if bo.pin_count == 0:
                self._pinned_bytes -= bo.nbytes
                _PINNED.discard(self._buf(bo).int_ptr)
                self._lru_add_locked(bo)
                self._cond.notify_all()

    def _bo_sync(self, bo: BufferObject) -> None:
        if bo.name is None:
            raise ValueError(f"sync needs a named buffer object; {bo.label()} has no name")
        with bo.lock:
            self._check_alive(bo)
            self._sync_locked(bo)

    def _sync_locked(self, bo: BufferObject) -> None:
        """Commit ``bo``'s current content as its name's record. Holds ``bo.lock``."""
        assert bo.name is not None
        if bo.state is State.PURGED:
            raise Purged(f"{bo.label()} was purged; write it before syncing")
        if bo.state is State.RESIDENT and bo.entry is None:
            with self._lock:
                events = list(bo.events)
            self.backend.wait(events)  # a kernel may still be writing it
            copied = self._write_entry_locked(bo)
            with self._lock:
                self._bytes_evicted += copied
                if bo in self._lru:  # stays resident, now with a clean store copy
                    self._clean.add(bo)
        entry = bo.entry
        assert entry is not None
        with self._lock:
            # The record holds its entry beyond what admission promised the BO.
            others = (
                self._store_committed_bytes + self.store.record_bytes - self.store.record_footprint(bo.name)
            )
            largest = max(self._live_sizes, default=0)
            if others + entry.footprint + self.store.transit_bytes(largest) > self.store.capacity_bytes:
                raise StoreFull(
                    f"no room in the store for a durable copy of {bo.label()} ({format_bytes(bo.nbytes)})",
                    nbytes=bo.nbytes,
                    free_bytes=max(0, self.store.capacity_bytes - others),
                )
        self.store.commit_name(bo.name, entry)

    def _bo_set_purgeable(self, bo: BufferObject, value: bool) -> bool:
        if not isinstance(value, bool):
            raise TypeError(f"purgeable must be a bool, got {type(value).__name__}")
        with bo.lock:
            self._check_alive(bo)
            with self._lock:
                listed = bo in self._lru
                if listed:
                    self._lru_remove_locked(bo)
                bo.is_purgeable = value
                if value:
                    self._purgeable.add(bo)
                else:
                    self._purgeable.discard(bo)
                if listed:
                    self._lru_add_locked(bo)
                return bo.state is not State.PURGED

    def _bo_evict(self, bo: BufferObject) -> None:
        with bo.lock:
            self._check_alive(bo)
            if bo.state is not State.RESIDENT:  # swapped, or purged: nothing on the device
                return
            with self._lock:
                if bo.pin_count:
                    raise BufferBusy(f"{bo.label()} is pinned and cannot be evicted")
            # Keep the device buffer for the next restore: a fresh allocation
            # costs several times the copy (mgr.evict() releases for real).
            self._swap_out_locked(bo, keep_buffer=True)

    def _bo_restore(self, bo: BufferObject) -> None:
        self._lock_resident(bo)
        try:
            with self._lock:
                self._lru_touch_locked(bo)
        finally:
            bo.lock.release()

    def _bo_free(self, bo: BufferObject, force: bool = False) -> None:
        with bo.lock:
            if bo.state is State.FREED:
                return
            with self._lock:
                if bo.pin_count and not force:
                    raise BufferBusy(f"{bo.label()} is pinned and cannot be freed")
                if bo.pin_count:
                    log.warning("%s freed while pinned (manager closing)", bo.label())
                events = list(bo.events)
            try:
                self.backend.wait(events)
            except GpuboError as e:  # a failed kernel does not keep memory alive
                log.warning("a kernel using %s failed: %s", bo.label(), e)
            buf, entry = bo.buf, bo.entry
            with self._lock:
                if bo.state is State.RESIDENT:
                    self._resident_delta_locked(bo, -1)
                    if not self._closed:  # keep it for the next alloc/restore of this size
                        self._pool_locked(self._buf(bo), bo.nbytes)
                        buf = None
                elif bo.state is State.SWAPPED:
                    self._swapped_delta_locked(bo, -1)
                else:
                    self._purged_bytes -= bo.nbytes
                self._lru_remove_locked(bo)
                self._move(bo, State.FREED)
                del self._bos[bo.id]
                self._purgeable.discard(bo)
                if bo.group is not None:
                    bo.group.bo_count -= 1
                self._unadmit_locked(bo.nbytes, bo.store_footprint)
                if bo.pin_count:
                    self._pinned_bytes -= bo.nbytes
                    bo.pin_count = 0
                    if bo.buf is not None:
                        _PINNED.discard(bo.buf.int_ptr)
                bo.buf = bo.entry = None
                bo.events.clear()
                self._cond.notify_all()
            if buf is not None:
                self._release(buf, bo.nbytes)
            if entry is not None:
                self._release_entry(entry)
        log.debug("free %r", bo)

    # -- moving bytes -------------------------------------------------------

    def _lock_resident(
        self, bo: BufferObject, replace_with: np.ndarray | None = None, revive: bool = False
    ) -> bool:
        """Return holding ``bo.lock`` with ``bo`` resident, or raise holding nothing.

        With ``replace_with`` (the BO's complete new content) a swapped or
        purged BO is brought in with those bytes instead of its stored ones;
        the result says whether that happened. A purged BO raises Purged,
        unless ``revive`` (a write): then it comes back zero-filled.
        """
        bo.lock.acquire()
        if bo.state is State.RESIDENT:
            return False
        bo.lock.release()
        # Restoring may evict others: take the room lock first (lock order).
        with self._room_lock:
            bo.lock.acquire()
            try:
                self._check_alive(bo)
                if bo.state is State.SWAPPED:
                    self._restore_locked(bo, replace_with)
                    return replace_with is not None
                if bo.state is State.PURGED:
                    if not revive:
                        raise Purged(f"{bo.label()} was purgeable and its content was dropped")
                    self._revive_locked(bo, replace_with)
                    return replace_with is not None
                return False
            except BaseException:
                bo.lock.release()
                raise

    def _restore_locked(self, bo: BufferObject, replace_with: np.ndarray | None) -> None:
        """Bring swapped ``bo`` back. Holds ``_room_lock`` and ``bo.lock``.

        Invariant: reserve budget -> device buffer -> copy -> verify ->
        commit. The entry is kept as the BO's clean copy (released when the
        BO is dirtied). On any failure the BO stays swapped with its entry.
        """
        entry = bo.entry
        assert entry is not None
        buf = self._filled_buffer(bo, entry if replace_with is None else None, replace_with)
        with self._lock:
            self._restored_locked(bo, buf)
            if replace_with is None:
                self._restores += 1
                self._bytes_restored += bo.nbytes
            else:
                bo.entry = None
                bo.known_zero = False
        if replace_with is not None:
            self._release_entry(entry)
        log.debug("restored %r", bo)

    def _restored_locked(self, bo: BufferObject, buf: cl.Buffer) -> None:
        """Swapped ``bo`` is resident in ``buf``. Its entry stays as the swap
        cache: evicting it again while it is clean costs no copy."""
        self._move(bo, State.RESIDENT)
        self._swapped_delta_locked(bo, -1)
        self._resident_delta_locked(bo, +1)
        self._lru_add_locked(bo)
        bo.buf = buf

    def _restore_batch(self, bos: Sequence[BufferObject]) -> int:
        """Restore ``bos`` (a run from :meth:`_prefetch_run`) together; how
        many were restored (0 when fewer than two could be). BOs another
        thread holds or that are no longer swapped are left out, for the
        caller to restore one by one.

        Raises:
            GpuboError: as a restore; then none of them was restored.
        """
        with self._room_lock:
            batch: list[BufferObject] = []
            try:
                for bo in bos:
                    if not bo.lock.acquire(blocking=False):
                        continue  # another thread holds it, or it is listed twice
                    if bo.state is State.SWAPPED and bo.entry is not None:
                        batch.append(bo)
                    else:
                        bo.lock.release()
                if len(batch) < 2:
                    return 0
                self._restore_batch_locked(batch)
                return len(batch)
            finally:
                for bo in batch:
                    bo.lock.release()

    def _restore_batch_locked(self, bos: list[BufferObject]) -> None:
        """Restore swapped ``bos`` (locked by the caller, who holds
        ``_room_lock``): a device buffer each, then their copies enqueued
        together (:func:`swap_in_batch`). All or nothing."""
        bufs: list[cl.Buffer] = []
        try:
            parts = []
            for bo in bos:
                assert bo.entry is not None
                bufs.append(self._new_buffer(bo.nbytes, zero=False, group=bo.group))
                parts.append((bo.entry, bufs[-1], bo.label()))
            swap_in_batch(self.backend, self.store, parts)
        except BaseException:
            for bo, buf in zip(bos, bufs, strict=False):
                self._release(buf, bo.nbytes, bo.group)
            raise
        with self._lock:
            for bo, buf in zip(bos, bufs, strict=True):
                self._restored_locked(bo, buf)
                self._bytes_restored += bo.nbytes
            self._restores += len(bos)
            self._restore_batches += 1
        if log.isEnabledFor(logging.DEBUG):
            for bo in bos:
                log.debug("restored %r (batched)", bo)

    def _filled_buffer(self, bo: BufferObject, entry: Entry | None, content: np.ndarray | None) -> cl.Buffer:
        """A device buffer for ``bo`` (charged to the budget and its group)
        holding ``content``, else ``entry``'s verified bytes, else zeros; on
        any failure it is released and nothing else changed."""
        buf = self._new_buffer(bo.nbytes, zero=entry is None and content is None, group=bo.group)
        try:
            if content is not None:
                self.backend.upload(buf, content, 0, fresh=True)
            elif entry is not None:
                swap_in(self.backend, self.store, entry, buf, bo.label())
        except BaseException:
            self._release(buf, bo.nbytes, bo.group)
            raise
        return buf

    def _revive_locked(self, bo: BufferObject, replace_with: np.ndarray | None) -> None:
        """Bring purged ``bo`` back, zero-filled or with ``replace_with``.
        Holds ``_room_lock`` and ``bo.lock``."""
        buf = self._filled_buffer(bo, None, replace_with)
        with self._lock:
            self._move(bo, State.RESIDENT)
            bo.buf = buf
            bo.known_zero = replace_with is None
            self._purged_bytes -= bo.nbytes
            self._resident_delta_locked(bo, +1)
            self._lru_add_locked(bo)
        log.debug("revived %r", bo)

    def _purge_locked(self, bo: BufferObject) -> int:
        """Drop purgeable ``bo``'s content (no I/O); device bytes freed.
        Holds ``bo.lock``; ``bo`` is resident or swapped and not pinned."""
        with self._lock:
            events = list(bo.events)
        self.backend.wait(events)
        buf, entry = bo.buf, bo.entry
        with self._lock:
            if bo.state is State.RESIDENT:
                self._resident_delta_locked(bo, -1)
                self._lru_remove_locked(bo)
            else:
                self._swapped_delta_locked(bo, -1)
            self._move(bo, State.PURGED)
            bo.buf = bo.entry = None
            bo.events.clear()
            bo.known_zero = False
            self._purged_bytes += bo.nbytes
            self._purges += 1
        if buf is not None:
            self._release(buf, bo.nbytes)
        if entry is not None:
            self._release_entry(entry)
        log.debug("purged %r", bo)
        return bo.nbytes if buf is not None else 0

    def _swap_out_locked(self, bo: BufferObject, keep_buffer: bool) -> None:
        """Evict resident, unpinned ``bo``; the caller holds ``bo.lock``.

        Invariant: store space is reserved (StoreFull here changes nothing)
        -> wait for the BO's kernels -> copy -> commit the entry -> only then
        the device buffer goes to the pool or is released.
        """
        with self._lock:
            events = list(bo.events)
        self.backend.wait(events)
        copied = self._write_entry_locked(bo)
        self._swapped_out([bo], copied, keep_buffer)

    def _swapped_out(self, bos: list[BufferObject], copied: int, keep_buffer: bool) -> None:
        """Bookkeeping once the entries of ``bos`` (``copied`` bytes in all)
        are committed: each BO is swapped and its device buffer pooled or
        released. Holds every ``bo.lock``."""
        bufs = [(self._buf(bo), bo.nbytes) for bo in bos]
        with self._lock:
            for bo, (buf, nbytes) in zip(bos, bufs, strict=True):
                self._move(bo, State.SWAPPED)
                bo.buf = None
                bo.events.clear()
                self._lru_remove_locked(bo)
                self._resident_delta_locked(bo, -1)
                self._swapped_delta_locked(bo, +1)
                if bo.group is not None:
                    bo.group.evictions += 1
                if keep_buffer:
                    self._pool_locked(buf, nbytes)
            self._evictions += len(bos)
            self._bytes_evicted += copied
        if not keep_buffer:
            for buf, _ in bufs:
                self.backend.release(buf)
            self._uncharge(sum(n for _, n in bufs), None)  # released first, then uncharged
        if log.isEnabledFor(logging.DEBUG):
            for bo in bos:
                log.debug("evicted %r", bo)

    def _needs_copy(self, bo: BufferObject) -> bool:
        """Evicting ``bo`` copies its bytes (no clean entry, not known zero)."""
        return bo.entry is None and not bo.known_zero

    def _batch_limit_locked(self, victim: BufferObject, need: int) -> int:
        """Bytes of more victims to evict together with ``victim`` (0: evict it
        alone). A batch needs a staging buffer from the budget's free room, so
        its size is bounded by that room (which each batch grows), by
        :data:`BATCH_BYTES`, and by the ``need`` still to free."""
        if victim.is_purgeable or victim.nbytes > BATCH_MAX_BO_BYTES or not self._needs_copy(victim):
            return 0
        held = self._staging[1] if self._staging is not None else 0  # reused by the next batch
        room = min(self.budget - self._charged_bytes + held, BATCH_BYTES) // PAGE_BYTES * PAGE_BYTES
        first = _pages(victim.nbytes)
        if room < 2 * PAGE_BYTES or need <= victim.nbytes or room <= first:
            return 0
        return min(room - first, need - victim.nbytes)

    def _extend_batch_locked(
        self,
        victim: BufferObject,
        limit: int,
        *,
        for_group: Group | None = None,
        only_group: Group | None = None,
    ) -> list[BufferObject]:
        """More victims for ``victim``'s batch, locked, in LRU order: the idle,
        unprotected, non-purgeable BOs that the walk would pick next, as long
        as the ones needing a copy are small and fit ``limit`` staging bytes.
        A large BO needing a copy ends the batch (it goes alone, in order)."""
        batch: list[BufferObject] = []
        staged = 0
        leaving: Counter[Group | None] = Counter({victim.group: victim.nbytes})  # protections as if gone
        for bo in self._lru:
            if bo is victim or bo.is_purgeable or (only_group is not None and bo.group is not only_group):
                continue
            if self._protection_locked(bo.group, for_group, leaving[bo.group]) != 0:
                continue
            if self._prune_events_locked(bo):
                continue
            copy = self._needs_copy(bo)
            if copy and (bo.nbytes > BATCH_MAX_BO_BYTES or staged + _pages(bo.nbytes) > limit):
                break
            if not bo.lock.acquire(blocking=False):
                continue  # another thread uses it
            batch.append(bo)
            leaving[bo.group] += bo.nbytes
            staged += _pages(bo.nbytes) if copy else 0
            if staged >= limit:
                break
        return batch

    def _swap_out_batch(self, victims: list[BufferObject], keep_buffer: bool, keep_staging: bool) -> int:
        """Evict ``victims`` (locked by the caller, resident, unpinned, idle);
        bytes they held. Those needing a copy go through one staging buffer
        charged to the budget; without room for it, each goes alone."""
        copy: list[BufferObject] = []
        for bo in victims:
            if self._needs_copy(bo):
                copy.append(bo)
            else:
                self._swap_out_locked(bo, keep_buffer)  # no copy: nothing to batch
        layout, offset = [], 0
        for bo in copy:
            layout.append((offset, bo.nbytes))
            offset += _pages(bo.nbytes)
        staging = self._staging_buffer(offset) if len(copy) > 1 else None
        if staging is None:
            for bo in copy:
                self._swap_out_locked(bo, keep_buffer)
            return sum(bo.nbytes for bo in victims)
        try:
            with self._lock:
                events = [ev for bo in copy for ev in bo.events]
            self.backend.wait(events)
            entries = swap_out_batch(
                self.backend, self.store, staging, [(self._buf(bo), bo.nbytes) for bo in copy], layout
            )
        finally:
            if not keep_staging:
                self._drop_staging()
        for bo, entry in zip(copy, entries, strict=True):
            bo.entry = entry
        with self._lock:
            self._batches += 1
        self._swapped_out(copy, sum(e.stored_bytes for e in entries), keep_buffer)
        return sum(bo.nbytes for bo in victims)

    def _staging_buffer(self, nbytes: int) -> cl.Buffer | None:
        """A staging buffer of at least ``nbytes`` charged to the budget's free
        room, or None when there is no room (nothing is evicted for it).

        The shrinker's walk keeps it between batches (``self._staging``, under
        ``_room_lock``) and gives it back at the end (:meth:`_drop_staging`).
        """
        if self._staging is not None:
            if self._staging[1] >= nbytes:
                return self._staging[0]
            self._drop_staging()
        with self._lock:
            got = self._try_charge_locked(nbytes, None)
        if got is _NO_ROOM:
            return None
        if got is None:
            try:
                # Only the bytes the gather writes are ever read back.
                got = self.backend.allocate(nbytes, kernel_queue=True, zero=False)
            except OutOfDeviceMemory:
                self._uncharge(nbytes, None)
                log.info("no device memory for a %d-byte staging buffer: evicting one by one", nbytes)
                return None
            except BaseException:
                self._uncharge(nbytes, None)
                raise
        self._staging = (got, nbytes)  # type: ignore[assignment]
        return got  # type: ignore[return-value]

    def _drop_staging(self) -> None:
        """Release the staging buffer, if any. Holds ``_room_lock``."""
        if self._staging is not None:
            buf, nbytes = self._staging
            self._staging = None
            self._release(buf, nbytes)

    def _write_entry_locked(self, bo: BufferObject) -> int:
        """Give resident ``bo`` a clean store entry; bytes copied. Holds ``bo.lock``.

        Nothing to copy when the swap cache still holds its content, and no
        data I/O when it is untouched since allocation (all zeros).
        """
        if bo.entry is not None:
            return 0
        if bo.known_zero:
            bo.entry, copied = self.store.write_zeros(bo.nbytes), 0
        else:
            bo.entry = swap_out(self.backend, self.store, self._buf(bo), bo.nbytes)
            copied = bo.entry.stored_bytes
        return copied

    def _mark_dirty(self, bo: BufferObject) -> None:
        """``bo``'s device bytes may change: drop its clean store copy. Holds ``bo.lock``."""
        bo.known_zero = False
        if bo.entry is not None and bo.state is State.RESIDENT:
            with self._lock:
                entry, bo.entry = bo.entry, None
                self._clean.remove(bo)
            self._release_entry(entry)

    # -- store admission ----------------------------------------------------

    def _admit_locked(self, nbytes: int, footprint: int) -> None:
        """Promise store room to a new BO, or raise StoreFull.

        A BO is admitted only while the store can hold every live BO at once
        plus the room an eviction needs in transit, so that restoring any BO
        can always evict a victim: the store never traps a swapped BO.
        """
        while self._size_heap and not self._live_sizes[-self._size_heap[0]]:
            self._heap_sizes.discard(-heapq.heappop(self._size_heap))
        largest = max(nbytes, -self._size_heap[0] if self._size_heap else 0)
        committed = self._store_committed_bytes + self.store.record_bytes
        need = committed + footprint + self.store.transit_bytes(largest)
        if need > self.store.capacity_bytes:
            raise StoreFull(
                f"the store cannot back {format_bytes(nbytes)} more: {format_bytes(committed)} of "
                f"{format_bytes(self.store.capacity_bytes)} is promised to live buffers and "
                f"{format_bytes(self.store.transit_bytes(largest))} must stay free for eviction "
                "(the store must be larger)",
                nbytes=nbytes,
                free_bytes=max(0, self.store.capacity_bytes - committed - self.store.transit_bytes(largest)),
            )
        self._store_committed_bytes += footprint
        if nbytes not in self._heap_sizes:
            self._heap_sizes.add(nbytes)
            heapq.heappush(self._size_heap, -nbytes)
        self._live_sizes[nbytes] += 1

    def _unadmit_locked(self, nbytes: int, footprint: int) -> None:
        self._store_committed_bytes -= footprint
        self._live_sizes[nbytes] -= 1
        if not self._live_sizes[nbytes]:
            del self._live_sizes[nbytes]

    # -- budget and pool ----------------------------------------------------

    def _new_buffer(self, nbytes: int, zero: bool, group: Group | None = None) -> cl.Buffer:
        """A device buffer of ``nbytes`` charged to the budget and to ``group``
        (zeroed if ``zero``).

        Raises:
            OutOfDeviceMemory: no room could be made, or the device itself is
                out of memory with nothing left to evict.
        """
        buf = self._charge(nbytes, group)
        while buf is None:
            try:
                return self.backend.allocate(nbytes, zero=zero)
            except OutOfDeviceMemory as e:
                # The device is fuller than the budget says (other users,
                # fragmentation, or a budget above the device's memory).
                self._uncharge(nbytes, group)
                with self._room_lock:
                    freed = self._drain_pool(None) + self._shrink_device(nbytes, may_block=True)
                    if not freed:
                        raise OutOfDeviceMemory(
                            f"the device cannot allocate {format_bytes(nbytes)} even with every "
                            "evictable buffer evicted",
                            nbytes=nbytes,
                            budget=self.budget,
                        ) from e
                    log.info("device out of memory below the budget; freed %d bytes", freed)
                    buf = self._charge(nbytes, group)
        if zero:
            try:
                self.backend.zero(buf, nbytes)
            except BaseException:
                self._release(buf, nbytes, group)
                raise
        return buf

    def _charge(self, nbytes: int, group: Group | None) -> cl.Buffer | None:
        """Charge ``nbytes`` to the budget and ``group``, evicting if needed.

        Returns a pooled buffer of exactly ``nbytes`` (content undefined) when
        one can be reused, else None and the caller allocates.
        """
        with self._lock:
            got = self._try_charge_locked(nbytes, group)
        if got is not _NO_ROOM:
            return got  # type: ignore[return-value]
        with self._room_lock:
            return self._make_room(nbytes, group)

    def _try_charge_locked(self, nbytes: int, group: Group | None) -> object:
        if self._over_group_max_locked(nbytes, group):
            return _NO_ROOM
        bufs = self._pool.get(nbytes)
        if bufs:
            buf = bufs.pop()
            self._pooled_bytes -= nbytes  # stays charged, now in flight
        elif self._charged_bytes + nbytes <= self.budget:
            self._charged_bytes += nbytes
            buf = None
        else:
            return _NO_ROOM
        if group is not None:
            group.charged_bytes += nbytes
        return buf

    def _uncharge(self, nbytes: int, group: Group | None) -> None:
        with self._lock:
            self._charged_bytes -= nbytes
            if group is not None:
                group.charged_bytes -= nbytes
            self._cond.notify_all()

    def _over_group_max_locked(self, nbytes: int, group: Group | None) -> bool:
        return (
            group is not None
            and group.max_bytes is not None
            and group.charged_bytes + nbytes > group.max_bytes
        )

    def _make_room(self, nbytes: int, group: Group | None) -> cl.Buffer | None:
        """Evict until ``nbytes`` can be charged; see :meth:`_charge`. Holds ``_room_lock``.

        A group at its ``max`` evicts its own BOs; otherwise victims come
        from everyone, sparing groups within their protections.
        """
        with self._lock:
            # Other threads' launches pin their arguments only while enqueuing:
            # wait for those rather than fail.
            lasting = self._pinned_bytes - self._others_launch_pins_locked()
            if nbytes > self.budget - lasting:  # evicting could not help
                raise OutOfDeviceMemory(
                    f"cannot make room for {format_bytes(nbytes)}: {format_bytes(self._pinned_bytes)} "
                    f"of the {format_bytes(self.budget)} budget is pinned",
                    nbytes=nbytes,
                    budget=self.budget,
                )
        deadline = time.monotonic() + _ROOM_TIMEOUT_S
        while True:
            drain = 0
            with self._lock:
                got = self._try_charge_locked(nbytes, group)
                if got is not _NO_ROOM:
                    return got  # type: ignore[return-value]
                if self._over_group_max_locked(nbytes, group):
                    assert group is not None
                    victim, wait = self._pick_victim_locked(for_group=group, only_group=group)
                    where = f"group {group.name!r} (max {format_bytes(group.max_bytes or 0)})"
                elif self._pooled_bytes:  # drain the pool before evicting anyone
                    victim, wait = None, True
                    drain = self._charged_bytes + nbytes - self.budget
                else:
                    victim, wait = self._pick_victim_locked(for_group=group)
                    where = f"the budget ({format_bytes(self.budget)})"
                batch: list[BufferObject] = []
                if victim is not None:
                    only = group if self._over_group_max_locked(nbytes, group) else None
                    if only is not None:
                        need = only.charged_bytes + nbytes - (only.max_bytes or 0)
                    else:
                        need = self._charged_bytes + nbytes - self.budget
                    limit = self._batch_limit_locked(victim, need)
                    if limit:
                        batch = self._extend_batch_locked(victim, limit, for_group=group, only_group=only)
                if victim is None and not drain:
                    if not wait:
                        raise OutOfDeviceMemory(
                            f"cannot make room for {format_bytes(nbytes)} in {where}: "
                            f"{format_bytes(self._resident_bytes)} resident, "
                            f"{format_bytes(self._pinned_bytes)} pinned, the rest protected or in use",
                            nbytes=nbytes,
                            budget=self.budget,
                        )
                    if time.monotonic() > deadline:
                        raise OutOfDeviceMemory(
                            f"timed out making room for {format_bytes(nbytes)}: "
                            "the evictable buffers stayed in use by other threads",
                            nbytes=nbytes,
                            budget=self.budget,
                        )
                    self._cond.wait(0.005)
                    continue
            if drain:
                self._drain_pool(drain)
                continue
            assert victim is not None
            try:
                if victim.is_purgeable:
                    self._purge_locked(victim)
                elif batch:
                    self._swap_out_batch([victim, *batch], keep_buffer=True, keep_staging=False)
                else:
                    self._swap_out_locked(victim, keep_buffer=True)
            finally:
                victim.lock.release()
                for bo in batch:
                    bo.lock.release()

    def _protection_locked(
        self, group: Group | None, for_group: Group | None, leaving: int = 0
    ) -> int | None:
        """Eviction tier of a BO of ``group`` when room is made for
        ``for_group``: 0 evictable, 1 only when nothing else is (below
        ``low``), None never (below ``min``). ``leaving``: bytes of the group
        already chosen for eviction (a batch), as if gone."""
        if group is None or group is for_group:
            return 0
        charged = group.charged_bytes - leaving
        if group.min_bytes and charged <= group.min_bytes:
            return None
        if group.low_bytes and charged <= group.low_bytes:
            return 1
        return 0

    def _pick_victim_locked(
        self,
        *,
        for_group: Group | None = None,
        only_group: Group | None = None,
        shrink: bool = False,
        may_block: bool = True,
    ) -> tuple[BufferObject | None, bool]:
        """The next victim, returned with its lock held, or ``(None, wait)``.

        Order (each in LRU order, lower priority first): purgeable idle BOs;
        then, per protection tier, idle BOs (for a shrink: those with a clean
        store copy before dirty ones) and busy ones; busy BOs only if
        ``may_block``. ``wait`` says whether waiting could help (BOs locked
        by other threads, buffers in flight).
        """
        contended = False
        ranked: dict[int, list[BufferObject]] = {}
        queue_busy = not may_block and self._launches_in_flight_locked()
        if shrink and not self._purgeable_resident:
            # Fast paths, in rank order: the first idle clean BO, else (none
            # exists) the first idle dirty one; the full ranking below only
            # when protections or busy BOs are in the way.
            for lst, dirty in ((self._clean, False), (self._lru, True)):
                for bo in lst:
                    if (dirty and bo.entry is not None) or (
                        only_group is not None and bo.group is not only_group
                    ):
                        continue
                    if self._protection_locked(bo.group, for_group) != 0 or self._prune_events_locked(bo):
                        continue
                    if dirty and queue_busy and not bo.known_zero:
                        continue
                    if bo.lock.acquire(blocking=False):
                        return bo, False
                    contended = True
                if not dirty and contended:
                    break  # a clean BO exists but is in use: rank properly below
        for bo in self._lru:
            if only_group is not None and bo.group is not only_group:
                continue
            tier = self._protection_locked(bo.group, for_group)
            if tier is None:
                continue
            busy = self._prune_events_locked(bo)
            needs_copy = bo.entry is None and not bo.known_zero and not bo.is_purgeable
            if not may_block and (busy or (needs_copy and queue_busy)):
                # Copying it out would wait on the in-order queue behind
                # every kernel enqueued before: not for a non-blocking walk.
                continue
            if bo.is_purgeable and not busy:
                rank = 0
            elif busy:
                rank = 6 + tier
            elif shrink:
                rank = 1 + 2 * tier + (bo.entry is None)
            else:
                rank = 1 + 2 * tier
            if rank == 0 or (rank == 1 and not self._purgeable_resident):
                # Nothing can rank better: take it now (the common case, O(1)).
                if bo.lock.acquire(blocking=False):
                    return bo, False
                contended = True
                continue
            ranked.setdefault(rank, []).append(bo)
        for rank in sorted(ranked):
            for bo in ranked[rank]:
                if bo.lock.acquire(blocking=False):
                    return bo, False
                contended = True
        in_flight = self._charged_bytes - self._resident_bytes - self._pooled_bytes
        return None, contended or in_flight > 0 or self._others_launch_pins_locked() > 0

    def _launches_in_flight_locked(self) -> bool:
        """True while a kernel this manager launched may still run."""
        self._launch_events[:] = [ev for ev in self._launch_events if not self.backend.is_complete(ev)]
        return bool(self._launch_events)

    def _owns_buffer_locked(self, handle: int) -> bool:
        """True if the device buffer ``handle`` is a resident BO's or pooled."""
        if any(bo.buf is not None and bo.buf.int_ptr == handle for bo in self._bos.values()):
            return True
        return any(buf.int_ptr == handle for bufs in self._pool.values() for buf in bufs)

    def _others_launch_pins_locked(self) -> int:
        """Bytes pinned by other threads' launches in progress."""
        return self._launch_pinned_bytes - getattr(self._launch_ctx, "pinned", 0)

    def _shrink_device(self, nbytes: int, may_block: bool) -> int:
        """The device shrinker's walk: free up to ``nbytes`` of device memory
        by purging and evicting (buffers released, not pooled); bytes freed.

        With ``may_block`` False (the pressure monitor) it neither waits for
        another thread making room nor for a kernel: it skips busy BOs.
        """
        if not self._room_lock.acquire(blocking=may_block):
            return 0
        try:
            freed = 0
            while freed < nbytes:
                batch: list[BufferObject] = []
                with self._lock:
                    victim, _ = self._pick_victim_locked(shrink=True, may_block=may_block)
                    if victim is not None and may_block:  # a batch waits for the queue
                        limit = self._batch_limit_locked(victim, nbytes - freed)
                        if limit:
                            batch = self._extend_batch_locked(victim, limit)
                if victim is None:
                    break
                try:
                    if victim.is_purgeable:
                        freed += self._purge_locked(victim)
                    elif batch:
                        freed += self._swap_out_batch([victim, *batch], keep_buffer=False, keep_staging=True)
                    else:
                        self._swap_out_locked(victim, keep_buffer=False)
                        freed += victim.nbytes
                finally:
                    victim.lock.release()
                    for bo in batch:
                        bo.lock.release()
            self._purge_swapped()
            return freed
        finally:
            self._drop_staging()
            self._room_lock.release()

    def _purge_swapped(self) -> None:
        """Drop swapped purgeable BOs too: they hold store space, not device memory."""
        with self._lock:
            swapped = [bo for bo in self._purgeable if bo.state is State.SWAPPED]
        for bo in swapped:
            if not bo.lock.acquire(blocking=False):
                continue
            try:
                with self._lock:
                    still = bo.state is State.SWAPPED and bo.is_purgeable and not bo.pin_count
                if still:
                    self._purge_locked(bo)
            finally:
                bo.lock.release()

    # -- accounting helpers -------------------------------------------------

    def _resident_delta_locked(self, bo: BufferObject, sign: int) -> None:
        """``bo`` became resident (+1; its charge was taken) or left (-1; its
        group charge goes, its buffer is pooled or released by the caller)."""
        self._resident_bytes += sign * bo.nbytes
        if bo.group is not None:
            bo.group.resident_bytes += sign * bo.nbytes
            if sign < 0:
                bo.group.charged_bytes -= bo.nbytes

    def _swapped_delta_locked(self, bo: BufferObject, sign: int) -> None:
        self._swapped_bytes += sign * bo.nbytes
        if bo.group is not None:
            bo.group.swapped_bytes += sign * bo.nbytes

    def _lru_add_locked(self, bo: BufferObject) -> None:
        """List a resident, unpinned BO as the most recently used."""
        if bo not in self._lru and bo.is_purgeable:
            self._purgeable_resident += 1
        self._lru.add(bo)
        if bo.entry is not None:
            self._clean.add(bo)

    def _lru_remove_locked(self, bo: BufferObject) -> None:
        if bo in self._lru:
            self._lru.remove(bo)
            self._clean.remove(bo)
            if bo.is_purgeable:
                self._purgeable_resident -= 1

    def _lru_touch_locked(self, bo: BufferObject) -> None:
        self._lru.touch(bo)
        self._clean.touch(bo)

    def _pool_locked(self, buf: cl.Buffer, nbytes: int) -> None:
        self._pool.setdefault(nbytes, []).append(buf)
        self._pooled_bytes += nbytes

    def _drain_pool(self, target: int | None) -> int:
        """Release pooled buffers until at least ``target`` bytes are released
        (``None``: all of them); return bytes released."""
        drained: list[tuple[cl.Buffer, int]] = []
        with self._lock:
            released = 0
            for size in list(self._pool):
                bufs = self._pool[size]
                while bufs and (target is None or released < target):
                    drained.append((bufs.pop(), size))
                    released += size
                    self._pooled_bytes -= size
                if not bufs:
                    del self._pool[size]
        for buf, size in drained:
            self._release(buf, size)
        return released

    def _release(self, buf: cl.Buffer, nbytes: int, group: Group | None = None) -> None:
        """Release a charged buffer, then uncharge it (never the other way);
        ``group`` for a buffer still charged to one (in flight)."""
        self.backend.release(buf)
        self._uncharge(nbytes, group)

    def _release_entry(self, entry: Entry) -> None:
        try:
            self.store.release(entry)
        except StoreError as e:  # the bytes were already safe elsewhere
            log.error("could not release a store entry (%d bytes stay in use): %s", entry.footprint, e)

    # -- helpers ------------------------------------------------------------

    def _prune_events_locked(self, bo: BufferObject) -> bool:
        """Drop completed events; True if some kernel still uses ``bo``."""
        if bo.events:
            bo.events[:] = [ev for ev in bo.events if not self.backend.is_complete(ev)]
        return bool(bo.events)

    @staticmethod
    def _buf(bo: BufferObject) -> cl.Buffer:
        """The device buffer of a resident BO (caller holds ``bo.lock``)."""
        assert bo.buf is not None, f"{bo!r} has no device buffer"
        return bo.buf

    @staticmethod
    def _move(bo: BufferObject, new: State) -> None:
        if new not in ALLOWED_MOVES[bo.state]:
            raise AssertionError(f"illegal state move {bo.state.name} -> {new.name} for {bo!r}")
        bo.state = new

    @staticmethod
    def _check_alive(bo: BufferObject) -> None:
        if bo.state is State.FREED:
            raise BufferFreed(f"buffer object {bo.label()} was freed")

    def _check_open(self) -> None:
        with self._lock:
            self._check_open_locked()

    def _check_open_locked(self) -> None:
        if self._closed:
            raise ManagerClosed("the manager was closed")
