"""Shrinkers: the device walk's order, the registry, and the pressure monitor.

Pressure is driven deterministically by scripted sources (any object with
``read() -> Pressure | None`` is a source, by design); the device, the store
and the kernels are real (PoCL, LMDB).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyopencl as cl
import pytest
from conftest import INC_SRC, SLOW_SRC, Gate, check_budget, gated_launch, pattern, slow_expected

import gpubo
from gpubo.shrinker import (
    DeviceShrinker,
    LinuxPressure,
    PoolShrinker,
    Pressure,
    PressureMonitor,
    StoreCacheShrinker,
)

KiB = 1 << 10
MiB = 1 << 20
N = 256 * KiB
R, S, P = gpubo.State.RESIDENT, gpubo.State.SWAPPED, gpubo.State.PURGED

#: SLOW_SRC work items and iterations. A gate (conftest.Gate) keeps the
#: kernel from starting while the host acts, so its speed does not matter.
SLOW_N = 1024
SLOW_ITERS = 1_000

MakeMgr = Callable[..., gpubo.Manager]
Builder = Callable[[gpubo.Manager, str, str], cl.Kernel]


def completed(ev: cl.Event) -> bool:
    return bool(ev.command_execution_status == cl.command_execution_status.COMPLETE)


# -- helpers -------------------------------------------------------------------------------------


class Scripted:
    """A pressure source that returns (or raises) its script, then ``then`` forever."""

    def __init__(self, script: list[Any], then: Any = None) -> None:
        self.script = list(script)
        self.then = then
        self.reads = 0
        self.done = threading.Event()  # set once the script is used up
        self._lock = threading.Lock()

    def read(self) -> Pressure | None:
        with self._lock:
            self.reads += 1
            if self.script:
                item = self.script.pop(0)
            else:
                self.done.set()
                item = self.then
        if isinstance(item, BaseException):
            raise item
        return item  # type: ignore[no-any-return]


class Recorder:
    """A custom shrinker that records its calls and frees a scripted amount."""

    def __init__(
        self, name: str, calls: list[tuple[str, str, int]], frees: int = 0, count: int | None = None
    ) -> None:
        self.name = name
        self.calls = calls
        self.frees = frees
        self._count = max(frees, 1) if count is None else count  # says it has something

    def count(self) -> int:
        self.calls.append((self.name, "count", 0))
        return self._count

    def scan(self, nbytes: int) -> int:
        self.calls.append((self.name, "scan", nbytes))
        return self.frees


class Exploding(Recorder):
    def scan(self, nbytes: int) -> int:
        self.calls.append((self.name, "scan", nbytes))
        raise RuntimeError("shrinker on fire")


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def only_shrinkers(m: gpubo.Manager, *keep: type) -> None:
    """Unregister every built-in shrinker not of a type in ``keep``."""
    for s in m.shrinkers:
        if not isinstance(s, keep):
            m.unregister_shrinker(s)


def written(m: gpubo.Manager, seed: int, nbytes: int = N, **kw: Any) -> tuple[gpubo.BufferObject, np.ndarray]:
    bo = m.alloc(nbytes, **kw)
    data = pattern(nbytes, seed)
    bo.write(data)
    return bo, data


def pressure_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "gpubo-pressure" and t.is_alive()]


def launch_slow(m: gpubo.Manager, kernel: cl.Kernel, bo: gpubo.BufferObject) -> tuple[cl.Event, Gate]:
    """A launch that cannot start before its gate opens (see conftest.Gate)."""
    return gated_launch(m, kernel, (SLOW_N,), bo, np.uint32(SLOW_ITERS))


# -- the device walk ------------------------------------------------------------------------------


def test_default_registry_is_pool_device_store_cache(mgr: gpubo.Manager) -> None:
    kinds = [type(s) for s in mgr.shrinkers]
    assert kinds == [PoolShrinker, DeviceShrinker, StoreCacheShrinker]
    # shrinkers is a copy: changing it does not change the registry
    mgr.shrinkers.clear()
    assert len(mgr.shrinkers) == 3


@pytest.mark.parametrize("how", ["shrink", "evict"])
def test_walk_purgeable_then_clean_then_dirty_against_lru(mgr: gpubo.Manager, how: str) -> None:
    only_shrinkers(mgr, PoolShrinker, DeviceShrinker)  # exact byte counts
    dirty, dirty_data = written(mgr, 1)  # least recently used
    clean, clean_data = written(mgr, 2)
    clean.evict()
    clean.restore()  # its store copy stays: evicting it again costs no copy
    purg, _ = written(mgr, 3)  # most recently used
    purg.purgeable = True
    s0 = mgr.stats()
    assert s0.pooled_bytes == 0 and s0.resident_bytes == 3 * N

    def step() -> int:
        return mgr.shrink(N) if how == "shrink" else mgr.evict(N)

    # 1. purgeable first, dropped with no I/O
    assert step() == N
    s1 = mgr.stats()
    assert (purg.state, clean.state, dirty.state) == (P, R, R)
    assert s1.purges == s0.purges + 1 and s1.purged_bytes == N
    assert s1.bytes_evicted == s0.bytes_evicted and s1.evictions == s0.evictions
    assert s1.resident_bytes == 2 * N and s1.pooled_bytes == 0  # released, not pooled

    # 2. then the idle BO whose content is already in the store: no copy
    assert step() == N
    s2 = mgr.stats()
    assert (clean.state, dirty.state) == (S, R)
    assert s2.evictions == s1.evictions + 1
    assert s2.bytes_evicted == s1.bytes_evicted

    # 3. then the idle dirty BO: copied
    assert step() == N
    s3 = mgr.stats()
    assert dirty.state is S
    assert s3.evictions == s2.evictions + 1
    assert s3.bytes_evicted == s2.bytes_evicted + N
    assert s3.resident_bytes == 0 and s3.pooled_bytes == 0

    # 4. nothing left
    assert step() == 0
    assert np.array_equal(clean.read(), clean_data)
    assert np.array_equal(dirty.read(), dirty_data)


@pytest.mark.parametrize("how", ["shrink", "evict"])
def test_lower_priority_first_then_lru_within_priority(make_mgr: MakeMgr, how: str) -> None:
    m = make_mgr(budget=4 * MiB)
    only_shrinkers(m, PoolShrinker, DeviceShrinker)
    high, _ = written(m, 1, priority=3)  # the oldest of all
    p1, _ = written(m, 2, priority=1)
    a, _ = written(m, 3, priority=0)
    b, _ = written(m, 4, priority=0)
    c, _ = written(m, 5, priority=0)
    a.read(count=1)  # a becomes the most recently used priority-0 BO
    order = []
    bos = {"high": high, "p1": p1, "a": a, "b": b, "c": c}
    for _ in bos:
        assert (m.shrink(N) if how == "shrink" else m.evict(N)) == N
        newly = [name for name, bo in bos.items() if bo.state is S and name not in order]
        assert len(newly) == 1
        order += newly
    assert order == ["b", "c", "a", "p1", "high"]


def test_shrink_without_blocking_skips_a_busy_bo_and_blocking_waits_for_it(
    make_mgr: MakeMgr, build_kernel: Builder
) -> None:
    m = make_mgr(budget=4 * MiB)
    only_shrinkers(m, PoolShrinker, DeviceShrinker)
    slow = build_kernel(m, SLOW_SRC, "slow")
    busy = m.alloc(SLOW_N * 4)
    busy.write(np.full(SLOW_N, 0xDEADBEEF, np.uint32))
    clean, clean_data = written(m, 7)
    clean.evict()
    clean.restore()
    ev, gate = launch_slow(m, slow, busy)
    clean.restore()  # touch without queueing: busy is now the least recently used
    assert busy.busy
    s0 = m.stats()

    freed = m.shrink(64 * MiB, may_block=False)
    assert freed == N  # only the clean idle BO
    assert clean.state is S
    assert busy.state is R
    assert busy.busy and not gate.is_open and not completed(ev)

    freed = m.shrink(64 * MiB, may_block=True)
    assert freed == SLOW_N * 4
    assert busy.state is S
    assert gate.opened_by == "wait"  # the blocking walk waited for the kernel
    assert completed(ev)
    s1 = m.stats()
    assert s1.bytes_evicted == s0.bytes_evicted + SLOW_N * 4  # the kernel's output was copied
    assert np.array_equal(busy.read(np.uint32), slow_expected(SLOW_N, SLOW_ITERS))
    assert np.array_equal(clean.read(), clean_data)


def test_busy_bo_is_evicted_last_even_when_least_recently_used(
    make_mgr: MakeMgr, build_kernel: Builder
) -> None:
    m = make_mgr(budget=4 * MiB)
    only_shrinkers(m, PoolShrinker, DeviceShrinker)
    slow = build_kernel(m, SLOW_SRC, "slow")
    busy = m.alloc(SLOW_N * 4)
    dirty, dirty_data = written(m, 8)
    _, gate = launch_slow(m, slow, busy)
    dirty.restore()  # touch: busy is the least recently used
    assert busy.busy
    assert m.evict(1) == N  # waits for the queue to copy, but picks the idle BO
    assert gate.opened_by != "wait"  # it never waited for the busy BO's kernel
    assert (dirty.state, busy.state) == (S, R)
    assert np.array_equal(busy.read(np.uint32), slow_expected(SLOW_N, SLOW_ITERS))
    assert np.array_equal(dirty.read(), dirty_data)


def test_pinned_bos_are_never_shrunk(mgr: gpubo.Manager) -> None:
    a, a_data = written(mgr, 1)
    b, _ = written(mgr, 2)
    with a.pin():
        freed = mgr.shrink(64 * MiB)
        assert a.state is R and b.state is S
        assert freed >= N
    assert np.array_equal(a.read(), a_data)


def test_device_and_pool_shrinkers_count_what_they_could_free(mgr: gpubo.Manager) -> None:
    pool = next(s for s in mgr.shrinkers if isinstance(s, PoolShrinker))
    dev = next(s for s in mgr.shrinkers if isinstance(s, DeviceShrinker))
    a, _ = written(mgr, 1)
    b, _ = written(mgr, 2)
    c, _ = written(mgr, 3)
    assert dev.count() == 3 * N and pool.count() == 0
    c.evict()  # its buffer goes to the pool
    assert dev.count() == 2 * N and pool.count() == N
    with a.pin():
        assert dev.count() == N
        assert pool.scan(N) == N and pool.count() == 0
        assert dev.scan(10 * N) == N
        assert b.state is S and a.state is R


# -- the registry -------------------------------------------------------------------------------


def test_custom_shrinkers_run_in_order_until_enough_is_freed(mgr: gpubo.Manager) -> None:
    calls: list[tuple[str, str, int]] = []
    builtins = mgr.shrinkers
    for s in builtins:
        mgr.unregister_shrinker(s)
    assert mgr.shrinkers == []
    b = Recorder("b", calls, frees=100)
    c = Recorder("c", calls, frees=100)
    d = Recorder("d", calls, frees=100)
    a = Recorder("a", calls, frees=100)
    mgr.register_shrinker(b)
    mgr.register_shrinker(c)
    mgr.register_shrinker(d)
    mgr.register_shrinker(a, first=True)
    assert mgr.shrinkers == [a, b, c, d]
    assert mgr.shrink(250) == 300
    scans = [(n, arg) for n, what, arg in calls if what == "scan"]
    assert scans == [("a", 250), ("b", 150), ("c", 50)]  # each asked for what is still missing; d not needed
    calls.clear()
    mgr.unregister_shrinker(b)
    mgr.unregister_shrinker(b)  # not registered any more: no-op
    assert mgr.shrinkers == [a, c, d]
    assert mgr.shrink("1KiB") == 300
    assert [n for n, what, _ in calls if what == "scan"] == ["a", "c", "d"]
    assert mgr.shrink(0) == 0
    for s in builtins:
        mgr.register_shrinker(s)


def test_custom_shrinker_runs_after_the_builtins_and_its_return_is_counted(mgr: gpubo.Manager) -> None:
    calls: list[tuple[str, str, int]] = []
    only_shrinkers(mgr, PoolShrinker, DeviceShrinker)  # the store cache could cover the rest
    extra = Recorder("extra", calls, frees=4096)
    mgr.register_shrinker(extra)
    assert mgr.shrinkers[-1] is extra
    bo, _ = written(mgr, 1)
    freed = mgr.shrink(N + 10_000)  # the device gives N; the rest is asked of the next ones
    assert bo.state is S
    assert ("extra", "scan") in [(n, w) for n, w, _ in calls]
    asked = next(arg for n, w, arg in calls if w == "scan")
    assert asked == 10_000
    assert freed == N + 4096


def test_a_shrinker_with_nothing_to_give_is_not_scanned(mgr: gpubo.Manager) -> None:
    calls: list[tuple[str, str, int]] = []
    only_shrinkers(mgr)
    mgr.register_shrinker(Recorder("empty", calls, frees=50, count=0))
    mgr.register_shrinker(Recorder("full", calls, frees=10))
    assert mgr.shrink(100) == 10
    assert ("empty", "count", 0) in calls
    assert [n for n, what, _ in calls if what == "scan"] == ["full"]


def test_a_negative_return_counts_as_nothing(mgr: gpubo.Manager) -> None:
    calls: list[tuple[str, str, int]] = []
    only_shrinkers(mgr)
    mgr.register_shrinker(Recorder("liar", calls, frees=-1000))
    mgr.register_shrinker(Recorder("honest", calls, frees=10))
    assert mgr.shrink(100) == 10


def test_a_shrinker_that_raises_is_logged_and_skipped(
    mgr: gpubo.Manager, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[tuple[str, str, int]] = []
    only_shrinkers(mgr, PoolShrinker, DeviceShrinker)  # the store cache could cover the rest
    boom = Exploding("boom", calls)
    after = Recorder("after", calls, frees=7)
    mgr.register_shrinker(boom, first=True)
    mgr.register_shrinker(after)
    bo, data = written(mgr, 3)
    with caplog.at_level(logging.ERROR, logger="gpubo"):
        freed = mgr.shrink(N + 1)
    assert ("boom", "scan", N + 1) in calls  # it ran first and was asked for everything
    assert bo.state is S  # the device shrinker still ran
    assert ("after", "scan") in [(n, w) for n, w, _ in calls]  # and the one after it
    assert freed == N + 7
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR and "failed" in r.getMessage()]
    assert len(failures) == 1
    assert failures[0].exc_info is not None and isinstance(failures[0].exc_info[1], RuntimeError)
    assert np.array_equal(bo.read(), data)  # nothing lost


def test_a_nested_shrink_keeps_the_outer_non_blocking_mode(mgr: gpubo.Manager, build_kernel: Builder) -> None:
    slow = build_kernel(mgr, SLOW_SRC, "slow")

    class Nested:
        def count(self) -> int:
            return 1

        def scan(self, nbytes: int) -> int:
            return mgr.shrink(0)

    mgr.register_shrinker(Nested(), first=True)
    busy = mgr.alloc(SLOW_N * 4)
    ev, gate = launch_slow(mgr, slow, busy)
    try:
        assert busy.busy
        mgr.shrink(64 * MiB, may_block=False)
        assert busy.state is R and not gate.is_open and not completed(ev)
    finally:
        gate.open()
        ev.wait()


def test_register_rejects_objects_that_are_not_shrinkers(mgr: gpubo.Manager) -> None:
    class OnlyCount:
        def count(self) -> int:
            return 0

    class OnlyScan:
        def scan(self, nbytes: int) -> int:
            return 0

    before = mgr.shrinkers
    for bad in (object(), OnlyCount(), OnlyScan(), 42, None):
        with pytest.raises(TypeError, match="count"):
            mgr.register_shrinker(bad)  # type: ignore[arg-type]
    assert mgr.shrinkers == before


@pytest.mark.parametrize(
    ("nbytes", "exc"),
    [(-1, ValueError), ("lots", ValueError), ("-5MiB", ValueError), (None, TypeError), (1.5, TypeError)],
)
def test_shrink_rejects_bad_sizes(mgr: gpubo.Manager, nbytes: Any, exc: type) -> None:
    bo, _ = written(mgr, 1)
    with pytest.raises(exc, match="nbytes"):
        mgr.shrink(nbytes)
    with pytest.raises(exc, match="nbytes"):
        mgr.evict(nbytes)
    assert bo.state is R  # nothing happened


# -- the pressure monitor -----------------------------------------------------------------------


def test_monitor_shrinks_when_its_source_reports_pressure(mgr: gpubo.Manager) -> None:
    bos = [written(mgr, i) for i in range(4)]
    src = Scripted([Pressure(2 * N, "test says so")], then=Pressure(0))
    mon = mgr.watch_pressure(src, interval=0.01)
    assert mon.running and mon.source is src and mon.interval == 0.01
    wait_for(lambda: src.done.is_set())
    assert mon.reclaimed_bytes == 2 * N
    assert [bo.state for bo, _ in bos] == [S, S, R, R]  # the least recently used
    assert mgr.stats().evictions == 2
    rounds = mon.rounds
    wait_for(lambda: mon.rounds >= rounds + 3)  # it keeps polling, and no pressure means no shrink
    assert mon.reclaimed_bytes == 2 * N and mgr.stats().evictions == 2
    for bo, data in bos:
        assert np.array_equal(bo.read(), data)


def test_monitor_does_nothing_without_pressure(mgr: gpubo.Manager) -> None:
    bos = [written(mgr, i)[0] for i in range(3)]
    src = Scripted([None, Pressure(0), Pressure(0, "calm"), None], then=None)
    mon = mgr.watch_pressure(src, interval=0.005)
    wait_for(lambda: src.reads >= 8)
    assert mon.rounds >= 7
    assert mon.reclaimed_bytes == 0
    s = mgr.stats()
    assert s.evictions == 0 and s.purges == 0
    assert all(bo.state is R for bo in bos)


def test_monitor_survives_a_source_that_raises(mgr: gpubo.Manager, caplog: pytest.LogCaptureFixture) -> None:
    bo, data = written(mgr, 1)
    src = Scripted([RuntimeError("sensor gone"), OSError("EIO"), Pressure(N, "back")], then=Pressure(0))
    with caplog.at_level(logging.ERROR, logger="gpubo"):
        mon = mgr.watch_pressure(src, interval=0.005)
        wait_for(lambda: src.done.is_set())
    assert mon.running
    assert mon.reclaimed_bytes == N and bo.state is S
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) >= 2
    raised = {type(r.exc_info[1]) for r in errors if r.exc_info}
    assert {RuntimeError, OSError} <= raised
    assert np.array_equal(bo.read(), data)


def test_monitor_survives_a_shrinker_that_raises(
    mgr: gpubo.Manager, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[tuple[str, str, int]] = []
    mgr.register_shrinker(Exploding("boom", calls), first=True)
    bo, _ = written(mgr, 1)
    src = Scripted([Pressure(N)] * 3, then=Pressure(0))
    with caplog.at_level(logging.ERROR, logger="gpubo"):
        mon = mgr.watch_pressure(src, interval=0.005)
        wait_for(lambda: src.done.is_set())
    assert mon.running
    assert bo.state is S and mon.reclaimed_bytes >= N
    assert len([c for c in calls if c[1] == "scan"]) >= 3
    assert any("failed" in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_monitor_survives_a_reading_it_cannot_use(mgr: gpubo.Manager) -> None:
    bo, data = written(mgr, 1)
    src = Scripted([Pressure(1e5, "a float")], then=Pressure(N, "fine"))  # type: ignore[arg-type]
    mon = mgr.watch_pressure(src, interval=0.005)
    try:
        wait_for(lambda: src.reads >= 3, timeout=2.0)
        assert mon.running
        wait_for(lambda: bo.state is S, timeout=2.0)
    finally:
        assert np.array_equal(bo.read(), data)


def test_manager_pressure_argument_starts_the_monitor_and_close_stops_it(make_mgr: MakeMgr) -> None:
    assert pressure_threads() == []
    src = Scripted([], then=Pressure(0))
    m = make_mgr(pressure=src)
    assert len(pressure_threads()) == 1
    wait_for(lambda: src.reads >= 1)
    m.close()
    assert pressure_threads() == []
    reads = src.reads  # close joined the monitor's thread: nothing can read any more
    assert pressure_threads() == [] and src.reads == reads
    m.close()  # idempotent


def test_manager_pressure_true_reads_linux(make_mgr: MakeMgr) -> None:
    m = make_mgr(pressure=True)
    assert len(pressure_threads()) == 1
    mon = m.watch_pressure()  # None: Linux's signals too
    assert isinstance(mon.source, LinuxPressure)
    assert len(pressure_threads()) == 1
    reading = mon.source.read()
    assert reading is None or reading.reclaim_bytes >= 0
    m.close()
    assert pressure_threads() == []


def test_watch_pressure_twice_replaces_the_monitor(mgr: gpubo.Manager) -> None:
    src1 = Scripted([], then=None)
    src2 = Scripted([], then=None)
    mon1 = mgr.watch_pressure(src1, interval=0.005)
    wait_for(lambda: src1.reads >= 1)
    mon2 = mgr.watch_pressure(src2, interval=0.005)
    assert mon2 is not mon1
    assert not mon1.running and mon2.running
    assert len(pressure_threads()) == 1
    reads1 = src1.reads
    wait_for(lambda: src2.reads >= 3)
    assert src1.reads == reads1  # the old source is not read any more
    mgr.close()
    assert not mon2.running and pressure_threads() == []


def test_watch_pressure_rejects_bad_input_and_keeps_the_running_monitor(mgr: gpubo.Manager) -> None:
    src = Scripted([], then=None)
    mon = mgr.watch_pressure(src, interval=0.01)

    class NotCallable:
        read = 5

    for bad_interval in (0, -1, -0.5):
        with pytest.raises(ValueError, match="interval"):
            mgr.watch_pressure(Scripted([]), interval=bad_interval)
    for bad_source in (object(), NotCallable(), "linux"):
        with pytest.raises(TypeError, match="read"):
            mgr.watch_pressure(bad_source)  # type: ignore[arg-type]
    assert mon.running
    assert len(pressure_threads()) == 1


def test_manager_rejects_a_pressure_source_without_read(leak_check: None) -> None:
    with pytest.raises(TypeError, match="read"):
        gpubo.Manager(budget="1MiB", store_size="8MiB", pressure=object())  # type: ignore[arg-type]
    assert pressure_threads() == []


def test_watch_pressure_after_close_raises(make_mgr: MakeMgr) -> None:
    m = make_mgr()
    m.close()
    with pytest.raises(gpubo.ManagerClosed):
        m.watch_pressure(Scripted([]))
    assert pressure_threads() == []


# -- the monitor never blocks on a BO someone else is using ---------------------------------------


def _hold_in_thread(
    enter: Callable[[], Any], exit_: Callable[[], Any]
) -> tuple[threading.Thread, threading.Event]:
    """Run ``enter`` in a thread, keep it until the returned event is set, then ``exit_``."""
    holding, release = threading.Event(), threading.Event()

    def run() -> None:
        enter()
        holding.set()
        release.wait(30)
        exit_()

    t = threading.Thread(target=run)
    t.start()
    assert holding.wait(10)
    return t, release


@pytest.mark.timeout(60)
@pytest.mark.parametrize("hold", ["pin", "bo-lock"])
def test_monitor_poll_skips_a_bo_another_thread_holds(mgr: gpubo.Manager, hold: str) -> None:
    held, held_data = written(mgr, 1)  # the least recently used
    other, other_data = written(mgr, 2)
    if hold == "pin":
        ctx = held.pin()
        t, release = _hold_in_thread(ctx.__enter__, lambda: ctx.__exit__(None, None, None))
    else:  # another thread is in the middle of using the BO
        t, release = _hold_in_thread(held.lock.acquire, held.lock.release)
    try:
        mon = PressureMonitor(mgr, Scripted([], then=Pressure(64 * MiB)), interval=1.0)
        # The holder lets go only after the poll returned: a poll that blocked
        # on the held BO would never return (the guard below, not a timing).
        polled = threading.Event()
        poller = threading.Thread(target=lambda: (mon.poll(), polled.set()))
        poller.start()
        assert polled.wait(60), "poll blocked on a BO another thread holds"
        poller.join()
        assert held.state is R and other.state is S
    finally:
        release.set()
        t.join(10)
    assert np.array_equal(held.read(), held_data)
    assert np.array_equal(other.read(), other_data)


@pytest.mark.timeout(60)
def test_monitor_keeps_polling_while_a_kernel_runs(mgr: gpubo.Manager, build_kernel: Builder) -> None:
    slow = build_kernel(mgr, SLOW_SRC, "slow")
    busy = mgr.alloc(SLOW_N * 4)
    clean, clean_data = written(mgr, 3)
    clean.evict()
    clean.restore()
    zero = mgr.alloc(N)  # never written: evicting it needs no copy either
    ev, gate = launch_slow(mgr, slow, busy)
    assert busy.busy
    src = Scripted([], then=Pressure(64 * MiB, "always"))
    mon = mgr.watch_pressure(src, interval=0.005)
    wait_for(lambda: mon.rounds >= 5 and clean.state is S and zero.state is S, timeout=30)
    assert not gate.is_open and not completed(ev), f"the monitor blocked on the device ({gate.opened_by})"
    assert busy.state is R
    assert clean.state is S and zero.state is S
    assert mon.reclaimed_bytes >= 2 * N
    mon.stop()
    assert np.array_equal(busy.read(np.uint32), slow_expected(SLOW_N, SLOW_ITERS))
    assert np.array_equal(clean.read(), clean_data)
    assert not zero.read().any()


@pytest.mark.timeout(60)
def test_monitor_poll_does_not_wait_for_a_kernel_to_copy_an_idle_dirty_bo(
    mgr: gpubo.Manager, build_kernel: Builder
) -> None:
    slow = build_kernel(mgr, SLOW_SRC, "slow")
    busy = mgr.alloc(SLOW_N * 4)
    dirty, dirty_data = written(mgr, 4)
    ev, gate = launch_slow(mgr, slow, busy)
    try:
        assert busy.busy
        mon = PressureMonitor(mgr, Scripted([], then=Pressure(64 * MiB)), interval=1.0)
        mon.poll()
        # The poll must come back without queueing behind the kernel (skipping or deferring the copy).
        assert not gate.is_open and not completed(ev), f"the poll blocked on the device ({gate.opened_by})"
    finally:
        gate.open()
        ev.wait()
        assert np.array_equal(dirty.read(), dirty_data)


# -- the monitor while threads work ----------------------------------------------------------------


class _Model:
    """One BO and what it must hold; ``purged`` is None while unknown (purgeable)."""

    def __init__(self, bo: gpubo.BufferObject) -> None:
        self.bo = bo
        self.data = np.zeros(bo.nbytes, np.uint8)
        self.purgeable = False
        self.purged: bool | None = False


WORKER_STEPS = 1200  # a fixed count: the work does not depend on the device's speed
ROUND_EVERY = 50  # a worker waits for one monitor round every this many steps


def _worker(
    m: gpubo.Manager,
    seed: int,
    stop: threading.Event,
    errors: list[BaseException],
    counts: dict[str, int],
    next_round: Callable[[], None] = lambda: None,
) -> None:
    rng = random.Random(seed)
    inc = cl.Kernel(cl.Program(m.context, INC_SRC).build(), "inc")
    models = [_Model(m.alloc(rng.choice([64, 128, 256]) * KiB)) for _ in range(4)]
    try:
        for step in range(WORKER_STEPS):
            if stop.is_set():  # another thread failed
                break
            if step % ROUND_EVERY == 0:
                next_round()  # the monitor shrinks while this thread's BOs are live
            md = rng.choice(models)
            bo = md.bo
            op = rng.choice(
                ["write", "whole", "read", "evict", "restore", "kernel", "purgeable", "keep", "pin"]
            )
            counts[op] = counts.get(op, 0) + 1
            if md.purgeable and op not in ("whole", "read", "evict", "keep"):
                op = "keep"  # content may vanish at any time: only ops whose outcome is defined
            if op == "write":
                off = rng.randrange(bo.nbytes)
                data = np.frombuffer(rng.randbytes(rng.randrange(1, bo.nbytes - off + 1)), np.uint8)
                bo.write(data, off)
                if md.purged:
                    md.data[:] = 0  # revived, zero-filled
                md.purged = False
                md.data[off : off + data.nbytes] = data
            elif op == "whole":
                data = np.frombuffer(rng.randbytes(bo.nbytes), np.uint8)
                bo.write(data)
                md.data[:] = data
                md.purged = None if md.purgeable else False  # purgeable: may be dropped again
            elif op == "read":
                try:
                    got = bo.read()
                except gpubo.Purged:
                    assert md.purged is not False, f"{bo!r} raised Purged but was never purgeable"
                    md.purged = True
                    counts["purged-seen"] = counts.get("purged-seen", 0) + 1
                else:
                    assert md.purged is not True, f"{bo!r} was purged but read back"
                    assert np.array_equal(got, md.data), f"{bo!r} corrupted"
            elif op == "evict":
                bo.evict()
            elif op == "restore":
                if md.purged:
                    with pytest.raises(gpubo.Purged):
                        bo.restore()
                else:
                    bo.restore()
            elif op == "kernel":
                if md.purged:
                    continue
                m.launch(inc, (bo.nbytes,), None, bo).wait()
                md.data += 1
            elif op == "pin":
                if md.purged:
                    continue
                with bo.pin() as buf:
                    out = np.empty(16, np.uint8)
                    cl.enqueue_copy(m.queue, out, buf, is_blocking=True)
                    assert np.array_equal(out, md.data[:16])
            elif op == "purgeable":
                bo.purgeable = True
                md.purgeable = True
                if md.purged is False:
                    md.purged = None
            elif op == "keep" and md.purgeable:
                kept = bo.set_purgeable(False)
                md.purgeable = False
                if md.purged is True:
                    assert not kept
                md.purged = not kept
                if kept:
                    assert bo.state is not P
        for md in models:
            if md.purgeable:
                md.purged = not md.bo.set_purgeable(False)
            if md.purged:
                with pytest.raises(gpubo.Purged):
                    md.bo.read()
            else:
                assert np.array_equal(md.bo.read(), md.data), f"{md.bo!r} corrupted at the end"
    except BaseException as e:
        errors.append(e)
        stop.set()
    finally:
        for md in models:
            md.bo.free()


@pytest.mark.timeout(60)
def test_monitor_and_three_threads_never_lose_a_byte(make_mgr: MakeMgr) -> None:
    budget = 1536 * KiB
    m = make_mgr(budget=budget, store_size="64MiB")
    src = Scripted([], then=Pressure(256 * KiB, "always a little"))
    mon = m.watch_pressure(src, interval=0.01)
    stop = threading.Event()
    errors: list[BaseException] = []
    counts: list[dict[str, int]] = [{}, {}, {}]
    samples = [0]

    def sampler() -> None:
        while not stop.is_set():
            try:
                check_budget(m)
            except BaseException as e:
                errors.append(e)
                stop.set()
            samples[0] += 1
            time.sleep(0.002)

    def next_round() -> None:
        """The handshake: return once the monitor has finished a round it
        had not started when this was called."""
        seen = mon.rounds
        wait_for(lambda: mon.rounds >= seen + 2 or stop.is_set(), timeout=10.0)

    workers = [
        threading.Thread(target=_worker, args=(m, 100 + i, stop, errors, counts[i], next_round))
        for i in range(3)
    ]
    watcher = threading.Thread(target=sampler)
    for t in [*workers, watcher]:
        t.start()
    for t in workers:
        t.join(60)
        assert not t.is_alive(), "a worker hung"
    stop.set()
    watcher.join(30)
    assert not watcher.is_alive(), "the sampler hung"
    if errors:
        raise errors[0]
    assert mon.running
    assert mon.rounds > 10 and mon.reclaimed_bytes > 0
    assert samples[0] > 0
    total = {k: sum(c.get(k, 0) for c in counts) for k in set().union(*counts)}
    assert total.get("read", 0) > 20 and total.get("kernel", 0) > 5, total
    s = check_budget(m)
    assert s.evictions > 0 and s.restores > 0 and s.purges > 0
    assert s.bo_count == 0 and s.resident_bytes == 0 and s.swapped_bytes == 0
