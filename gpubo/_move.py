"""Moving buffer objects (TTM's ``ttm_bo_handle_move_mem`` and
``ttm_bo_util.c``): one BO or a batch between the device and the store,
restore, revive, purge, free, and the device buffers they need.

Owns: the staging buffer of batched evictions (``_staging``, guarded by the
resource's ``room_lock``). Everything else it changes belongs to
:class:`gpubo._resource.Resource` (under its lock) or to the BO (under its
lock); state moves go through :func:`gpubo._state.move`, byte copies through
the transfer strategy of :mod:`gpubo._transfer` (``map`` or ``bounce``).
Room is made by a :class:`RoomMaker` (the eviction walk,
:class:`gpubo._evict.Evictor`), which uses this module to evict: it is
passed in, so the imports point one way.

The invariants of each move, in order:

* swap out: store space is reserved (StoreFull changes nothing) -> wait for
  the BO's kernels -> copy -> commit the entry -> only then the device
  buffer goes to the pool or is released;
* restore: reserve budget -> device buffer -> copy -> verify -> commit; on
  any failure the BO stays swapped with its entry;
* a device buffer is released first and uncharged after, never the other way.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from gpubo._bo import BufferObject, BufferOps, GroupLike
from gpubo._errors import (
    BufferBusy,
    BufferFreed,
    GpuboError,
    ManagerClosed,
    OutOfDeviceMemory,
    Purged,
    StoreError,
)
from gpubo._resource import NO_ROOM, PINNED, Resource, StoreAdmission
from gpubo._state import State, enter, move, needs_copy
from gpubo._transfer import MapTransfer, replace_bytes, zero_fill
from gpubo._units import format_bytes
from gpubo.backends.base import Backend
from gpubo.store import PAGE_BYTES, Entry, SwapStore

__all__ = ["Mover", "RoomMaker", "pages"]

log = logging.getLogger(__name__)


def pages(nbytes: int) -> int:
    """``nbytes`` rounded up to whole pages."""
    return -(-nbytes // PAGE_BYTES) * PAGE_BYTES


class RoomMaker(Protocol):
    """What the mover needs from the eviction walk."""

    def make_room(self, nbytes: int, group: GroupLike | None, own_pins: int) -> Any:
        """Evict until ``nbytes`` can be charged to the budget and ``group``;
        return a pooled buffer of that size or None (the charge is taken).
        ``own_pins``: bytes the calling launch pins (not waited for)."""
        ...

    def shrink_device(self, nbytes: int, may_block: bool) -> int: ...


class Mover:
    """Moves BOs between the device and the store (see the module docstring)."""

    def __init__(
        self,
        resource: Resource,
        admission: StoreAdmission,
        backend: Backend,
        store: SwapStore,
        transfer: MapTransfer,
    ) -> None:
        self.res = resource
        self.admission = admission
        self.backend = backend
        self.store = store
        self.transfer = transfer  # the strategy every BO copy goes through (see gpubo._transfer)
        self.room: RoomMaker | None = None  # wired by the Manager once the walk exists
        self._staging: tuple[Any, int] | None = None

    # -- helpers --------------------------------------------------------------

    @staticmethod
    def check_alive(bo: BufferObject) -> None:
        if bo.state is State.FREED:
            raise BufferFreed(f"buffer object {bo.label()} was freed")

    @staticmethod
    def buf(bo: BufferObject) -> Any:
        """The device buffer of a resident BO (caller holds ``bo.lock``)."""
        assert bo.buf is not None, f"{bo!r} has no device buffer"
        return bo.buf

    def _room(self) -> RoomMaker:
        assert self.room is not None, "the mover has no eviction walk wired"
        return self.room

    # -- device buffers -------------------------------------------------------

    def release(self, buf: Any, nbytes: int, group: GroupLike | None = None) -> None:
        """Release a charged buffer, then uncharge it (never the other way);
        ``group`` for a buffer still charged to one (in flight)."""
        self.backend.release(buf)
        self.res.uncharge(nbytes, group)

    def release_entry(self, entry: Entry) -> None:
        try:
            self.store.release(entry)
        except StoreError as e:  # the bytes were already safe elsewhere
            log.error("could not release a store entry (%d bytes stay in use): %s", entry.footprint, e)

    def drain_pool(self, target: int | None) -> int:
        """Release pooled buffers until at least ``target`` bytes are released
        (``None``: all of them); return bytes released."""
        with self.res.lock:
            if not self.res.pool.pooled_bytes:
                return 0
            taken = self.res.pool.take_many_locked(target)
        released = 0
        for buf, size in taken:
            self.release(buf, size)
            released += size
        return released

    def new_buffer(self, nbytes: int, zero: bool, group: GroupLike | None = None, own_pins: int = 0) -> Any:
        """A device buffer of ``nbytes`` charged to the budget and to ``group``
        (zeroed if ``zero``).

        Raises:
            OutOfDeviceMemory: no room could be made, or the device itself is
                out of memory with nothing left to evict.
        """
        buf = self._charge(nbytes, group, own_pins)
        while buf is None:
            try:
                return self.backend.allocate(nbytes, zero=zero)
            except OutOfDeviceMemory as e:
                # The device is fuller than the budget says (other users,
                # fragmentation, or a budget above the device's memory).
                self.res.uncharge(nbytes, group)
                with self.res.room_lock:
                    freed = self.drain_pool(None) + self._room().shrink_device(nbytes, may_block=True)
                    if not freed:
                        raise OutOfDeviceMemory(
                            f"the device cannot allocate {format_bytes(nbytes)} even with every "
                            "evictable buffer evicted",
                            nbytes=nbytes,
                            budget=self.res.budget,
                        ) from e
                    log.info("device out of memory below the budget; freed %d bytes", freed)
                    buf = self._charge(nbytes, group, own_pins)
        if zero:
            try:
                zero_fill(self.backend, buf, nbytes)
            except BaseException:
                self.release(buf, nbytes, group)
                raise
        return buf

    def _charge(self, nbytes: int, group: GroupLike | None, own_pins: int) -> Any:
        """Charge ``nbytes``, evicting if needed: a pooled buffer of exactly
        ``nbytes`` (content undefined) when one can be reused, else None."""
        with self.res.lock:
            got = self.res.try_charge_locked(nbytes, group)
        if got is not NO_ROOM:
            return got
        with self.res.room_lock:
            return self._room().make_room(nbytes, group, own_pins)

    def staging_buffer(self, nbytes: int) -> Any | None:
        """A staging buffer of at least ``nbytes`` charged to the budget's free
        room, or None when there is no room (nothing is evicted for it). A
        walk keeps it between its batches and gives it back at the end
        (:meth:`drop_staging`). Holds ``room_lock``."""
        if self._staging is not None:
            if self._staging[1] >= nbytes:
                return self._staging[0]
            self.drop_staging()
        with self.res.lock:
            got = self.res.try_charge_locked(nbytes, None)
        if got is NO_ROOM:
            return None
        if got is None:
            try:
                # Only the bytes the gather writes are ever read back.
                got = self.backend.allocate(nbytes, kernel_queue=True, zero=False)
            except OutOfDeviceMemory:
                self.res.uncharge(nbytes, None)
                log.info("no device memory for a %d-byte staging buffer: evicting one by one", nbytes)
                return None
            except BaseException:
                self.res.uncharge(nbytes, None)
                raise
        self._staging = (got, nbytes)
        return got

    def staging_bytes(self) -> int:
        """Bytes of the staging buffer kept for the next batch (0: none)."""
        return self._staging[1] if self._staging is not None else 0

    def drop_staging(self) -> None:
        """Release the staging buffer, if any. Holds ``room_lock``."""
        if self._staging is not None:
            buf, nbytes = self._staging
            self._staging = None
            self.release(buf, nbytes)

    # -- making a BO resident ---------------------------------------------------

    def lock_resident(
        self,
        bo: BufferObject,
        replace_with: np.ndarray | None = None,
        revive: bool = False,
        own_pins: int = 0,
    ) -> bool:
        """Return holding ``bo.lock`` with ``bo`` resident, or raise holding nothing.

        With ``replace_with`` (the BO's complete new content) a swapped or
        purged BO is brought in with those bytes instead of its stored ones;
        the result says whether that happened. A purged BO raises Purged,
        unless ``revive`` (a write): then it comes back zero-filled.
        ``own_pins``: bytes the calling launch has pinned already.
        """
        bo.lock.acquire()
        if bo.state is State.RESIDENT:
            return False
        bo.lock.release()
        # Restoring may evict others: take the room lock first (lock order).
        with self.res.room_lock:
            bo.lock.acquire()
            try:
                self.check_alive(bo)
                if bo.state is State.SWAPPED:
                    self._restore_locked(bo, replace_with, own_pins)
                    return replace_with is not None
                if bo.state is State.PURGED:
                    if not revive:
                        raise Purged(f"{bo.label()} was purgeable and its content was dropped")
                    self._revive_locked(bo, replace_with, own_pins)
                    return replace_with is not None
                return False
            except BaseException:
                bo.lock.release()
                raise

    def restore(self, bo: BufferObject) -> None:
        """Make ``bo`` resident (restoring it if swapped) and count it as a use."""
        self.lock_resident(bo)
        try:
            with self.res.lock:
                self.res.lru_touch_locked(bo)
        finally:
            bo.lock.release()

    def read_swapped(self, bo: BufferObject, dest: np.ndarray, offset: int) -> bool:
        """Fill ``dest`` (flat uint8) with ``bo``'s bytes from ``offset``
        straight from its store entry, verified, if ``bo`` is swapped; it
        stays swapped and its LRU place is unchanged. False (nothing read)
        if it is resident.

        Raises:
            BufferFreed, Purged: ``bo`` was freed or purged.
            IntegrityError, StoreError: as a restore's read.
        """
        with bo.lock:
            self.check_alive(bo)
            if bo.state is State.PURGED:
                raise Purged(f"{bo.label()} was purgeable and its content was dropped")
            if bo.state is not State.SWAPPED:
                return False
            entry = bo.entry
            assert entry is not None
            if offset == 0 and dest.nbytes == bo.nbytes:
                self.store.read_into(entry, dest.data, bo.label())
            else:
                whole = np.empty(bo.nbytes, np.uint8)
                self.store.read_into(entry, whole.data, bo.label())
                dest[:] = whole[offset : offset + dest.nbytes]
        return True

    def _restore_locked(self, bo: BufferObject, replace_with: np.ndarray | None, own_pins: int) -> None:
        """Bring swapped ``bo`` back. Holds ``room_lock`` and ``bo.lock``. The
        entry is kept as the BO's clean copy (released when it is dirtied)."""
        entry = bo.entry
        assert entry is not None
        buf = self._filled_buffer(bo, entry if replace_with is None else None, replace_with, own_pins)
        with self.res.lock:
            self._restored_locked(bo, buf)
            if replace_with is None:
                self.res.counters.restores += 1
                self.res.counters.bytes_restored += bo.nbytes
            else:
                bo.entry = None
                bo.known_zero = False
        if replace_with is not None:
            self.release_entry(entry)
        log.debug("restored %r", bo)

    def _restored_locked(self, bo: BufferObject, buf: Any) -> None:
        """Swapped ``bo`` is resident in ``buf``. Its entry stays as the swap
        cache: evicting it again while it is clean costs no copy."""
        move(bo, State.RESIDENT, self.res.counters)
        bo.buf = buf
        self.res.lru_add_locked(bo)

    def restore_batch(self, bos: Sequence[BufferObject]) -> None:
        """Restore ``bos`` together (nothing when fewer than two can be). BOs
        another thread holds or that are no longer swapped are left out, for
        the caller to restore one by one.

        Raises:
            GpuboError: as a restore; then none of them was restored.
        """
        with self.res.room_lock:
            batch: list[BufferObject] = []
            try:
                for bo in bos:
                    if not bo.lock.acquire(blocking=False):
                        continue  # another thread holds it, or it is listed twice
                    if bo.state is State.SWAPPED and bo.entry is not None:
                        batch.append(bo)
                    else:
                        bo.lock.release()
                if len(batch) >= 2:
                    self._restore_batch_locked(batch)
            finally:
                for bo in batch:
                    bo.lock.release()

    def _restore_batch_locked(self, bos: list[BufferObject]) -> None:
        """A device buffer each, then their copies enqueued together
        (:func:`swap_in_batch`). All or nothing."""
        bufs: list[Any] = []
        try:
            parts = []
            for bo in bos:
                assert bo.entry is not None
                bufs.append(self.new_buffer(bo.nbytes, zero=False, group=bo.group))
                parts.append((bo.entry, bufs[-1], bo.label()))
            self.transfer.swap_in_batch(parts)
        except BaseException:
            for bo, buf in zip(bos, bufs, strict=False):
                self.release(buf, bo.nbytes, bo.group)
            raise
        with self.res.lock:
            for bo, buf in zip(bos, bufs, strict=True):
                self._restored_locked(bo, buf)
                self.res.counters.bytes_restored += bo.nbytes
            self.res.counters.restores += len(bos)
            self.res.counters.restore_batches += 1
        if log.isEnabledFor(logging.DEBUG):
            for bo in bos:
                log.debug("restored %r (batched)", bo)

    def _filled_buffer(
        self, bo: BufferObject, entry: Entry | None, content: np.ndarray | None, own_pins: int = 0
    ) -> Any:
        """A device buffer for ``bo`` (charged to the budget and its group)
        holding ``content``, else ``entry``'s verified bytes, else zeros; on
        any failure it is released and nothing else changed."""
        buf = self.new_buffer(
            bo.nbytes, zero=entry is None and content is None, group=bo.group, own_pins=own_pins
        )
        try:
            if content is not None:
                replace_bytes(self.backend, buf, content)
            elif entry is not None:
                self.transfer.swap_in(entry, buf, bo.label())
        except BaseException:
            self.release(buf, bo.nbytes, bo.group)
            raise
        return buf

    def _revive_locked(self, bo: BufferObject, replace_with: np.ndarray | None, own_pins: int) -> None:
        """Bring purged ``bo`` back, zero-filled or with ``replace_with``."""
        buf = self._filled_buffer(bo, None, replace_with, own_pins)
        with self.res.lock:
            move(bo, State.RESIDENT, self.res.counters)
            bo.buf = buf
            bo.known_zero = replace_with is None
            self.res.lru_add_locked(bo)
        log.debug("revived %r", bo)

    # -- taking a BO off the device ---------------------------------------------

    def purge_locked(self, bo: BufferObject) -> int:
        """Drop purgeable ``bo``'s content (no I/O); device bytes freed.
        Holds ``bo.lock``; ``bo`` is resident or swapped and not pinned."""
        with self.res.lock:
            events = list(bo.events)
        self.backend.wait(events)
        buf, entry = bo.buf, bo.entry
        with self.res.lock:
            self.res.lru_remove_locked(bo)
            move(bo, State.PURGED, self.res.counters)
            bo.buf = bo.entry = None
            bo.events.clear()
            bo.known_zero = False
            self.res.counters.purges += 1
        if buf is not None:
            self.release(buf, bo.nbytes)
        if entry is not None:
            self.release_entry(entry)
        log.debug("purged %r", bo)
        return bo.nbytes if buf is not None else 0

    def swap_out_locked(self, bo: BufferObject, keep_buffer: bool) -> None:
        """Evict resident, unpinned ``bo``; the caller holds ``bo.lock``.
        ``keep_buffer``: its device buffer goes to the pool (else released)."""
        with self.res.lock:
            events = list(bo.events)
        self.backend.wait(events)
        copied = self.write_entry_locked(bo)
        self._swapped_out([bo], copied, keep_buffer)

    def _swapped_out(self, bos: list[BufferObject], copied: int, keep_buffer: bool) -> None:
        """Bookkeeping once the entries of ``bos`` (``copied`` bytes in all)
        are committed. Holds every ``bo.lock``."""
        bufs = [(self.buf(bo), bo.nbytes) for bo in bos]
        with self.res.lock:
            for bo, (buf, nbytes) in zip(bos, bufs, strict=True):
                self.res.lru_remove_locked(bo)
                move(bo, State.SWAPPED, self.res.counters)
                bo.buf = None
                bo.events.clear()
                if bo.group is not None:
                    bo.group.evictions += 1
                if keep_buffer:
                    self.res.pool.put_locked(buf, nbytes)
            self.res.counters.evictions += len(bos)
            self.res.counters.bytes_evicted += copied
        if not keep_buffer:
            released = 0
            for buf, nbytes in bufs:
                self.backend.release(buf)
                released += nbytes
            self.res.uncharge(released, None)  # released first, then uncharged
        if log.isEnabledFor(logging.DEBUG):
            for bo in bos:
                log.debug("evicted %r", bo)

    def swap_out_batch(self, victims: list[BufferObject], keep_buffer: bool, keep_staging: bool) -> int:
        """Evict ``victims`` (locked by the caller, resident, unpinned, idle);
        bytes they held. Those needing a copy go through one staging buffer
        charged to the budget; without room for it, each goes alone."""
        copy: list[BufferObject] = []
        for bo in victims:
            if needs_copy(bo):
                copy.append(bo)
            else:
                self.swap_out_locked(bo, keep_buffer)  # no copy: nothing to batch
        layout, offset = [], 0
        for bo in copy:
            layout.append((offset, bo.nbytes))
            offset += pages(bo.nbytes)
        staging = self.staging_buffer(offset) if len(copy) > 1 else None
        if staging is None:
            for bo in copy:
                self.swap_out_locked(bo, keep_buffer)
            return sum(bo.nbytes for bo in victims)
        try:
            with self.res.lock:
                events = [ev for bo in copy for ev in bo.events]
            self.backend.wait(events)
            entries = self.transfer.swap_out_batch(
                staging, [(self.buf(bo), bo.nbytes) for bo in copy], layout
            )
        finally:
            if not keep_staging:
                self.drop_staging()
        for bo, entry in zip(copy, entries, strict=True):
            bo.entry = entry
        with self.res.lock:
            self.res.counters.eviction_batches += 1
        self._swapped_out(copy, sum(e.stored_bytes for e in entries), keep_buffer)
        return sum(bo.nbytes for bo in victims)

    def write_entry_locked(self, bo: BufferObject) -> int:
        """Give resident ``bo`` a clean store entry; bytes copied. Holds ``bo.lock``.

        Nothing to copy when the swap cache still holds its content, and no
        data I/O when it is untouched since allocation (all zeros).
        """
        if bo.entry is not None:
            return 0
        if bo.known_zero:
            bo.entry, copied = self.store.write_zeros(bo.nbytes), 0
        else:
            bo.entry = self.transfer.swap_out(self.buf(bo), bo.nbytes)
            copied = bo.entry.stored_bytes
        return copied

    def mark_dirty(self, bo: BufferObject) -> None:
        """``bo``'s device bytes may change: drop its clean store copy. Holds ``bo.lock``."""
        bo.known_zero = False
        if bo.entry is not None and bo.state is State.RESIDENT:
            with self.res.lock:
                entry, bo.entry = bo.entry, None
                self.res.now_dirty_locked(bo)
            self.release_entry(entry)

    # -- the end of a BO ----------------------------------------------------------

    def new_bo(
        self,
        owner: Any,
        ops: BufferOps,
        nbytes: int,
        name: str | None,
        priority: int,
        group: GroupLike | None,
    ) -> BufferObject:
        """A new resident, zero-filled BO (arguments checked by the caller):
        store room promised, then a device buffer, then listed.

        Raises:
            StoreFull, OutOfDeviceMemory, ManagerClosed: see :meth:`Manager.alloc`.
        """
        footprint = self.store.footprint(nbytes)
        res = self.res
        with res.lock:
            res.check_open_locked()
            self.admission.admit_locked(nbytes, footprint)
        try:
            buf = self.new_buffer(nbytes, zero=True, group=group)
        except BaseException:
            with res.lock:
                self.admission.unadmit_locked(nbytes, footprint)
            raise
        with res.lock:
            bo = BufferObject(owner, ops, res.next_id(), nbytes, name, priority, footprint, buf, group=group)
            closed = res.closed  # close() ran while we allocated
            if closed:
                self.admission.unadmit_locked(nbytes, footprint)
                bo.state = State.FREED
            else:
                res.bos[bo.id] = bo
                enter(bo, res.counters)
                res.lru_add_locked(bo)
        if closed:
            self.release(buf, nbytes, group)
            raise ManagerClosed("the manager was closed")
        log.debug("alloc %r", bo)
        return bo

    def free_all(self, live: list[BufferObject]) -> None:
        """At close: every BO freed, the pool drained and the queue finished,
        each whatever the others did. Holds ``room_lock``."""
        for bo in live:
            try:
                self.free(bo, force=True)
            except GpuboError as e:  # keep closing; the store goes anyway
                log.error("freeing %s at close failed: %s", bo.label(), e)
        try:
            self.drain_pool(None)
            self.backend.finish()
        except GpuboError as e:
            log.error("releasing device buffers at close failed: %s", e)

    def free(self, bo: BufferObject, force: bool = False) -> None:
        """Give back ``bo``'s device buffer (to the pool unless the manager is
        closing) and store space, after its kernels. Idempotent.

        Raises:
            BufferBusy: ``bo`` is pinned and not ``force``.
        """
        with bo.lock:
            if bo.state is State.FREED:
                return
            with self.res.lock:
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
            with self.res.lock:
                if bo.state is State.RESIDENT and not self.res.closed:
                    self.res.pool.put_locked(buf, bo.nbytes)  # for the next alloc/restore of this size
                    buf = None
                self.res.lru_remove_locked(bo)
                move(bo, State.FREED, self.res.counters)
                del self.res.bos[bo.id]
                self.res.purgeable.discard(bo)
                self.admission.unadmit_locked(bo.nbytes, bo.store_footprint)
                if bo.pin_count:
                    self.res.pinned_bytes -= bo.nbytes
                    bo.pin_count = 0
                    if bo.buf is not None:
                        PINNED.discard(self.backend.handle(bo.buf))
                bo.buf = bo.entry = None
                bo.events.clear()
                self.res.cond.notify_all()
            if buf is not None:
                self.release(buf, bo.nbytes)
            if entry is not None:
                self.release_entry(entry)
        log.debug("free %r", bo)
