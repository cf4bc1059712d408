"""Use after free, close, leaks of device memory and store slots, and reprs."""

from __future__ import annotations

import gc
import os
from collections.abc import Callable

import numpy as np
import pyopencl as cl
import pytest
from conftest import INC_SRC, SLOW_SRC, check_budget, gated_launch, pattern

import gpubo

MiB = 1 << 20

USES: dict[str, Callable[[gpubo.BufferObject], object]] = {
    "read": lambda bo: bo.read(),
    "read-typed": lambda bo: bo.read(np.uint16, count=1, offset=2),
    "write": lambda bo: bo.write(b"abc"),
    "write-whole": lambda bo: bo.write(np.zeros(bo.nbytes, np.uint8)),
    "pin": lambda bo: bo.pin().__enter__(),
    "evict": lambda bo: bo.evict(),
    "restore": lambda bo: bo.restore(),
}


@pytest.mark.parametrize("swapped", [False, True], ids=["resident", "swapped"])
@pytest.mark.parametrize("use", list(USES))
def test_every_use_after_free_raises(mgr: gpubo.Manager, use: str, swapped: bool) -> None:
    keep = mgr.alloc(4096)
    keep.write(pattern(4096, 1))
    bo = mgr.alloc(4096, name="gone")
    if swapped:
        bo.evict()
    bo.free()
    assert bo.state is gpubo.State.FREED
    with pytest.raises(gpubo.BufferFreed, match="gone"):
        USES[use](bo)
    assert bo.state is gpubo.State.FREED
    assert not bo.busy and not bo.pinned
    bo.free()  # idempotent
    s = check_budget(mgr)
    assert s.bo_count == 1 and s.resident_bytes + s.swapped_bytes == 4096
    assert np.array_equal(keep.read(), pattern(4096, 1))


def test_launch_with_freed_bo_raises(mgr: gpubo.Manager, build_kernel: Callable) -> None:
    inc = build_kernel(mgr, INC_SRC, "inc")
    live = mgr.alloc(4096)
    dead = mgr.alloc(4096)
    dead.free()
    with pytest.raises(gpubo.BufferFreed):
        mgr.launch(inc, (4096,), None, live, dead)
    assert not live.pinned and mgr.stats().pinned_bytes == 0
    live.evict()
    assert live.state is gpubo.State.SWAPPED


def test_with_block_frees(mgr: gpubo.Manager) -> None:
    with mgr.alloc(MiB) as bo:
        bo.write(pattern(MiB, 2))
        bo.evict()
        assert mgr.stats().bo_count == 1
    assert bo.state is gpubo.State.FREED
    s = mgr.stats()
    assert s.bo_count == 0 and s.swapped_bytes == 0 and s.store_used_bytes == 0
    with pytest.raises(gpubo.BufferFreed):
        bo.read()
    with pytest.raises(ZeroDivisionError), mgr.alloc(10) as bo2:
        1 / 0  # noqa: B018
    assert bo2.state is gpubo.State.FREED


def test_stats_after_freeing_everything(mgr: gpubo.Manager, build_kernel: Callable) -> None:
    inc = build_kernel(mgr, INC_SRC, "inc")
    bos = [mgr.alloc(n) for n in (1, 4097, MiB, MiB + 1, 2 * MiB, 3 * MiB)]
    for i, bo in enumerate(bos):
        bo.write(pattern(bo.nbytes, i))
        mgr.launch(inc, (bo.nbytes,), None, bo)
    bos[0].evict()
    with bos[1].pin():
        pass
    assert mgr.store.chunk_count() > 0
    for bo in bos:
        bo.free()
    s = check_budget(mgr)
    assert s.bo_count == 0
    assert s.resident_bytes == 0
    assert s.swapped_bytes == 0
    assert s.pinned_bytes == 0
    assert s.store_used_bytes == 0
    assert mgr.store.chunk_count() == 0


def test_long_run_leaks_nothing(make_mgr: Callable[..., gpubo.Manager]) -> None:
    m = make_mgr(budget=2 * MiB, store_size="16MiB")
    rng = np.random.default_rng(3)
    for _ in range(300):
        bo = m.alloc(int(rng.integers(1, 600_000)))
        if rng.integers(0, 2):
            bo.evict()
        if rng.integers(0, 2):
            bo.write(b"xyz", offset=0)
        bo.free()
    s = check_budget(m)
    assert s.bo_count == 0 and s.resident_bytes == 0 and s.swapped_bytes == 0
    assert s.store_used_bytes == 0 and m.store.chunk_count() == 0
    m.evict(m.budget)  # drains the pool
    assert m.stats().pooled_bytes == 0


def test_close_frees_everything_and_refuses_use(
    make_mgr: Callable[..., gpubo.Manager], build_kernel: Callable
) -> None:
    m = make_mgr()
    inc = build_kernel(m, INC_SRC, "inc")
    a, b = m.alloc(MiB), m.alloc(4096)
    b.evict()
    path = m.store.path
    assert os.path.isdir(path)
    m.close()
    assert not os.path.exists(path), "the temporary store must be deleted on close"
    for bo in (a, b):
        assert bo.state is gpubo.State.FREED
        for use in USES.values():
            with pytest.raises(gpubo.BufferFreed):
                use(bo)
        bo.free()  # still idempotent
    for call in (
        lambda: m.alloc(10),
        lambda: m.evict(1),
        lambda: m.launch(inc, (1,), None, np.int32(0)),
    ):
        with pytest.raises(gpubo.ManagerClosed) as info:
            call()
        assert isinstance(info.value, gpubo.GpuboError)
    m.close()  # idempotent
    assert "closed" in repr(m)


def test_close_inside_pin(make_mgr: Callable[..., gpubo.Manager]) -> None:
    m = make_mgr()
    bo = m.alloc(4096)
    with bo.pin() as buf:
        assert isinstance(buf, cl.Buffer)
        m.close()
        assert bo.state is gpubo.State.FREED
    assert not bo.pinned
    with pytest.raises(gpubo.BufferFreed):
        bo.read()


def test_close_waits_for_running_kernel(
    make_mgr: Callable[..., gpubo.Manager], build_kernel: Callable
) -> None:
    m = make_mgr()
    slow = build_kernel(m, SLOW_SRC, "slow")
    bo = m.alloc(4096)
    ev, gate = gated_launch(m, slow, (1024,), bo, np.uint32(1_000))  # cannot start before the gate opens
    m.close()
    assert gate.opened_by == "wait"  # close waited for it
    assert ev.command_execution_status == cl.command_execution_status.COMPLETE


def test_manager_context_manager(leak_check: None) -> None:
    with gpubo.Manager(budget="1MiB", store_size="8MiB") as m:
        bo = m.alloc(100)
        path = m.store.path
    assert bo.state is gpubo.State.FREED
    assert not os.path.exists(path)
    with pytest.raises(gpubo.ManagerClosed):
        m.alloc(1)


def test_unclosed_manager_is_cleaned_up_by_gc(leak_check: None) -> None:
    m = gpubo.Manager(budget="1MiB", store_size="8MiB")
    m.alloc(100).evict()
    path = m.store.path
    del m
    gc.collect()
    assert not os.path.exists(path), "a garbage-collected manager must delete its temporary store"


def test_manager_accepts_context_and_device(leak_check: None, mgr: gpubo.Manager) -> None:
    with gpubo.Manager(budget="1MiB", store_size="8MiB", device=mgr.context) as m:
        assert m.context is mgr.context
        assert m.budget == MiB
        assert isinstance(m.queue, cl.CommandQueue)
        bo = m.alloc(10)
        bo.write(b"0123456789")
        bo.evict()
        assert bo.read().tobytes() == b"0123456789"
    with gpubo.Manager(budget=4096, store_size="8MiB", device=mgr.context.devices[0]) as m:
        assert m.context.devices[0] == mgr.context.devices[0]
        assert m.budget == 4096


# -- repr ---------------------------------------------------------------------


def test_reprs_show_state(make_mgr: Callable[..., gpubo.Manager]) -> None:
    m = make_mgr(budget="16MiB")
    a = m.alloc(12 * MiB, name="weights", priority=2)
    b = m.alloc(4 * MiB)
    b.evict()
    with a.pin():
        r = repr(m)
        assert r.startswith("<Manager ")
        assert m.backend.name in r
        assert "resident=12.0MiB/16.0MiB" in r
        assert "swapped=4.0MiB" in r
        assert "bos=2" in r and "pinned=1" in r
        ra = repr(a)
        assert "weights" in ra and "RESIDENT" in ra and "12.0MiB" in ra and "prio=2" in ra and "pins=1" in ra
    rb = repr(b)
    assert "SWAPPED" in rb and f"#{b.id}" in rb and "4.0MiB" in rb
    b.free()
    assert "FREED" in repr(b)
    assert "pinned=0" in repr(m)
