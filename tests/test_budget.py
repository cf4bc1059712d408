"""The budget is hard; victims are chosen LRU by priority; pinned BOs never move."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyopencl as cl
import pytest
from conftest import INC_SRC, check_budget, pattern

import gpubo
from gpubo.store import CHUNK_BYTES

MiB = 1 << 20
R, S = gpubo.State.RESIDENT, gpubo.State.SWAPPED


def states(*bos: gpubo.BufferObject) -> list[gpubo.State]:
    return [bo.state for bo in bos]


def test_budget_holds_after_every_call(make_mgr: Callable[..., gpubo.Manager]) -> None:
    m = make_mgr(budget=3 * MiB + 12345)
    rng = np.random.default_rng(1)
    bos: dict[int, tuple[gpubo.BufferObject, np.ndarray]] = {}
    for step in range(200):
        op = rng.integers(0, 6)
        if op == 0 or not bos:
            n = int(rng.integers(1, 3 * MiB // 2))
            bo = m.alloc(n)
            data = pattern(n, step)
            bo.write(data)
            bos[bo.id] = (bo, data)
        else:
            key = list(bos)[int(rng.integers(0, len(bos)))]
            bo, data = bos[key]
            if op == 1:
                assert np.array_equal(bo.read(), data)
            elif op == 2:
                bo.evict()
            elif op == 3:
                bo.restore()
            elif op == 4:
                m.evict(int(rng.integers(0, 2 * MiB)))
            elif op == 5 and len(bos) > 4:
                bo.free()
                del bos[key]
        s = check_budget(m)
        assert s.bo_count == len(bos)
        assert s.resident_bytes + s.swapped_bytes == sum(bo.nbytes for bo, _ in bos.values())
    for bo, data in bos.values():
        assert np.array_equal(bo.read(), data)


@pytest.mark.parametrize("extra", [1, MiB])
def test_bo_larger_than_budget_evicts_nothing(mgr: gpubo.Manager, extra: int) -> None:
    bos = [mgr.alloc(MiB) for _ in range(4)]
    bos[0].evict()
    before = mgr.stats()
    before_states = states(*bos)
    with pytest.raises(gpubo.OutOfDeviceMemory) as info:
        mgr.alloc(mgr.budget + extra)
    assert isinstance(info.value, MemoryError) and isinstance(info.value, gpubo.GpuboError)
    assert info.value.nbytes == mgr.budget + extra
    assert info.value.budget == mgr.budget
    after = mgr.stats()
    assert after.evictions == before.evictions
    assert after.resident_bytes == before.resident_bytes
    assert states(*bos) == before_states


def test_bo_larger_than_device_max_alloc_evicts_nothing(make_mgr: Callable[..., gpubo.Manager]) -> None:
    # PoCL's largest allocation follows the host's free memory: ask the device.
    device_max = cl.Context(dev_type=cl.device_type.ALL).devices[0].max_mem_alloc_size
    m = make_mgr(budget=2 * device_max, store_size="16MiB")  # budget above the device: allowed
    bo = m.alloc(4096)
    too_big = m.backend.max_alloc_bytes + 1
    with pytest.raises(gpubo.OutOfDeviceMemory, match="largest allocation"):
        m.alloc(too_big)
    assert bo.state is R and m.stats().evictions == 0


def test_lru_victim_is_least_recently_used(make_mgr: Callable[..., gpubo.Manager]) -> None:
    m = make_mgr(budget=3 * MiB)
    a, b, c = (m.alloc(MiB, name=n) for n in "abc")
    a.read(count=1)  # touch a: b is now least recently used
    m.alloc(MiB, name="d")
    assert states(a, b, c) == [R, S, R]
    assert m.stats().evictions == 1


@pytest.mark.parametrize("touch", ["read", "write", "pin", "restore"])
def test_every_use_counts_for_lru(make_mgr: Callable[..., gpubo.Manager], touch: str) -> None:
    m = make_mgr(budget=3 * MiB)
    a, b, c = (m.alloc(MiB) for _ in range(3))
    if touch == "read":
        a.read(count=1)
    elif touch == "write":
        a.write(b"x", offset=5)
    elif touch == "pin":
        with a.pin():
            pass
    else:
        a.restore()
    m.alloc(MiB)
    assert states(a, b, c) == [R, S, R]
    m.alloc(MiB)
    assert states(a, b, c) == [R, S, S]


def test_launch_counts_for_lru(make_mgr: Callable[..., gpubo.Manager], build_kernel: Callable) -> None:
    m = make_mgr(budget=3 * MiB)
    inc = build_kernel(m, INC_SRC, "inc")
    a, b, c = (m.alloc(MiB) for _ in range(3))
    m.launch(inc, (MiB,), None, a).wait()
    m.alloc(MiB)
    assert states(a, b, c) == [R, S, R]
    assert (a.read() == 1).all()


def test_lower_priority_is_evicted_first(make_mgr: Callable[..., gpubo.Manager]) -> None:
    m = make_mgr(budget=3 * MiB)
    low = m.alloc(MiB, name="low", priority=0)
    high = m.alloc(MiB, name="high", priority=3)
    mid = m.alloc(MiB, name="mid", priority=1)
    high.read(count=1)
    mid.read(count=1)
    low.read(count=1)  # low is the most recently used, still goes first
    m.alloc(MiB, priority=3)
    assert states(low, high, mid) == [S, R, R]
    m.alloc(MiB, priority=3)
    assert states(low, high, mid) == [S, R, S]
    assert (low.priority, mid.priority, high.priority) == (0, 1, 3)


def test_pool_is_drained_before_anyone_is_evicted(mgr: gpubo.Manager) -> None:
    bos = [mgr.alloc(MiB) for _ in range(4)]
    bos[0].free()
    assert mgr.stats().pooled_bytes == MiB
    before = mgr.stats()
    other = mgr.alloc(MiB // 2)  # a different size: the pooled buffer must go, nobody is evicted
    s = check_budget(mgr)
    assert s.evictions == before.evictions
    assert states(*bos[1:]) == [R, R, R] and other.state is R
    assert s.pooled_bytes == 0


def test_mgr_evict_frees_lru_first_and_reports_bytes(mgr: gpubo.Manager) -> None:
    a, b, c = (mgr.alloc(MiB + i) for i in range(3))
    a.read(count=1)
    assert mgr.evict(1) == MiB + 1  # b, the least recently used
    assert states(a, b, c) == [R, S, R]
    assert mgr.evict("1MiB") == MiB + 2  # then c
    assert states(a, b, c) == [R, S, S]
    assert mgr.evict(0) == 0
    assert mgr.evict(100 * MiB) == MiB  # all that is left
    assert states(a, b, c) == [S, S, S]
    assert mgr.evict(1) == 0
    s = mgr.stats()
    assert s.resident_bytes == 0 and s.swapped_bytes == 3 * MiB + 3


def test_mgr_evict_drains_pool_first(mgr: gpubo.Manager) -> None:
    a = mgr.alloc(MiB)
    b = mgr.alloc(MiB)
    b.free()
    assert mgr.evict(MiB) == MiB
    assert a.state is R
    assert mgr.stats().pooled_bytes == 0


# -- pinned -------------------------------------------------------------------


def test_pinned_bo_is_never_evicted(make_mgr: Callable[..., gpubo.Manager]) -> None:
    m = make_mgr(budget=3 * MiB)
    p = m.alloc(MiB, name="pinned")
    data = pattern(MiB, 1)
    p.write(data)
    others = [m.alloc(MiB) for _ in range(2)]
    with p.pin() as buf:
        assert p.pinned and m.stats().pinned_bytes == MiB
        # p is the least recently used; allocations and restores that need room go elsewhere
        for _ in range(4):
            others.append(m.alloc(MiB))
            assert p.state is R
        for bo in others:
            bo.read(count=1)
            assert p.state is R
        assert m.evict(100 * MiB) == 2 * MiB
        assert p.state is R
        with pytest.raises(gpubo.BufferBusy, match="pinned"):
            p.evict()
        with pytest.raises(gpubo.BufferBusy, match="pinned"):
            p.free()
        assert p.state is R and p.pinned
        host = np.empty(MiB, np.uint8)
        cl.enqueue_copy(m.queue, host, buf, is_blocking=True)
        assert np.array_equal(host, data)
        check_budget(m)
    assert not p.pinned and m.stats().pinned_bytes == 0
    p.evict()
    assert np.array_equal(p.read(), data)
    p.free()


def test_only_pinned_resident_alloc_raises(make_mgr: Callable[..., gpubo.Manager]) -> None:
    m = make_mgr(budget=2 * MiB)
    a, b = m.alloc(MiB), m.alloc(MiB)
    c = m.alloc(MiB)  # evicts a
    c.free()
    with a.pin(), b.pin():
        before = m.stats()
        assert before.pinned_bytes == 2 * MiB
        with pytest.raises(gpubo.OutOfDeviceMemory):
            m.alloc(1)
        with pytest.raises(gpubo.OutOfDeviceMemory):
            m.alloc(MiB)
        after = check_budget(m)
        assert after.evictions == before.evictions
        assert after.bo_count == 2
        assert states(a, b) == [R, R]
    m.alloc(MiB)  # fine once unpinned; a was unpinned last, so b is the LRU victim
    assert states(a, b) == [R, S]


def test_alloc_that_cannot_fit_beside_pinned_evicts_nothing(make_mgr: Callable[..., gpubo.Manager]) -> None:
    m = make_mgr(budget=4 * MiB)
    p = m.alloc(3 * MiB)
    small = m.alloc(MiB // 2)
    with p.pin():
        before = m.stats()
        with pytest.raises(gpubo.OutOfDeviceMemory):
            m.alloc(2 * MiB)  # 3 MiB pinned + 2 MiB > budget, whatever is evicted
        assert m.stats().evictions == before.evictions
        assert small.state is R
        m.alloc(MiB // 2 + 1)  # this one fits beside the pinned BO
    check_budget(m)


def test_nested_pins(mgr: gpubo.Manager) -> None:
    bo = mgr.alloc(100)
    with bo.pin() as b1, bo.pin() as b2:
        assert b1.int_ptr == b2.int_ptr
        assert mgr.stats().pinned_bytes == 100
    assert not bo.pinned and mgr.stats().pinned_bytes == 0
    with pytest.raises(RuntimeError), bo.pin():
        raise RuntimeError("body fails")
    assert not bo.pinned
    bo.evict()
    assert bo.state is S


def test_restore_of_other_bo_skips_pinned(make_mgr: Callable[..., gpubo.Manager]) -> None:
    m = make_mgr(budget=2 * MiB)
    a = m.alloc(MiB)
    a.write(pattern(MiB, 1))
    b = m.alloc(MiB)
    b.write(pattern(MiB, 2))
    a.evict()
    with b.pin():
        c = m.alloc(MiB)
        c.write(pattern(MiB, 3))
        assert np.array_equal(a.read(), pattern(MiB, 1))  # must evict c, not pinned b
        assert states(a, b, c) == [R, R, S]
    assert np.array_equal(c.read(), pattern(MiB, 3))
    assert np.array_equal(b.read(), pattern(MiB, 2))


def test_stats_pooled_counted_against_budget(mgr: gpubo.Manager) -> None:
    bos = [mgr.alloc(MiB) for _ in range(4)]
    for bo in bos[:2]:
        bo.free()
    s = check_budget(mgr)
    assert s.pooled_bytes == 2 * MiB and s.resident_bytes == 2 * MiB
    big = mgr.alloc(2 * MiB + CHUNK_BYTES // 2)  # needs the pool and one eviction
    s = check_budget(mgr)
    assert big.state is R
    assert s.pooled_bytes == 0
    assert s.evictions == 1
