"""Kernel launches: BO args restored together, busy BOs waited for, never copied stale."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyopencl as cl
import pytest
from conftest import AXPY_SRC, INC_SRC, SLOW_SRC, Gate, check_budget, gated_launch, pattern, slow_expected

import gpubo

MiB = 1 << 20
R, S = gpubo.State.RESIDENT, gpubo.State.SWAPPED
Builder = Callable[[gpubo.Manager, str, str], cl.Kernel]

#: Work items and LCG steps of the slow kernel; it is held busy by a gate,
#: not by its speed, so a few steps are enough.
SLOW_N = 1024
SLOW_ITERS = 1_000


def test_launch_restores_evicted_args_and_mixes_scalars(mgr: gpubo.Manager, build_kernel: Builder) -> None:
    axpy = build_kernel(mgr, AXPY_SRC, "axpy")
    n = 100_000
    x = np.linspace(0, 1, n, dtype=np.float32)
    y = np.arange(n, dtype=np.float32)
    bx, by = mgr.alloc(x.nbytes, name="x"), mgr.alloc(y.nbytes + 4, name="y")
    bx.write(x)
    by.write(y)
    bx.evict()
    by.evict()
    before = mgr.stats()
    ev = mgr.launch(axpy, (n + 3,), None, bx, by, np.float32(2.5), np.int32(n))
    assert isinstance(ev, cl.Event)
    assert (bx.state, by.state) == (R, R)
    assert mgr.stats().restores == before.restores + 2
    ev.wait()
    assert np.array_equal(by.read(np.float32, count=n), np.float32(2.5) * x + y)
    assert np.array_equal(bx.read(np.float32), x)
    assert by.read(offset=4 * n).tobytes() == b"\0\0\0\0"
    assert not bx.pinned and not by.pinned and mgr.stats().pinned_bytes == 0


def test_launch_args_resident_together(make_mgr: Callable[..., gpubo.Manager], build_kernel: Builder) -> None:
    m = make_mgr(budget=3 * MiB)
    axpy = build_kernel(m, AXPY_SRC, "axpy")
    n = MiB // 4
    x, y = m.alloc(MiB), m.alloc(MiB)
    x.write(np.ones(n, np.float32))
    y.write(np.full(n, 3, np.float32))
    x.evict()
    y.evict()
    fillers = [m.alloc(MiB) for _ in range(3)]  # the device is full of others
    m.launch(axpy, (n,), None, y, x, np.float32(-1), np.int32(n)).wait()
    # restoring the second arg must not have evicted the first
    assert (x.state, y.state) == (R, R)
    assert [f.state for f in fillers].count(S) == 2
    assert (x.read(np.float32) == -2).all()
    check_budget(m)


def test_launch_args_over_budget_evict_nothing(
    make_mgr: Callable[..., gpubo.Manager], build_kernel: Builder
) -> None:
    m = make_mgr(budget=2 * MiB)
    axpy = build_kernel(m, AXPY_SRC, "axpy")
    a, b = m.alloc(MiB), m.alloc(MiB + 4)
    b.write(pattern(MiB + 4, 1))
    a.evict()
    c = m.alloc(MiB)
    before = m.stats()
    before_states = [a.state, b.state, c.state]
    with pytest.raises(gpubo.OutOfDeviceMemory) as info:
        m.launch(axpy, (16,), None, a, b, np.float32(1), np.int32(16))
    assert info.value.nbytes == 2 * MiB + 4
    after = m.stats()
    assert after.evictions == before.evictions and after.restores == before.restores
    assert [a.state, b.state, c.state] == before_states
    assert after.pinned_bytes == 0 and not any(bo.pinned for bo in (a, b, c))
    assert np.array_equal(b.read(), pattern(MiB + 4, 1))


def test_launch_args_plus_pinned_over_budget(
    make_mgr: Callable[..., gpubo.Manager], build_kernel: Builder
) -> None:
    m = make_mgr(budget=2 * MiB)
    inc = build_kernel(m, INC_SRC, "inc")
    p, a = m.alloc(MiB + 1), m.alloc(MiB)
    a.evict()
    with p.pin():
        before = m.stats()
        with pytest.raises(gpubo.OutOfDeviceMemory):
            m.launch(inc, (MiB,), None, a)
        assert m.stats().evictions == before.evictions
        assert a.state is S
    m.launch(inc, (MiB,), None, a).wait()  # fits once p is unpinned
    assert (a.read() == 1).all()


def test_same_bo_twice_in_args(mgr: gpubo.Manager, build_kernel: Builder) -> None:
    axpy = build_kernel(mgr, AXPY_SRC, "axpy")
    bo = mgr.alloc(400)
    bo.write(np.full(100, 2, np.float32))
    bo.evict()
    mgr.launch(axpy, (100,), None, bo, bo, np.float32(3), np.int32(100)).wait()
    assert (bo.read(np.float32) == 8).all()


def test_a_launch_dirties_a_clean_bo_so_its_eviction_writes_it_back(
    mgr: gpubo.Manager, build_kernel: Builder
) -> None:
    """A restored BO keeps its store copy (evicting it again copies nothing);
    a kernel that may write it makes that copy stale: the next eviction must
    write the kernel's output back, not drop the buffer."""
    inc = build_kernel(mgr, INC_SRC, "inc")
    n = 64 * 1024
    bo = mgr.alloc(n)
    data = pattern(n, 7)
    bo.write(data)
    bo.evict()
    bo.restore()  # resident, with a clean copy in the store
    before = mgr.stats().bytes_evicted
    bo.evict()
    assert mgr.stats().bytes_evicted == before, "a clean BO's eviction must copy nothing"
    bo.restore()
    mgr.launch(inc, (n,), None, bo).wait()
    bo.evict()
    assert mgr.stats().bytes_evicted == before + n, "the launch's output was not written back"
    assert np.array_equal(bo.read(), data + 1)


def _launch_slow(m: gpubo.Manager, kernel: cl.Kernel, bo: gpubo.BufferObject) -> tuple[cl.Event, Gate]:
    """A launch that cannot start before its gate opens (see conftest.Gate)."""
    return gated_launch(m, kernel, (SLOW_N,), bo, np.uint32(SLOW_ITERS))


@pytest.mark.parametrize("force", ["bo.evict", "alloc", "mgr.evict", "free+alloc"])
def test_eviction_of_running_kernel_copies_its_output(
    mgr: gpubo.Manager, build_kernel: Builder, force: str
) -> None:
    slow = build_kernel(mgr, SLOW_SRC, "slow")
    bo = mgr.alloc(SLOW_N * 4, name="out")
    bo.write(np.full(SLOW_N, 0xDEADBEEF, np.uint32))
    ev, gate = _launch_slow(mgr, slow, bo)
    assert bo.busy  # the gate holds the kernel back, however fast the device
    if force == "bo.evict":
        bo.evict()
    elif force == "alloc":
        mgr.alloc(mgr.budget)  # only bo is evictable, and it is busy
    elif force == "mgr.evict":
        assert mgr.evict(1) == SLOW_N * 4
    else:
        # Free waits for the kernel, and a new BO on the recycled memory reads zeros.
        bo.free()
        assert gate.opened_by == "wait"  # free waited for the kernel
        assert ev.command_execution_status == cl.command_execution_status.COMPLETE
        fresh = mgr.alloc(SLOW_N * 4)
        assert not fresh.read().any()
        return
    assert bo.state is S
    assert gate.opened_by == "wait"  # the eviction waited for the kernel before copying
    assert ev.command_execution_status == cl.command_execution_status.COMPLETE
    assert not bo.busy
    got = bo.read(np.uint32)
    assert np.array_equal(got, slow_expected(SLOW_N, SLOW_ITERS))
    check_budget(mgr)


def test_idle_bos_are_evicted_before_busy_ones(
    make_mgr: Callable[..., gpubo.Manager], build_kernel: Builder
) -> None:
    m = make_mgr(budget=3 * MiB)
    slow = build_kernel(m, SLOW_SRC, "slow")
    busy = m.alloc(MiB, name="busy")
    b = m.alloc(MiB, name="b")
    c = m.alloc(MiB, name="c")
    _, gate = _launch_slow(m, slow, busy)
    # Touch b and c without queueing anything (the queue is in order: a read
    # would wait for the kernel): busy is now the least recently used.
    b.restore()
    c.restore()
    assert busy.busy and not gate.is_open
    m.alloc(MiB)
    assert (busy.state, b.state, c.state) == (R, S, R)
    assert np.array_equal(busy.read(np.uint32, count=SLOW_N), slow_expected(SLOW_N, SLOW_ITERS))


def test_read_and_write_wait_for_running_kernel(mgr: gpubo.Manager, build_kernel: Builder) -> None:
    slow = build_kernel(mgr, SLOW_SRC, "slow")
    bo = mgr.alloc(SLOW_N * 4 + 8)
    _, gate = _launch_slow(mgr, slow, bo)
    assert bo.busy
    bo.write(np.uint32(7).tobytes(), offset=SLOW_N * 4)  # beyond the kernel's range
    assert gate.is_open  # the write went behind the kernel
    got = bo.read(np.uint32, count=SLOW_N)
    assert np.array_equal(got, slow_expected(SLOW_N, SLOW_ITERS))
    assert bo.read(np.uint32, count=1, offset=SLOW_N * 4)[0] == 7


def test_kernel_then_restore_by_another_kernel(mgr: gpubo.Manager, build_kernel: Builder) -> None:
    """Kernel output survives eviction and feeds the next launch."""
    inc = build_kernel(mgr, INC_SRC, "inc")
    n = 3 * MiB // 2
    bo = mgr.alloc(n)
    data = pattern(n, 4)
    bo.write(data)
    for _ in range(3):
        mgr.launch(inc, (n,), None, bo)
        bo.evict()
    assert np.array_equal(bo.read(), data + 3)


def test_launch_with_wait_for(mgr: gpubo.Manager, build_kernel: Builder) -> None:
    inc = build_kernel(mgr, INC_SRC, "inc")
    bo = mgr.alloc(4096)
    ev1 = mgr.launch(inc, (4096,), None, bo)
    ev2 = mgr.launch(inc, (4096,), None, bo, wait_for=[ev1])
    ev2.wait()
    assert (bo.read() == 2).all()


def test_launch_failure_is_translated_and_unpins(mgr: gpubo.Manager, build_kernel: Builder) -> None:
    inc = build_kernel(mgr, INC_SRC, "inc")
    bo = mgr.alloc(4096)
    bo.evict()
    with pytest.raises(gpubo.DeviceError):
        mgr.launch(inc, (4096,), (7,), bo)  # 7 does not divide 4096
    assert not bo.pinned and mgr.stats().pinned_bytes == 0
    bo.evict()
    assert not bo.read().any()
