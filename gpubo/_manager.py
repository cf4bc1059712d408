"""The device object (TTM's ``ttm_device``): it builds the pieces, checks
every argument at the edge, and delegates. No byte moves here and no victim
is chosen here; the module map is in the README's design section:

* :mod:`gpubo._resource`: budget, charges, LRU, admission (and the lock order);
* :mod:`gpubo._pool`: pooled device buffers;
* :mod:`gpubo._state`: states, moves, and what each move does to the counters;
* :mod:`gpubo._evict`: the one eviction walk and its callers' policies;
* :mod:`gpubo._move`: moving a BO or a batch between device and store;
* :mod:`gpubo._transfer`: every byte copy;
* :mod:`gpubo._launch`, :mod:`gpubo._prefetch`, :mod:`gpubo._records`:
  launches and pins, background restores, named records;
* :mod:`gpubo._ops`: what the methods of BOs and groups do.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

from gpubo import _array
from gpubo._array import DeviceArray
from gpubo._bo import BufferObject
from gpubo._checks import (
    check_alloc_size,
    check_int,
    check_name,
    check_priority,
    check_work_size,
    from_environment,
)
from gpubo._evict import BATCH_BYTES, BATCH_MAX_BO_BYTES, Evictor
from gpubo._groups import _KEEP, Group, check_limits
from gpubo._launch import Launcher
from gpubo._move import Mover
from gpubo._ops import BufferOps, GroupOps
from gpubo._prefetch import Prefetcher
from gpubo._records import Records
from gpubo._resource import Resource, StoreAdmission
from gpubo._share import ShareMember, ShareMemberStats, check_share_args
from gpubo._state import Stats
from gpubo._transfer import check_checksums, make_transfer
from gpubo._units import format_bytes, parse_bytes
from gpubo.backends.base import Backend
from gpubo.backends.opencl import OpenCLBackend
from gpubo.shrinker import (
    DeviceShrinker,
    LinuxPressure,
    PoolShrinker,
    PressureMonitor,
    PressureSource,
    Shrinker,
    ShrinkerList,
    StoreCacheShrinker,
)
from gpubo.store import Durability, SwapStore, open_store

__all__ = ["BATCH_BYTES", "BATCH_MAX_BO_BYTES", "Manager", "Stats"]

log = logging.getLogger(__name__)


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
            ``store_backend`` and ``durability`` are its own, whether it
            keeps checksums too (``checksums`` then only says where:
            ``False`` means the host), and the manager closes it).
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
        checksums: keep a checksum per stored chunk (1 MiB) and verify it on
            every restore: ``"host"`` (the store hashes the bytes as it
            copies them, xxh3-64), ``"device"`` (a kernel hashes them on the
            device before they leave and after they come back: per 4 KiB
            page XXH64, then the chunk's XXH64 of those; BOs under 1 MiB are
            hashed on the host), ``True`` (``device`` for the bounce
            strategy, ``host`` for map) or ``False`` (none). A store written
            with either kind reads with either setting. With a
            :class:`~gpubo.store.SwapStore`, the store's own setting says
            whether there are any.
        transfer: ``"map"`` (map device buffers: zero-copy on unified memory),
            ``"bounce"`` (stream through ``bounce_buffers`` pinned host buffers
            of ``bounce_size``, allocated now), ``"auto"`` (map on unified
            memory, else bounce); None: ``$GPUBO_TRANSFER``, else auto.
        share: the name of a device share to create or join (None:
            ``$GPUBO_SHARE``, else none): one budget for every member process
            on this device, which evict for each other on request (see
            :mod:`gpubo._share`). ``budget`` None joins with the share's;
            ``share_min``/``share_low``/``share_max`` protect and cap this
            process as a group's ``min``/``low``/``max`` do.

    Raises:
        TypeError, ValueError: an argument is of the wrong type or out of range.
        DeviceError: no OpenCL device could be opened.
        StoreError: the store cannot be created or opened.

    Notes:
        Thread-safe; the lock order is written once, in :mod:`gpubo._resource`.
        Constant after init: ``store``, ``budget`` and the pieces it builds
        (``backend`` may be replaced before first use by an object with the
        same methods, e.g. one that observes the real one: see
        :class:`gpubo.backends.Backend`). ``_monitor`` is guarded by
        ``_monitor_lock``; everything else belongs to the pieces (see the
        module docstring).
    """

    def __init__(
        self,
        budget: int | str | None = None,
        store: str | os.PathLike[str] | SwapStore | bool | None = None,
        store_size: int | str = "2GiB",
        device: Any = None,
        *,
        store_backend: str | None = None,
        durability: str = "lazy",
        checksums: bool | str = True,
        pressure: bool | PressureSource | None = None,
        transfer: str | None = None,
        bounce_buffers: int = 4,
        bounce_size: int | str = "4MiB",
        share: str | None = None,
        share_min: int | str | None = None,
        share_low: int | str | None = None,
        share_max: int | str | None = None,
    ) -> None:
        sharing = check_share_args(share, share_min, share_low, share_max)
        asked = None if budget is None else parse_bytes(budget, "budget")
        budget, store, device = from_environment(budget, store, device)
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
        checksums = check_checksums(checksums)
        bounce = (check_int(bounce_buffers, "bounce_buffers", 2), parse_bytes(bounce_size, "bounce_size"))
        backend: Backend = OpenCLBackend(device)
        if self.budget > backend.global_mem_bytes:
            log.warning(
                "budget %s exceeds the device's memory %s; the device will run out first",
                format_bytes(self.budget),
                format_bytes(backend.global_mem_bytes),
            )
        if isinstance(store, SwapStore):
            self.store: SwapStore = store
        else:
            self.store = open_store(
                store,
                store_bytes,
                backend=store_backend,
                checksums=checksums is not False,
                durability=durability,
            )
        self._close_store = weakref.finalize(self, self.store.close)
        self._share: ShareMember | None = None
        try:
            if sharing is not None:
                self._share = ShareMember(*sharing, asked, self.budget, backend.device_id)
                self.budget = self._share.budget
            transfer_ = make_transfer(transfer, backend, self.store, *bounce, checksums)
        except BaseException:
            if self._share is not None:
                self._share.leave()
            self._close_store()
            raise
        # The pieces, each on top of the ones before it (imports point one way).
        self._res = Resource(self.budget, backend, self._share)
        self._admission = StoreAdmission(self.store)
        self._mover = Mover(self._res, self._admission, backend, self.store, transfer_)
        self._evictor = Evictor(self._res, self._mover)
        self._mover.room = self._evictor
        self._launcher = Launcher(self._res, self._mover, backend)
        self._records = Records(self._res, self._admission, self._mover, self._evictor, self.store)
        self._prefetcher = Prefetcher(self._res, self._mover)
        self._bo_ops = BufferOps(self._res, self._mover, self._launcher, self._records, self._prefetcher)
        self._group_ops = GroupOps(
            self._res, self._evictor, lambda n, name, p, g: self.alloc(n, name, p, group=g)
        )
        self._backend = backend
        # Shrinkers run in this order by shrink().
        self._shrinkers = ShrinkerList(
            [
                PoolShrinker(self._res.pooled_bytes, self._mover.drain_pool),
                DeviceShrinker(self._res.evictable_bytes, self._evictor.shrink_device),
                StoreCacheShrinker(self.store),
            ]
        )
        self._monitor_lock = threading.Lock()
        self._monitor: PressureMonitor | None = None
        try:
            if pressure is not None and pressure is not False:
                self.watch_pressure(None if pressure is True else pressure)
        except BaseException:
            self.close()  # the store, the share, the buffers: nothing stays behind
            raise
        if self._share is not None:  # serves peers until close() (its thread keeps the manager alive)
            self._share.attach(self._res, self._evictor.give_back)
        _array.opened(self)  # the default manager of unpickled DeviceArrays, unless one is named
        where = f"{self.store.path} ({format_bytes(self.store.size_bytes)})"
        log.info("gpubo manager on %s: budget %s, store %s", backend.name, format_bytes(self.budget), where)

    # -- the device -----------------------------------------------------------

    @property
    def backend(self) -> Backend:
        """The device backend every piece uses (see :class:`gpubo.backends.Backend`)."""
        return self._backend

    @backend.setter
    def backend(self, value: Backend) -> None:
        self._backend = value
        for piece in (self._res, self._mover, self._launcher, self._mover.transfer):
            piece.backend = value

    @property
    def context(self) -> Any:
        """The pyopencl context every BO lives in."""
        return self._backend.context

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return self._res.closed

    @property
    def queue(self) -> Any:
        """The in-order pyopencl queue gpubo copies and launches on."""
        return self._backend.queue

    # -- buffer objects ---------------------------------------------------------

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
        nbytes = check_int(nbytes, "nbytes", 1)
        if name is not None:
            check_name(name)
        priority = check_priority(priority)
        if group is not None and (not isinstance(group, Group) or group.manager is not self):
            raise ValueError(f"group must be a Group of this manager, got {group!r}")
        check_alloc_size(nbytes, self._res.cap, self._backend.max_alloc_bytes, group)
        return self._mover.new_bo(self, self._bo_ops, nbytes, name, priority, group)

    def asarray(
        self, array: Any, name: str | None = None, priority: int = 0, *, group: Group | None = None
    ) -> DeviceArray:
        """A new :class:`DeviceArray` holding a copy of ``array`` (a numpy
        array, anything numpy can make one of, or a DeviceArray); the other
        arguments are :meth:`alloc`'s.

        Raises:
            TypeError: ``array`` cannot be made a numeric numpy array.
            the errors of :meth:`alloc`.
        """
        return _array.new_array(self, _array.as_host_array(array), name=name, priority=priority, group=group)

    def empty(
        self,
        shape: int | Sequence[int],
        dtype: Any = float,
        name: str | None = None,
        priority: int = 0,
        *,
        group: Group | None = None,
    ) -> DeviceArray:
        """A new :class:`DeviceArray` of ``shape`` and ``dtype`` (numpy's
        default, float64, if not given). Its bytes are zeros, as every new
        BO's are: gpubo never hands out another buffer's old bytes.

        Raises:
            TypeError, ValueError: bad ``shape`` or ``dtype``; the errors of
                :meth:`alloc`.
        """
        dims, dt = _array.check_array_spec(shape, dtype)
        return _array.new_array(self, None, dims, dt, name=name, priority=priority, group=group)

    def zeros(
        self,
        shape: int | Sequence[int],
        dtype: Any = float,
        name: str | None = None,
        priority: int = 0,
        *,
        group: Group | None = None,
    ) -> DeviceArray:
        """Like :meth:`empty` (whose arrays are zero-filled too)."""
        return self.empty(shape, dtype, name, priority, group=group)

    def launch(
        self,
        kernel: Any,
        global_size: Sequence[int],
        local_size: Sequence[int] | None,
        *args: Any,
        wait_for: Sequence[Any] | None = None,
    ) -> Any:
        """Enqueue ``kernel`` with ``args``, making every BO argument resident.

        BO arguments are passed as their ``pyopencl.Buffer``; they are made
        resident together and stay busy until the returned event completes.
        An argument may also be :func:`gpubo.readonly` (a BO the kernel only
        reads), a :class:`DeviceArray` (passed as its BO), or a
        ``pyopencl.array.Array`` from :meth:`BufferObject.array`.
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
        if not self._backend.is_kernel(kernel):
            raise TypeError(f"kernel must be a pyopencl.Kernel, got {type(kernel).__name__}")
        global_dims = check_work_size(global_size, "global_size")
        local_dims = None if local_size is None else check_work_size(local_size, "local_size")
        if local_dims is not None and len(local_dims) != len(global_dims):
            raise ValueError(f"local_size {local_dims} and global_size {global_dims} differ in dimensions")
        events = None
        if wait_for is not None:
            if isinstance(wait_for, (str, bytes)) or not all(self._backend.is_event(e) for e in wait_for):
                raise TypeError("wait_for must be None or a sequence of pyopencl.Event")
            events = list(wait_for)
        self._res.check_open()
        return self._launcher.launch(kernel, global_dims, local_dims, _array.unwrap(args), events, owner=self)

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
        return self._prefetcher.submit(items)

    def evict(self, nbytes: int | str) -> int:
        """Free at least ``nbytes`` of device memory if possible; return bytes freed.

        Pooled buffers go first, then the device shrinker's walk (:mod:`gpubo._evict`): purgeable
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
        self._res.check_open()
        with self._res.room_lock:
            freed = self._mover.drain_pool(want)
            if freed < want:
                freed += self._evictor.shrink_device(want - freed, may_block=True)
        return freed

    # -- named records --------------------------------------------------------------

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
        check_name(name)
        priority = check_priority(priority)
        return self._records.open(name, priority, self, self._bo_ops)

    def names(self) -> list[str]:
        """Names with a durable record in the store, sorted.

        Raises:
            ManagerClosed: the manager was closed.
        """
        self._res.check_open()
        return self.store.names()

    def remove(self, name: str) -> bool:
        """Delete the durable record ``name``; False if there was none.

        A live BO of that name is not affected (it just has no record).

        Raises:
            TypeError, ValueError: bad ``name``.
            StoreError: the store failed; the record stands.
            ManagerClosed: the manager was closed.
        """
        check_name(name)
        self._res.check_open()
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
        self._res.check_open()
        return self._records.hibernate()

    # -- groups -----------------------------------------------------------------------

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
        with self._res.lock:
            self._res.check_open_locked()
            grp = self._res.groups.get(name)
            if grp is None:
                limits = check_limits(
                    None if max is _KEEP else max,
                    None if low is _KEEP else low,
                    None if min is _KEEP else min,
                )
                grp = Group(self, self._group_ops, name, *limits)
                self._res.groups[name] = grp
                return grp
        if not (max is _KEEP and low is _KEEP and min is _KEEP):
            grp.set_limits(max=max, low=low, min=min)
        return grp

    def groups(self) -> list[Group]:
        """Every group of this manager, by name."""
        with self._res.lock:
            return [self._res.groups[n] for n in sorted(self._res.groups)]

    # -- shrinkers and pressure ----------------------------------------------------------

    @property
    def shrinkers(self) -> list[Shrinker]:
        """The registered shrinkers, in the order :meth:`shrink` runs them."""
        return self._shrinkers.snapshot()

    def register_shrinker(self, shrinker: Shrinker, *, first: bool = False) -> None:
        """Add a shrinker (anything with ``count()`` and ``scan(nbytes)``), last
        or ``first``.

        Raises:
            TypeError: ``shrinker`` lacks ``count`` or ``scan``.
        """
        self._shrinkers.register(shrinker, first)

    def unregister_shrinker(self, shrinker: Shrinker) -> None:
        """Remove a shrinker; no-op if it is not registered."""
        self._shrinkers.unregister(shrinker)

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
        self._res.check_open()
        return self._shrinkers.run(want, may_block)

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
        monitor = PressureMonitor(self, source if source is not None else LinuxPressure(), interval)
        with self._monitor_lock:  # close() swaps it out under this lock too
            self._res.check_open()
            old, self._monitor = self._monitor, monitor
            monitor.start()
        if old is not None:
            old.stop()
        return monitor

    # -- the whole ------------------------------------------------------------------------

    def share_stats(self) -> list[ShareMemberStats]:
        """One row per live member of this manager's share (others' usage at most 0.1 s old).
        Raises ValueError outside a share, ShareError if its ledger is damaged."""
        if self._share is None:
            raise ValueError("this manager is not in a share (Manager(share=...))")
        self._res.check_open()
        return self._share.stats()

    def stats(self) -> Stats:
        """A consistent snapshot of the counters."""
        res = self._res
        with res.lock:
            c = res.counters
            return Stats(
                budget=self.budget,
                resident_bytes=c.resident_bytes,
                swapped_bytes=c.swapped_bytes,
                pinned_bytes=res.pinned_bytes,
                bo_count=len(res.bos),
                evictions=c.evictions,
                eviction_batches=c.eviction_batches,
                restore_batches=c.restore_batches,
                restores=c.restores,
                bytes_evicted=c.bytes_evicted,
                bytes_restored=c.bytes_restored,
                pooled_bytes=res.pool.pooled_bytes,
                store_capacity_bytes=self.store.capacity_bytes,
                store_used_bytes=self.store.used_bytes,
                purged_bytes=c.purged_bytes,
                purges=c.purges,
                transfer=self._mover.transfer.name,
                checksums=self._mover.transfer.checksums,
            )

    def close(self) -> None:
        """Free every BO, release pooled buffers, close the store. Idempotent.

        Waits for kernels still using BOs. BOs still pinned are freed anyway
        (with a warning); their handles raise BufferFreed from then on.
        """
        with self._res.lock:
            if self._res.closed:
                return
            self._res.closed = True
            live = list(self._res.bos.values())
        try:
            if self._share is not None:
                self._share.stop()  # peers stop asking; its charge goes once the buffers are gone
            with self._monitor_lock:
                monitor, self._monitor = self._monitor, None
            if monitor is not None:
                monitor.stop()  # no join from the monitor's own thread
            self._prefetcher.shutdown()
        finally:
            with self._res.room_lock:
                freed = False
                try:
                    self._mover.free_all(live)
                    freed = True
                    self._mover.transfer.close()
                finally:
                    try:
                        self._close_store()
                    finally:
                        if self._share is not None and freed:
                            self._share.leave()  # its buffers are released: its charge goes
        log.info("gpubo manager closed")

    def __enter__(self) -> Manager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        res = self._res
        with res.lock:
            if res.closed:
                return f"<Manager {self._backend.name} closed>"
            pinned = sum(1 for bo in res.bos.values() if bo.pin_count)
            return (
                f"<Manager {self._backend.name} resident={format_bytes(res.counters.resident_bytes)}"
                f"/{format_bytes(self.budget)} pooled={format_bytes(res.pool.pooled_bytes)}"
                f" swapped={format_bytes(res.counters.swapped_bytes)} bos={len(res.bos)} pinned={pinned}"
                f" transfer={self._mover.transfer.name} checksums={self._mover.transfer.checksums}>"
            )
