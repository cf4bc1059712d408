"""Named records: a BO's content committed under its name in the store, so
that a later manager on the same store can ``open`` it (TTM's backup, made
durable); ``sync`` and ``hibernate``.

Owns nothing of its own. Opening takes the resource lock around the
store's ``lookup`` and the admission (so that both see one store); a sync
holds the BO's lock while it copies and commits, and checks the record's
room under the resource lock (see :mod:`gpubo._resource`).
"""

from __future__ import annotations

import logging
from typing import Any

from gpubo._bo import BufferObject, BufferOps
from gpubo._errors import NameNotFound, Purged
from gpubo._evict import Evictor
from gpubo._move import Mover
from gpubo._resource import Resource, StoreAdmission
from gpubo._state import State, enter
from gpubo.store import SwapStore

__all__ = ["Records"]

log = logging.getLogger(__name__)


class Records:
    """Named records of one manager (see the module docstring)."""

    def __init__(
        self, resource: Resource, admission: StoreAdmission, mover: Mover, evictor: Evictor, store: SwapStore
    ) -> None:
        self.res = resource
        self.admission = admission
        self.mover = mover
        self.evictor = evictor
        self.store = store

    def open(self, name: str, priority: int, owner: Any, ops: BufferOps) -> BufferObject:
        """A new swapped BO holding the record ``name`` (validated by the caller).

        Raises:
            NameNotFound, IntegrityError, StoreFull, ManagerClosed: see
                :meth:`Manager.open`.
        """
        with self.res.lock:
            self.res.check_open_locked()
            entry = self.store.lookup(name)
            if entry is None:
                raise NameNotFound(f"the store at {self.store.path} has no buffer named {name!r}")
            footprint = self.store.footprint(entry.nbytes)
            try:
                self.admission.admit_locked(entry.nbytes, footprint)
            except BaseException:
                self.store.release(entry)
                raise
            bo = BufferObject(
                owner, ops, self.res.next_id(), entry.nbytes, name, priority, footprint, None, entry
            )
            self.res.bos[bo.id] = bo
            enter(bo, self.res.counters)
        log.debug("opened %r", bo)
        return bo

    def sync(self, bo: BufferObject) -> None:
        if bo.name is None:
            raise ValueError(f"sync needs a named buffer object; {bo.label()} has no name")
        with bo.lock:
            self.mover.check_alive(bo)
            self.sync_locked(bo)

    def sync_locked(self, bo: BufferObject) -> None:
        """Commit ``bo``'s current content as its name's record. Holds ``bo.lock``."""
        assert bo.name is not None
        if bo.state is State.PURGED:
            raise Purged(f"{bo.label()} was purged; write it before syncing")
        if bo.state is State.RESIDENT and bo.entry is None:
            with self.res.lock:
                events = list(bo.events)
            self.mover.backend.wait(events)  # a kernel may still be writing it
            copied = self.mover.write_entry_locked(bo)
            with self.res.lock:
                self.res.counters.bytes_evicted += copied
                self.res.now_clean_locked(bo)  # stays resident, now with a clean store copy
        entry = bo.entry
        assert entry is not None
        with self.res.lock:
            self.admission.check_record_locked(bo.name, entry.footprint, bo.nbytes, bo.label())
        self.store.commit_name(bo.name, entry)

    def hibernate(self) -> int:
        """Swap out every unpinned BO, committing each named one's record as
        it goes, then the named BOs left (pinned, already swapped); the
        number of BOs swapped out (see :meth:`Manager.hibernate`). A record
        already committed for the same entry costs nothing the second time."""

        def sync_named(bo: BufferObject) -> None:
            if bo.name is not None:
                self.sync_locked(bo)  # done as it goes: a later StoreFull leaves it done

        with self.res.room_lock:
            swapped = self.evictor.swap_out_all(after_evict=sync_named)
            with self.res.lock:
                live = sorted(self.res.bos.values(), key=lambda b: b.id)
            for bo in live:
                if bo.name is None:
                    continue
                with bo.lock:
                    if bo.state not in (State.FREED, State.PURGED):
                        self.sync_locked(bo)
            self.mover.drain_pool(None)
        return swapped
