"""Prefetch: restores in the background, on one worker thread, in order.

Owns the executor (``_pool``, created on first use, and the worker's thread
id), both guarded by the resource lock. A restore it runs is an ordinary
restore (:meth:`gpubo._move.Mover.lock_resident`, or
:meth:`~gpubo._move.Mover.restore_batch` for a run of small BOs), so it
takes the same locks in the same order as any other.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from gpubo._bo import BufferObject
from gpubo._errors import GpuboError
from gpubo._evict import BATCH_BYTES, BATCH_MAX_BO_BYTES
from gpubo._move import Mover
from gpubo._resource import Resource
from gpubo._state import State

__all__ = ["Prefetcher"]

log = logging.getLogger(__name__)

_THREAD_NAME = "gpubo-prefetch"


class Prefetcher:
    """The prefetch worker of one manager (see the module docstring)."""

    def __init__(self, resource: Resource, mover: Mover) -> None:
        self.res = resource
        self.mover = mover
        self._pool: ThreadPoolExecutor | None = None
        self._threads: set[int] = set()  # the worker's thread id, once it started

    def submit(self, items: Sequence[BufferObject]) -> list[Future[None]]:
        """One future per BO of ``items`` (validated by the caller)."""
        with self.res.lock:
            self.res.check_open_locked()
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=1,
                    thread_name_prefix=_THREAD_NAME,
                    initializer=lambda: self._threads.add(threading.get_ident()),
                )
            pool = self._pool
        # Small BOs go together: the first task of a run of them restores the
        # whole run in one batch, and the others' tasks then find theirs resident.
        futures = []
        i = 0
        while i < len(items):
            run = self._run(items, i)
            futures.append(pool.submit(self._one, items[i], run))
            futures.extend(pool.submit(self._one, bo, []) for bo in run[1:])
            i += max(1, len(run))
        return futures

    def _run(self, items: Sequence[BufferObject], start: int) -> list[BufferObject]:
        """The swapped small BOs from ``items[start]`` on that are restored in
        one batch (up to :data:`BATCH_BYTES` or half the budget), or [] (their
        state is a hint: :meth:`Mover.restore_batch` checks it under the locks)."""
        run: list[BufferObject] = []
        total, limit = 0, min(BATCH_BYTES, self.res.budget // 2)
        for bo in items[start:]:
            if bo.nbytes > BATCH_MAX_BO_BYTES or bo.state is not State.SWAPPED or total + bo.nbytes > limit:
                break
            run.append(bo)
            total += bo.nbytes
        return run if len(run) > 1 else []

    def _one(self, bo: BufferObject, together: list[BufferObject]) -> None:
        try:
            if together:
                try:
                    self.mover.restore_batch(together)
                except GpuboError as e:  # each is tried alone, and reports its own error
                    log.info("a batched prefetch failed, restoring one by one: %s", e)
            self.mover.check_alive(bo)
            if bo.state is State.SWAPPED:
                self.mover.restore(bo)
        except GpuboError as e:
            log.info("prefetch of %s failed (its next use will retry): %s", bo.label(), e)
            raise

    def shutdown(self) -> None:
        """Let the running prefetch finish and cancel the queued ones. From
        the worker itself (a future's done-callback runs there) it cannot
        join itself, and runs no other task meanwhile."""
        if self._pool is not None:
            on_worker = threading.get_ident() in self._threads
            self._pool.shutdown(wait=not on_worker, cancel_futures=True)
