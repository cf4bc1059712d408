"""Batched eviction of small BOs (issue 6): gathered on the device into one
staging buffer, written to the store in one transaction or one pwrite per
slot run, all or nothing; every byte comes back; the budget holds."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import check_budget, footprint_of, pattern

import gpubo
from gpubo import BATCH_MAX_BO_BYTES
from gpubo.store import PAGE_BYTES, Entry, SwapStore, open_store

KiB = 1 << 10
MiB = 1 << 20
R, S = gpubo.State.RESIDENT, gpubo.State.SWAPPED
MakeMgr = Callable[..., gpubo.Manager]
DATA_FILE = {"lmdb": "data.mdb", "slotfile": "slots.bin"}

COMBOS = [
    pytest.param("lmdb", "lazy", True, id="lmdb-lazy-cs"),
    pytest.param("lmdb", "sync", False, id="lmdb-sync"),
    pytest.param("slotfile", "lazy", True, id="slotfile-lazy-cs"),
    pytest.param("slotfile", "lazy", False, id="slotfile-lazy"),
    pytest.param("slotfile", "sync", True, id="slotfile-sync-cs"),
    pytest.param("slotfile", "direct", True, id="slotfile-direct-cs"),
]


def fill(m: gpubo.Manager, sizes: list[int], seed: int = 0) -> list[tuple[gpubo.BufferObject, np.ndarray]]:
    out = []
    for i, n in enumerate(sizes):
        bo = m.alloc(n)
        data = pattern(n, seed + i)
        bo.write(data)
        out.append((bo, data))
    return out


def assert_intact(bos: list[tuple[gpubo.BufferObject, np.ndarray]]) -> None:
    for i, (bo, data) in enumerate(bos):
        assert np.array_equal(bo.read(), data), f"BO {i} ({bo.nbytes} bytes) changed"


@pytest.mark.parametrize(("backend", "durability", "checksums"), COMBOS)
def test_evicting_many_small_bos_batches_them(
    make_mgr: MakeMgr, backend: str, durability: str, checksums: bool
) -> None:
    n, size = 256, 4 * KiB
    m = make_mgr(
        budget=n * size,
        store_size="64MiB",
        store_backend=backend,
        durability=durability,
        checksums=checksums,
    )
    bos = fill(m, [size] * n)
    before = m.stats()
    assert m.evict(n * size) == n * size
    after = check_budget(m)
    assert after.evictions - before.evictions == n
    assert after.bytes_evicted - before.bytes_evicted == n * size  # every byte copied once
    # The budget was full: the first victim goes alone, then batches double
    # with the room they free (a staging buffer comes from free room only).
    assert after.eviction_batches - before.eviction_batches >= 3
    assert after.resident_bytes == 0 and after.swapped_bytes == n * size
    assert all(bo.state is S for bo, _ in bos)
    assert_intact(bos)
    # Once more, now through the swap cache's dirty path (restored, then written).
    for bo, data in bos:
        data[7] ^= 0xFF
        bo.write(data[7:8], 7)
    m.evict(n * size)
    assert_intact(bos)


def test_batch_mixed_sizes_and_unaligned_lengths(make_mgr: MakeMgr) -> None:
    sizes = [1, 100, 4095, 4096, 4097, 3 * 4096 + 100, 64 * KiB, BATCH_MAX_BO_BYTES, 5000] * 6
    m = make_mgr(budget=sum(sizes), store_size="64MiB", store_backend="slotfile")
    bos = fill(m, sizes, seed=100)
    m.evict(sum(sizes))
    s = check_budget(m)
    assert s.eviction_batches >= 2 and s.resident_bytes == 0
    assert_intact(bos)


def test_large_bos_are_not_batched(make_mgr: MakeMgr) -> None:
    size = BATCH_MAX_BO_BYTES + PAGE_BYTES
    m = make_mgr(budget=8 * size, store_size="64MiB")
    bos = fill(m, [size] * 8)
    m.evict(8 * size)
    assert m.stats().eviction_batches == 0 and m.stats().evictions == 8
    assert_intact(bos)


def test_batch_with_zero_pages_skips_them(make_mgr: MakeMgr) -> None:
    # Every other BO has an all-zero first page: the batch takes the
    # per-entry path and the zero pages are not stored.
    sizes = [8 * KiB] * 64
    m = make_mgr(budget=sum(sizes), store_size="64MiB", store_backend="slotfile")
    bos = []
    for i, n in enumerate(sizes):
        data = pattern(n, i)
        if i % 2:
            data[:PAGE_BYTES] = 0
        bo = m.alloc(n)
        bo.write(data)
        bos.append((bo, data))
    m.evict(sum(sizes))
    s = check_budget(m)
    assert s.eviction_batches >= 1 and s.resident_bytes == 0
    assert s.bytes_evicted == sum(sizes) - 32 * PAGE_BYTES  # the zero pages were skipped
    assert s.store_used_bytes == sum(sizes) - 32 * PAGE_BYTES
    assert_intact(bos)


def test_alloc_evicts_only_what_it_needs_in_batches(make_mgr: MakeMgr) -> None:
    n, size = 512, 4 * KiB
    m = make_mgr(budget=n * size, store_size="64MiB")
    bos = fill(m, [size] * n)
    big = m.alloc(256 * KiB)
    s = check_budget(m)
    assert s.evictions == 64  # exactly room for the new BO: no over-eviction
    assert s.eviction_batches >= 1
    # The least recently used went first.
    assert [bo.state for bo, _ in bos[:64]] == [S] * 64
    assert [bo.state for bo, _ in bos[64:]] == [R] * (n - 64)
    big.write(pattern(256 * KiB, 9))
    assert_intact(bos)


def test_busy_and_pinned_bos_stay_out_of_batches(make_mgr: MakeMgr) -> None:
    n, size = 64, 4 * KiB
    m = make_mgr(budget=n * size, store_size="64MiB")
    bos = fill(m, [size] * n)
    pinned = bos[5][0]
    with pinned.pin():
        freed = m.evict(n * size)
        assert freed == (n - 1) * size
        assert pinned.state is R
        assert all(bo.state is S for bo, _ in bos if bo is not pinned)
    assert m.stats().eviction_batches >= 1
    assert_intact(bos)


def test_batch_store_full_changes_nothing(make_mgr: MakeMgr, tmp_path: Path) -> None:
    # A batch needs room for all its entries at once: when the store cannot
    # give it, StoreFull is raised and every victim stays resident and intact.
    n, size = 64, 4 * KiB
    m = make_mgr(budget=n * size, store=tmp_path / "s", store_size="16MiB", store_backend="slotfile")
    bos = fill(m, [size] * n)
    filler = m.store.write(
        memoryview(np.ones(m.store.capacity_bytes - m.store.used_bytes - 8 * KiB, np.uint8))
    )
    before = m.stats()
    with pytest.raises(gpubo.StoreFull):
        m.evict(n * size)
    after = check_budget(m)
    assert after.store_used_bytes == before.store_used_bytes + (after.bytes_evicted - before.bytes_evicted)
    swapped = [bo for bo, _ in bos if bo.state is S]
    assert len(swapped) <= 2  # only what fitted one by one before the first batch
    m.store.release(filler)
    m.evict(n * size)
    assert all(bo.state is S for bo, _ in bos)
    assert_intact(bos)


def write_some(store: SwapStore, room: int) -> Entry:
    """An entry taking at most ``room`` bytes of the store's capacity."""
    n = room
    while footprint_of(store, n) > room:
        n -= PAGE_BYTES
    return store.write(memoryview(np.ones(n, np.uint8)))


@pytest.mark.parametrize("backend", ["lmdb", "slotfile"])
def test_write_batch_all_or_nothing(leak_check: None, tmp_path: Path, backend: str) -> None:
    store = open_store(tmp_path / "s", 4 * MiB, backend=backend)
    try:
        src = pattern(64 * PAGE_BYTES, 3)
        layout = [(i * PAGE_BYTES, PAGE_BYTES) for i in range(64)]
        with pytest.raises(ValueError):
            store.write_batch(memoryview(src), [(0, PAGE_BYTES), (63 * PAGE_BYTES, 2 * PAGE_BYTES)])
        with pytest.raises(ValueError):
            store.write_batch(memoryview(src), [(0, 0)])
        entries = store.write_batch(memoryview(src), layout)
        for i, entry in enumerate(entries):
            out = np.empty(PAGE_BYTES, np.uint8)
            store.read_into(entry, memoryview(out), "t")
            assert np.array_equal(out, src[i * PAGE_BYTES : (i + 1) * PAGE_BYTES])
        # Fill the store until the batch's 64 entries no longer fit, then try it.
        need = sum(footprint_of(store, n) for _, n in layout)
        fillers = []
        while store.capacity_bytes - store.used_bytes >= need:
            fillers.append(write_some(store, min(need // 2, store.capacity_bytes - store.used_bytes)))
        used, units = store.used_bytes, store.chunk_count()
        with pytest.raises(gpubo.StoreFull):
            store.write_batch(memoryview(src), layout)
        assert store.used_bytes == used and store.chunk_count() == units  # nothing left behind
        for filler in fillers:
            store.release(filler)
        for entry in entries:
            store.release(entry)
        assert store.used_bytes == 0 and store.chunk_count() == 0
    finally:
        store.close()


def test_corrupted_batched_entry_is_detected(make_mgr: MakeMgr, tmp_path: Path) -> None:
    n, size = 32, 4 * KiB
    m = make_mgr(budget=n * size, store=tmp_path / "s", store_size="16MiB", store_backend="slotfile")
    bos = fill(m, [size] * n, seed=500)
    m.evict(n * size)
    assert m.stats().eviction_batches >= 1
    victim, data = bos[20]
    raw = (tmp_path / "s" / "slots.bin").read_bytes()
    pos = raw.find(data[:64].tobytes())
    assert pos >= 0
    with open(tmp_path / "s" / "slots.bin", "r+b") as f:
        f.seek(pos + 100)
        f.write(bytes([raw[pos + 100] ^ 0x01]))
    with pytest.raises(gpubo.IntegrityError):
        victim.read()
    assert victim.state is S
    assert_intact([b for b in bos if b[0] is not victim])


def test_batched_entries_survive_hibernate(make_mgr: MakeMgr, tmp_path: Path) -> None:
    n, size = 48, 4 * KiB
    m = make_mgr(budget=n * size, store=tmp_path / "s", store_size="16MiB")
    datas = []
    for i in range(n):
        bo = m.alloc(size, name=f"bo{i}")
        datas.append(pattern(size, 900 + i))
        bo.write(datas[-1])
    m.evict(n * size)
    assert m.stats().eviction_batches >= 1
    m.hibernate()
    m.close()
    m2 = make_mgr(budget=n * size, store=tmp_path / "s", store_size="16MiB")
    for i in range(n):
        assert np.array_equal(m2.open(f"bo{i}").read(), datas[i])


@pytest.mark.parametrize("path", ["kernel", "copy commands"])
def test_gather_paths_are_byte_exact(make_mgr: MakeMgr, path: str) -> None:
    # The gather kernel copies 16 BOs per launch, words then the last bytes;
    # without it (a device that cannot build it) each BO is one copy command.
    sizes = [4096, 5, 4099, 12_288, 64 * KiB + 3] * 8  # more than one launch of 16
    m = make_mgr(budget=sum(sizes), store_size="64MiB")
    if path == "copy commands":
        m.backend._gather_failed = True  # as after a failed build
    bos = fill(m, sizes, seed=4000)
    m.evict(sum(sizes))
    assert m.stats().eviction_batches >= 2
    assert (m.backend._gather_kernel is not None) == (path == "kernel")
    assert_intact(bos)


# -- batched restores (mgr.prefetch of small BOs) ----------------------------


@pytest.mark.parametrize(("backend", "durability", "checksums"), COMBOS)
def test_prefetching_many_small_bos_restores_them_together(
    make_mgr: MakeMgr, backend: str, durability: str, checksums: bool
) -> None:
    n, size = 96, 4 * KiB
    m = make_mgr(
        budget=2 * n * size,
        store_size="64MiB",
        store_backend=backend,
        durability=durability,
        checksums=checksums,
    )
    # Odd sizes, a zero page (its entry is not one run: restored by read_into)
    # and never-written BOs (known zero) ride along with the plain ones.
    sizes = [size] * n + [3 * KiB + 5, 12 * KiB + 1, 64 * KiB]
    bos = fill(m, sizes, seed=1000)
    holey = bos[-1][1]
    holey[4 * KiB : 8 * KiB] = 0
    bos[-1][0].write(holey)
    fresh = [m.alloc(size) for _ in range(3)]
    everything = [bo for bo, _ in bos] + fresh
    m.evict(m.stats().resident_bytes)
    assert all(bo.state is S for bo in everything)
    before = m.stats()
    for future in m.prefetch(everything):
        assert future.result(timeout=60) is None
    after = check_budget(m)
    assert all(bo.state is R for bo in everything)
    assert after.restore_batches > before.restore_batches
    assert after.restores - before.restores == len(everything)
    assert after.bytes_restored - before.bytes_restored == sum(bo.nbytes for bo in everything)
    assert_intact(bos)
    assert all(not bo.read().any() for bo in fresh)
    # Restored clean: evicting them again copies nothing (the swap cache holds).
    copied = m.stats().bytes_evicted
    m.evict(m.stats().resident_bytes)
    assert m.stats().bytes_evicted == copied
    assert_intact(bos)


def test_prefetch_batches_stay_within_the_budget(make_mgr: MakeMgr) -> None:
    """Twice the budget of small BOs: the batch restores evict others as they
    go, and the budget holds at every step."""
    n, size = 128, 4 * KiB
    m = make_mgr(budget=n * size // 2, store_size="32MiB")
    bos = fill(m, [size] * n, seed=2000)
    for start in range(0, n, n // 4):
        group = [bo for bo, _ in bos[start : start + n // 4]]
        for future in m.prefetch(group):
            future.result(timeout=60)
        check_budget(m)
        assert all(bo.state is R for bo in group)
    assert m.stats().restore_batches >= 1
    assert_intact(bos)


def test_prefetch_list_with_duplicates_freed_and_resident_bos(make_mgr: MakeMgr) -> None:
    size = 8 * KiB
    m = make_mgr(budget=64 * size, store_size="16MiB")
    bos = fill(m, [size] * 8, seed=3000)
    m.evict(m.stats().resident_bytes)
    freed = bos[3][0]
    freed.free()
    bos[5][0].restore()
    items = [bos[0][0], bos[1][0], bos[1][0], freed, bos[2][0], bos[5][0], bos[6][0], bos[0][0]]
    futures = m.prefetch(items)
    for bo, future in zip(items, futures, strict=True):
        if bo is freed:
            with pytest.raises(gpubo.BufferFreed):
                future.result(timeout=60)
        else:
            assert future.result(timeout=60) is None
            assert bo.state is R
    assert bos[4][0].state is S and bos[7][0].state is S  # not asked for
    assert m.stats().restore_batches == 1
    assert_intact([b for b in bos if b[0] is not freed])
    check_budget(m)


@pytest.mark.parametrize("backend", ["lmdb", "slotfile"])
def test_corrupted_bo_in_a_prefetch_batch_fails_alone(
    make_mgr: MakeMgr, tmp_path: Path, backend: str
) -> None:
    """One flipped byte among a batch: that BO's future raises IntegrityError
    and it stays swapped; the others are restored (one by one after the
    batch fails), byte for byte, and the budget holds."""
    n, size = 24, 4 * KiB
    m = make_mgr(budget=4 * n * size, store=tmp_path / "s", store_size="16MiB", store_backend=backend)
    bos = fill(m, [size] * n, seed=4000)
    m.evict(m.stats().resident_bytes)
    victim, data = bos[9]
    path = tmp_path / "s" / DATA_FILE[backend]
    raw = path.read_bytes()
    pos = raw.find(data[:64].tobytes())
    assert pos >= 0 and raw.find(data[:64].tobytes(), pos + 1) < 0
    with open(path, "r+b") as f:
        f.seek(pos + 200)
        f.write(bytes([raw[pos + 200] ^ 0x04]))
    before = m.stats()
    futures = m.prefetch([bo for bo, _ in bos])
    for i, future in enumerate(futures):
        if i == 9:
            with pytest.raises(gpubo.IntegrityError) as info:
                future.result(timeout=60)
            assert info.value.offset == 0
        else:
            assert future.result(timeout=60) is None
    after = check_budget(m)
    assert victim.state is S
    assert after.restore_batches == before.restore_batches  # the batch failed as a whole
    assert after.restores - before.restores == n - 1
    assert after.swapped_bytes == size
    assert_intact([b for b in bos if b[0] is not victim])
    victim.write(data)  # a whole overwrite recovers it
    assert np.array_equal(victim.read(), data)
