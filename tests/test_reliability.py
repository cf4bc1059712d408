"""Regressions of defects found by hostile use: a pinned BO synced inside
its block, launches with another manager's buffers, shape products that
wrap, close() from gpubo's own threads, and errors that were foreign or
unclear. Each test fails on the code before its fix."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array
import pytest
from conftest import INC_SRC

import gpubo

MakeMgr = Callable[..., gpubo.Manager]
KiB = 1024


def _fill(queue: cl.CommandQueue, buf: cl.Buffer, value: int, nbytes: int) -> None:
    cl.enqueue_fill_buffer(queue, buf, np.uint8(value), 0, nbytes).wait()


# -- a pinned or arrayed BO is dirty until its block ends ---------------------


@pytest.mark.parametrize("how", ["sync", "hibernate"])
def test_writes_through_a_pin_after_a_sync_inside_the_block_survive(make_mgr: MakeMgr, how: str) -> None:
    m = make_mgr(budget="1MiB")
    bo = m.alloc(64 * KiB, name="weights")
    bo.write(np.ones(64 * KiB, np.uint8))
    with bo.pin() as buf:
        bo.sync() if how == "sync" else m.hibernate()
        _fill(m.queue, buf, 2, 64 * KiB)  # after the sync, inside the block
    bo.evict()
    assert (bo.read() == 2).all()
    # the record holds what was synced, the 1s
    with m.open("weights") as copy:
        assert (copy.read() == 1).all()


def test_writes_through_an_array_after_a_sync_inside_the_block_survive(make_mgr: MakeMgr) -> None:
    m = make_mgr(budget="1MiB")
    bo = m.alloc(64 * KiB, name="a")
    bo.write(np.ones(64 * KiB, np.uint8))
    with bo.array(64 * KiB, np.uint8) as arr:
        m.hibernate()
        arr.fill(3)
    bo.evict()
    assert (bo.read() == 3).all()


def test_a_readonly_array_block_keeps_the_clean_copy(make_mgr: MakeMgr) -> None:
    m = make_mgr(budget="1MiB")
    bo = m.alloc(64 * KiB, name="a")
    bo.write(np.ones(64 * KiB, np.uint8))
    bo.sync()
    with bo.array(64 * KiB, np.uint8, readonly=True) as arr:
        assert int(cl_array.sum(arr, dtype=np.uint32).get()) == 64 * KiB
    before = m.stats().bytes_evicted
    bo.evict()
    assert m.stats().bytes_evicted == before  # nothing copied: the copy is still clean


# -- launches refuse what another manager handed out --------------------------


def test_a_launch_refuses_another_managers_array_and_pinned_buffer(make_mgr: MakeMgr) -> None:
    a = make_mgr(budget="1MiB")
    b = make_mgr(budget="1MiB", device=a.context)  # one context: OpenCL itself would accept it
    inc = cl.Kernel(cl.Program(a.context, INC_SRC).build(), "inc")
    theirs = b.alloc(4 * KiB)
    theirs.write(np.ones(4 * KiB, np.uint8))
    with (
        theirs.array(4 * KiB, np.uint8) as arr,
        pytest.raises(ValueError, match=r"argument 0.*another manager"),
    ):
        a.launch(inc, (4 * KiB,), None, arr)
    with theirs.pin() as buf, pytest.raises(ValueError, match=r"argument 0.*another manager"):
        a.launch(inc, (4 * KiB,), None, buf)
    assert (theirs.read() == 1).all()  # nothing ran


def test_a_launch_with_its_own_pinned_buffer_dirties_the_bo(make_mgr: MakeMgr) -> None:
    m = make_mgr(budget="1MiB")
    inc = cl.Kernel(cl.Program(m.context, INC_SRC).build(), "inc")
    bo = m.alloc(4 * KiB, name="x")
    bo.write(np.ones(4 * KiB, np.uint8))
    with bo.pin() as buf:
        m.launch(inc, (4 * KiB,), None, buf).wait()
    bo.evict()
    assert (bo.read() == 2).all()


# -- sizes from a user are Python ints ----------------------------------------


@pytest.mark.parametrize("shape", [(2**62 + 1, 4), (2**63, 2), (2**32, 2**32, 2), 2**64 + 1, (2**61, 2**3)])
def test_an_array_shape_whose_product_wraps_is_refused(mgr: gpubo.Manager, shape: Any) -> None:
    bo = mgr.alloc(4 * KiB)
    bo.write(np.full(4 * KiB, 7, np.uint8))
    with pytest.raises(ValueError, match="needs"), bo.array(shape, np.uint8):
        pass
    assert not bo.pinned
    assert (bo.read() == 7).all()


@pytest.mark.parametrize(
    "kwargs", [{"count": 2**61, "dtype": np.uint64}, {"count": 2**62, "dtype": np.uint32}]
)
def test_a_read_whose_size_wraps_is_refused(mgr: gpubo.Manager, kwargs: dict[str, Any]) -> None:
    bo = mgr.alloc(4 * KiB)
    with pytest.raises(ValueError, match="past the end"):
        bo.read(**kwargs)


@pytest.mark.parametrize(
    ("global_size", "exc"),
    [
        ((-1,), ValueError),
        (("64",), TypeError),
        ("64", TypeError),
        ((0,), ValueError),
        ((2**64,), ValueError),
        ((1, 1, 1, 1), ValueError),
        ((64.0,), TypeError),
        ((True,), TypeError),
        (None, TypeError),
    ],
)
def test_launch_sizes_are_checked_before_opencl(mgr: gpubo.Manager, global_size: Any, exc: type) -> None:
    inc = cl.Kernel(cl.Program(mgr.context, INC_SRC).build(), "inc")
    bo = mgr.alloc(4 * KiB)
    with pytest.raises(exc, match="global_size"):
        mgr.launch(inc, global_size, None, bo)
    with pytest.raises(ValueError, match="local_size"):
        mgr.launch(inc, (64,), (64, 1), bo)
    assert (bo.read() == 0).all()


def test_launch_takes_a_bare_int_and_numpy_ints(mgr: gpubo.Manager) -> None:
    inc = cl.Kernel(cl.Program(mgr.context, INC_SRC).build(), "inc")
    bo = mgr.alloc(4 * KiB)
    mgr.launch(inc, 4 * KiB, None, bo).wait()
    mgr.launch(inc, (np.int64(4 * KiB),), (np.uint32(64),), bo).wait()
    assert (bo.read() == 2).all()


# -- close() from gpubo's own threads ------------------------------------------


def test_close_from_a_prefetch_callback_closes_everything(make_mgr: MakeMgr, tmp_path: Any) -> None:
    m = make_mgr(budget="1MiB", store=tmp_path / "s")
    bos = [m.alloc(256 * KiB) for _ in range(6)]  # the first ones are evicted
    for i, bo in enumerate(bos):
        bo.write(np.full(256 * KiB, i, np.uint8))
    errors: list[BaseException] = []
    done = threading.Event()

    def close_now(_: Future[None]) -> None:
        try:
            m.close()
        except BaseException as e:
            errors.append(e)
        finally:
            done.set()

    futures = m.prefetch([bos[0]])
    futures[0].add_done_callback(close_now)
    assert done.wait(30)
    assert errors == []
    assert all(bo.state is gpubo.State.FREED for bo in bos)
    with pytest.raises(gpubo.ManagerClosed):
        m.alloc(4 * KiB)
    # the store is unlocked: a new manager opens it
    with gpubo.Manager(budget="1MiB", store=tmp_path / "s") as again:
        assert again.names() == []


def test_close_from_a_shrinker_called_by_the_pressure_monitor(make_mgr: MakeMgr) -> None:
    m = make_mgr(budget="1MiB")
    m.alloc(64 * KiB).write(np.ones(64 * KiB, np.uint8))
    closed = threading.Event()

    class Pressure:
        def read(self) -> Any:
            from gpubo.shrinker import Pressure as P

            return P(reclaim_bytes=4096, reason="test")

    class Closer:
        def count(self) -> int:
            return 1

        def scan(self, nbytes: int) -> int:
            m.close()
            closed.set()
            return 0

    m.register_shrinker(Closer(), first=True)
    m.watch_pressure(Pressure(), interval=0.01)
    assert closed.wait(30)
    assert repr(m).endswith("closed>")


# -- clear, typed errors ---------------------------------------------------------


def test_array_shape_of_the_wrong_type_names_it(mgr: gpubo.Manager) -> None:
    bo = mgr.alloc(4 * KiB)
    for shape in (2.0, "4", None, {4: 1}):
        with pytest.raises(TypeError, match="shape"), bo.array(shape):  # type: ignore[arg-type]
            pass


def test_remove_takes_only_a_name(mgr: gpubo.Manager) -> None:
    with pytest.raises(TypeError, match="name"):
        mgr.remove(5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="name"):
        mgr.remove("")


def test_calls_after_close_raise_manager_closed(make_mgr: MakeMgr) -> None:
    m = make_mgr()
    m.close()
    for call in (m.names, lambda: m.shrink(4096), lambda: m.remove("x"), lambda: m.evict(1)):
        with pytest.raises(gpubo.ManagerClosed):
            call()


@pytest.mark.parametrize("make", [np.int64, np.uint64, np.int32, int])
def test_numpy_integers_are_sizes_everywhere(make_mgr: MakeMgr, make: Any) -> None:
    m = make_mgr(budget=make(1 << 20), store_size=make(64 << 20))
    bo = m.alloc(make(4096))
    assert bo.nbytes == 4096 and type(bo.nbytes) is int
    assert m.evict(make(4096)) >= 0
    g = m.group("g", max=make(1 << 20))
    assert g.max == 1 << 20


@pytest.mark.parametrize("bad", [True, np.bool_(True), 1.0, np.float64(4096)])
def test_bools_and_floats_are_not_sizes(make_mgr: MakeMgr, bad: Any) -> None:
    with pytest.raises(TypeError, match="budget"):
        make_mgr(budget=bad)
    m = make_mgr()
    with pytest.raises(TypeError, match="nbytes"):
        m.alloc(bad)


def test_contradicting_limits_blame_the_ones_given(mgr: gpubo.Manager) -> None:
    g = mgr.group("g")
    with pytest.raises(ValueError, match=r"min \(2\.0MiB\) must not exceed max \(1\.0MiB\)"):
        g.set_limits(max="1MiB", min="2MiB")
    assert (g.max, g.low, g.min) == (None, 0, 0)


# -- the CLI never prints a traceback for a Manager that cannot be built ---------


@pytest.mark.parametrize(
    "args",
    [
        ["--store-size", "1000TiB"],
        ["--oversubscribe", "1e9"],
        ["--budget", "16MiB", "--store-size", "1000TiB", "--processes", "2"],
        ["--device-env"],
        ["--device-env", "--processes", "2", "--budget", "16MiB"],
    ],
)
def test_stress_that_cannot_build_its_manager_exits_3(
    monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    from click.testing import CliRunner

    from gpubo.cli import main

    if "--device-env" in args:
        args = [a for a in args if a != "--device-env"]
        monkeypatch.setenv("GPUBO_DEVICE", "nonexistent")
    base = ["stress", "--budget", "4MiB", "--size", "1MiB", "--seconds", "1"]
    result = CliRunner().invoke(main, base + args)
    assert result.exit_code == 3, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Error:" in result.output and "Traceback" not in result.output
