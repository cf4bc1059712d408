"""The resource manager (TTM's ``ttm_resource_manager``): the device budget
and group charges, the LRU lists, and "does it fit" (yes or no: it never
evicts; :mod:`gpubo._evict` does). Also the store's admission
(:class:`StoreAdmission`): "can the store back one more BO".

Lock order (take them in this order, never the reverse; written here once):

1. :attr:`Resource.room_lock` (re-entrant): held by the one thread making
   room on the device (evicting other BOs), and by restores and launches,
   which may need room.
2. ``BufferObject.lock``: held while one BO's bytes are copied, read or
   written. A thread that needs room takes ``room_lock`` *before* the BO
   lock; a thread holding ``room_lock`` only *try*-locks victims.
3. :attr:`Resource.lock`: bookkeeping only (everything this module owns, the
   pool, the counters, each BO's ``pin_count``, ``events`` and
   ``is_purgeable``); never held across a copy, an allocation or a wait for
   the device. Two store calls are made under it, both bookkeeping in the
   store's own memory or metadata: ``store.lookup`` in ``open`` (so that
   admission and the lookup agree) and the store's ``record_bytes`` /
   ``record_footprint`` reads in admission and sync.

Why no deadlock: the evictor never blocks on a BO lock; it skips BOs that
another thread holds and, if nothing else can be evicted, waits briefly on
:attr:`Resource.cond` and walks again. Every other holder of a resident BO's
lock finishes without needing ``room_lock`` (reads, writes, evict, free), so
the wait ends.

Budget accounting: ``charged_bytes`` is every byte of device memory the
manager holds or is about to hold: resident BOs, the buffer pool, and
buffers in flight (being allocated, restored or released). It never exceeds
``limit``: the budget, or in a share (:mod:`gpubo._share`) this process's
reservation, which the share grows through :class:`ShareHook` (under the
resource lock) before anything is charged beyond it.

Mirrors kept on purpose (each updated only by the methods here):

* ``clean``: the BOs of ``lru`` with a clean store copy, in the same order.
  The shrinker's walk takes the first one; deriving it would scan the whole
  LRU for every victim (quadratic in the number of resident BOs).
* ``purgeable_resident``: how many listed BOs are purgeable, so the walk
  knows in O(1) that no purgeable BO outranks the first idle one.
* :class:`StoreAdmission`'s live sizes: the largest live BO size decides the
  room an eviction needs in transit, asked at every allocation.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import Counter
from typing import Any, Protocol

from gpubo._bo import BufferObject, GroupLike
from gpubo._errors import ManagerClosed, StoreFull
from gpubo._groups import Group, GroupStats
from gpubo._lru import LRU
from gpubo._pool import Pool
from gpubo._state import Counters, State
from gpubo._units import format_bytes
from gpubo.store.base import SwapStore

__all__ = ["NO_ROOM", "PINNED", "Resource", "ShareHook", "StoreAdmission"]

#: What :meth:`Resource.try_charge_locked` returns when the charge does not fit.
NO_ROOM: Any = object()


class _PinnedBuffers:
    """The device buffers that the managers of this process have pinned, by
    backend handle: a launch argument that is a raw buffer or array is
    matched to its BO here, whichever manager pinned it.

    Notes:
        Process-wide on purpose (a buffer can be passed to any manager);
        entries live only while their pin does. Its lock is a leaf: taken
        under a resource lock, never the other way.
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


PINNED = _PinnedBuffers()


class ShareHook(Protocol):
    """What the resource and the eviction walk need of a device share
    (:class:`gpubo._share.ShareMember`)."""

    #: The most this process may hold (the share's budget, or ``share_max``).
    cap: int

    def grow_locked(self, total: int) -> bool:
        """Raise ``Resource.limit`` so that ``total`` charged bytes fit, if
        the share has the room (resource lock held)."""
        ...

    def ask_peers(self, nbytes: int, older_than: float | None) -> int:
        """Ask other members to give back ``nbytes``; bytes they gave."""
        ...

    def describe(self) -> str:
        """Who holds what in the share (for error messages)."""
        ...


class Resource:
    """Budget, charges, LRU and the BO table of one manager (see the module
    docstring for the locks)."""

    def __init__(self, budget: int, backend: Any, share: ShareHook | None = None) -> None:
        self.budget = budget
        self.share = share
        #: The most this manager may hold (``share_max`` in a share).
        self.cap = budget if share is None else share.cap
        # Protected by lock: what may be charged now (the reservation in a share).
        self.limit = budget if share is None else 0
        self.backend = backend  # for is_complete on events (never waits)
        self.room_lock = threading.RLock()
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self._ids = itertools.count(1)
        # Protected by lock:
        self.closed = False
        self.bos: dict[int, BufferObject] = {}
        self.groups: dict[str, Group] = {}
        self.counters = Counters()
        self.pool = Pool()
        self.charged_bytes = 0
        self.pinned_bytes = 0
        self.launch_pinned_bytes = 0  # pins held by launches being enqueued (brief)
        self.launch_events: list[Any] = []  # launches that may still run (pruned lazily)
        self.lru: LRU[BufferObject] = LRU()
        self.clean: LRU[BufferObject] = LRU()
        self.purgeable_resident = 0
        self.purgeable: set[BufferObject] = set()  # every live purgeable BO

    def next_id(self) -> int:
        """A new BO id (unique within the manager; ``itertools.count`` is atomic)."""
        return next(self._ids)

    # -- open / closed ----------------------------------------------------

    def check_open(self) -> None:
        with self.lock:
            self.check_open_locked()

    def check_open_locked(self) -> None:
        if self.closed:
            raise ManagerClosed("the manager was closed")

    # -- charges ------------------------------------------------------------

    def try_charge_locked(self, nbytes: int, group: GroupLike | None) -> Any:
        """Charge ``nbytes`` to the budget and ``group`` if they fit: a pooled
        buffer of that size (its charge moves over), else None (the caller
        allocates); :data:`NO_ROOM` if they do not fit."""
        if self.over_group_max_locked(nbytes, group):
            return NO_ROOM
        buf = self.pool.take_locked(nbytes)
        if buf is None:
            total = self.charged_bytes + nbytes
            if total > self.limit and (self.share is None or not self.share.grow_locked(total)):
                return NO_ROOM
            self.charged_bytes += nbytes
        if group is not None:
            group.charged_bytes += nbytes
        return buf

    def uncharge(self, nbytes: int, group: GroupLike | None) -> None:
        with self.lock:
            self.charged_bytes -= nbytes
            if group is not None:
                group.charged_bytes -= nbytes
            self.cond.notify_all()

    def over_group_max_locked(self, nbytes: int, group: GroupLike | None) -> bool:
        return (
            group is not None
            and group.max_bytes is not None
            and group.charged_bytes + nbytes > group.max_bytes
        )

    def need_locked(self, nbytes: int, group: GroupLike | None) -> tuple[int, GroupLike | None]:
        """Bytes to free before ``nbytes`` can be charged, and the group they
        must come from (None: anyone's)."""
        if self.over_group_max_locked(nbytes, group):
            assert group is not None and group.max_bytes is not None
            return group.charged_bytes + nbytes - group.max_bytes, group
        return self.charged_bytes + nbytes - self.limit, None

    def in_flight_locked(self) -> int:
        """Charged bytes neither resident nor pooled: buffers on their way."""
        return self.charged_bytes - self.counters.resident_bytes - self.pool.pooled_bytes

    def pooled_bytes(self) -> int:
        with self.lock:
            return self.pool.pooled_bytes

    def evictable_bytes(self) -> int:
        """Resident bytes no pin holds (what the device shrinker could free)."""
        with self.lock:
            return self.counters.resident_bytes - self.pinned_bytes

    @staticmethod
    def protection_locked(
        group: GroupLike | None, for_group: GroupLike | None, leaving: int = 0
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

    # -- LRU --------------------------------------------------------------

    def lru_add_locked(self, bo: BufferObject) -> None:
        """List a resident, unpinned BO as the most recently used."""
        if bo not in self.lru and bo.is_purgeable:
            self.purgeable_resident += 1
        bo.used_at = time.monotonic()
        self.lru.add(bo)
        if bo.entry is not None:
            self.clean.add(bo)

    def lru_remove_locked(self, bo: BufferObject) -> None:
        if bo in self.lru:
            self.lru.remove(bo)
            self.clean.remove(bo)
            if bo.is_purgeable:
                self.purgeable_resident -= 1

    def lru_touch_locked(self, bo: BufferObject) -> None:
        bo.used_at = time.monotonic()
        self.lru.touch(bo)
        self.clean.touch(bo)

    def oldest_idle_locked(self) -> float | None:
        """When the first BO the walk would evict was last used (the
        system's monotonic clock, one clock for every process), or None."""
        for bo in self.lru:
            return bo.used_at
        return None

    def now_clean_locked(self, bo: BufferObject) -> None:
        """Resident ``bo`` got a clean store copy (``bo.entry`` is set)."""
        if bo in self.lru:
            self.clean.add(bo)

    def now_dirty_locked(self, bo: BufferObject) -> None:
        """Resident ``bo`` lost its clean store copy."""
        self.clean.remove(bo)

    def set_purgeable_locked(self, bo: BufferObject, value: bool) -> None:
        listed = bo in self.lru
        if listed:
            self.lru_remove_locked(bo)
        bo.is_purgeable = value
        if value:
            self.purgeable.add(bo)
        else:
            self.purgeable.discard(bo)
        if listed:
            self.lru_add_locked(bo)

    # -- events -------------------------------------------------------------

    def busy_locked(self, bo: BufferObject) -> bool:
        """Drop ``bo``'s completed events; True if some kernel still uses it."""
        if bo.events:
            bo.events[:] = [ev for ev in bo.events if not self.backend.is_complete(ev)]
        return bool(bo.events)

    def launches_in_flight_locked(self) -> bool:
        """True while a kernel this manager launched may still run."""
        self.launch_events[:] = [ev for ev in self.launch_events if not self.backend.is_complete(ev)]
        return bool(self.launch_events)

    def add_launch_locked(self, event: Any) -> None:
        if len(self.launch_events) > 64:
            self.launches_in_flight_locked()
        self.launch_events.append(event)

    # -- groups -------------------------------------------------------------

    def group_stats(self, grp: Group) -> GroupStats:
        """A snapshot of ``grp``: its usage is summed from its BOs."""
        with self.lock:
            mine = [bo for bo in self.bos.values() if bo.group is grp]
            return GroupStats(
                name=grp.name,
                max_bytes=grp.max_bytes,
                low_bytes=grp.low_bytes,
                min_bytes=grp.min_bytes,
                resident_bytes=sum(bo.nbytes for bo in mine if bo.state is State.RESIDENT),
                swapped_bytes=sum(bo.nbytes for bo in mine if bo.state is State.SWAPPED),
                bo_count=len(mine),
                evictions=grp.evictions,
            )


class _LiveSizes:
    """How many live BOs there are of each size, and the largest (a heap
    whose stale tops are popped lazily: O(log n) per BO instead of a scan)."""

    def __init__(self) -> None:
        self._count: Counter[int] = Counter()
        self._heap: list[int] = []  # -nbytes of the sizes in _in_heap
        self._in_heap: set[int] = set()

    def add(self, nbytes: int) -> None:
        if nbytes not in self._in_heap:
            self._in_heap.add(nbytes)
            heapq.heappush(self._heap, -nbytes)
        self._count[nbytes] += 1

    def remove(self, nbytes: int) -> None:
        self._count[nbytes] -= 1
        if not self._count[nbytes]:
            del self._count[nbytes]

    def largest(self) -> int:
        while self._heap and not self._count[-self._heap[0]]:
            self._in_heap.discard(-heapq.heappop(self._heap))
        return -self._heap[0] if self._heap else 0


class StoreAdmission:
    """The store room promised to live BOs: a BO is admitted only while the
    store can hold every live BO at once plus the room an eviction needs in
    transit, so that restoring any BO can always evict a victim (the store
    never traps a swapped BO). Protected by the resource lock."""

    def __init__(self, store: SwapStore) -> None:
        self.store = store
        self.committed_bytes = 0
        self._sizes = _LiveSizes()

    def admit_locked(self, nbytes: int, footprint: int) -> None:
        """Promise store room to a new BO, or raise StoreFull."""
        store = self.store
        largest = max(nbytes, self._sizes.largest())
        committed = self.committed_bytes + store.record_bytes
        transit = store.transit_bytes(largest)
        if committed + footprint + transit > store.capacity_bytes:
            raise StoreFull(
                f"the store cannot back {format_bytes(nbytes)} more: {format_bytes(committed)} of "
                f"{format_bytes(store.capacity_bytes)} is promised to live buffers and "
                f"{format_bytes(transit)} must stay free for eviction (the store must be larger)",
                nbytes=nbytes,
                free_bytes=max(0, store.capacity_bytes - committed - transit),
            )
        self.committed_bytes += footprint
        self._sizes.add(nbytes)

    def unadmit_locked(self, nbytes: int, footprint: int) -> None:
        self.committed_bytes -= footprint
        self._sizes.remove(nbytes)

    def check_record_locked(self, name: str, footprint: int, nbytes: int, label: str) -> None:
        """Raise StoreFull unless a record of ``footprint`` bytes for ``name``
        fits beside what is promised (a record holds its entry beyond what
        admission promised the BO)."""
        store = self.store
        others = self.committed_bytes + store.record_bytes - store.record_footprint(name)
        if others + footprint + store.transit_bytes(self._sizes.largest()) > store.capacity_bytes:
            raise StoreFull(
                f"no room in the store for a durable copy of {label} ({format_bytes(nbytes)})",
                nbytes=nbytes,
                free_bytes=max(0, store.capacity_bytes - others),
            )
