"""Bytes are exact through eviction and restore; new BOs read as zeros."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyopencl as cl
import pytest
from conftest import check_budget, pattern

import gpubo
from gpubo.store import CHUNK_BYTES

SIZES = [
    1,
    3,
    4095,
    4096,
    4097,
    65536 + 7,
    CHUNK_BYTES - 1,
    CHUNK_BYTES,
    CHUNK_BYTES + 1,
    3 * CHUNK_BYTES + 12345,
    4 << 20,  # exactly the budget
]


def nonzero_page_bytes(data: np.ndarray) -> int:
    """Bytes of ``data`` in 4 KiB pages that are not all zeros (what a store keeps)."""
    return sum(len(data[i : i + 4096]) for i in range(0, len(data), 4096) if data[i : i + 4096].any())


@pytest.mark.parametrize("nbytes", SIZES)
def test_round_trip_through_eviction(mgr: gpubo.Manager, nbytes: int) -> None:
    data = pattern(nbytes, nbytes)
    bo = mgr.alloc(nbytes, name="rt")
    assert bo.state is gpubo.State.RESIDENT
    bo.write(data)
    assert np.array_equal(bo.read(), data)

    for cycle in range(3):
        before = mgr.stats()
        bo.evict()
        assert bo.state is gpubo.State.SWAPPED
        s = check_budget(mgr)
        assert s.evictions == before.evictions + 1
        # Only the first eviction copies (and only non-zero pages): after a
        # restore the BO is clean and its store entry is kept (swap cache).
        copied = nonzero_page_bytes(data) if cycle == 0 else 0
        assert s.bytes_evicted == before.bytes_evicted + copied
        assert s.swapped_bytes == nbytes and s.resident_bytes == 0
        if cycle == 1:
            bo.restore()
            assert bo.state is gpubo.State.RESIDENT
        got = bo.read()
        assert bo.state is gpubo.State.RESIDENT
        s = check_budget(mgr)
        assert s.restores == before.restores + 1
        assert s.bytes_restored == before.bytes_restored + nbytes
        assert got.dtype == np.uint8 and got.shape == (nbytes,)
        assert np.array_equal(got, data), f"mismatch after cycle {cycle}"
    bo.free()
    s = mgr.stats()
    assert (s.resident_bytes, s.swapped_bytes, s.store_used_bytes) == (0, 0, 0)
    assert mgr.store.chunk_count() == 0


def test_round_trip_with_pressure_many_sizes(mgr: gpubo.Manager) -> None:
    """Several BOs larger in total than the budget, touched in several orders."""
    sizes = [CHUNK_BYTES + 1, 1, 4097, 2 * CHUNK_BYTES - 3, CHUNK_BYTES, 777, 3 * CHUNK_BYTES]
    bos = []
    for i, n in enumerate(sizes):
        bo = mgr.alloc(n, name=f"b{i}")
        bo.write(pattern(n, 100 + i))
        bos.append(bo)
        check_budget(mgr)
    assert mgr.stats().evictions > 0
    rng = np.random.default_rng(7)
    for _ in range(4):
        for i in rng.permutation(len(bos)):
            assert np.array_equal(bos[i].read(), pattern(sizes[i], 100 + i)), f"b{i}"
            check_budget(mgr)
    s = mgr.stats()
    assert s.resident_bytes + s.swapped_bytes == sum(sizes)
    assert s.bo_count == len(sizes)


def test_read_with_dtype_count_offset(mgr: gpubo.Manager) -> None:
    nbytes = CHUNK_BYTES + 10
    data = pattern(nbytes, 3)
    bo = mgr.alloc(nbytes)
    bo.write(data)
    bo.evict()

    f32 = bo.read(np.float32, count=5, offset=8)
    assert f32.dtype == np.float32 and f32.shape == (5,)
    assert f32.tobytes() == data[8:28].tobytes()
    assert bo.state is gpubo.State.RESIDENT

    # Unaligned offsets, a chunk boundary, and the tail.
    u16 = bo.read(np.uint16, count=7, offset=CHUNK_BYTES - 5)
    assert u16.tobytes() == data[CHUNK_BYTES - 5 : CHUNK_BYTES + 9].tobytes()
    assert bo.read(offset=nbytes - 3).tobytes() == data[-3:].tobytes()
    assert bo.read(np.uint64, offset=2).tobytes() == data[2:].tobytes()  # 1 MiB + 8 bytes: whole items
    assert bo.read(count=0).shape == (0,)
    assert bo.read(offset=nbytes).shape == (0,)
    assert bo.read(np.dtype(">u4"), count=1, offset=4)[0] == int.from_bytes(data[4:8].tobytes(), "big")
    assert bo.read("int8", count=3, offset=np.int64(1)).tobytes() == data[1:4].tobytes()

    # The result is a copy: changing it does not change the BO.
    got = bo.read(count=4)
    got[:] = 0
    assert np.array_equal(bo.read(count=4), data[:4])


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (0, 1),
        (5, 100),
        (CHUNK_BYTES - 2, 4),
        (CHUNK_BYTES + 3000 - 10, 10),
        (4096, 4096),
        (0, CHUNK_BYTES + 2999),
    ],
)
def test_partial_write_on_swapped_bo_keeps_old_bytes(mgr: gpubo.Manager, offset: int, length: int) -> None:
    nbytes = CHUNK_BYTES + 3000
    model = pattern(nbytes, 11)
    bo = mgr.alloc(nbytes)
    bo.write(model)
    bo.evict()
    before = mgr.stats()
    patch = pattern(length, 12)
    bo.write(patch, offset=offset)
    model[offset : offset + length] = patch
    s = check_budget(mgr)
    assert s.restores == before.restores + 1, "a partial write must restore the old bytes first"
    assert bo.state is gpubo.State.RESIDENT
    assert np.array_equal(bo.read(), model)
    bo.evict()
    assert np.array_equal(bo.read(), model)


def test_whole_overwrite_of_swapped_bo(mgr: gpubo.Manager) -> None:
    nbytes = 2 * CHUNK_BYTES + 5
    bo = mgr.alloc(nbytes)
    bo.write(pattern(nbytes, 1))
    bo.evict()
    before = mgr.stats()
    new = pattern(nbytes, 2)
    bo.write(new)
    s = check_budget(mgr)
    assert bo.state is gpubo.State.RESIDENT
    # Documented: a write that covers the whole BO skips reading the old bytes back.
    assert s.restores == before.restores
    assert s.swapped_bytes == 0 and s.store_used_bytes == 0
    assert np.array_equal(bo.read(), new)
    bo.evict()
    assert np.array_equal(bo.read(), new)


@pytest.mark.parametrize(
    "data",
    [
        b"hello",
        bytearray(b"\x00\xff\x10"),
        memoryview(b"abcdefgh")[2:6],
        np.arange(6, dtype=np.int32),
        np.arange(12, dtype=np.float64).reshape(3, 4),
        np.zeros(0, np.uint8),
        b"",
    ],
    ids=["bytes", "bytearray", "memoryview", "int32", "float64-2d", "empty-array", "empty-bytes"],
)
def test_write_accepts_bytes_like(mgr: gpubo.Manager, data: object) -> None:
    raw = bytes(memoryview(data).cast("B")) if not isinstance(data, np.ndarray) else data.tobytes()
    bo = mgr.alloc(200)
    bo.write(pattern(200, 0))
    bo.evict()
    bo.write(data, offset=17)
    model = pattern(200, 0)
    model[17 : 17 + len(raw)] = np.frombuffer(raw, np.uint8)
    assert np.array_equal(bo.read(), model)


def test_typed_write_and_read_back(mgr: gpubo.Manager) -> None:
    x = np.linspace(-1, 1, 1000, dtype=np.float32)
    bo = mgr.alloc(x.nbytes)
    bo.write(x)
    bo.evict()
    assert np.array_equal(bo.read(np.float32), x)


# -- zero fill ----------------------------------------------------------------


@pytest.mark.parametrize("nbytes", [1, 4097, CHUNK_BYTES + 1])
def test_new_bo_reads_zeros(mgr: gpubo.Manager, nbytes: int) -> None:
    bo = mgr.alloc(nbytes)
    assert not bo.read().any()
    bo.evict()
    assert not bo.read().any()


def test_new_bo_reuses_freed_device_memory_as_zeros(mgr: gpubo.Manager) -> None:
    nbytes = CHUNK_BYTES + 17
    for round_ in range(3):
        bo = mgr.alloc(nbytes)
        assert not bo.read().any(), f"round {round_}: new BO saw old bytes"
        bo.write(np.full(nbytes, 0xA5, np.uint8))
        bo.free()
        # The freed buffer is kept for reuse: the next alloc of this size gets it.
        assert mgr.stats().pooled_bytes >= nbytes


def test_new_bo_reuses_evicted_buffer_as_zeros(make_mgr: Callable[..., gpubo.Manager]) -> None:
    """An eviction forced by alloc pools the victim's buffer; the new BO gets it zeroed."""
    m = make_mgr(budget="2MiB")
    a = m.alloc(CHUNK_BYTES)
    a.write(np.full(CHUNK_BYTES, 0x5A, np.uint8))
    b = m.alloc(CHUNK_BYTES)
    b.write(np.full(CHUNK_BYTES, 0x6B, np.uint8))
    c = m.alloc(CHUNK_BYTES)  # evicts a and takes its device buffer
    assert a.state is gpubo.State.SWAPPED
    assert not c.read().any()
    assert (a.read() == 0x5A).all()  # evicts b, restores a
    d = m.alloc(CHUNK_BYTES)  # evicts c; the pool recycles
    assert not d.read().any()
    assert (b.read() == 0x6B).all()
    check_budget(m)


def test_new_bo_reuses_store_slots_as_zeros(mgr: gpubo.Manager) -> None:
    nbytes = CHUNK_BYTES + 4096
    old = mgr.alloc(nbytes)
    old.write(np.full(nbytes, 0xEE, np.uint8))
    old.evict()
    old.free()
    assert mgr.stats().store_used_bytes == 0
    new = mgr.alloc(nbytes)
    new.evict()
    assert not new.read().any()
    # and a partial write to a swapped new BO keeps the rest zero
    new.evict()
    new.write(b"\x01", offset=nbytes // 2)
    got = new.read()
    assert got[nbytes // 2] == 1 and got.sum() == 1


def test_pinned_buffer_writes_persist(mgr: gpubo.Manager) -> None:
    """Bytes written straight into the pinned pyopencl.Buffer survive eviction."""
    bo = mgr.alloc(5000)
    data = pattern(5000, 9)
    bo.evict()
    with bo.pin() as buf:
        assert isinstance(buf, cl.Buffer)
        assert bo.state is gpubo.State.RESIDENT and bo.pinned
        cl.enqueue_copy(mgr.queue, buf, data, is_blocking=True)
    assert not bo.pinned
    bo.evict()
    assert np.array_equal(bo.read(), data)


def test_checksums_off_still_round_trips(make_mgr: Callable[..., gpubo.Manager]) -> None:
    m = make_mgr(checksums=False)
    bo = m.alloc(CHUNK_BYTES + 1)
    data = pattern(CHUNK_BYTES + 1, 5)
    bo.write(data)
    bo.evict()
    assert np.array_equal(bo.read(), data)
