"""Eviction: the one walk over the LRU (TTM's ``ttm_lru_walk_for_evict``)
with its policy passed in, and the one dispatch that evicts what it chose.

Every caller that needs device memory back states what it needs as a
:class:`Policy` and a ``need`` (bytes still to free, asked under the
resource lock after every step):

=====================  =====================================================
caller                 policy
=====================  =====================================================
:meth:`make_room`      for a charge: victims' buffers pooled, waits for BOs
                       other threads hold, a group at its ``max`` evicts its own
:meth:`shrink_device`  the device shrinker: clean BOs first, buffers released,
                       non-blocking for the pressure monitor, then swapped
                       purgeable BOs are dropped too
:meth:`evict_group_to` a group's lower ``max``: only that group's BOs
:meth:`swap_out_all`   hibernate: every unpinned BO, protections ignored,
                       purgeable BOs swapped rather than dropped
=====================  =====================================================

Victim order (each in LRU order, lower priority first): purgeable idle BOs
(dropped, no I/O); then, per protection tier (see
:meth:`Resource.protection_locked`), idle BOs (for a shrink: those with a
clean store copy before dirty ones) and busy ones; busy BOs only if the
policy may block. Small victims that need a copy go in batches through one
staging buffer (:meth:`Mover.swap_out_batch`) wherever the walk evicts.

Owns nothing of its own: it reads and changes :class:`Resource` under its
lock, and holds ``room_lock`` while it walks (see :mod:`gpubo._resource`
for the lock order); victims are try-locked, never waited for.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from gpubo._bo import BufferObject, GroupLike
from gpubo._errors import OutOfDeviceMemory
from gpubo._move import Mover, pages
from gpubo._resource import NO_ROOM, Resource
from gpubo._state import State, needs_copy
from gpubo._units import format_bytes
from gpubo.store import PAGE_BYTES

__all__ = ["BATCH_BYTES", "BATCH_MAX_BO_BYTES", "Evictor", "Policy", "Walked"]

log = logging.getLogger(__name__)

#: How long a walk keeps waiting for BOs that other threads hold before it
#: gives up with OutOfDeviceMemory (a guard, not a tuning knob).
_ROOM_TIMEOUT_S = 60.0
#: BOs up to this size that need a copy are evicted in batches (gathered on
#: the device into one staging buffer that crosses to the store at once), and
#: prefetched in batches (their copies enqueued together, waited for once).
BATCH_MAX_BO_BYTES = 256 << 10
#: The most a batch moves at once: one slot-file cluster (2 MiB).
BATCH_BYTES = 2 << 20


@dataclass(frozen=True)
class Policy:
    """How one walk chooses and evicts (see the module docstring)."""

    #: Wait for kernels (busy BOs are taken last, after waiting); False: skip
    #: busy BOs, and dirty ones while any kernel of this manager may run
    #: (their copy would queue behind it), and batch nothing.
    may_block: bool = True
    #: Rank BOs with a clean store copy before dirty ones (a shrink).
    clean_first: bool = False
    #: Room is made for this group: its own BOs are not protected from it.
    for_group: GroupLike | None = None
    #: Take victims from this group only.
    only_group: GroupLike | None = None
    #: Spare groups within their ``min``/``low`` (False: hibernate).
    protect: bool = True
    #: Drop purgeable victims (False: swap them out like any other).
    purge: bool = True
    #: Victims' device buffers go to the pool (else they are released).
    keep_buffer: bool = False
    #: A batch's staging buffer stays for the next batch of this walk.
    keep_staging: bool = False
    #: When no victim can be taken now but one may soon (another thread holds
    #: it, or buffers are in flight), wait and walk again.
    wait: bool = False
    #: At the end, also drop swapped purgeable BOs (they hold store space).
    purge_swapped: bool = False
    #: Bytes the calling launch has pinned (their release is not waited for).
    own_pins: int = 0
    #: How long waiting may last before OutOfDeviceMemory (None: as long as
    #: it takes, like a blocking lock: hibernate).
    deadline_s: float | None = _ROOM_TIMEOUT_S
    #: Called with each evicted BO, its lock still held (hibernate syncs
    #: named ones as it goes, so that what is done stays done).
    after_evict: Callable[[BufferObject], None] | None = None
    #: Skip victims whose eviction would leave fewer charged bytes than this
    #: (a share member giving back no more than its ``share_min`` allows;
    #: checked under the resource lock, with the charge of the moment).
    floor_bytes: int | None = None


class Walked(NamedTuple):
    """What a walk did: ``done`` says whether ``need`` reached zero."""

    freed: int
    victims: int
    done: bool


#: The policies that do not depend on the call, built once (a walk is asked
#: for on every eviction decision; building a policy costs microseconds).
_SHRINK = {
    may_block: Policy(may_block=may_block, clean_first=True, keep_staging=True, purge_swapped=True)
    for may_block in (True, False)
}
_ROOM_FOR_ANYONE = Policy(keep_buffer=True, wait=True)


def _one_victim(want: int, freed: int) -> int:
    """A walk's ``need`` that takes one victim (``want`` bytes wanted)."""
    return want if freed == 0 else 0


class Evictor:
    """The eviction walk and its callers (see the module docstring)."""

    def __init__(self, resource: Resource, mover: Mover) -> None:
        self.res = resource
        self.mover = mover

    # -- the walk -----------------------------------------------------------------

    def walk(self, policy: Policy, need: Callable[[int], int]) -> Walked:
        """Evict victims chosen by ``policy`` while ``need(freed)`` (asked
        under the resource lock) is positive. The caller holds ``room_lock``.

        Raises:
            OutOfDeviceMemory: the policy waits, and the BOs that could be
                evicted stayed in use by other threads for a minute.
            StoreFull, StoreError, DeviceError: a victim could not be
                evicted (it stays resident; victims before it stay evicted).
        """
        res = self.res
        freed = victims = 0
        deadline: float | None = None
        done = False
        while True:
            batch: list[BufferObject] = []
            with res.lock:
                want = need(freed)
                if want <= 0:
                    done = True
                    break
                victim, can_wait = self._pick_locked(policy)
                if victim is None:
                    if not (policy.wait and can_wait):
                        break
                    if deadline is None:
                        deadline = time.monotonic() + (policy.deadline_s or 0.0)
                    elif policy.deadline_s is not None and time.monotonic() > deadline:
                        raise OutOfDeviceMemory(
                            f"timed out freeing {format_bytes(want)}: the evictable buffers stayed "
                            "in use by other threads",
                            nbytes=want,
                            budget=res.budget,
                        )
                    res.cond.wait(0.005)
                    continue
                if policy.may_block:  # a batch waits for the queue
                    limit = self._batch_limit_locked(victim, want)
                    if limit:
                        batch = self._extend_batch_locked(victim, limit, policy, want)
            try:
                freed += self._evict(victim, batch, policy)
                victims += 1 + len(batch)
                if policy.after_evict is not None:
                    for bo in (victim, *batch):
                        policy.after_evict(bo)
            finally:
                victim.lock.release()
                for bo in batch:
                    bo.lock.release()
        if policy.purge_swapped:
            self._purge_swapped()
        return Walked(freed, victims, done)

    def _evict(self, victim: BufferObject, batch: list[BufferObject], policy: Policy) -> int:
        """The one dispatch: purge, clean drop, batch or single copy; device
        bytes freed. Holds the lock of ``victim`` and of each of ``batch``."""
        if victim.is_purgeable and policy.purge:
            return self.mover.purge_locked(victim)
        if batch:
            return self.mover.swap_out_batch([victim, *batch], policy.keep_buffer, policy.keep_staging)
        self.mover.swap_out_locked(victim, policy.keep_buffer)  # a clean or zero BO copies nothing
        return victim.nbytes

    def _tier_locked(self, bo: BufferObject, policy: Policy, leaving: int = 0) -> int | None:
        if not policy.protect:
            return 0
        return self.res.protection_locked(bo.group, policy.for_group, leaving)

    def _pick_locked(self, policy: Policy) -> tuple[BufferObject | None, bool]:
        """The next victim, returned with its lock held, or ``(None, wait)``:
        ``wait`` says whether waiting could help (BOs locked by other
        threads, buffers in flight, other launches' pins)."""
        res = self.res
        only = policy.only_group
        purge = policy.purge
        contended = False
        ranked: dict[int, list[BufferObject]] = {}
        queue_busy = not policy.may_block and res.launches_in_flight_locked()
        no_purgeable = not res.purgeable_resident or not purge
        largest = None if policy.floor_bytes is None else res.charged_bytes - policy.floor_bytes
        if policy.clean_first and no_purgeable:
            # Fast paths, in rank order: the first idle clean BO, else (none
            # exists) the first idle dirty one; the full ranking below only
            # when protections or busy BOs are in the way.
            for lst, dirty in ((res.clean, False), (res.lru, True)):
                for bo in lst:
                    if (dirty and bo.entry is not None) or (only is not None and bo.group is not only):
                        continue
                    if largest is not None and bo.nbytes > largest:
                        continue
                    if (policy.protect and res.protection_locked(bo.group, policy.for_group) != 0) or (
                        res.busy_locked(bo)
                    ):
                        continue
                    if dirty and queue_busy and not bo.known_zero:
                        continue
                    if bo.lock.acquire(blocking=False):
                        return bo, False
                    contended = True
                if not dirty and contended:
                    break  # a clean BO exists but is in use: rank properly below
        protect = policy.protect
        for bo in res.lru:
            if (only is not None and bo.group is not only) or (largest is not None and bo.nbytes > largest):
                continue
            tier = res.protection_locked(bo.group, policy.for_group) if protect else 0
            if tier is None:
                continue
            busy = res.busy_locked(bo)
            dropped = bo.is_purgeable and purge
            if not policy.may_block and (busy or (not dropped and needs_copy(bo) and queue_busy)):
                # Copying it out would wait on the in-order queue behind
                # every kernel enqueued before: not for a non-blocking walk.
                continue
            if dropped and not busy:
                rank = 0
            elif busy:
                rank = 6 + tier
            elif policy.clean_first:
                rank = 1 + 2 * tier + (bo.entry is None)
            else:
                rank = 1 + 2 * tier
            if rank == 0 or (rank == 1 and no_purgeable):
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
        others_pins = res.launch_pinned_bytes - policy.own_pins
        return None, contended or res.in_flight_locked() > 0 or others_pins > 0

    def _batch_limit_locked(self, victim: BufferObject, need: int) -> int:
        """Bytes of more victims to evict together with ``victim`` (0: evict it
        alone). A batch needs a staging buffer from the budget's free room, so
        its size is bounded by that room (which each batch grows), by
        :data:`BATCH_BYTES`, and by the ``need`` still to free."""
        if victim.is_purgeable or victim.nbytes > BATCH_MAX_BO_BYTES or not needs_copy(victim):
            return 0
        held = self.mover.staging_bytes()  # reused by the next batch
        room = min(self.res.limit - self.res.charged_bytes + held, BATCH_BYTES) // PAGE_BYTES * PAGE_BYTES
        first = pages(victim.nbytes)
        if room < 2 * PAGE_BYTES or need <= victim.nbytes or room <= first:
            return 0
        return min(room - first, need - victim.nbytes)

    def _extend_batch_locked(
        self, victim: BufferObject, limit: int, policy: Policy, need: int
    ) -> list[BufferObject]:
        """More victims for ``victim``'s batch, locked, in LRU order: the idle,
        unprotected, non-purgeable BOs that the walk would pick next, as long
        as the ones needing a copy are small and fit ``limit`` staging bytes,
        and the batch frees no more than ``need``. A large BO needing a copy
        ends the batch (it goes alone, in order)."""
        res = self.res
        only = policy.only_group
        batch: list[BufferObject] = []
        staged = 0
        taken = victim.nbytes
        leaving: Counter[GroupLike | None] = Counter({victim.group: victim.nbytes})  # protections as if gone
        for bo in res.lru:
            if taken >= need:
                break
            if bo is victim or bo.is_purgeable or (only is not None and bo.group is not only):
                continue
            if self._tier_locked(bo, policy, leaving[bo.group]) != 0:
                continue
            if res.busy_locked(bo):
                continue
            copy = needs_copy(bo)
            if copy and (bo.nbytes > BATCH_MAX_BO_BYTES or staged + pages(bo.nbytes) > limit):
                break
            if not bo.lock.acquire(blocking=False):
                continue  # another thread uses it
            batch.append(bo)
            taken += bo.nbytes
            leaving[bo.group] += bo.nbytes
            staged += pages(bo.nbytes) if copy else 0
            if staged >= limit:
                break
        return batch

    def _purge_swapped(self) -> None:
        """Drop swapped purgeable BOs too: they hold store space, not device memory."""
        with self.res.lock:
            swapped = [bo for bo in self.res.purgeable if bo.state is State.SWAPPED]
        for bo in swapped:
            if not bo.lock.acquire(blocking=False):
                continue
            try:
                with self.res.lock:
                    still = bo.state is State.SWAPPED and bo.is_purgeable and not bo.pin_count
                if still:
                    self.mover.purge_locked(bo)
            finally:
                bo.lock.release()

    # -- the callers: each a policy and a need -----------------------------------------

    def make_room(self, nbytes: int, group: GroupLike | None, own_pins: int = 0) -> Any:
        """Evict until ``nbytes`` can be charged to the budget and ``group``;
        a pooled buffer of exactly that size, or None (the caller allocates).
        Holds ``room_lock``. The pool is drained before any BO is evicted;
        a group at its ``max`` evicts its own BOs. In a share, members whose
        idle BOs are older than this manager's are asked first, and every
        member when this manager's own BOs cannot make the room.

        Raises:
            OutOfDeviceMemory: pins leave no room, or nothing evictable is
                left (or stays in use by other threads for a minute).
        """
        res = self.res
        with res.lock:
            # Other threads' launches pin their arguments only while enqueuing:
            # wait for those rather than fail.
            lasting = res.pinned_bytes - (res.launch_pinned_bytes - own_pins)
            if nbytes > res.cap - lasting:  # evicting could not help
                raise OutOfDeviceMemory(
                    f"cannot make room for {format_bytes(nbytes)}: {format_bytes(res.pinned_bytes)} "
                    f"of the {format_bytes(res.cap)} {'budget' if res.share is None else 'share_max'} "
                    "is pinned",
                    nbytes=nbytes,
                    budget=res.budget,
                )
        share = res.share
        deadline = time.monotonic() + _ROOM_TIMEOUT_S
        while True:
            with res.lock:
                got = res.try_charge_locked(nbytes, group)
                if got is not NO_ROOM:
                    return got
                want, only = res.need_locked(nbytes, group)
                drain = want if only is None and res.pool.pooled_bytes else 0
                # A share's peers can help only while this manager is below its cap.
                ask = share is not None and only is None and res.charged_bytes + nbytes <= res.cap
                if ask:
                    oldest = res.oldest_idle_locked()
                    own = res.counters.resident_bytes - res.pinned_bytes  # what evicting here could free
            if drain:  # the pool goes before anyone is evicted
                self.mover.drain_pool(drain)
                continue
            if ask and time.monotonic() < deadline:
                assert share is not None
                # Peers with older idle BOs first; anyone, if this manager cannot free enough.
                older = None if own < want else (math.inf if oldest is None else oldest)
                if share.ask_peers(want, older):
                    continue
            if group is None and only is None and not own_pins:
                policy = _ROOM_FOR_ANYONE
            else:
                policy = Policy(
                    for_group=group, only_group=only, keep_buffer=True, wait=True, own_pins=own_pins
                )

            def need(freed: int, only: GroupLike | None = only) -> int:
                # Ends the walk when the charge fits, or when what is needed
                # changed (the group is under its max, the pool has buffers).
                want, now = res.need_locked(nbytes, group)
                return want if now is only and not (only is None and res.pool.pooled_bytes) else 0

            if self.walk(policy, need).done:
                continue
            if ask and time.monotonic() < deadline:
                assert share is not None
                if share.ask_peers(want, None):
                    continue
            with res.lock:
                where = (
                    f"group {only.name!r} (max {format_bytes(only.max_bytes or 0)})"
                    if only is not None
                    else f"the budget ({format_bytes(res.budget)})"
                )
                held = f"; {share.describe()}" if share is not None else ""
                raise OutOfDeviceMemory(
                    f"cannot make room for {format_bytes(nbytes)} in {where}: "
                    f"{format_bytes(res.counters.resident_bytes)} resident, "
                    f"{format_bytes(res.pinned_bytes)} pinned, the rest protected or in use{held}",
                    nbytes=nbytes,
                    budget=res.budget,
                )

    def shrink_device(self, nbytes: int, may_block: bool) -> int:
        """The device shrinker: free up to ``nbytes`` of device memory by
        purging and evicting (buffers released, not pooled); bytes freed.
        With ``may_block`` False (the pressure monitor) it neither waits for
        another thread making room nor for a kernel: it skips busy BOs."""
        if not self.res.room_lock.acquire(blocking=may_block):
            return 0
        try:
            return self.walk(_SHRINK[may_block], lambda freed: nbytes - freed).freed
        finally:
            self.mover.drop_staging()
            self.res.room_lock.release()

    def give_back(self, nbytes: int, floor: int, deadline: float) -> tuple[int, bool]:
        """Device bytes freed for a share peer's request, and whether it was
        refused because another thread of this manager is making room (a
        retry may help). Pooled buffers first, then victims of a
        non-blocking walk (try-locks only, busy BOs skipped: the serving
        side never waits for a BO or for ``room_lock``), one at a time, none
        whose eviction would leave fewer than ``floor`` charged bytes (the
        member's protection), until ``deadline`` (``time.monotonic()``)."""
        if not self.res.room_lock.acquire(blocking=False):
            return 0, True
        try:
            freed = self.mover.drain_pool(nbytes)
            policy = Policy(may_block=False, clean_first=True, floor_bytes=floor)
            while freed < nbytes and time.monotonic() < deadline:
                walked = self.walk(policy, functools.partial(_one_victim, nbytes - freed))
                if not walked.victims:
                    break
                freed += walked.freed
        finally:
            self.res.room_lock.release()
        return freed, False

    def evict_group_to(self, grp: GroupLike, max_bytes: int) -> None:
        """Evict ``grp``'s BOs until it holds at most ``max_bytes``. Holds ``room_lock``.

        Raises:
            OutOfDeviceMemory: what is left is pinned or in use.
        """
        policy = Policy(for_group=grp, only_group=grp)
        try:
            walked = self.walk(policy, lambda freed: grp.charged_bytes - max_bytes)
        finally:
            self.mover.drop_staging()
        if not walked.done:
            raise OutOfDeviceMemory(
                f"group {grp.name!r} holds {format_bytes(grp.charged_bytes)} that cannot be "
                f"evicted below its new max {format_bytes(max_bytes)} (pinned or in use); "
                "the limits are unchanged",
                budget=self.res.budget,
            )

    def swap_out_all(self, after_evict: Callable[[BufferObject], None] | None = None) -> int:
        """Swap out every BO unpinned now (hibernate), waiting for BOs other
        threads hold as long as it takes; how many. ``after_evict`` runs on
        each, its lock held. BOs that become resident meanwhile are not
        chased (at most the bytes resident at the start are evicted). Holds
        ``room_lock``."""
        res = self.res
        with res.lock:
            start = res.counters.resident_bytes - res.pinned_bytes
        policy = Policy(protect=False, purge=False, wait=True, deadline_s=None, after_evict=after_evict)

        def need(freed: int) -> int:
            return min(start - freed, res.counters.resident_bytes - res.pinned_bytes)

        try:
            return self.walk(policy, need).victims
        finally:
            self.mover.drop_staging()
