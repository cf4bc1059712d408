"""pyopencl interop: bo.array(), arrays and read-only arguments in launches,
read(out=) and write() of any dtype and shape, GPUBO_* settings, prefetch.

All on the real PoCL device and a real LMDB store. "Dirty" is observed
through the public counters: evicting a BO whose clean store copy is still
valid adds an eviction but no ``bytes_evicted``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array
import pytest
from conftest import (
    AXPY_SRC,
    INC_SRC,
    SLOW_SRC,
    check_budget,
    gated_launch,
    observe_backend,
    pattern,
    slow_expected,
)

import gpubo
from gpubo import State

MiB = 1 << 20
ARG_INFO = ["-cl-kernel-arg-info"]
#: A SLOW_SRC launch (held busy by a gate, not by its speed).
SLOW_N, SLOW_ITERS = 1024, 1_000

MakeMgr = Callable[..., gpubo.Manager]
BuildKernel = Callable[[gpubo.Manager, str, str], cl.Kernel]


def build(m: gpubo.Manager, src: str, name: str, options: list[str] | None = None) -> cl.Kernel:
    return cl.Kernel(cl.Program(m.context, src).build(options=options or []), name)


def clean_copy(bo: gpubo.BufferObject) -> None:
    """Give ``bo`` a clean store copy (evict, then restore: the swap cache keeps it)."""
    bo.evict()
    bo.restore()
    assert bo.state is State.RESIDENT


def evict_copies(mgr: gpubo.Manager, bo: gpubo.BufferObject) -> int:
    """Evict ``bo``; return the bytes the eviction copied (0: its store copy was clean)."""
    before = mgr.stats()
    bo.evict()
    after = mgr.stats()
    assert after.evictions == before.evictions + 1
    return after.bytes_evicted - before.bytes_evicted


def filled(mgr: gpubo.Manager, nbytes: int, seed: int) -> tuple[gpubo.BufferObject, np.ndarray]:
    bo = mgr.alloc(nbytes)
    data = pattern(nbytes, seed)
    bo.write(data)
    return bo, data


# -- bo.array -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "dtype", "expected_shape"),
    [
        (256, np.float32, (256,)),
        ((16, 16), np.float32, (16, 16)),
        ((4, 8, 2), np.int16, (4, 8, 2)),
        (np.int64(10), np.float64, (10,)),
        ((), np.uint32, ()),
        ((3, 0), np.uint8, (3, 0)),
    ],
)
def test_array_shape_and_dtype(mgr: gpubo.Manager, shape: object, dtype: type, expected_shape: tuple) -> None:
    bo = mgr.alloc(4096)
    with bo.array(shape, dtype) as arr:  # type: ignore[arg-type]
        assert isinstance(arr, cl_array.Array)
        assert arr.shape == expected_shape
        assert arr.dtype == np.dtype(dtype)
        assert arr.base_data is not None
        assert (arr.get() == 0).all()


def test_array_ops_and_reduction_on_managed_memory(mgr: gpubo.Manager) -> None:
    n = 64 * 1024
    bo = mgr.alloc(n * 4)
    host = np.arange(n, dtype=np.float32)
    bo.write(host)
    with bo.array((256, 256), np.float32) as arr:
        assert float(cl_array.sum(arr).get()) == pytest.approx(float(host.sum(dtype=np.float64)), rel=1e-6)
        assert float(cl_array.max(arr).get()) == n - 1
        arr *= 2  # in place, on the BO's buffer
        arr += 1
        doubled = (arr * 3).get()  # a new (unmanaged) array from an expression
        np.testing.assert_array_equal(doubled.ravel(), (2 * host + 1) * 3)
        assert float(cl_array.dot(arr, arr).get()) == pytest.approx(
            float(((2 * host.astype(np.float64) + 1) ** 2).sum()), rel=1e-5
        )
    np.testing.assert_array_equal(bo.read(np.float32), 2 * host + 1)
    # Writes through the array survive an eviction (the pin made the BO dirty).
    bo.evict()
    np.testing.assert_array_equal(bo.read(np.float32), 2 * host + 1)


def test_array_set_writes_the_bo(mgr: gpubo.Manager) -> None:
    bo = mgr.alloc(1024)
    data = np.arange(128, dtype=np.float64).reshape(8, 16)
    with bo.array((8, 16), np.float64) as arr:
        arr.set(data)
    bo.evict()
    np.testing.assert_array_equal(bo.read(np.float64).reshape(8, 16), data)


def test_array_is_pinned_inside_the_block_only(mgr: gpubo.Manager) -> None:
    """Inside the block the BO is never evicted, even by allocations that
    need room; after it, it is an ordinary LRU victim again."""
    bo, data = filled(mgr, MiB, seed=1)
    with bo.array(MiB // 4, np.float32) as arr:
        assert bo.pinned
        assert mgr.stats().pinned_bytes == MiB
        others = [mgr.alloc(MiB) for _ in range(6)]  # 7 MiB of BOs on a 4 MiB budget
        assert bo.state is State.RESIDENT
        assert check_budget(mgr).evictions >= 3
        # The array still works on the same buffer.
        np.testing.assert_array_equal(arr.get().view(np.uint8), data)
    assert not bo.pinned
    assert mgr.stats().pinned_bytes == 0
    for other in others:  # touch every other BO: bo is now the least recently used
        other.read(count=1)
    assert bo.state is State.SWAPPED
    np.testing.assert_array_equal(bo.read(), data)


def test_array_unpinned_when_the_block_raises(mgr: gpubo.Manager) -> None:
    bo = mgr.alloc(4096)
    with pytest.raises(RuntimeError, match="inside"), bo.array(1024, np.float32):
        raise RuntimeError("inside")
    assert not bo.pinned
    bo.evict()
    assert bo.state is State.SWAPPED


def test_array_readonly_keeps_the_clean_store_copy(mgr: gpubo.Manager) -> None:
    bo = mgr.alloc(MiB)
    host = np.arange(MiB // 4, dtype=np.float32)
    bo.write(host)
    clean_copy(bo)
    with bo.array(MiB // 4, np.float32, readonly=True) as arr:
        assert float(cl_array.max(arr).get()) == host[-1]
    assert evict_copies(mgr, bo) == 0  # an eviction, but no copy
    np.testing.assert_array_equal(bo.read(np.float32), host)


def test_array_writable_drops_the_clean_store_copy(mgr: gpubo.Manager) -> None:
    bo, _ = filled(mgr, MiB, seed=3)
    clean_copy(bo)
    with bo.array(MiB, np.uint8):
        pass  # a writable view may have been written: the copy is stale
    assert evict_copies(mgr, bo) == MiB


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [(1025, np.float32), ((33, 32), np.float32), ((4097,), np.uint8), (513, np.float64)],
)
def test_array_too_big_is_value_error(mgr: gpubo.Manager, shape: object, dtype: type) -> None:
    bo = mgr.alloc(4096)
    with pytest.raises(ValueError, match=r"needs \d+ bytes; the BO has 4096"), bo.array(shape, dtype):  # type: ignore[arg-type]
        pass
    assert not bo.pinned and mgr.stats().pinned_bytes == 0


@pytest.mark.parametrize("shape", [2.5, (2.5, 4), "abc", (4, None), (-1,), (True, 2), None, [object()]])
def test_array_bad_shape_is_type_error(mgr: gpubo.Manager, shape: object) -> None:
    bo = mgr.alloc(4096)
    with pytest.raises(TypeError), bo.array(shape, np.uint8):  # type: ignore[arg-type]
        pass
    assert not bo.pinned and mgr.stats().pinned_bytes == 0


@pytest.mark.parametrize("dtype", [object, "no-such-dtype", np.dtype([("a", object)])])
def test_array_bad_dtype_is_type_error(mgr: gpubo.Manager, dtype: object) -> None:
    bo = mgr.alloc(4096)
    with pytest.raises(TypeError), bo.array(4, dtype):  # type: ignore[arg-type]
        pass
    assert not bo.pinned


def test_array_of_freed_bo(mgr: gpubo.Manager) -> None:
    bo = mgr.alloc(4096)
    bo.free()
    with pytest.raises(gpubo.BufferFreed), bo.array(16, np.uint8):
        pass


def test_array_restores_a_swapped_bo(mgr: gpubo.Manager) -> None:
    bo, data = filled(mgr, 8192, seed=4)
    bo.evict()
    with bo.array(8192, np.uint8) as arr:
        assert bo.state is State.RESIDENT
        np.testing.assert_array_equal(arr.get(), data)


# -- launches with arrays and read-only arguments ------------------------------


def test_launch_with_array_makes_the_bo_busy_and_dirty(mgr: gpubo.Manager, build_kernel: BuildKernel) -> None:
    slow = build_kernel(mgr, SLOW_SRC, "slow")
    n, iters = SLOW_N, SLOW_ITERS
    bo = mgr.alloc(n * 4)
    clean_copy(bo)
    with bo.array(n, np.uint32) as arr:
        ev, gate = gated_launch(mgr, slow, (n,), arr, np.uint32(iters))
        assert bo.busy  # the kernel cannot start before its gate opens
        with pytest.raises(gpubo.BufferBusy):
            bo.free()  # pinned by the block
    assert bo.busy and not gate.is_open
    gate.open()
    ev.wait()
    assert not bo.busy
    np.testing.assert_array_equal(bo.read(np.uint32), slow_expected(n, iters))
    assert evict_copies(mgr, bo) == n * 4  # the kernel's writes went to the store


def test_launch_with_array_waits_before_eviction(mgr: gpubo.Manager, build_kernel: BuildKernel) -> None:
    """A BO busy through an array argument is not evicted with stale bytes."""
    slow = build_kernel(mgr, SLOW_SRC, "slow")
    n, iters = SLOW_N, SLOW_ITERS
    bo = mgr.alloc(n * 4)
    with bo.array(n, np.uint32) as arr:
        _, gate = gated_launch(mgr, slow, (n,), arr, np.uint32(iters))
    assert bo.busy
    bo.evict()  # must wait for the kernel
    assert gate.opened_by == "wait"
    np.testing.assert_array_equal(bo.read(np.uint32), slow_expected(n, iters))


def test_launch_with_array_and_bo_mixed(mgr: gpubo.Manager, build_kernel: BuildKernel) -> None:
    axpy = build_kernel(mgr, AXPY_SRC, "axpy")
    n = 1024
    x_bo, y_bo = mgr.alloc(n * 4), mgr.alloc(n * 4)
    x = np.arange(n, dtype=np.float32)
    x_bo.write(x)
    y_bo.write(np.ones(n, np.float32))
    with x_bo.array(n, np.float32) as xa:
        mgr.launch(axpy, (n,), None, xa, y_bo, np.float32(2.0), np.int32(n)).wait()
    np.testing.assert_array_equal(y_bo.read(np.float32), 2 * x + 1)


def test_launch_with_a_foreign_array_passes_it_through(mgr: gpubo.Manager, build_kernel: BuildKernel) -> None:
    inc = build_kernel(mgr, INC_SRC, "inc")
    foreign = cl_array.zeros(mgr.queue, 256, np.uint8)
    mgr.launch(inc, (256,), None, foreign).wait()
    assert (foreign.get() == 1).all()
    assert mgr.stats().bo_count == 0


def test_launch_with_an_offset_array_view_is_value_error(
    mgr: gpubo.Manager, build_kernel: BuildKernel
) -> None:
    inc = build_kernel(mgr, INC_SRC, "inc")
    bo = mgr.alloc(4096)
    with bo.array(4096, np.uint8) as arr, pytest.raises(ValueError, match="offset"):
        mgr.launch(inc, (16,), None, arr[16:])


def test_launch_with_an_array_after_its_block_is_refused(
    mgr: gpubo.Manager, build_kernel: BuildKernel
) -> None:
    inc = build_kernel(mgr, INC_SRC, "inc")
    bo = mgr.alloc(4096)
    with bo.array(4096, np.uint8) as stale:
        pass
    bo.evict()  # its buffer goes to the pool...
    other = mgr.alloc(4096)  # ...and is reused, zero-filled, for another BO
    try:
        with pytest.raises(ValueError, match="used after its with block"):
            mgr.launch(inc, (4096,), None, stale).wait()
    finally:
        assert (other.read() == 0).all(), "a stale array wrote into another BO"


@pytest.mark.parametrize("as_array", [False, True], ids=["bo", "array"])
def test_const_global_args_do_not_dirty(mgr: gpubo.Manager, as_array: bool) -> None:
    """With -cl-kernel-arg-info, a ``const __global`` argument keeps its BO's
    clean store copy; the non-const one is dirtied."""
    axpy = build(mgr, AXPY_SRC, "axpy", ARG_INFO)
    n = 64 * 1024
    x_bo, x = filled(mgr, n * 4, seed=5)
    y_bo, _ = filled(mgr, n * 4, seed=6)
    clean_copy(x_bo)
    clean_copy(y_bo)
    if as_array:
        with x_bo.array(n, np.float32, readonly=True) as xa:
            mgr.launch(axpy, (n,), None, xa, y_bo, np.float32(0.0), np.int32(n)).wait()
    else:
        mgr.launch(axpy, (n,), None, x_bo, y_bo, np.float32(0.0), np.int32(n)).wait()
    assert evict_copies(mgr, x_bo) == 0
    assert evict_copies(mgr, y_bo) == n * 4
    np.testing.assert_array_equal(x_bo.read(), x)


def test_without_arg_info_const_args_are_still_found(mgr: gpubo.Manager) -> None:
    """A program built plainly keeps no argument info: gpubo reads the const
    qualifier from a copy built from the same source with the option."""
    axpy = build(mgr, AXPY_SRC, "axpy")
    n = 1024
    x_bo, x = filled(mgr, n * 4, seed=7)
    y_bo, _ = filled(mgr, n * 4, seed=8)
    clean_copy(x_bo)
    clean_copy(y_bo)
    mgr.launch(axpy, (n,), None, x_bo, y_bo, np.float32(1.0), np.int32(n)).wait()
    assert evict_copies(mgr, x_bo) == 0  # const: its clean copy stays valid
    assert evict_copies(mgr, y_bo) == n * 4  # written
    np.testing.assert_array_equal(x_bo.read(), x)


def test_a_program_from_binaries_dirties_every_buffer_arg(mgr: gpubo.Manager) -> None:
    """Built from binaries, a program has no source to read qualifiers from:
    the safe default is to assume the kernel writes."""
    plain = cl.Program(mgr.context, AXPY_SRC).build()
    program = cl.Program(mgr.context, mgr.context.devices, plain.binaries).build()
    axpy = cl.Kernel(program, "axpy")
    n = 1024
    x_bo, x = filled(mgr, n * 4, seed=7)
    y_bo, _ = filled(mgr, n * 4, seed=8)
    clean_copy(x_bo)
    mgr.launch(axpy, (n,), None, x_bo, y_bo, np.float32(1.0), np.int32(n)).wait()
    assert evict_copies(mgr, x_bo) == n * 4
    np.testing.assert_array_equal(x_bo.read(), x)


def test_readonly_wrapper_does_not_dirty(mgr: gpubo.Manager) -> None:
    axpy = build(mgr, AXPY_SRC, "axpy")  # no argument info: readonly() says it
    n = 64 * 1024
    x = np.arange(n, dtype=np.float32)
    x_bo, y_bo = mgr.alloc(n * 4), mgr.alloc(n * 4)
    x_bo.write(x)
    clean_copy(x_bo)
    x_bo.evict()  # the launch restores it, keeping the store copy
    mgr.launch(axpy, (n,), None, gpubo.readonly(x_bo), y_bo, np.float32(3.0), np.int32(n)).wait()
    np.testing.assert_array_equal(y_bo.read(np.float32), 3 * x)
    assert evict_copies(mgr, x_bo) == 0
    assert evict_copies(mgr, y_bo) == n * 4
    np.testing.assert_array_equal(x_bo.read(np.float32), x)


def test_readonly_wrapper_keeps_the_bo_busy(mgr: gpubo.Manager, build_kernel: BuildKernel) -> None:
    """Read-only still means in use: the BO is busy until the kernel ends."""
    src = """
    __kernel void spin_read(__global const uint *in, __global uint *out, uint iters) {
        uint gid = get_global_id(0), x = in[gid];
        for (uint i = 0; i < iters; i++) x = x * 1664525u + 1013904223u;
        out[gid] = x;
    }"""
    kernel = build_kernel(mgr, src, "spin_read")
    n, iters = SLOW_N, SLOW_ITERS
    src_bo, out_bo = mgr.alloc(n * 4), mgr.alloc(n * 4)
    src_bo.write(np.arange(n, dtype=np.uint32))
    mgr.launch(kernel, (n,), None, gpubo.readonly(src_bo), out_bo, np.uint32(iters))
    assert src_bo.busy
    src_bo.evict()  # waits for the kernel before it lets the buffer go
    assert not out_bo.busy
    np.testing.assert_array_equal(out_bo.read(np.uint32), slow_expected(n, iters))


@pytest.mark.parametrize("arg", [np.zeros(4), b"bytes", None, 3, "bo"])
def test_readonly_of_a_non_bo_is_type_error(arg: object) -> None:
    with pytest.raises(TypeError, match="BufferObject"):
        gpubo.readonly(arg)  # type: ignore[arg-type]


def test_readonly_of_an_array_is_type_error(mgr: gpubo.Manager) -> None:
    bo = mgr.alloc(64)
    with bo.array(64, np.uint8) as arr, pytest.raises(TypeError, match="BufferObject"):
        gpubo.readonly(arr)  # type: ignore[arg-type]


def test_readonly_of_another_managers_bo_is_refused_by_launch(make_mgr: MakeMgr) -> None:
    a, b = make_mgr(), make_mgr()
    inc = build(a, INC_SRC, "inc")
    foreign = b.alloc(64)
    with pytest.raises(ValueError, match="another manager"):
        a.launch(inc, (64,), None, gpubo.readonly(foreign))


# -- read(out=) and write() ----------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "shape"),
    [
        (np.uint8, (4096,)),
        (np.float32, (32, 32)),
        (np.int16, (2, 4, 8, 4)),
        (np.float64, (512,)),
        (np.complex64, (16, 32)),
        (np.bool_, (64, 64)),
        (np.dtype([("a", np.int32), ("b", np.float32)]), (8, 64)),
        (np.dtype(">u4"), (1024,)),
        (np.float32, (0,)),
    ],
    ids=lambda v: str(v),
)
def test_write_then_read_out_round_trips(mgr: gpubo.Manager, dtype: object, shape: tuple) -> None:
    dt = np.dtype(dtype)  # type: ignore[call-overload]
    raw = pattern(int(np.prod(shape)) * dt.itemsize, seed=10)
    data = raw.view(dt).reshape(shape) if raw.size else np.empty(shape, dt)
    if dt == np.bool_:
        data = (raw % 2).astype(np.bool_).reshape(shape)
    bo = mgr.alloc(4096)
    bo.write(data)
    bo.evict()  # through the store and back
    out = np.empty(shape, dt)
    got = bo.read(out=out)
    assert got is out
    assert out.tobytes() == data.tobytes()


def test_read_out_at_offset(mgr: gpubo.Manager) -> None:
    bo, data = filled(mgr, 4096, seed=11)
    out = np.empty((4, 8), np.uint32)
    bo.read(offset=1000, out=out)
    assert out.tobytes() == data[1000 : 1000 + 128].tobytes()
    tail = np.empty(96, np.uint8)
    bo.read(offset=4000, out=tail)  # ends exactly at the end of the BO
    np.testing.assert_array_equal(tail, data[4000:])


def test_read_out_ignores_dtype_and_count(mgr: gpubo.Manager) -> None:
    bo, data = filled(mgr, 4096, seed=12)
    out = np.empty(16, np.uint16)
    bo.read(np.float64, 3, out=out)
    assert out.tobytes() == data[:32].tobytes()


@pytest.mark.parametrize(
    ("make_out", "error", "match"),
    [
        (lambda: np.empty(64, np.float32)[::2], ValueError, "C-contiguous"),
        (lambda: np.empty((8, 8), np.float32, order="F"), ValueError, "C-contiguous"),
        (lambda: np.empty((8, 8), np.float32).T, ValueError, "C-contiguous"),
        (lambda: np.empty(4, object), TypeError, "objects"),
        (lambda: np.empty(4, [("a", object)]), TypeError, "objects"),
        (lambda: np.empty(4097, np.uint8), ValueError, "past the end"),
        (lambda: np.empty((33, 32), np.float32), ValueError, "past the end"),
        (lambda: bytearray(16), TypeError, "numpy array"),
        (lambda: [0, 0, 0], TypeError, "numpy array"),
        (lambda: memoryview(bytearray(16)), TypeError, "numpy array"),
    ],
    ids=[
        "strided",
        "fortran",
        "transposed",
        "object",
        "object-field",
        "too-big",
        "too-big-2d",
        "bytearray",
        "list",
        "memoryview",
    ],
)
def test_read_out_bad_arrays(
    mgr: gpubo.Manager, make_out: Callable[[], object], error: type, match: str
) -> None:
    bo = mgr.alloc(4096)
    with pytest.raises(error, match=match):
        bo.read(out=make_out())  # type: ignore[arg-type]


def test_read_out_readonly_array_is_value_error(mgr: gpubo.Manager) -> None:
    bo = mgr.alloc(4096)
    out = np.zeros(16, np.uint8)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        bo.read(out=out)
    assert (out == 0).all()


def test_read_out_too_big_at_offset(mgr: gpubo.Manager) -> None:
    bo = mgr.alloc(4096)
    with pytest.raises(ValueError, match="past the end"):
        bo.read(offset=4090, out=np.empty(8, np.uint8))
    with pytest.raises(ValueError, match="past the end"):
        bo.read(offset=5000, out=np.empty(0, np.uint8))


def test_bad_read_out_leaves_a_swapped_bo_swapped(mgr: gpubo.Manager) -> None:
    """Errors are early: a refused out= does not restore anything."""
    bo, _ = filled(mgr, 4096, seed=13)
    bo.evict()
    restores = mgr.stats().restores
    with pytest.raises(ValueError):
        bo.read(out=np.empty(8192, np.uint8))
    assert bo.state is State.SWAPPED and mgr.stats().restores == restores


@pytest.mark.parametrize(
    "data",
    [
        np.arange(12, dtype=np.float64).reshape(3, 4),
        np.arange(100, dtype=np.int8),
        np.array([[1 + 2j, 3 - 4j]], np.complex128),
        np.ones((2, 3, 4), np.bool_),
        np.array(7, np.int32),  # 0-d
        b"raw bytes",
        bytearray(b"\x01\x02\x03"),
        memoryview(np.arange(6, dtype=np.uint16)),
    ],
    ids=["float64-2d", "int8", "complex128", "bool-3d", "0d", "bytes", "bytearray", "memoryview"],
)
def test_write_dtypes_and_shapes_at_offsets(mgr: gpubo.Manager, data: object) -> None:
    raw = bytes(memoryview(data).cast("B")) if not isinstance(data, np.ndarray) else data.tobytes()  # type: ignore[arg-type]
    bo = mgr.alloc(4096)
    for offset in (0, 3, 4096 - len(raw)):
        bo.write(data, offset=offset)
        bo.evict()
        assert bo.read(count=len(raw), offset=offset).tobytes() == raw


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        (np.arange(16, dtype=np.float32)[::2], ValueError, "C-contiguous"),
        (np.ones((4, 4), order="F"), ValueError, "C-contiguous"),
        (np.array([1, None], object), TypeError, "objects"),
        ("text", TypeError, "str"),
        ([1, 2, 3], TypeError, "bytes-like"),
        (np.zeros(4097, np.uint8), ValueError, "do not fit"),
    ],
    ids=["strided", "fortran", "object", "str", "list", "too-big"],
)
def test_write_bad_data(mgr: gpubo.Manager, data: object, error: type, match: str) -> None:
    bo, before = filled(mgr, 4096, seed=14)
    with pytest.raises(error, match=match):
        bo.write(data)
    np.testing.assert_array_equal(bo.read(), before)


# -- configuration from the environment ----------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("GPUBO_BUDGET", "GPUBO_STORE", "GPUBO_DEVICE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_budget_from_environment(clean_env: pytest.MonkeyPatch, leak_check: None) -> None:
    clean_env.setenv("GPUBO_BUDGET", "3MiB")
    with gpubo.Manager(store_size="16MiB") as m:
        assert m.budget == 3 * MiB
    with gpubo.Manager(budget="2MiB", store_size="16MiB") as m:  # the constructor wins
        assert m.budget == 2 * MiB
    clean_env.setenv("GPUBO_BUDGET", "")  # empty means unset
    with gpubo.Manager(store_size="16MiB") as m:
        assert m.budget == 256 * MiB


def test_bad_budget_in_environment_is_value_error(clean_env: pytest.MonkeyPatch, leak_check: None) -> None:
    clean_env.setenv("GPUBO_BUDGET", "lots")
    with pytest.raises(ValueError, match="budget"):
        gpubo.Manager(store_size="16MiB")


def test_store_from_environment(clean_env: pytest.MonkeyPatch, tmp_path: Path, leak_check: None) -> None:
    env_store = tmp_path / "env-store"
    clean_env.setenv("GPUBO_STORE", str(env_store))
    with gpubo.Manager(budget="1MiB", store_size="16MiB") as m:
        assert Path(m.store.path) == env_store
        m.alloc(4096, name="kept").sync()
    assert env_store.is_dir()  # a named store outlives its manager
    with gpubo.Manager(budget="1MiB") as m:
        assert m.names() == ["kept"]
    # The constructor wins, and store=False is a private store whatever the environment says.
    other = tmp_path / "arg-store"
    with gpubo.Manager(budget="1MiB", store=str(other), store_size="16MiB") as m:
        assert Path(m.store.path) == other and m.names() == []
    with gpubo.Manager(budget="1MiB", store=False, store_size="16MiB") as m:
        private = Path(m.store.path)
        assert env_store not in (private, *private.parents)
        assert m.names() == []
    assert not private.exists()


def has_pocl() -> bool:
    return any(p.name == "Portable Computing Language" for p in cl.get_platforms())


@pytest.mark.parametrize("spec", ["cpu", "CPU", "0:0", " 0:0 ", "pthread", "portable computing"])
def test_device_from_environment(clean_env: pytest.MonkeyPatch, spec: str, leak_check: None) -> None:
    if not has_pocl():
        pytest.skip("no PoCL platform")
    clean_env.setenv("GPUBO_DEVICE", spec)
    with gpubo.Manager(budget="1MiB", store_size="16MiB") as m:
        device = m.backend.device
        if spec.lower() == "cpu":
            assert device.type & cl.device_type.CPU
        elif ":" in spec:  # platform 0, device 0, as `gpubo info` lists them
            assert device == cl.get_platforms()[0].get_devices()[0]
        else:
            assert m.backend.name == "pocl"


@pytest.mark.parametrize("spec", ["no-such-device-xyz", "7:0", "0:99", "accelerator"])
def test_device_spec_matching_nothing_is_device_error(
    clean_env: pytest.MonkeyPatch, spec: str, leak_check: None
) -> None:
    if spec == "accelerator" and any(
        d.type & cl.device_type.ACCELERATOR for p in cl.get_platforms() for d in p.get_devices()
    ):
        pytest.skip("this machine has an OpenCL accelerator")
    clean_env.setenv("GPUBO_DEVICE", spec)
    with pytest.raises(gpubo.DeviceError, match="matches no OpenCL device"):
        gpubo.Manager(budget="1MiB", store_size="16MiB")


def test_device_argument_wins_over_environment(clean_env: pytest.MonkeyPatch, leak_check: None) -> None:
    if not has_pocl():
        pytest.skip("no PoCL platform")
    clean_env.setenv("GPUBO_DEVICE", "no-such-device-xyz")
    with gpubo.Manager(budget="1MiB", store_size="16MiB", device="cpu") as m:
        assert m.backend.device.type & cl.device_type.CPU
    device = cl.get_platforms()[0].get_devices()[0]
    with gpubo.Manager(budget="1MiB", store_size="16MiB", device=device) as m:
        assert m.backend.device == device


def test_environment_is_read_at_construction(clean_env: pytest.MonkeyPatch, leak_check: None) -> None:
    clean_env.setenv("GPUBO_BUDGET", "2MiB")
    with gpubo.Manager(store_size="16MiB") as m:
        clean_env.setenv("GPUBO_BUDGET", "8MiB")
        assert m.budget == 2 * MiB


# -- prefetch ------------------------------------------------------------------


def test_prefetch_restores_in_the_background(mgr: gpubo.Manager) -> None:
    bos, data = [], []
    for i in range(3):
        bo, d = filled(mgr, MiB, seed=20 + i)
        bos.append(bo)
        data.append(d)
    for bo in bos:
        bo.evict()
    restores = mgr.stats().restores
    futures = mgr.prefetch(bos)
    assert len(futures) == 3 and all(isinstance(f, Future) for f in futures)
    for f in futures:
        assert f.result(timeout=30) is None
    assert all(bo.state is State.RESIDENT for bo in bos)
    assert mgr.stats().restores == restores + 3
    for bo, d in zip(bos, data, strict=True):
        np.testing.assert_array_equal(bo.read(), d)
    assert mgr.stats().restores == restores + 3  # the reads needed no restore
    check_budget(mgr)


def test_bo_prefetch(mgr: gpubo.Manager) -> None:
    bo, data = filled(mgr, MiB, seed=30)
    bo.evict()
    f = bo.prefetch()
    assert isinstance(f, Future)
    f.result(timeout=30)
    assert bo.state is State.RESIDENT
    np.testing.assert_array_equal(bo.read(), data)
    # Prefetching a resident BO is a no-op.
    assert bo.prefetch().result(timeout=30) is None


def test_prefetch_past_the_budget_evicts_lru(mgr: gpubo.Manager) -> None:
    """Prefetching more than fits keeps the budget: later ones evict earlier ones."""
    bos = [filled(mgr, MiB, seed=40 + i)[0] for i in range(6)]
    for bo in bos:
        bo.evict()
    for f in mgr.prefetch(bos):
        f.result(timeout=30)
    check_budget(mgr)
    assert [bo.state for bo in bos[-4:]] == [State.RESIDENT] * 4
    assert [bo.state for bo in bos[:2]] == [State.SWAPPED] * 2


def test_prefetch_then_launch(mgr: gpubo.Manager, build_kernel: BuildKernel) -> None:
    inc = build_kernel(mgr, INC_SRC, "inc")
    bo, data = filled(mgr, MiB, seed=50)
    bo.evict()
    f = bo.prefetch()  # the launch waits for it, or restores the BO itself
    mgr.launch(inc, (MiB,), None, bo).wait()
    f.result(timeout=30)
    np.testing.assert_array_equal(bo.read(), data + 1)


def test_prefetch_of_a_freed_bo_holds_buffer_freed(
    mgr: gpubo.Manager, caplog: pytest.LogCaptureFixture
) -> None:
    bo = mgr.alloc(4096)
    bo.evict()
    bo.free()
    with caplog.at_level(logging.INFO, logger="gpubo"):
        f = mgr.prefetch([bo])[0]
        assert isinstance(f.exception(timeout=30), gpubo.BufferFreed)
    assert any("prefetch" in r.getMessage() and r.levelno >= logging.INFO for r in caplog.records)
    with pytest.raises(gpubo.BufferFreed):
        f.result()


class HoldPrefetch:
    """Observes ``m``'s backend (every call goes through): the prefetch
    thread's first backend call waits until the test sets ``release``, and
    ``entered`` says it got there. So the test knows which prefetches are
    still queued, on any device."""

    def __init__(self, m: gpubo.Manager) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

        def before(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            prefetching = threading.current_thread().name.startswith("gpubo-prefetch")
            if prefetching and not self.entered.is_set():
                self.entered.set()
                assert self.release.wait(60), "the test never released the prefetch"

        observe_backend(m, before)


def test_prefetch_freed_while_queued(mgr: gpubo.Manager) -> None:
    """A BO freed while its prefetch is queued behind a running one: its
    future holds BufferFreed; the others complete; nothing leaks."""
    bos = [filled(mgr, MiB, seed=60 + i)[0] for i in range(4)]
    for bo in bos:
        bo.evict()
    hold = HoldPrefetch(mgr)
    futures = mgr.prefetch(bos)
    assert hold.entered.wait(30), "the first prefetch never started"
    freeing = threading.Thread(target=bos[-1].free)
    freeing.start()
    freeing.join(30)
    assert not freeing.is_alive(), "free waited for a prefetch of another BO"
    hold.release.set()
    for f in futures[:-1]:
        f.result(timeout=30)
    assert isinstance(futures[-1].exception(timeout=30), gpubo.BufferFreed)
    check_budget(mgr)


@pytest.mark.parametrize("bad", [[None], [b"x"], ["bo"], [np.zeros(3)]])
def test_prefetch_non_bos_is_value_error(mgr: gpubo.Manager, bad: list) -> None:
    good = mgr.alloc(64)
    with pytest.raises(ValueError, match=r"bos\[1\]"):
        mgr.prefetch([good, *bad])


def test_prefetch_of_another_managers_bo_is_value_error(make_mgr: MakeMgr) -> None:
    a, b = make_mgr(), make_mgr()
    with pytest.raises(ValueError, match="not a buffer object of this manager"):
        a.prefetch([b.alloc(64)])


def test_prefetch_on_a_closed_manager(make_mgr: MakeMgr) -> None:
    m = make_mgr()
    bo = m.alloc(64)
    m.close()
    with pytest.raises(gpubo.ManagerClosed):
        m.prefetch([bo])


def test_close_with_prefetches_in_flight(make_mgr: MakeMgr) -> None:
    """close() lets the running prefetch finish, cancels the queued ones, and
    leaves no thread behind (make_mgr's leak_check)."""
    m = make_mgr(budget="8MiB", store_size="128MiB")
    bos = [m.alloc(MiB) for _ in range(24)]
    for i, bo in enumerate(bos):
        bo.write(pattern(MiB, seed=70 + i))
    for bo in bos:
        bo.evict()
    hold = HoldPrefetch(m)
    futures = m.prefetch(bos)
    assert hold.entered.wait(30), "the first prefetch never started"
    closing = threading.Thread(target=m.close)
    closing.start()
    deadline = time.monotonic() + 30
    while not all(f.done() for f in futures[1:]):  # close cancels the queued ones first...
        assert time.monotonic() < deadline, "close did not cancel the queued prefetches"
        time.sleep(0.005)
    assert not futures[0].done()  # ...while the running one is held
    hold.release.set()
    closing.join(30)
    assert not closing.is_alive(), "close hung"
    assert futures[0].result() is None  # it ran to the end
    assert all(f.cancelled() for f in futures[1:])
    assert not [t for t in threading.enumerate() if t.name.startswith("gpubo-prefetch")]


def test_prefetch_worker_is_shared_and_ordered(mgr: gpubo.Manager) -> None:
    """Prefetches run on one worker, in the order asked."""
    bos = [filled(mgr, 256 * 1024, seed=80 + i)[0] for i in range(4)]
    for bo in bos:
        bo.evict()
    order: list[int] = []
    futures = mgr.prefetch(bos)
    for i, f in enumerate(futures):
        f.add_done_callback(lambda _f, i=i: order.append(i))
    for f in futures:
        f.result(timeout=30)
    assert order == [0, 1, 2, 3]
    workers = {t.name for t in threading.enumerate() if t.name.startswith("gpubo-prefetch")}
    assert len(workers) == 1


# -- the transfer queue: restores do not wait behind queued kernels -------------


class _Gate:
    """Holds the manager's kernel queue: a marker waiting on a user event, so
    that every command enqueued after it waits until the gate opens."""

    def __init__(self, m: gpubo.Manager) -> None:
        self.event = cl.UserEvent(m.context)
        cl.enqueue_marker(m.queue, wait_for=[self.event])

    def open(self) -> None:
        if self.event.command_execution_status != cl.command_execution_status.COMPLETE:
            self.event.set_status(cl.command_execution_status.COMPLETE)


def test_prefetch_and_alloc_do_not_wait_for_the_kernel_queue(mgr: gpubo.Manager) -> None:
    """With the kernel queue held, a prefetch (one BO, and a batch of small
    ones) and a new allocation still complete: they go on the transfer queue.
    Reads then wait for the queue, and every byte is right."""
    big, big_data = filled(mgr, MiB, seed=60)
    small = [filled(mgr, 4096, seed=61 + i) for i in range(8)]
    big.evict()
    for bo, _ in small:
        bo.evict()
    gate = _Gate(mgr)
    try:
        futures = mgr.prefetch([big] + [bo for bo, _ in small])
        for f in futures:
            assert f.result(timeout=30) is None
        fresh = mgr.alloc(2 * MiB)
        assert big.state is State.RESIDENT and all(bo.state is State.RESIDENT for bo, _ in small)
        assert mgr.stats().restore_batches == 1
    finally:
        gate.open()
    np.testing.assert_array_equal(big.read(), big_data)
    for bo, data in small:
        np.testing.assert_array_equal(bo.read(), data)
    assert not fresh.read().any()
    check_budget(mgr)


def test_eviction_still_follows_queued_kernels(mgr: gpubo.Manager, build_kernel: BuildKernel) -> None:
    """Copies out of a BO stay on the kernel queue: an eviction waits for a
    kernel queued behind the gate and stores its result, not the old bytes."""
    inc = build_kernel(mgr, INC_SRC, "inc")
    bo, data = filled(mgr, MiB, seed=70)
    gate = _Gate(mgr)
    evicted = threading.Event()
    try:
        mgr.launch(inc, (MiB,), None, bo)
        worker = threading.Thread(target=lambda: (bo.evict(), evicted.set()))
        worker.start()
        assert not evicted.wait(0.3)  # held by the kernel behind the gate
    finally:
        gate.open()
    worker.join(timeout=30)
    assert evicted.is_set() and bo.state is State.SWAPPED
    np.testing.assert_array_equal(bo.read(), data + 1)


def test_buffer_of_an_array_block_is_reused_only_after_its_commands(mgr: gpubo.Manager) -> None:
    """An array operation left queued at the end of a ``bo.array`` block: the
    BO's free waits for it (a marker joins the BO's events), so the pooled
    buffer's zero fill for the next allocation, on the transfer queue, comes
    after it, and the new BO reads as zeros."""
    bo, _ = filled(mgr, MiB, seed=80)
    gate = _Gate(mgr)
    freed = threading.Event()
    try:
        with bo.array(MiB // 4, np.uint32) as arr:
            arr.fill(7)  # queued behind the gate
        worker = threading.Thread(target=lambda: (bo.free(), freed.set()))
        worker.start()
        assert not freed.wait(0.3)
    finally:
        gate.open()
    worker.join(timeout=30)
    assert freed.is_set()
    assert mgr.stats().pooled_bytes >= MiB
    fresh = mgr.alloc(MiB)
    assert not fresh.read().any()


def test_many_pin_blocks_keep_a_short_event_list(mgr: gpubo.Manager) -> None:
    """Each pin or array block adds a marker to the BO's events; finished
    ones are dropped as new ones come, so the list does not grow."""
    bo, data = filled(mgr, 4096, seed=90)
    for _ in range(200):
        with bo.pin():
            pass
        with bo.array(1024, np.uint32, readonly=True):
            pass
        mgr.queue.finish()
    assert len(bo.events) <= 2
    np.testing.assert_array_equal(bo.read(), data)
