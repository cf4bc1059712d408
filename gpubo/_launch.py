"""Launches, pins and events: what makes a BO busy.

Owns the launch path (argument resolution, pinning the BO arguments
together, recording the kernel's event on each BO) and pins (``pin``,
``array``, and the marker after a block that handed a buffer out). The
counters it changes (``pinned_bytes``, ``launch_pinned_bytes``, each BO's
``pin_count`` and ``events``) belong to :class:`gpubo._resource.Resource`
and are changed under its lock; the process-wide table of pinned buffers
is :data:`gpubo._resource.PINNED`.

The bytes a launch has pinned so far are passed down (``own_pins``) to the
restores it triggers, so that making room for its next argument does not
wait for its own pins to go.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy.typing as npt

from gpubo._bo import BufferObject, ReadOnly
from gpubo._checks import check_dtype, check_shape
from gpubo._errors import GpuboError, OutOfDeviceMemory
from gpubo._move import Mover
from gpubo._resource import PINNED, Resource
from gpubo._state import State
from gpubo._units import format_bytes
from gpubo.backends.base import Backend

__all__ = ["Launcher"]

log = logging.getLogger(__name__)


class Launcher:
    """Launches and pins for one manager (see the module docstring)."""

    def __init__(self, resource: Resource, mover: Mover, backend: Backend) -> None:
        self.res = resource
        self.mover = mover
        self.backend = backend

    # -- pins -----------------------------------------------------------------

    def pin(self, bo: BufferObject, dirty: bool, own_pins: int = 0) -> Any:
        """Make ``bo`` resident and pin it; ``dirty`` unless the holder only
        reads. Returns its device buffer."""
        self.mover.lock_resident(bo, own_pins=own_pins)
        try:
            if dirty:
                self.mover.mark_dirty(bo)  # the holder of the buffer may write to it
            buf = self.mover.buf(bo)
            with self.res.lock:
                bo.pin_count += 1
                if bo.pin_count == 1:
                    self.res.lru_remove_locked(bo)
                    self.res.pinned_bytes += bo.nbytes
                    PINNED.add(self.backend.handle(buf), bo)
            return buf
        finally:
            bo.lock.release()

    def array(
        self, bo: BufferObject, shape: int | tuple[int, ...], dtype: npt.DTypeLike, readonly: bool
    ) -> Any:
        """A backend array of ``shape`` and ``dtype`` over pinned ``bo``."""
        dt = check_dtype(dtype)
        dims = check_shape(shape, "shape", small=TypeError)
        # Python ints: a numpy product is fixed-width and wraps silently.
        nbytes = math.prod(dims) * dt.itemsize
        if nbytes > bo.nbytes:
            raise ValueError(
                f"an array of shape {dims} and dtype {dt} needs {nbytes} bytes; the BO has {bo.nbytes}"
            )
        buf = self.pin(bo, dirty=not readonly)
        return self.backend.array(buf, dims, dt)

    def unpin(self, bo: BufferObject, handed_out: bool = False, wrote: bool = False) -> None:
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
                    self.mover.mark_dirty(bo)
        fence = None
        if handed_out:
            try:
                fence = self.backend.fence()
            except GpuboError as e:  # the pin must end all the same: wait for the queue instead
                log.warning("no marker after %s's pin (%s): waiting for the queue", bo.label(), e)
                with contextlib.suppress(GpuboError):
                    self.backend.finish()
        with self.res.lock:
            if fence is not None and bo.state is State.RESIDENT:
                self.res.busy_locked(bo)  # a BO pinned over and over keeps a short list
                bo.events.append(fence)
            if bo.state is State.FREED:  # close() freed it inside the pin
                return
            bo.pin_count -= 1
            if bo.pin_count == 0:
                self.res.pinned_bytes -= bo.nbytes
                PINNED.discard(self.backend.handle(self.mover.buf(bo)))
                self.res.lru_add_locked(bo)
                self.res.cond.notify_all()

    # -- launches ---------------------------------------------------------------

    def launch(
        self,
        kernel: Any,
        global_dims: tuple[int, ...],
        local_dims: tuple[int, ...] | None,
        args: Sequence[Any],
        wait_for: list[Any] | None,
        owner: object,
    ) -> Any:
        """Enqueue ``kernel`` with every BO argument resident and pinned
        together (see :meth:`Manager.launch`, which validated the sizes)."""
        const = self.backend.const_args(kernel)
        bos: dict[int, BufferObject] = {}
        writes: set[int] = set()  # BOs some argument may write through
        for index, arg in enumerate(args):
            bo = self._arg_bo(index, arg, owner)
            if bo is None:
                continue
            bos[bo.id] = bo
            if not isinstance(arg, ReadOnly) and index not in const:
                writes.add(bo.id)
        total = sum(bo.nbytes for bo in bos.values())
        pinned: list[BufferObject] = []
        own = 0  # bytes this launch has pinned so far
        try:
            with self.res.room_lock:
                with self.res.lock:
                    others = self.res.pinned_bytes - sum(bo.nbytes for bo in bos.values() if bo.pin_count)
                if total + others > self.res.cap:
                    raise OutOfDeviceMemory(
                        f"kernel arguments need {format_bytes(total)} resident together; budget is "
                        f"{format_bytes(self.res.budget)} with {format_bytes(others)} pinned elsewhere",
                        nbytes=total,
                        budget=self.res.budget,
                    )
                # The resident ones first: making room for a swapped argument
                # must not evict (or purge, if purgeable) one not yet pinned.
                for bo in sorted(bos.values(), key=lambda b: (b.state is not State.RESIDENT, b.id)):
                    self.pin(bo, dirty=bo.id in writes, own_pins=own)
                    pinned.append(bo)
                    own += bo.nbytes
                    with self.res.lock:
                        self.res.launch_pinned_bytes += bo.nbytes
            cl_args = [self._kernel_arg(arg) for arg in args]
            event = self.backend.launch(kernel, global_dims, local_dims, cl_args, wait_for)
            with self.res.lock:
                for bo in pinned:
                    self.res.busy_locked(bo)
                    bo.events.append(event)
                self.res.add_launch_locked(event)
        finally:
            for bo in pinned:
                self.unpin(bo)
            if pinned:
                with self.res.lock:
                    self.res.launch_pinned_bytes -= own
                    self.res.cond.notify_all()
        return event

    def _kernel_arg(self, arg: Any) -> Any:
        """What the backend gets for a launch argument (BOs are pinned by now)."""
        if isinstance(arg, ReadOnly):
            arg = arg.bo
        if isinstance(arg, BufferObject):
            return arg.buf
        found = self.backend.buffer_of(arg)
        if found is not None and found[0] is not arg:  # an array: pass its buffer
            return found[0]
        return arg

    def _arg_bo(self, index: int, arg: Any, owner: object) -> BufferObject | None:
        """The BO behind a launch argument, if any (validated).

        A device buffer or array that some manager handed out (``pin``,
        ``array``) is recognised by its handle: this manager's is pinned again
        and dirtied like a BO argument; another manager's is refused, since
        that manager would never learn that the kernel wrote to its BO.
        """
        if isinstance(arg, ReadOnly):
            bo = arg.bo
        elif isinstance(arg, BufferObject):
            bo = arg
        else:
            found = self.backend.buffer_of(arg)
            if found is None:
                return None
            buf, has_offset = found
            if buf is None:  # an empty array: no buffer behind it
                if has_offset:
                    raise ValueError(
                        f"argument {index}: an array view with an offset cannot be a kernel argument"
                    )
                return None
            handle = self.backend.handle(buf)
            pin_owner = PINNED.get(handle)
            if pin_owner is not None and pin_owner.manager is not owner:
                raise ValueError(
                    f"argument {index}: the buffer of {pin_owner.label()}, pinned by another manager "
                    "(launch it with that manager)"
                )
            if buf is not arg:  # an array over the buffer
                if has_offset:
                    raise ValueError(
                        f"argument {index}: an array view with an offset cannot be a kernel argument"
                    )
                if pin_owner is None and self._owns_buffer(handle):
                    raise ValueError(
                        f"argument {index}: an array from bo.array() used after its with block "
                        "(its buffer may hold another BO by now)"
                    )
            return pin_owner  # pinned by its block; launch pins it again
        if bo.manager is not owner:
            raise ValueError(f"argument {index} ({bo.label()}) belongs to another manager")
        return bo

    def _owns_buffer(self, handle: int) -> bool:
        """True if the device buffer ``handle`` is a resident BO's or pooled."""
        handle_of = self.backend.handle
        with self.res.lock:
            if any(bo.buf is not None and handle_of(bo.buf) == handle for bo in self.res.bos.values()):
                return True
            return self.res.pool.owns_locked(handle, handle_of)
