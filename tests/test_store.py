"""The swap-slot store: full store, corruption, its directory on disk."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import INC_SRC, check_budget, footprint_of, pattern, transit_of

import gpubo
from gpubo.store import CHUNK_BYTES

MiB = 1 << 20
KiB = 1 << 10
R, S = gpubo.State.RESIDENT, gpubo.State.SWAPPED


# -- store full ---------------------------------------------------------------


def _fill_until_store_full(m: gpubo.Manager, nbytes: int) -> list[tuple[gpubo.BufferObject, np.ndarray]]:
    bos = []
    for i in range(10_000):
        try:
            bo = m.alloc(nbytes, name=f"b{i}")
        except gpubo.StoreFull as e:
            assert isinstance(e, gpubo.StoreError) and isinstance(e, gpubo.GpuboError)
            assert e.nbytes == nbytes
            assert e.free_bytes < footprint_of(m.store, nbytes)
            break
        data = pattern(nbytes, 1000 + i)
        bo.write(data)
        bos.append((bo, data))
        check_budget(m)
    else:
        pytest.fail("the store never filled up")
    return bos


def _cycle_and_verify(
    m: gpubo.Manager, bos: list[tuple[gpubo.BufferObject, np.ndarray]], rounds: int
) -> None:
    rng = np.random.default_rng(5)
    for r in range(rounds):
        order = range(len(bos)) if r % 2 == 0 else rng.permutation(len(bos))
        for i in order:
            bo, data = bos[i]
            assert np.array_equal(bo.read(), data), f"round {r}: {bo!r}"
            check_budget(m)


STORE_FULL_CASES = [
    pytest.param("2MiB", 64 * KiB, 128 * KiB, id="64KiB-bos"),
    pytest.param("2MiB", 100_000, 300_000, id="odd-bos"),
    pytest.param("1MiB", 4 * KiB, 8 * KiB, id="4KiB-bos"),
    pytest.param("8MiB", MiB, 2 * MiB, id="1MiB-bos"),
    pytest.param("16MiB", MiB + 1, 3 * MiB, id="1MiB+1-bos"),
]


@pytest.mark.pressure
@pytest.mark.parametrize(("store_size", "nbytes", "budget"), STORE_FULL_CASES)
def test_store_full_keeps_every_earlier_bo_readable(
    make_mgr: Callable[..., gpubo.Manager], store_size: str, nbytes: int, budget: int
) -> None:
    m = make_mgr(budget=budget, store_size=store_size)
    bos = _fill_until_store_full(m, nbytes)
    assert len(bos) * nbytes > budget, "the test must overflow the budget too"
    s = m.stats()
    assert s.bo_count == len(bos)
    # A refused alloc changed nothing; smaller ones may still fit, bigger never.
    with pytest.raises(gpubo.StoreFull):
        m.alloc(nbytes)
    assert m.stats().bo_count == len(bos)
    _cycle_and_verify(m, bos, rounds=4)
    # Freeing one makes room for exactly that again.
    bos[0][0].free()
    again = m.alloc(nbytes)
    again.evict()
    assert not again.read().any()
    bos[0] = (again, np.zeros(nbytes, np.uint8))
    _cycle_and_verify(m, bos, rounds=2)
    for bo, _ in bos:
        bo.free()
    s = m.stats()
    assert s.store_used_bytes == 0 and s.swapped_bytes == 0 and m.store.chunk_count() == 0


def test_swapped_bo_readable_in_admitted_store(make_mgr: Callable[..., gpubo.Manager]) -> None:
    """Every 1 MiB BO a 6 MiB store admits must stay readable, forever.

    LMDB is copy-on-write: a store admitting five such BOs (all it can hold
    at rest) could not cycle them, so admission keeps transit room free.
    """
    m = make_mgr(budget="1MiB", store_size="6MiB")
    bos = []
    with pytest.raises(gpubo.StoreFull):
        for i in range(4):
            bo = m.alloc(MiB)
            bo.write(np.full(MiB, i + 1, np.uint8))
            bos.append(bo)
    assert len(bos) >= 2, "the store must still oversubscribe the budget"
    for _ in range(5):
        for i, bo in enumerate(bos):
            assert (bo.read() == i + 1).all()


def test_failed_alloc_does_not_leak_store_space(make_mgr: Callable[..., gpubo.Manager]) -> None:
    """An alloc refused for lack of device room gives back the store space it had promised."""
    m = make_mgr(budget="256KiB", store_size="2MiB")
    n = 64 * KiB
    pinned = [m.alloc(n) for _ in range(4)]
    with pinned[0].pin(), pinned[1].pin(), pinned[2].pin(), pinned[3].pin():
        for _ in range(50):
            with pytest.raises(gpubo.OutOfDeviceMemory):
                m.alloc(n)
    admitted = len(_fill_until_store_full(m, n)) + len(pinned)
    # as many as the capacity allows (less the room kept for transit), not 50 fewer
    room = m.stats().store_capacity_bytes - transit_of(m.store, n)
    assert admitted == room // footprint_of(m.store, n)


def test_store_full_mixed_sizes(make_mgr: Callable[..., gpubo.Manager]) -> None:
    m = make_mgr(budget="256KiB", store_size="2MiB")
    cap = m.stats().store_capacity_bytes
    big = m.alloc(200 * KiB)
    big.write(pattern(200 * KiB, 1))
    small = []
    while True:
        try:
            bo = m.alloc(3 * KiB + 1)
        except gpubo.StoreFull:
            break
        bo.write(pattern(bo.nbytes, len(small) + 2))
        small.append(bo)
    assert m.stats().store_used_bytes <= cap
    # a big one is refused while a small one may still be fine: no state changed either way
    with pytest.raises(gpubo.StoreFull):
        m.alloc(200 * KiB)
    assert np.array_equal(big.read(), pattern(200 * KiB, 1))
    for i, bo in enumerate(small):
        assert np.array_equal(bo.read(), pattern(bo.nbytes, i + 2))
    assert np.array_equal(big.read(), pattern(200 * KiB, 1))


# -- corruption ---------------------------------------------------------------


def _flip_byte_of(path: Path, needle: bytes, delta: int) -> None:
    raw = path.read_bytes()
    pos = raw.find(needle)
    assert pos >= 0, "pattern not found in the store's data file"
    assert raw.find(needle, pos + 1) < 0, "pattern found twice; the test needs it unique"
    with open(path, "r+b") as f:
        f.seek(pos + delta)
        byte = f.read(1)
        f.seek(pos + delta)
        f.write(bytes([byte[0] ^ 0x5A]))


@pytest.mark.parametrize("chunk", [0, 1, 2])
def test_corrupted_store_byte_raises_integrity_error(
    make_mgr: Callable[..., gpubo.Manager], build_kernel: Callable, tmp_path: Path, chunk: int
) -> None:
    m = make_mgr(store=tmp_path / "store", store_size="32MiB")
    nbytes = 2 * CHUNK_BYTES + 5000
    data = pattern(nbytes, 77)
    bo = m.alloc(nbytes, name="victim")
    bo.write(data)
    other = m.alloc(3 * KiB, name="bystander")
    other.write(pattern(3 * KiB, 78))
    other.evict()
    bo.evict()

    at = chunk * CHUNK_BYTES + 1000
    _flip_byte_of(tmp_path / "store" / "data.mdb", data[at : at + 64].tobytes(), 17)

    inc = build_kernel(m, INC_SRC, "inc")
    before = m.stats()
    for touch in (
        lambda: bo.read(),
        lambda: bo.restore(),
        lambda: bo.pin().__enter__(),
        lambda: bo.write(b"x"),
        lambda: m.launch(inc, (16,), None, other, bo),
    ):
        with pytest.raises(gpubo.IntegrityError) as info:
            touch()
        e = info.value
        assert e.offset == chunk * CHUNK_BYTES
        assert "victim" in str(e) and "victim" in e.bo
        assert bo.state is S and not bo.pinned
    after = check_budget(m)
    assert after.restores == before.restores
    assert after.swapped_bytes == before.swapped_bytes and after.store_used_bytes == before.store_used_bytes
    assert after.pinned_bytes == 0 and not other.pinned
    assert np.array_equal(other.read(), pattern(3 * KiB, 78))

    # A whole overwrite does not need the stored bytes, so it recovers the BO.
    bo.write(data)
    assert bo.state is R
    bo.evict()
    assert np.array_equal(bo.read(), data)
    bo.free()
    other.free()
    assert m.stats().store_used_bytes == 0 and m.store.chunk_count() == 0


def test_corrupted_bo_can_be_freed(make_mgr: Callable[..., gpubo.Manager], tmp_path: Path) -> None:
    m = make_mgr(store=tmp_path / "s", store_size="8MiB")
    data = pattern(10_000, 5)
    bo = m.alloc(10_000, name="bad")
    bo.write(data)
    bo.evict()
    _flip_byte_of(tmp_path / "s" / "data.mdb", data[5000:5064].tobytes(), 0)
    with pytest.raises(gpubo.IntegrityError) as info:
        bo.read(count=1)
    assert info.value.offset == 0
    bo.free()
    s = m.stats()
    assert s.bo_count == 0 and s.store_used_bytes == 0 and m.store.chunk_count() == 0
    assert not m.alloc(10_000).read().any()


# -- the store directory ------------------------------------------------------


def test_store_directory_modes(make_mgr: Callable[..., gpubo.Manager], tmp_path: Path) -> None:
    old_umask = os.umask(0)  # the modes must come from gpubo, not from a kind umask
    try:
        m = make_mgr(store=tmp_path / "store", store_size="8MiB")
    finally:
        os.umask(old_umask)
    m.alloc(4096).evict()
    d = tmp_path / "store"
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert (d / "data.mdb").exists()
    for f in d.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    assert os.path.samefile(m.store.path, d)


def test_temporary_store_directory_mode_and_deletion(make_mgr: Callable[..., gpubo.Manager]) -> None:
    m = make_mgr(store=None, store_size="8MiB")
    path = m.store.path
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    m.alloc(4096).evict()
    assert stat.S_IMODE(os.stat(os.path.join(path, "data.mdb")).st_mode) == 0o600
    m.close()
    assert not os.path.exists(path)


def test_store_is_preallocated(make_mgr: Callable[..., gpubo.Manager], tmp_path: Path) -> None:
    m = make_mgr(store=str(tmp_path / "store"), store_size="16MiB")
    data_file = tmp_path / "store" / "data.mdb"
    st = data_file.stat()
    assert st.st_size >= 16 * MiB
    assert st.st_blocks * 512 >= 16 * MiB, "store space must be allocated up front (not sparse)"
    assert m.stats().store_capacity_bytes <= 16 * MiB


def test_second_manager_on_same_store(make_mgr: Callable[..., gpubo.Manager], tmp_path: Path) -> None:
    path = tmp_path / "shared"
    first = make_mgr(store=path, store_size="8MiB")
    bo = first.alloc(10_000)
    bo.write(pattern(10_000, 1))
    bo.evict()
    with pytest.raises(gpubo.StoreError):
        gpubo.Manager(budget="1MiB", store=path, store_size="8MiB")
    # the failed open did not disturb the first one
    assert np.array_equal(bo.read(), pattern(10_000, 1))
    bo.evict()
    assert np.array_equal(bo.read(), pattern(10_000, 1))
    first.close()
    assert path.is_dir(), "a named store directory is kept on close"
    with gpubo.Manager(budget="1MiB", store=path, store_size="8MiB") as second:
        assert second.store.chunk_count() == 0
        b2 = second.alloc(10_000)
        b2.evict()
        assert not b2.read().any()


def test_store_path_that_cannot_be_created(leak_check: None, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"not a directory")
    with pytest.raises(gpubo.StoreError):
        gpubo.Manager(budget="1MiB", store=blocker / "store", store_size="8MiB")
