"""What the methods of a :class:`BufferObject` and a :class:`Group` do:
each validates its arguments (at the edge, before anything changes) and
hands the work to the module that owns the job. Implements the
:class:`gpubo._bo.BufferOps` and :class:`gpubo._groups.GroupOps` protocols.

Owns nothing; every field it reads belongs to the pieces it is given.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np
import numpy.typing as npt

from gpubo._bo import BufferObject
from gpubo._checks import as_byte_array, as_out_array, check_dtype, check_int
from gpubo._errors import BufferBusy, OutOfDeviceMemory
from gpubo._evict import Evictor
from gpubo._groups import Group, GroupStats, check_limits
from gpubo._launch import Launcher
from gpubo._move import Mover
from gpubo._prefetch import Prefetcher
from gpubo._records import Records
from gpubo._resource import Resource
from gpubo._state import State
from gpubo._transfer import read_bytes, write_bytes
from gpubo._units import format_bytes

__all__ = ["BufferOps", "GroupOps"]


class BufferOps:
    """The operations behind :class:`BufferObject`'s methods."""

    def __init__(
        self, resource: Resource, mover: Mover, launcher: Launcher, records: Records, prefetcher: Prefetcher
    ) -> None:
        self.res = resource
        self.mover = mover
        self.launcher = launcher
        self.records = records
        self.prefetcher = prefetcher

    def busy(self, bo: BufferObject) -> bool:
        with self.res.lock:
            return self.res.busy_locked(bo)

    def read(
        self,
        bo: BufferObject,
        dtype: npt.DTypeLike,
        count: int,
        offset: int,
        out: np.ndarray | None,
        restore: bool = True,
    ) -> np.ndarray:
        offset = check_int(offset, "offset", 0)
        if offset > bo.nbytes:
            raise ValueError(f"offset {offset} is past the end of the {bo.nbytes}-byte buffer")
        if out is not None:
            dest = as_out_array(out)
            if offset + dest.nbytes > bo.nbytes:
                raise ValueError(
                    f"out ({dest.nbytes} bytes) at offset {offset} reads past the end of the "
                    f"{bo.nbytes}-byte buffer"
                )
            self._read_into(bo, dest, offset, restore)
            return out
        dt = check_dtype(dtype)
        count = check_int(count, "count", -1)
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
        self._read_into(bo, result.view(np.uint8), offset, restore)
        return result

    def _read_into(self, bo: BufferObject, dest: np.ndarray, offset: int, restore: bool = True) -> None:
        while not restore:  # a swapped BO from the store; a resident one from the device, never a restore
            if self.mover.read_swapped(bo, dest, offset):
                return
            with bo.lock:
                if bo.state is State.RESIDENT:
                    read_bytes(self.mover.backend, self.mover.buf(bo), dest, offset)
                    with self.res.lock:
                        self.res.lru_touch_locked(bo)
                    return
            # Evicted (or freed, purged) since: read_swapped says which.
        self.mover.lock_resident(bo)
        try:
            read_bytes(self.mover.backend, self.mover.buf(bo), dest, offset)
            with self.res.lock:
                self.res.lru_touch_locked(bo)
        finally:
            bo.lock.release()

    def write(self, bo: BufferObject, data: Any, offset: int) -> None:
        src = as_byte_array(data)
        offset = check_int(offset, "offset", 0)
        if offset + src.nbytes > bo.nbytes:
            raise ValueError(f"{src.nbytes} bytes at offset {offset} do not fit the {bo.nbytes}-byte buffer")
        whole = offset == 0 and src.nbytes == bo.nbytes
        replaced = self.mover.lock_resident(bo, replace_with=src if whole else None, revive=True)
        try:
            if src.nbytes and not replaced:
                self.mover.mark_dirty(bo)
                write_bytes(self.mover.backend, self.mover.buf(bo), src, offset)
            with self.res.lock:
                self.res.lru_touch_locked(bo)
        finally:
            bo.lock.release()

    def pin(self, bo: BufferObject) -> Any:
        return self.launcher.pin(bo, dirty=True)

    def array(
        self, bo: BufferObject, shape: int | tuple[int, ...], dtype: npt.DTypeLike, readonly: bool
    ) -> Any:
        return self.launcher.array(bo, shape, dtype, readonly)

    def unpin(self, bo: BufferObject, *, handed_out: bool, wrote: bool) -> None:
        self.launcher.unpin(bo, handed_out=handed_out, wrote=wrote)

    def set_purgeable(self, bo: BufferObject, value: bool) -> bool:
        if not isinstance(value, bool):
            raise TypeError(f"purgeable must be a bool, got {type(value).__name__}")
        with bo.lock:
            self.mover.check_alive(bo)
            with self.res.lock:
                self.res.set_purgeable_locked(bo, value)
                return bo.state is not State.PURGED

    def evict(self, bo: BufferObject) -> None:
        with bo.lock:
            self.mover.check_alive(bo)
            if bo.state is not State.RESIDENT:  # swapped, or purged: nothing on the device
                return
            with self.res.lock:
                if bo.pin_count:
                    raise BufferBusy(f"{bo.label()} is pinned and cannot be evicted")
            # Keep the device buffer for the next restore: a fresh allocation
            # costs several times the copy (mgr.evict() releases for real).
            self.mover.swap_out_locked(bo, keep_buffer=True)

    def restore(self, bo: BufferObject) -> None:
        self.mover.restore(bo)

    def sync(self, bo: BufferObject) -> None:
        self.records.sync(bo)

    def prefetch(self, bo: BufferObject) -> Future[None]:
        return self.prefetch_many([bo])[0]

    def prefetch_many(self, bos: Sequence[BufferObject]) -> list[Future[None]]:
        return self.prefetcher.submit(bos)

    def free(self, bo: BufferObject) -> None:
        self.mover.free(bo)


class GroupOps:
    """The operations behind :class:`Group`'s methods."""

    def __init__(
        self,
        resource: Resource,
        evictor: Evictor,
        alloc: Callable[[int, str | None, int, Group], BufferObject],
    ) -> None:
        self.res = resource
        self.evictor = evictor
        self._alloc = alloc

    def alloc(self, nbytes: int, name: str | None, priority: int, group: Group) -> BufferObject:
        return self._alloc(nbytes, name, priority, group)

    def stats(self, group: Group) -> GroupStats:
        return self.res.group_stats(group)

    def set_limits(self, group: Group, max_: object, low: object, min_: object) -> None:
        """Apply new limits; a lower ``max`` evicts the group's BOs down to it.
        A call that fails puts the old limits back (BOs it already evicted
        stay swapped: their bytes are safe, only where they live changed)."""
        limits = check_limits(max_, low, min_)
        new_max = limits[0]
        with self.res.room_lock:
            with self.res.lock:
                old = (group.max_bytes, group.low_bytes, group.min_bytes)
                pinned = sum(bo.nbytes for bo in self.res.bos.values() if bo.group is group and bo.pin_count)
                if new_max is not None and pinned > new_max:
                    raise OutOfDeviceMemory(
                        f"group {group.name!r} has {format_bytes(pinned)} pinned, more than its new max "
                        f"{format_bytes(new_max)}; the limits are unchanged",
                        budget=self.res.budget,
                    )
                group.max_bytes, group.low_bytes, group.min_bytes = limits
            try:
                if new_max is not None:
                    self.evictor.evict_group_to(group, new_max)
            except BaseException:
                with self.res.lock:
                    group.max_bytes, group.low_bytes, group.min_bytes = old
                raise
