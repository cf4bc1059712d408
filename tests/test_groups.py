"""Groups: per-group max, min and low (the dmem cgroup semantics), stats, runtime limits, bad input."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from conftest import check_budget, pattern

import gpubo

KiB = 1 << 10
MiB = 1 << 20
N = 256 * KiB
R, S, P = gpubo.State.RESIDENT, gpubo.State.SWAPPED, gpubo.State.PURGED

MakeMgr = Callable[..., gpubo.Manager]


def written(
    where: gpubo.Manager | gpubo.Group, seed: int, nbytes: int = N, **kw: Any
) -> tuple[gpubo.BufferObject, np.ndarray]:
    bo = where.alloc(nbytes, **kw)
    data = pattern(nbytes, seed)
    bo.write(data)
    return bo, data


def states(*bos: gpubo.BufferObject) -> list[gpubo.State]:
    return [bo.state for bo in bos]


def check_group(grp: gpubo.Group) -> gpubo.GroupStats:
    s = grp.stats()
    if s.max_bytes is not None:
        assert s.resident_bytes <= s.max_bytes, s
    assert s.resident_bytes >= 0 and s.swapped_bytes >= 0 and s.bo_count >= 0, s
    return s


# -- the registry of groups -----------------------------------------------------------------------


def test_group_is_made_once_listed_and_found_by_name(mgr: gpubo.Manager) -> None:
    beta = mgr.group("beta", max="1MiB")
    assert isinstance(beta, gpubo.Group)
    assert (beta.name, beta.max, beta.low, beta.min) == ("beta", MiB, 0, 0)
    assert mgr.group("beta") is beta
    assert beta.max == MiB  # asking again without limits changes nothing
    alpha = mgr.group("alpha", min="256KiB")
    assert alpha.max is None and alpha.min == N and alpha.low == N  # low defaults to min
    assert mgr.groups() == [alpha, beta]
    assert mgr.group("beta", max="2MiB") is beta
    assert beta.max == 2 * MiB  # given again, limits replace the old ones


def test_alloc_in_a_group_of_another_manager_is_refused(make_mgr: MakeMgr) -> None:
    m1, m2 = make_mgr(), make_mgr()
    g2 = m2.group("x")
    for bad in (g2, "x", 1, object()):
        with pytest.raises(ValueError, match="group"):
            m1.alloc(N, group=bad)  # type: ignore[arg-type]
    assert m1.stats().bo_count == 0 and m2.stats().bo_count == 0
    assert g2.stats().bo_count == 0


@pytest.mark.parametrize(
    ("name", "exc"),
    [("", ValueError), (None, TypeError), (3, TypeError), (b"a", TypeError), (["a"], TypeError)],
)
def test_group_name_must_be_a_non_empty_str(mgr: gpubo.Manager, name: Any, exc: type) -> None:
    with pytest.raises(exc, match="name"):
        mgr.group(name)
    assert mgr.groups() == []


@pytest.mark.parametrize(
    ("limits", "exc", "names"),
    [
        ({"max": -1}, ValueError, ["max"]),
        ({"max": "lots"}, ValueError, ["max"]),
        ({"max": "1.5B"}, ValueError, ["max"]),
        ({"low": -5}, ValueError, ["low"]),
        ({"min": "x"}, ValueError, ["min"]),
        ({"max": 1.5}, TypeError, ["max"]),
        ({"min": True}, TypeError, ["min"]),
        ({"low": [1]}, TypeError, ["low"]),
        ({"min": "2MiB", "low": "1MiB"}, ValueError, ["min", "low"]),
        ({"low": "2MiB", "max": "1MiB"}, ValueError, ["low", "max"]),
        ({"min": "2MiB", "max": "1MiB"}, ValueError, ["min", "max"]),  # low defaults to min
        ({"min": "1MiB", "low": "3MiB", "max": "2MiB"}, ValueError, ["low", "max"]),
    ],
)
def test_bad_limits_are_refused_naming_the_limit(
    mgr: gpubo.Manager, limits: dict[str, Any], exc: type, names: list[str]
) -> None:
    with pytest.raises(exc) as info:
        mgr.group("g", **limits)
    for name in names:
        assert name in str(info.value)
    assert mgr.groups() == []  # nothing was made
    # the same limits on an existing group are refused and change nothing
    g = mgr.group("g", max="8MiB", low="512KiB", min="256KiB")
    with pytest.raises(exc) as info:
        g.set_limits(**limits)  # (kept limits count: min 2MiB > the kept low is the error then)
    assert any(name in str(info.value) for name in names)
    assert (g.max, g.low, g.min) == (8 * MiB, 2 * N, N)


def test_limit_setters(mgr: gpubo.Manager) -> None:
    g = mgr.group("g")
    g.max = "4MiB"
    g.low = "1MiB"
    g.min = "512KiB"
    assert (g.max, g.low, g.min) == (4 * MiB, MiB, 2 * N)
    with pytest.raises(ValueError, match="max"):
        g.max = -1
    with pytest.raises(ValueError, match="low"):
        g.max = "768KiB"  # below low
    with pytest.raises(ValueError, match="min"):
        g.min = "2MiB"  # above low
    assert (g.max, g.low, g.min) == (4 * MiB, MiB, 2 * N)
    g.max = None
    assert g.max is None
    s = g.stats()
    assert (s.max_bytes, s.low_bytes, s.min_bytes) == (None, MiB, 2 * N)


def test_group_after_close_raises(make_mgr: MakeMgr) -> None:
    m = make_mgr()
    g = m.group("g")
    m.close()
    with pytest.raises(gpubo.ManagerClosed):
        m.group("h")
    with pytest.raises(gpubo.ManagerClosed):
        g.alloc(N)


# -- max ------------------------------------------------------------------------------------------


def test_a_group_never_holds_more_than_max_and_evicts_its_own_first(make_mgr: MakeMgr) -> None:
    m = make_mgr(budget=16 * N)
    outsider, outsider_data = written(m, 0)  # the least recently used of all
    g = m.group("a", max=4 * N)
    bos = [written(g, i) for i in range(1, 5)]
    assert check_group(g).resident_bytes == 4 * N
    a5, a5_data = written(g, 5)  # the group is full: its own LRU BO goes
    s = check_group(g)
    assert s.resident_bytes == 4 * N and s.swapped_bytes == N and s.evictions == 1 and s.bo_count == 5
    assert states(*(bo for bo, _ in bos)) == [S, R, R, R]
    assert outsider.state is R
    bos.append((a5, a5_data))
    # restores inside the group evict the group's own BOs too
    for bo, data in bos * 2:
        assert np.array_equal(bo.read(), data)
        check_group(g)
        assert outsider.state is R
    assert m.stats().evictions == g.stats().evictions
    assert np.array_equal(outsider.read(), outsider_data)
    check_budget(m)


def test_a_bo_larger_than_the_group_max_evicts_nothing(make_mgr: MakeMgr) -> None:
    m = make_mgr(budget=8 * N)
    g = m.group("a", max=2 * N)
    a, _ = written(g, 1)
    x, _ = written(m, 2)
    s0 = m.stats()
    with pytest.raises(gpubo.OutOfDeviceMemory, match="max") as info:
        g.alloc(3 * N)
    assert info.value.nbytes == 3 * N
    assert states(a, x) == [R, R]
    s1 = m.stats()
    assert (s1.evictions, s1.bo_count, s1.resident_bytes) == (s0.evictions, s0.bo_count, s0.resident_bytes)
    assert g.stats().bo_count == 1


def test_a_group_full_of_pinned_bos_refuses_without_evicting_others(make_mgr: MakeMgr) -> None:
    m = make_mgr(budget=8 * N)
    g = m.group("a", max=2 * N)
    a1, _ = written(g, 1)
    a2, _ = written(g, 2)
    x, _ = written(m, 3)
    with a1.pin(), a2.pin():
        with pytest.raises(gpubo.OutOfDeviceMemory):
            g.alloc(N)
        assert x.state is R
    assert m.stats().evictions == 0
    g.alloc(N)  # unpinned: now the group evicts its own (a2: unpinned first, so less recently used)
    assert states(a1, a2, x) == [R, S, R]


def test_restoring_a_bo_above_a_lowered_max_fails_and_keeps_it(make_mgr: MakeMgr) -> None:
    m = make_mgr(budget=8 * N)
    g = m.group("a", max=2 * N)
    big, data = written(g, 1, 2 * N)
    big.evict()
    g.max = N
    with pytest.raises(gpubo.OutOfDeviceMemory):
        big.read()
    assert big.state is S
    g.max = 2 * N
    assert np.array_equal(big.read(), data)


def test_lowering_max_evicts_the_group_down_to_it_at_once(make_mgr: MakeMgr) -> None:
    m = make_mgr(budget=16 * N)
    x, _ = written(m, 0)
    g = m.group("a")
    bos = [written(g, i) for i in range(1, 5)]
    g.max = 2 * N
    s = check_group(g)
    assert s.resident_bytes == 2 * N and s.max_bytes == 2 * N
    assert states(*(bo for bo, _ in bos)) == [S, S, R, R]  # least recently used first
    m.group("a", max=N)  # the same through Manager.group
    assert states(*(bo for bo, _ in bos)) == [S, S, S, R]
    g.set_limits(max="0")
    assert states(*(bo for bo, _ in bos)) == [S, S, S, S]
    assert x.state is R
    g.max = None  # unlimited again: nothing comes back by itself, everything can
    for bo, data in bos:
        assert np.array_equal(bo.read(), data)
    assert check_group(g).resident_bytes == 4 * N


def test_lowering_max_below_pinned_bos_raises_and_changes_nothing(make_mgr: MakeMgr) -> None:
    m = make_mgr(budget=16 * N)
    g = m.group("a")
    bos = [written(g, i) for i in range(1, 5)]
    a1, a2, a3, a4 = (bo for bo, _ in bos)
    with a3.pin(), a4.pin():
        with pytest.raises(gpubo.OutOfDeviceMemory, match="unchanged"):
            g.max = N
        assert g.max is None and g.stats().max_bytes is None  # a failed call changes nothing
        assert states(a1, a2, a3, a4) == [R, R, R, R]
        g.max = 2 * N  # what the pins allow is accepted, and evicts the rest
        assert states(a1, a2, a3, a4) == [S, S, R, R]
    assert check_group(g).resident_bytes == 2 * N
    for bo, data in bos:
        assert np.array_equal(bo.read(), data)


def test_a_max_that_fails_while_evicting_puts_the_old_limits_back(make_mgr: MakeMgr) -> None:
    m = make_mgr(budget=16 * N)
    g = m.group("a", max=8 * N, low=N)
    bos = [written(g, i) for i in range(1, 4)]
    a1, a2 = bos[0][0], bos[1][0]
    # a1 and a2 held as if other threads were using them: the walk skips them
    with a1.lock, a2.lock, pytest.raises(gpubo.OutOfDeviceMemory, match="unchanged"):
        g.set_limits(max=N, low=N)
    assert (g.max, g.low) == (8 * N, N)
    for bo, data in bos:
        assert np.array_equal(bo.read(), data)


def test_raising_max_takes_effect_at_once(make_mgr: MakeMgr) -> None:
    m = make_mgr(budget=16 * N)
    g = m.group("a", max=N)
    a1, _ = written(g, 1)
    g.max = 3 * N
    a2, _ = written(g, 2)
    a3, _ = written(g, 3)
    assert states(a1, a2, a3) == [R, R, R]
    assert m.stats().evictions == 0


def test_a_group_at_max_drops_its_purgeable_bos_first(make_mgr: MakeMgr) -> None:
    m = make_mgr(budget=16 * N)
    g = m.group("a", max=2 * N)
    a1, _ = written(g, 1)
    a2, _ = written(g, 2)
    a2.purgeable = True
    s0 = m.stats()
    g.alloc(N)
    assert states(a1, a2) == [R, P]
    assert m.stats().bytes_evicted == s0.bytes_evicted
    check_group(g)


# -- min and low ----------------------------------------------------------------------------------


def test_min_protects_a_group_from_others(make_mgr: MakeMgr) -> None:
    m = make_mgr(budget=4 * N)
    g = m.group("prot", min=2 * N)
    p1, _ = written(g, 1)  # the least recently used of all
    p2, p2_data = written(g, 2)
    x1, _ = written(m, 3)
    x2, _ = written(m, 4)
    y, _ = written(m, 5)  # needs room: not from the protected group
    assert states(p1, p2, x1, x2, y) == [R, R, S, R, R]
    other = m.group("other")
    with y.pin(), x2.pin():
        # only the protected BOs could make room: refused rather than evicted
        with pytest.raises(gpubo.OutOfDeviceMemory):
            m.alloc(N)
        with pytest.raises(gpubo.OutOfDeviceMemory):
            other.alloc(N)
        with pytest.raises(gpubo.OutOfDeviceMemory):
            x1.read()  # a restore for no group
        assert m.shrink(64 * MiB) == 0 and m.evict(64 * MiB) == 0  # the shrinkers spare it too
        assert m.shrink(64 * MiB, may_block=False) == 0
        assert states(p1, p2) == [R, R]
        # its own allocation may evict its own BOs
        p3, _ = written(g, 6)
        assert states(p1, p2, p3) == [S, R, R]
    assert g.stats().evictions == 1
    assert np.array_equal(p2.read(), p2_data)
    assert m.stats().bo_count == 6


def test_min_protects_only_up_to_min(make_mgr: MakeMgr) -> None:
    m = make_mgr(budget=16 * N)
    g = m.group("prot", min=2 * N)
    bos = [written(g, i) for i in range(3)]
    x, _ = written(m, 9)
    m.evict(64 * MiB)
    # above min the group is fair game, down to min
    assert states(*(bo for bo, _ in bos)) == [S, R, R]
    assert x.state is S
    assert g.stats().resident_bytes == 2 * N
    assert m.evict(64 * MiB) == 0


def test_raising_min_at_runtime_protects_at_once(make_mgr: MakeMgr) -> None:
    m = make_mgr(budget=3 * N)
    g = m.group("g")
    a, _ = written(g, 1)  # least recently used
    x, _ = written(m, 2)
    y, _ = written(m, 3)
    g.set_limits(min=N, low=N)
    m.alloc(N)
    assert states(a, x, y) == [R, S, R]
    g.set_limits(min=0, low=0)
    m.alloc(N)
    assert a.state is S


def test_low_protects_until_nothing_else_can_go(make_mgr: MakeMgr) -> None:
    m = make_mgr(budget=4 * N)
    g = m.group("soft", low=2 * N)
    l1, l1_data = written(g, 1)  # least recently used
    l2, l2_data = written(g, 2)
    x, x_data = written(m, 3)
    d, _ = written(m, 4)
    e, _ = written(m, 5)  # unprotected x goes first although l1 is older
    assert states(l1, l2, x, d, e) == [R, R, S, R, R]
    with d.pin(), e.pin():
        f, _ = written(m, 6)  # nothing unprotected is left: the soft protection gives way, LRU first
        assert states(l1, l2) == [S, R]
    assert g.stats().evictions == 1
    # the shrinkers honour it too: unprotected BOs first (f is now the least recently used of them)
    assert m.evict(N) == N
    assert states(l2, f, e, d) == [R, S, R, R]
    assert np.array_equal(l1.read(), l1_data) and np.array_equal(l2.read(), l2_data)
    assert np.array_equal(x.read(), x_data)


# -- stats ----------------------------------------------------------------------------------------


def test_group_stats(make_mgr: MakeMgr) -> None:
    m = make_mgr(budget=16 * N)
    g = m.group("s", max=4 * N, low=2 * N, min=N)
    s = g.stats()
    assert isinstance(s, gpubo.GroupStats)
    assert s == gpubo.GroupStats("s", 4 * N, 2 * N, N, 0, 0, 0, 0)
    a, _ = written(g, 1)
    b, _ = written(g, 2, 2 * N)
    c, _ = written(g, 3)
    written(m, 4)  # not in the group
    s = g.stats()
    assert (s.resident_bytes, s.swapped_bytes, s.bo_count, s.evictions) == (4 * N, 0, 3, 0)
    a.evict()
    s = g.stats()
    assert (s.resident_bytes, s.swapped_bytes, s.bo_count, s.evictions) == (3 * N, N, 3, 1)
    c.purgeable = True
    # a's buffer went to the pool; then c is purged: neither resident nor swapped
    m.shrink(m.stats().pooled_bytes + 1)
    s = g.stats()
    assert c.state is P
    assert (s.resident_bytes, s.swapped_bytes, s.bo_count, s.evictions) == (2 * N, N, 3, 1)
    b.free()
    a.free()
    s = g.stats()
    assert (s.resident_bytes, s.swapped_bytes, s.bo_count, s.evictions) == (0, 0, 1, 1)
    c.free()
    assert g.stats().bo_count == 0
    with pytest.raises(AttributeError):
        s.bo_count = 5  # type: ignore[misc]


def test_group_bos_keep_their_priority(make_mgr: MakeMgr) -> None:
    m = make_mgr(budget=16 * N)
    g = m.group("g", max=2 * N)
    hi, _ = written(g, 1, priority=3)  # least recently used, but high priority
    lo, _ = written(g, 2, priority=0)
    g.alloc(N, name="third")
    assert states(hi, lo) == [R, S]
