"""Checksums of a large entry computed on a second core while the store
copies it.

A store hashes each chunk right after copying it (in cache) on the thread
that copies. For an entry of at least :data:`PARALLEL_HASH_MIN_BYTES` whose
source stays valid for the whole write (a mapping of the device buffer,
not a bounce buffer refilled under the store), the xxh3-64 of every chunk's
stored bytes is computed instead by one worker thread from the source,
while the copying thread writes: ``os.pwrite`` and LMDB's ``put`` release
the GIL while they copy, so the two overlap (``xxhash`` holds the GIL while
it hashes, which is why the worker hashes and the writer copies, not the
other way round). The bytes hashed are the same either way: the source is
not written during an eviction (the BO's lock is held and its kernels are
done).

A read of such an entry into one view that stays valid (a mapping of the
device buffer) is the mirror image (:func:`read_hashing_aside`): the
reading thread copies chunk after chunk with ``os.preadv`` or numpy (both
release the GIL) and hands the worker the chunks it has filled, a group of
:data:`ASIDE_GROUP_BYTES` at a time; the chunks are verified once all are
read. A group is handed off whole because the worker holds the GIL while
it hashes: the reader, between two copies, waits for it.

One worker serves the process (a write waits for it when another write's
hashes are ahead in its queue). A forked child starts without it and makes
its own on first use.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor

import xxhash

from gpubo.store.entry import ChunkPlan

__all__ = [
    "ASIDE_GROUP_BYTES",
    "PARALLEL_HASH_MIN_BYTES",
    "copy_hashing_aside",
    "hash_plans",
    "hash_plans_async",
    "read_hashing_aside",
]

#: Entries storing at least this many bytes are hashed on the worker (a
#: hand-off to it costs tens of microseconds: too much for small entries).
PARALLEL_HASH_MIN_BYTES = 4 << 20

#: A read hashing aside hands the worker the chunks it has filled once they
#: hold at least this many stored bytes: the worker's last group is the time
#: the read waits for it, and each hand-off costs about one small hash.
ASIDE_GROUP_BYTES = 4 << 20

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _forget_pool() -> None:
    global _pool, _lock
    _pool = None  # its thread does not exist in a forked child
    _lock = threading.Lock()  # another parent thread may have held it at the fork


os.register_at_fork(after_in_child=_forget_pool)


def hash_plans(view: memoryview, plans: Sequence[ChunkPlan]) -> list[int | None]:
    """The xxh3-64 of each plan's stored bytes (its pieces of ``view``, the
    whole entry, in order), None for a plan that stores nothing."""
    sums: list[int | None] = []
    for plan in plans:
        if not plan.stored_bytes:
            sums.append(None)
            continue
        if len(plan.pieces) == 1:
            start, end = plan.pieces[0]
            sums.append(int(xxhash.xxh3_64_intdigest(view[start:end])))
            continue
        h = xxhash.xxh3_64()
        for start, end in plan.pieces:
            h.update(view[start:end])
        sums.append(int(h.intdigest()))
    return sums


def hash_plans_async(view: memoryview, plans: Sequence[ChunkPlan]) -> Future[list[int | None]] | None:
    """:func:`hash_plans` on the worker thread; ``view`` must stay valid and
    unchanged until the future is done. None when the worker cannot take it
    (the interpreter is shutting down: ``concurrent.futures`` refuses new
    work before it joins the threads still running): hash inline then."""
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpubo-hash")
        pool = _pool
    try:
        return pool.submit(hash_plans, view, plans)
    except RuntimeError:
        return None


def copy_hashing_aside(
    copy: Callable[[], object], view: memoryview, plans: Sequence[ChunkPlan]
) -> list[int | None]:
    """Run ``copy`` (which writes the plans' bytes of ``view`` without
    hashing them) while the worker computes :func:`hash_plans`; the hashes.
    ``copy``'s error is raised once the worker is done with ``view``."""
    future: Future[list[int | None]] | None = None
    try:
        future = hash_plans_async(view, plans)
        if future is None:
            copy()
            return hash_plans(view, plans)
        copy()
    except BaseException:
        _outlive([] if future is None else [future])
        _drain()  # a Ctrl-C may have cut in between the submit and the assignment
        raise
    _outlive([future])
    return future.result()


def read_hashing_aside(
    read: Callable[[ChunkPlan], object], view: memoryview, plans: Sequence[ChunkPlan]
) -> list[int | None]:
    """Run ``read(plan)`` for each of ``plans`` in order (it fills the plan's
    stored bytes of ``view``, the whole entry, without hashing them) while
    the worker computes :func:`hash_plans` of the plans already read, about
    :data:`ASIDE_GROUP_BYTES` at a time; the hashes of all. ``read`` must
    release the GIL while it copies (``os.preadv`` and numpy's copies do),
    or nothing overlaps. ``read``'s error is raised once the worker is done
    with ``view``."""
    pending: list[Future[list[int | None]]] = []
    group: list[ChunkPlan] = []
    grouped = 0

    def hand_off() -> None:
        nonlocal group, grouped
        future = hash_plans_async(view, group)
        if future is None:  # shutting down: hash inline
            future = Future()
            future.set_result(hash_plans(view, group))
        pending.append(future)
        group, grouped = [], 0

    try:
        for plan in plans:
            read(plan)
            group.append(plan)
            grouped += plan.stored_bytes
            if grouped >= ASIDE_GROUP_BYTES:
                hand_off()
        if group:
            hand_off()
    except BaseException:
        _outlive(pending)
        _drain()  # a Ctrl-C may have cut in between a submit and its append
        raise
    _outlive(pending)
    return [digest for future in pending for digest in future.result()]


def _drain() -> None:
    """Wait until the worker has run everything submitted to it so far (it
    runs its queue in order): on an error path, the hashing of a view whose
    future the caller never got must end before the view may go."""
    with _lock:
        pool = _pool
    if pool is None:
        return
    try:
        barrier: Future[list[int | None]] = pool.submit(list)
    except RuntimeError:  # shutting down: the interpreter joins the worker before it frees anything
        return
    _outlive([barrier])


def _outlive(pending: Sequence[Future[list[int | None]]]) -> None:
    """Wait until the worker is done with every future of ``pending``: the
    view it hashes must outlive the hashing, even through a Ctrl-C here."""
    interrupted: KeyboardInterrupt | None = None
    while not all(future.done() for future in pending):
        try:
            futures.wait(pending)
        except KeyboardInterrupt as e:
            interrupted = e
    if interrupted is not None:
        raise interrupted
