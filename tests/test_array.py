"""gpubo.DeviceArray: a BO plus shape and dtype, on the real PoCL device."""

from __future__ import annotations

import copy
import gc
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyopencl as cl
import pyopencl.array as cla
import pytest

import gpubo

MiB = 1 << 20

SCALE = """
__kernel void scale(__global const float *x, __global float *y, float a) {
    int i = get_global_id(0);
    y[i] = a * x[i];
}
"""


@pytest.mark.parametrize(
    "values",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.arange(24, dtype=np.int64).reshape(2, 3, 4),
        np.array(3.5, dtype=np.float64),  # 0-d
        np.zeros((0, 7), np.int16),  # no elements: a one-byte BO
        np.array([1 + 2j, -3j], np.complex128),
        np.arange(10, dtype=np.uint8)[::2],  # not contiguous: copied
    ],
    ids=["2d-f32", "3d-i64", "0d", "empty", "complex", "strided"],
)
def test_asarray_keeps_shape_dtype_and_values_across_an_eviction(mgr: gpubo.Manager, values: Any) -> None:
    a = mgr.asarray(values)
    assert (a.shape, a.dtype, a.nbytes, a.size, a.ndim) == (
        values.shape,
        values.dtype,
        values.nbytes,
        values.size,
        values.ndim,
    )
    assert a.bo.nbytes == max(values.nbytes, 1)
    a.bo.evict()
    assert a.bo.state is gpubo.State.SWAPPED
    got = a.get()
    # Reading restores the BO; an array with no elements has nothing to read.
    assert a.bo.state is (gpubo.State.RESIDENT if values.size else gpubo.State.SWAPPED)
    assert got.shape == values.shape and got.dtype == values.dtype
    np.testing.assert_array_equal(got, values)
    np.testing.assert_array_equal(np.asarray(a), values)
    a.free()


def test_empty_and_zeros_are_zero_filled_with_numpy_defaults(mgr: gpubo.Manager) -> None:
    scratch = mgr.alloc(256 * 256 * 4)
    scratch.write(np.full(256 * 256 * 4, 0xAB, np.uint8))
    scratch.free()  # its buffer goes to the pool: the new array of its size must not see its bytes
    pooled = mgr.stats().pooled_bytes
    e = mgr.empty((256, 256), np.float32)
    assert mgr.stats().pooled_bytes == pooled - 256 * 256 * 4  # it took that very buffer
    z = mgr.zeros(1000)
    assert e.shape == (256, 256) and e.dtype == np.float32
    assert z.shape == (1000,) and z.dtype == np.float64  # numpy's default
    assert not e.get().any() and not z.get().any()


def test_set_replaces_values_and_a_mismatch_is_refused_without_touching_them(mgr: gpubo.Manager) -> None:
    a = mgr.asarray(np.arange(16, dtype=np.float32).reshape(4, 4))
    fresh = np.arange(32, dtype=np.float32).reshape(4, 8)[:, ::2]  # same shape, not contiguous
    a.set(fresh)
    np.testing.assert_array_equal(a.get(), fresh)
    with pytest.raises(ValueError, match=r"value has shape \(16,\).*shape \(4, 4\)"):
        a.set(np.zeros(16, np.float32))
    with pytest.raises(ValueError, match=r"value has dtype float64.*dtype float32"):
        a.set(np.zeros((4, 4), np.float64))
    with pytest.raises(TypeError, match="value must be a numpy array"):
        a.set([[0.0] * 4] * 4)
    with pytest.raises(ValueError, match="out has shape"):
        a.get(out=np.empty((2, 8), np.float32))
    np.testing.assert_array_equal(a.get(), fresh)  # nothing above changed it
    out = np.empty((4, 4), np.float32)
    assert a.get(out=out) is out
    np.testing.assert_array_equal(out, fresh)


def test_bad_arguments_are_typed_errors(mgr: gpubo.Manager) -> None:
    with pytest.raises(TypeError, match="dtype"):
        mgr.asarray(np.array([object()], dtype=object))
    with pytest.raises(TypeError, match="shape"):
        mgr.empty("big")
    with pytest.raises(ValueError, match="shape"):
        mgr.zeros((4, -1))
    with pytest.raises(TypeError, match="dtype"):
        mgr.empty(4, dtype="not a dtype")
    with pytest.raises(gpubo.OutOfDeviceMemory):
        mgr.empty((8, MiB), np.uint8)  # 8 MiB: twice the budget
    with pytest.raises(TypeError, match="readonly"):
        gpubo.readonly(np.zeros(4))
    assert mgr.stats().bo_count == 0  # nothing was left allocated by a refused call


def test_view_is_a_pyopencl_array_and_readonly_keeps_the_store_copy(mgr: gpubo.Manager) -> None:
    a = mgr.asarray(np.arange(1 << 16, dtype=np.float32).reshape(256, 256))
    with a.view() as arr:
        assert isinstance(arr, cla.Array) and arr.shape == (256, 256) and arr.dtype == np.float32
        arr *= 2
    a.bo.evict()
    copied = mgr.stats().bytes_evicted
    with a.view(readonly=True) as arr:
        assert float(cla.sum(arr).get()) == 2 * float(np.arange(1 << 16, dtype=np.float64).sum())
    a.bo.evict()
    assert mgr.stats().bytes_evicted == copied  # clean: evicted without a copy
    np.testing.assert_array_equal(a.get(), 2 * np.arange(1 << 16, dtype=np.float32).reshape(256, 256))


def test_launch_takes_arrays_like_bos_and_honours_readonly(
    mgr: gpubo.Manager, build_kernel: Callable[[gpubo.Manager, str, str], cl.Kernel]
) -> None:
    kernel = build_kernel(mgr, SCALE, "scale")
    n = 1 << 18
    x = mgr.asarray(np.arange(n, dtype=np.float32))
    y = mgr.empty(n, np.float32)
    x.bo.evict()
    y.bo.evict()
    mgr.launch(kernel, (n,), None, x, y, np.float32(3)).wait()  # restores both
    np.testing.assert_array_equal(y.get(), 3 * np.arange(n, dtype=np.float32))
    copied = mgr.stats().bytes_evicted
    x.bo.evict()  # const __global: its store copy is still valid
    assert mgr.stats().bytes_evicted == copied
    mgr.launch(kernel, (n,), None, gpubo.readonly(x), y, np.float32(-1)).wait()
    x.bo.evict()
    assert mgr.stats().bytes_evicted == copied
    np.testing.assert_array_equal(y.get(), -np.arange(n, dtype=np.float32))


def test_arrays_oversubscribing_the_budget_keep_every_value(mgr: gpubo.Manager) -> None:
    rng = np.random.default_rng(7)
    # 40 x 128 KiB: 5 MiB in a 4 MiB budget
    expected = [rng.standard_normal((128, 256)).astype(np.float32) for _ in range(40)]
    arrays = [mgr.asarray(v) for v in expected]
    assert mgr.stats().evictions > 0
    for a, v in zip(reversed(arrays), reversed(expected), strict=True):
        np.testing.assert_array_equal(a.get(), v)
    assert mgr.stats().resident_bytes <= mgr.budget


def test_free_and_the_context_manager_end_the_array(mgr: gpubo.Manager) -> None:
    with mgr.asarray(np.ones(8)) as a:
        assert a.get().sum() == 8
    assert a.bo.state is gpubo.State.FREED
    with pytest.raises(gpubo.BufferFreed):
        a.get()
    a.free()  # idempotent


def test_pickle_goes_to_the_default_manager_and_copy_stays_in_its_own(
    make_mgr: Callable[..., gpubo.Manager],
) -> None:
    first = make_mgr()
    second = make_mgr()  # the latest open manager: the default
    values = np.arange(64, dtype=np.int32).reshape(8, 8)
    a = first.asarray(values)
    a.bo.evict()  # pickling a swapped array restores its bytes to read them
    for protocol in (2, 5):
        b = pickle.loads(pickle.dumps(a, protocol=protocol))
        assert b.manager is second and b.bo is not a.bo
        np.testing.assert_array_equal(b.get(), values)
    gpubo.set_default_manager(first)
    try:
        assert gpubo.default_manager() is first
        c = pickle.loads(pickle.dumps(a))
        assert c.manager is first
    finally:
        gpubo.set_default_manager(None)
    d = copy.copy(a)
    e = copy.deepcopy([a])[0]
    assert d.manager is first and e.manager is first
    d.set(np.zeros((8, 8), np.int32))  # an independent copy
    np.testing.assert_array_equal(a.get(), values)
    np.testing.assert_array_equal(e.get(), values)
    with pytest.raises(TypeError, match="set_default_manager"):
        gpubo.set_default_manager("first")


def test_unpickling_with_no_open_manager_is_a_clear_error(make_mgr: Callable[..., gpubo.Manager]) -> None:
    m = make_mgr()
    data = pickle.dumps(m.asarray(np.ones(4, np.float32)))
    gpubo.set_default_manager(m)
    m.close()
    assert m.closed
    with pytest.raises(gpubo.GpuboError, match="was closed"):
        pickle.loads(data)
    gpubo.set_default_manager(None)
    with pytest.raises(gpubo.GpuboError, match=r"no open gpubo\.Manager"):
        pickle.loads(data)  # every other test's manager is closed by its teardown


def test_numpy_interop_refuses_a_copy_free_view(mgr: gpubo.Manager) -> None:
    a = mgr.asarray(np.arange(6, dtype=np.int32))
    np.testing.assert_array_equal(np.asarray(a, dtype=np.float64), np.arange(6, dtype=np.float64))
    with pytest.raises(ValueError, match="must copy"):
        np.asarray(a, copy=False)
    assert len(a) == 6 and "DeviceArray" in repr(a)


def _flip_stored_byte(store: Path, backend: str, needle: bytes) -> None:
    path = store / ("slots.bin" if backend == "slotfile" else "data.mdb")
    raw = path.read_bytes()
    at = raw.find(needle)
    assert at >= 0, "the evicted bytes are not in the store's file"
    with open(path, "r+b") as f:
        f.seek(at + 7)
        f.write(bytes([raw[at + 7] ^ 0x10]))


@pytest.mark.parametrize("checksums", ["host", "device"])
@pytest.mark.parametrize("backend", ["lmdb", "slotfile"])
def test_a_swapped_array_is_read_from_its_store_entry_without_a_restore(
    tmp_path: Path, make_mgr: Callable[..., gpubo.Manager], backend: str, checksums: str
) -> None:
    """``get(restore=False)``: the bytes come straight from the store,
    verified, and the BO stays swapped; a damaged stored byte is refused."""
    store = tmp_path / "s"
    m = make_mgr(store=str(store), store_backend=backend, checksums=checksums)
    rng = np.random.default_rng(3)
    values = rng.integers(0, 1 << 30, (3 * MiB) // 4, dtype=np.int32).reshape(-1, 1024)
    a = m.asarray(values)
    a.bo.evict()
    restores = m.stats().restores
    np.testing.assert_array_equal(a.get(restore=False), values)
    window = np.empty(1024, np.int32)
    a.bo.read(offset=5 * 4096, out=window, restore=False)  # a part, at an offset
    np.testing.assert_array_equal(window, values.reshape(-1)[5 * 1024 : 6 * 1024])
    assert a.bo.state is gpubo.State.SWAPPED and m.stats().restores == restores
    assert m.stats().resident_bytes == 0
    b = m.asarray(values[:4])  # a resident one reads as usual
    np.testing.assert_array_equal(b.get(restore=False), values[:4])
    _flip_stored_byte(store, backend, values.reshape(-1)[MiB // 4 : MiB // 4 + 16].tobytes())
    with pytest.raises(gpubo.IntegrityError):
        a.get(restore=False)
    assert a.bo.state is gpubo.State.SWAPPED


def test_an_array_nobody_references_is_freed_at_the_next_allocation(mgr: gpubo.Manager) -> None:
    a = mgr.asarray(np.ones((256, 256), np.float32))
    bo = a.bo
    cycle: list[Any] = [a]
    cycle.append(cycle)  # only the cyclic collector can free it
    del a, cycle
    gc.collect()
    assert bo.state is gpubo.State.RESIDENT  # queued, not freed inside the collector
    mgr.zeros(4, np.uint8)
    assert bo.state is gpubo.State.FREED
    assert mgr.stats().resident_bytes == 4


def test_a_pinned_array_that_is_collected_is_freed_once_unpinned(mgr: gpubo.Manager) -> None:
    a = mgr.asarray(np.ones(1024, np.float32))
    bo = a.bo
    with bo.pin():
        with pytest.raises(gpubo.BufferBusy):
            a.free()  # refused: the array keeps its finalizer
        del a
        gc.collect()
        mgr.zeros(1, np.uint8)  # BufferBusy inside: queued again, not dropped
        assert bo.state is gpubo.State.RESIDENT
    mgr.zeros(1, np.uint8)
    assert bo.state is gpubo.State.FREED


def test_an_empty_array_is_refused_once_freed_and_odd_shapes_are_value_errors(mgr: gpubo.Manager) -> None:
    e = mgr.empty((0, 3), np.float32)
    e.free()
    with pytest.raises(gpubo.BufferFreed):
        e.get()
    with pytest.raises(gpubo.BufferFreed):
        e.set(np.zeros((0, 3), np.float32))
    with pytest.raises(ValueError, match="64"):
        mgr.empty((1,) * 65)
    with pytest.raises(ValueError, match="shape"):
        mgr.empty((0, 1 << 62, 1 << 62))
