"""Purgeable buffers: dropped first and without I/O, Purged on access, revived zeroed by a write."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pyopencl as cl
import pytest
from conftest import AXPY_SRC, INC_SRC, SLOW_SRC, check_budget, gated_launch, pattern, slow_expected

import gpubo
from gpubo.shrinker import DeviceShrinker, PoolShrinker

KiB = 1 << 10
MiB = 1 << 20
N = 256 * KiB
R, S, P = gpubo.State.RESIDENT, gpubo.State.SWAPPED, gpubo.State.PURGED

MakeMgr = Callable[..., gpubo.Manager]
Builder = Callable[[gpubo.Manager, str, str], cl.Kernel]


def completed(ev: cl.Event) -> bool:
    return bool(ev.command_execution_status == cl.command_execution_status.COMPLETE)


def written(m: gpubo.Manager, seed: int, nbytes: int = N, **kw: Any) -> tuple[gpubo.BufferObject, np.ndarray]:
    bo = m.alloc(nbytes, **kw)
    data = pattern(nbytes, seed)
    bo.write(data)
    return bo, data


def purged(m: gpubo.Manager, nbytes: int = N, **kw: Any) -> gpubo.BufferObject:
    """A BO with content, made purgeable and purged by a shrink."""
    bo, _ = written(m, 99, nbytes, **kw)
    bo.purgeable = True
    m.shrink(1)
    assert bo.state is P
    return bo


def test_the_purgeable_flag(mgr: gpubo.Manager) -> None:
    bo, data = written(mgr, 1)
    assert bo.purgeable is False
    bo.purgeable = True
    assert bo.purgeable is True
    assert bo.set_purgeable(False) is True  # nothing was dropped
    assert bo.purgeable is False
    assert bo.set_purgeable(True) is True
    for bad in (1, 0, None, "yes"):
        with pytest.raises(TypeError, match="bool"):
            bo.set_purgeable(bad)
        with pytest.raises(TypeError, match="bool"):
            bo.purgeable = bad
    assert bo.purgeable is True
    assert bo.set_purgeable(False) is True
    assert np.array_equal(bo.read(), data)
    bo.free()
    with pytest.raises(gpubo.BufferFreed):
        bo.purgeable = True


def test_shrink_drops_a_purgeable_bo_with_no_io(mgr: gpubo.Manager) -> None:
    keep, keep_data = written(mgr, 1)  # least recently used, but not purgeable
    bo, _ = written(mgr, 2)
    bo.purgeable = True
    s0 = mgr.stats()
    assert mgr.shrink(1) >= N
    s1 = mgr.stats()
    assert bo.state is P and keep.state is R
    assert s1.purges == s0.purges + 1
    assert s1.purged_bytes == N
    assert s1.evictions == s0.evictions and s1.bytes_evicted == s0.bytes_evicted
    assert s1.store_used_bytes == s0.store_used_bytes  # nothing written to the store
    assert s1.resident_bytes == s0.resident_bytes - N
    assert s1.swapped_bytes == s0.swapped_bytes
    assert np.array_equal(keep.read(), keep_data)


def test_purgeable_bos_go_in_lru_order(mgr: gpubo.Manager) -> None:
    a, _ = written(mgr, 1)
    b, _ = written(mgr, 2)
    a.purgeable = True
    b.purgeable = True
    b.read(count=1)
    a.read(count=1)  # a is now the most recently used
    only = [s for s in mgr.shrinkers if isinstance(s, (PoolShrinker, DeviceShrinker))]
    for s in mgr.shrinkers:
        if s not in only:
            mgr.unregister_shrinker(s)
    assert mgr.shrink(N) == N
    assert (a.state, b.state) == (R, P)
    assert mgr.evict(N) == N
    assert a.state is P


def _access(m: gpubo.Manager, bo: gpubo.BufferObject, how: str, inc: cl.Kernel) -> None:
    if how == "read":
        bo.read()
    elif how == "read-out":
        bo.read(out=np.empty(16, np.uint8))
    elif how == "pin":
        with bo.pin():
            pass
    elif how == "array":
        with bo.array(bo.nbytes):
            pass
    elif how == "restore":
        bo.restore()
    elif how == "launch":
        m.launch(inc, (bo.nbytes,), None, bo)
    elif how == "sync":
        bo.sync()
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["read", "read-out", "pin", "array", "restore", "launch", "sync"])
def test_every_access_to_a_purged_bo_raises_purged(
    mgr: gpubo.Manager, build_kernel: Builder, how: str
) -> None:
    inc = build_kernel(mgr, INC_SRC, "inc")
    bo = purged(mgr, name="cache")
    s0 = mgr.stats()
    with pytest.raises(gpubo.Purged, match="cache") as info:
        _access(mgr, bo, how, inc)
    assert isinstance(info.value, gpubo.GpuboError)
    assert bo.state is P
    s1 = mgr.stats()
    assert s1.pinned_bytes == 0 and s1.resident_bytes == s0.resident_bytes
    assert s1.purged_bytes == N
    assert "cache" not in mgr.names()  # sync committed nothing


def test_launch_with_a_purged_arg_leaves_the_others_unpinned(
    mgr: gpubo.Manager, build_kernel: Builder
) -> None:
    inc = build_kernel(mgr, INC_SRC, "inc")
    ok, ok_data = written(mgr, 5)
    bo = purged(mgr)
    with pytest.raises(gpubo.Purged):
        mgr.launch(inc, (N,), None, ok, bo)
    assert mgr.stats().pinned_bytes == 0
    ok.evict()  # not pinned: it can move
    assert np.array_equal(ok.read(), ok_data)


def test_evict_of_a_purged_bo_is_a_no_op(mgr: gpubo.Manager) -> None:
    bo = purged(mgr)
    s0 = mgr.stats()
    bo.evict()
    bo.evict()
    assert mgr.evict(64 * MiB) == 0
    s1 = mgr.stats()
    assert bo.state is P
    assert s1.evictions == s0.evictions and s1.purges == s0.purges


def test_set_purgeable_false_says_whether_the_content_was_kept(mgr: gpubo.Manager) -> None:
    kept, kept_data = written(mgr, 1)
    kept.purgeable = True
    kept.evict()  # swapped, not purged
    assert kept.set_purgeable(False) is True
    assert np.array_equal(kept.read(), kept_data)

    gone = purged(mgr)
    assert gone.set_purgeable(False) is False
    assert gone.purgeable is False
    assert gone.state is P  # still purged: clearing the flag does not bring it back
    with pytest.raises(gpubo.Purged):
        gone.read()
    assert gone.set_purgeable(True) is False
    assert gone.set_purgeable(False) is False


def test_a_partial_write_revives_a_purged_bo_zero_filled(mgr: gpubo.Manager) -> None:
    bo = purged(mgr)
    data = pattern(1000, 7)
    bo.write(data, offset=300)
    assert bo.state is R
    got = bo.read()
    assert not got[:300].any()
    assert np.array_equal(got[300:1300], data)
    assert not got[1300:].any()
    s = mgr.stats()
    assert s.purged_bytes == 0 and s.resident_bytes == N
    bo.evict()  # and it survives a trip through the store
    got = bo.read()
    assert not got[:300].any() and np.array_equal(got[300:1300], data) and not got[1300:].any()


def test_a_whole_write_revives_a_purged_bo_with_exactly_the_data(mgr: gpubo.Manager) -> None:
    bo = purged(mgr)
    data = pattern(N, 8)
    bo.write(data)
    assert bo.state is R
    assert np.array_equal(bo.read(), data)
    bo.set_purgeable(False)
    mgr.evict(N)
    assert bo.state is S
    assert np.array_equal(bo.read(), data)


def test_reviving_makes_room_like_any_restore(make_mgr: MakeMgr) -> None:
    m = make_mgr(budget=2 * N)
    bo = purged(m)
    a, a_data = written(m, 1)
    b, b_data = written(m, 2)  # the budget is full
    bo.write(b"\x01")
    assert bo.state is R and a.state is S and b.state is R
    assert bo.read(count=2).tolist() == [1, 0]
    assert np.array_equal(a.read(), a_data) and np.array_equal(b.read(), b_data)
    check_budget(m)


def test_freeing_a_purged_bo(mgr: gpubo.Manager) -> None:
    s0 = mgr.stats()
    bo = purged(mgr)
    bo.free()
    bo.free()  # idempotent
    s1 = mgr.stats()
    assert bo.state is gpubo.State.FREED
    assert s1.bo_count == s0.bo_count and s1.purged_bytes == 0
    assert s1.store_used_bytes == s0.store_used_bytes
    with pytest.raises(gpubo.BufferFreed):
        bo.write(b"x")


def test_purging_releases_the_store_copy(mgr: gpubo.Manager) -> None:
    base = mgr.stats().store_used_bytes
    bo, _ = written(mgr, 3)
    bo.evict()
    bo.restore()  # resident, with a clean copy kept in the store
    with_copy = mgr.stats().store_used_bytes
    assert with_copy > base
    bo.purgeable = True
    mgr.shrink(1)
    assert bo.state is P
    assert mgr.stats().store_used_bytes == base
    assert mgr.stats().bytes_evicted == N  # only the first eviction copied


def test_allocation_drops_purgeable_bos_before_evicting_anyone(make_mgr: MakeMgr) -> None:
    m = make_mgr(budget=3 * N)
    a, a_data = written(m, 1)  # least recently used
    b, b_data = written(m, 2)
    p, _ = written(m, 3)  # most recently used, purgeable
    p.purgeable = True
    s0 = m.stats()
    c = m.alloc(N)
    s1 = m.stats()
    assert (a.state, b.state, p.state, c.state) == (R, R, P, R)
    assert s1.evictions == s0.evictions and s1.bytes_evicted == s0.bytes_evicted
    assert s1.purges == s0.purges + 1
    # a restore makes room the same way
    a.evict()
    q, _ = written(m, 4)
    q.purgeable = True
    b.read(count=1)
    c.read(count=1)
    a.restore()
    assert (a.state, q.state, b.state, c.state) == (R, P, R, R)
    assert np.array_equal(a.read(), a_data) and np.array_equal(b.read(), b_data)


def test_a_pinned_purgeable_bo_is_not_purged(mgr: gpubo.Manager) -> None:
    bo, data = written(mgr, 1)
    with bo.pin():
        bo.purgeable = True
        mgr.shrink(64 * MiB)
        assert bo.state is R
    assert np.array_equal(bo.read(), data)
    mgr.shrink(1)  # unpinned: now it goes
    assert bo.state is P


def test_a_busy_purgeable_bo_is_skipped_without_blocking(mgr: gpubo.Manager, build_kernel: Builder) -> None:
    slow = build_kernel(mgr, SLOW_SRC, "slow")
    n, iters = 1024, 1_000
    bo = mgr.alloc(n * 4)
    bo.purgeable = True
    ev, gate = gated_launch(mgr, slow, (n,), bo, np.uint32(iters))
    assert bo.busy  # held back by the gate, however fast the device
    mgr.shrink(64 * MiB, may_block=False)
    assert bo.state is R
    assert not gate.is_open and not completed(ev)  # the shrink never waited for it
    assert bo.set_purgeable(False) is True
    assert np.array_equal(bo.read(np.uint32), slow_expected(n, iters))


def test_hibernate_skips_a_purged_named_bo(mgr: gpubo.Manager) -> None:
    bo = purged(mgr, name="scratch")
    other, _ = written(mgr, 4, name="kept")
    mgr.hibernate()
    assert bo.state is P and other.state is S
    assert mgr.names() == ["kept"]


def test_a_launch_never_drops_its_own_purgeable_argument(
    make_mgr: Callable[..., gpubo.Manager], build_kernel: Callable[..., cl.Kernel]
) -> None:
    """Room for a swapped argument must not come from another argument not
    yet pinned, even a purgeable one, which the walk would take first: here
    the bystander z must go instead (found by the stateful machine's long
    profile)."""
    m = make_mgr(budget=2 * N, store_size="16MiB")
    axpy = build_kernel(m, AXPY_SRC, "axpy")
    x = m.alloc(N)  # the lowest id: first in id order
    x.write(np.full(N // 4, 2, np.float32))
    x.evict()
    assert m.evict(N) == N  # its buffer leaves the pool: restoring x needs room
    z = m.alloc(N)
    z.write(pattern(N, 5))
    y = m.alloc(N)
    y.write(np.full(N // 4, 1, np.float32))
    y.purgeable = True  # the budget is full: z and y
    m.launch(axpy, (N // 4,), None, x, y, np.float32(3), np.int32(N // 4)).wait()
    assert y.state is gpubo.State.RESIDENT
    assert (y.read(np.float32) == 7).all()  # 3 * 2 + 1: y was kept, not dropped
    assert z.state is gpubo.State.SWAPPED and np.array_equal(z.read(), pattern(N, 5))
    check_budget(m)
