"""Shared fixtures: managers on the real PoCL device, kernels, leak checks.

Nothing here mocks OpenCL or LMDB. Faults are injected at real boundaries
(a tiny budget or store, a flipped byte in the store's data file).
"""

from __future__ import annotations

import ctypes
import gc
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyopencl as cl
import pytest

import gpubo
from gpubo.store.entry import plan_chunks
from gpubo.store.hashing import hash_plans_async

#: Adds 1 (mod 256) to every byte of ``p``; launch with global size = nbytes.
INC_SRC = """
__kernel void inc(__global uchar *p) {
    p[get_global_id(0)] += 1;
}
"""

#: Each work item runs ``iters`` steps of a 32-bit LCG seeded with its id and
#: writes the result: slow enough to still be running when the host acts.
SLOW_SRC = """
__kernel void slow(__global uint *out, uint iters) {
    uint gid = get_global_id(0);
    uint x = gid;
    for (uint i = 0; i < iters; i++)
        x = x * 1664525u + 1013904223u;
    out[gid] = x;
}
"""

#: y[i] = a * x[i] + y[i] for i < n (mixes BO args with scalar args).
AXPY_SRC = """
__kernel void axpy(__global const float *x, __global float *y, float a, int n) {
    int i = get_global_id(0);
    if (i < n)
        y[i] = a * x[i] + y[i];
}
"""

_LCG_A = 1664525
_LCG_C = 1013904223
_M32 = 1 << 32

# After warm-up, a test may leave at most this many extra file descriptors
# (PoCL opens its kernel cache lazily; one LMDB store alone holds three).
_FD_TOLERANCE = 1


_libc = ctypes.CDLL(None, use_errno=True)
_SYS_CACHESTAT = 451  # the same number on every architecture


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_uint64)
        for n in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")
    ]


class CacheStat(NamedTuple):
    cached: int
    dirty: int
    writeback: int


def cachestat(file: Path, offset: int = 0, length: int = 0) -> CacheStat:
    """Pages of ``file`` in ``[offset, offset + length)`` (0: to the end)."""
    fd = os.open(file, os.O_RDONLY)
    try:
        rng, st = _Range(offset, length), _Stat()
        if _libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(rng), ctypes.byref(st), 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"cachestat: {os.strerror(err)}")
        return CacheStat(st.nr_cache, st.nr_dirty, st.nr_writeback)
    finally:
        os.close(fd)


# -- the stores' capacity rules, computed here from the documented format ----------
# (never from the store's own methods, so that a wrong rule there fails a test)

PAGE = 4096
CHUNK = 1 << 20
#: LMDB keeps a value that does not fit a page in "overflow" pages after a
#: 16-byte page header (PAGEHDRSZ in LMDB's mdb.c on 64-bit builds).
LMDB_PAGE_HEADER = 16


def _pages_of(nbytes: int) -> int:
    return -(-nbytes // PAGE) * PAGE


def footprint_of(store: Any, nbytes: int) -> int:
    """The most capacity an entry of ``nbytes`` takes: in LMDB one overflow
    value per 1 MiB chunk; in the slot file whole pages."""
    if store.backend_name == "lmdb":
        return sum(_pages_of(min(CHUNK, nbytes - lo) + LMDB_PAGE_HEADER) for lo in range(0, nbytes, CHUNK))
    return _pages_of(nbytes)


def transit_of(store: Any, nbytes: int) -> int:
    """The room LMDB keeps free to rewrite an entry (its copy-on-write needs
    the new copy and one more chunk before the old one is freed); the slot
    file writes in place and keeps none."""
    if store.backend_name == "lmdb":
        return footprint_of(store, nbytes) + footprint_of(store, min(nbytes, CHUNK))
    return 0


def stored_units_of(store: Any, entries: list[Any]) -> int:
    """What ``chunk_count()`` must say with exactly ``entries`` live: LMDB
    counts chunks holding a non-zero page, the slot file stored pages."""
    units = 0
    for e in entries:
        zero = e.zero_pages()
        npages = -(-e.nbytes // PAGE)
        stored = [p for p in range(npages) if zero is None or not zero[p]]
        units += len({p * PAGE // CHUNK for p in stored}) if store.backend_name == "lmdb" else len(stored)
    return units


def slow_expected(n: int, iters: int) -> np.ndarray:
    """What SLOW_SRC writes for work items 0..n-1 (LCG jump-ahead, exact)."""
    a, c = 1, 0  # the identity map x -> a*x + c
    base_a, base_c = _LCG_A, _LCG_C
    k = iters
    while k:
        if k & 1:
            a, c = (base_a * a) % _M32, (base_a * c + base_c) % _M32
        base_a, base_c = (base_a * base_a) % _M32, (base_a * base_c + base_c) % _M32
        k >>= 1
    return np.array([(a * x + c) % _M32 for x in range(n)], dtype=np.uint32)


def pattern(nbytes: int, seed: int) -> np.ndarray:
    """Distinct pseudo-random bytes for one BO."""
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def check_budget(mgr: gpubo.Manager) -> gpubo.Stats:
    """Assert the hard budget (resident + pooled) and return the stats."""
    s = mgr.stats()
    assert s.resident_bytes + s.pooled_bytes <= s.budget, s
    assert s.resident_bytes >= 0 and s.swapped_bytes >= 0 and s.pooled_bytes >= 0, s
    return s


def _process_snapshot() -> tuple[int, int, int]:
    return (
        len(os.listdir("/proc/self/fd")),
        threading.active_count(),
        len(os.listdir("/proc/self/task")),  # native threads too (PoCL's workers)
    )


@pytest.fixture(scope="session")
def _pocl_warm() -> None:
    """Let PoCL create its worker threads and open its cache once, up front."""
    with gpubo.Manager(budget="1MiB", store_size="8MiB") as m:
        for src, name in ((INC_SRC, "inc"), (SLOW_SRC, "slow"), (AXPY_SRC, "axpy")):
            cl.Kernel(cl.Program(m.context, src).build(), name)
        inc = cl.Kernel(cl.Program(m.context, INC_SRC).build(), "inc")
        bo = m.alloc(4096)
        m.launch(inc, (4096,), None, bo).wait()
        bo.evict()
        assert (bo.read() == 1).all()
    # Large entries are hashed on the store's worker thread, which then stays
    # for the process, as PoCL's threads do (gpubo.store.hashing).
    started = hash_plans_async(memoryview(bytes(4096)), plan_chunks(4096, None))
    assert started is not None
    started.result(timeout=60)
    gc.collect()


@pytest.fixture
def leak_check(_pocl_warm: None) -> Iterator[None]:
    """Fail the test if it leaks file descriptors or threads."""
    gc.collect()
    fds, threads, tasks = _process_snapshot()
    yield
    gc.collect()
    fds_after, threads_after, tasks_after = _process_snapshot()
    assert threads_after == threads, f"Python threads leaked: {threads} -> {threads_after}"
    assert tasks_after <= tasks, f"native threads leaked: {tasks} -> {tasks_after}"
    assert fds_after <= fds + _FD_TOLERANCE, f"file descriptors leaked: {fds} -> {fds_after}"


class CountingBackend:
    """The manager's real backend, observed: every call goes to it, and the
    device buffers it allocates and releases are counted, so that the
    budget is checked against what exists on the device, not against the
    manager's own counters (pool, staging and in-flight buffers included).

    ``peak_bytes`` is the most that was alive at once; ``violations`` lists
    every allocation that took the live bytes over the budget.
    """

    def __init__(self, real: Any, budget: int) -> None:
        self._real = real
        self.budget = budget
        self.live: dict[int, int] = {}
        self.peak_bytes = 0
        self.violations: list[int] = []
        self._count_lock = threading.Lock()

    _OWN = frozenset({"_real", "budget", "live", "peak_bytes", "violations", "_count_lock"})

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in CountingBackend._OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self._real, name, value)

    def allocate(self, nbytes: int, **kwargs: Any) -> Any:
        buf = self._real.allocate(nbytes, **kwargs)
        with self._count_lock:
            self.live[buf.int_ptr] = nbytes
            alive = sum(self.live.values())
            self.peak_bytes = max(self.peak_bytes, alive)
            if alive > self.budget:
                self.violations.append(alive)
        return buf

    def release(self, buf: Any) -> None:
        with self._count_lock:
            self.live.pop(buf.int_ptr, None)
        self._real.release(buf)

    @property
    def live_bytes(self) -> int:
        with self._count_lock:
            return sum(self.live.values())


def count_device_bytes(m: gpubo.Manager) -> CountingBackend:
    """Put a :class:`CountingBackend` under ``m`` (before it allocates anything)."""
    assert m.stats().resident_bytes == 0 and m.stats().pooled_bytes == 0
    counter = CountingBackend(m.backend, m.budget)
    m.backend = counter  # type: ignore[assignment]
    return counter


def check_counted(counter: CountingBackend, closed: bool) -> None:
    """The device never held more than the budget; after close, nothing."""
    assert not counter.violations, f"device bytes over the budget {counter.budget}: {counter.violations[:5]}"
    assert counter.peak_bytes <= counter.budget
    if closed:
        assert counter.live_bytes == 0, f"{counter.live_bytes} device bytes still allocated after close"


def observe_backend(m: gpubo.Manager, before: Callable[[str, tuple[Any, ...], dict[str, Any]], None]) -> Any:
    """Put an observer over ``m``'s backend: every call goes to the real one,
    after ``before(name, args, kwargs)`` (which may count it, or hold it
    back). Returns the real backend."""
    real = m.backend

    class Observed:
        def __getattr__(self, name: str) -> Any:
            attr = getattr(real, name)
            if not callable(attr):
                return attr

            def call(*args: Any, **kwargs: Any) -> Any:
                before(name, args, kwargs)
                return attr(*args, **kwargs)

            return call

        def __setattr__(self, name: str, value: Any) -> None:
            setattr(real, name, value)

    m.backend = Observed()  # type: ignore[assignment]
    return real


class Gate:
    """A ``UserEvent`` that a gated launch waits for: the kernel cannot start,
    so its BOs stay busy for as long as the test needs, on any device.

    The gate opens when the test calls :meth:`open`, or when the manager
    first blocks on the device: the backend under ``m`` is observed, and
    any call that could wait for the queue (a wait on an unfinished event,
    a map, a copy, an allocation, a finish) opens the gate just before it
    runs. So every decision a non-blocking path makes sees the kernel still
    queued, a blocking path never deadlocks, and ``opened_by`` tells which
    call opened it (None while closed).
    """

    #: Backend calls that never wait for the device.
    _NON_BLOCKING = frozenset(
        {
            "is_complete",
            "fence",
            "launch",
            "const_args",
            "release",
            "is_kernel",
            "is_event",
            "handle",
            "buffer_of",
            "array",
        }
    )

    def __init__(self, m: gpubo.Manager) -> None:
        self.event = cl.UserEvent(m.context)
        self.opened_by: str | None = None
        self._observe(m)

    def open(self, by: str = "the test") -> None:
        if self.opened_by is None:
            self.opened_by = by
            self.event.set_status(cl.command_execution_status.COMPLETE)

    @property
    def is_open(self) -> bool:
        return self.opened_by is not None

    def _observe(self, m: gpubo.Manager) -> None:
        gate = self
        real: Any = None

        def before(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if name in Gate._NON_BLOCKING:
                return
            if name == "wait":
                events = args[0] if args else kwargs.get("events", [])
                if any(not real.is_complete(ev) for ev in events):
                    gate.open(by="wait")
            else:
                gate.open(by=name)

        real = observe_backend(m, before)


def gated_launch(m: gpubo.Manager, kernel: cl.Kernel, global_size: Any, *args: Any) -> tuple[cl.Event, Gate]:
    """``m.launch`` of a kernel that waits for a fresh :class:`Gate`."""
    gate = Gate(m)
    return m.launch(kernel, global_size, None, *args, wait_for=[gate.event]), gate


@pytest.fixture
def make_mgr(leak_check: None) -> Iterator[Callable[..., gpubo.Manager]]:
    """Factory of managers; each is closed (and its temporary store checked gone) at teardown.

    Each one's device buffers are counted (:class:`CountingBackend`): the
    test fails if they ever exceed its budget, or outlive its close.
    """
    made: list[tuple[gpubo.Manager, str | None, CountingBackend]] = []

    def make(budget: Any = "4MiB", store_size: Any = "64MiB", **kwargs: Any) -> gpubo.Manager:
        m = gpubo.Manager(budget=budget, store_size=store_size, **kwargs)
        made.append((m, m.store.path if kwargs.get("store") is None else None, count_device_bytes(m)))
        return m

    yield make
    for m, _, counter in made:
        check_budget(m)
        check_counted(counter, closed=False)
        m.close()
        check_counted(counter, closed=True)
    for _, temp_path, _ in made:
        if temp_path is not None:
            assert not os.path.exists(temp_path), f"temporary store {temp_path} not deleted on close"


@pytest.fixture
def mgr(make_mgr: Callable[..., gpubo.Manager]) -> gpubo.Manager:
    """A Manager(budget="4MiB", store_size="64MiB"), closed after the test."""
    return make_mgr(budget="4MiB", store_size="64MiB")


@pytest.fixture
def build_kernel() -> Callable[[gpubo.Manager, str, str], cl.Kernel]:
    """build_kernel(mgr, source, name) -> a pyopencl.Kernel in mgr's context."""

    def build(m: gpubo.Manager, src: str, name: str) -> cl.Kernel:
        return cl.Kernel(cl.Program(m.context, src).build(), name)

    return build
