"""The two transfer strategies: ``map`` (map the device buffer) and
``bounce`` (stream through a few pinned host buffers, never mapping a
device buffer), on the real PoCL device and real stores."""

from __future__ import annotations

import os
import threading
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import check_budget, observe_backend, pattern

import gpubo
from gpubo.store.base import scan_zero_pages

KiB = 1 << 10
MiB = 1 << 20
MakeMgr = Callable[..., gpubo.Manager]

#: Sizes around the chunk (1 MiB) and the bounce buffer (2 MiB here).
SIZES = [1, 4095, 4096 * 3 + 7, MiB - 1, MiB, MiB + 1, 2 * MiB, 2 * MiB + 4097, 5 * MiB + 123]


class Calls:
    """Observes a manager's backend (every call goes through) and counts
    the calls by name."""

    def __init__(self, m: gpubo.Manager) -> None:
        self.counts: dict[str, int] = {}

        def before(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.counts[name] = self.counts.get(name, 0) + 1

        observe_backend(m, before)


def _with_zero_pages(n: int, seed: int) -> np.ndarray:
    data = pattern(n, seed)
    data[: min(n, 8192)] = 0  # whole zero pages at the start
    return data


@pytest.mark.parametrize("backend", ["lmdb", "slotfile"])
@pytest.mark.parametrize("checksums", [True, False])
def test_bounce_round_trips_every_size(make_mgr: MakeMgr, backend: str, checksums: bool) -> None:
    m = make_mgr(
        budget="16MiB",
        store_size="128MiB",
        store_backend=backend,
        checksums=checksums,
        transfer="bounce",
        bounce_buffers=2,
        bounce_size="2MiB",
    )
    assert m.stats().transfer == "bounce" and "transfer=bounce" in repr(m)
    for i, n in enumerate(SIZES):
        data = _with_zero_pages(n, i) if i % 2 else pattern(n, i)
        bo = m.alloc(n)
        bo.write(data)
        bo.evict()
        assert bo.state is gpubo.State.SWAPPED
        assert np.array_equal(bo.read(), data), f"{n} bytes"
        bo.write(pattern(n, 100 + i))  # dirty again: the next eviction copies
        bo.evict()
        assert np.array_equal(bo.read(), pattern(n, 100 + i)), f"{n} bytes, second round"
        bo.free()
    check_budget(m)


def test_bounce_never_maps_a_device_buffer_for_a_large_bo(make_mgr: MakeMgr) -> None:
    """An 8 MiB BO evicted and restored through 2 buffers of 1 MiB: every
    range is a non-blocking copy, and no map of a device buffer happens."""
    m = make_mgr(budget="16MiB", store_size="64MiB", transfer="bounce", bounce_buffers=2, bounce_size="1MiB")
    data = pattern(8 * MiB, 3)
    bo = m.alloc(data.nbytes)
    bo.write(data)
    calls = Calls(m)
    bo.evict()
    bo.restore()
    assert np.array_equal(bo.read(), data)
    assert calls.counts.get("map_read", 0) == 0 and calls.counts.get("map_write", 0) == 0, calls.counts
    assert calls.counts["download_nowait"] == 8 and calls.counts["upload_at_nowait"] == 8, calls.counts


def test_map_is_the_default_on_unified_memory(make_mgr: MakeMgr, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPUBO_TRANSFER", raising=False)
    m = make_mgr()
    assert m.backend.host_unified_memory  # PoCL's CPU device
    assert m.stats().transfer == "map" and "transfer=map" in repr(m)


def test_the_environment_chooses_when_the_argument_does_not(
    make_mgr: MakeMgr, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPUBO_TRANSFER", "bounce")
    assert make_mgr().stats().transfer == "bounce"
    assert make_mgr(transfer="map").stats().transfer == "map"  # the argument wins


def test_bounce_eviction_allocates_no_host_memory_in_the_bo_size(make_mgr: MakeMgr) -> None:
    """64 MiB evicted and restored through 4 buffers of 1 MiB (allocated when
    the manager opened): Python's allocations during the moves stay far below
    even one buffer."""
    m = make_mgr(budget="80MiB", store_size="256MiB", transfer="bounce", bounce_buffers=4, bounce_size="1MiB")
    bo = m.alloc(64 * MiB)
    bo.write(np.full(64 * MiB, 7, np.uint8))
    tracemalloc.start()
    try:
        bo.evict()
        bo.restore()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * KiB, f"peak {peak} bytes of host allocations while moving 64 MiB"
    assert bo.read(count=16, offset=32 * MiB).tolist() == [7] * 16


def _flip_a_byte_of(path: Path, data: np.ndarray) -> None:
    """Flip byte 10 of where ``data``'s first 64 bytes lie in the store's
    file ``path``, and flush it to the file."""
    raw = path.read_bytes()
    at = raw.find(data[:64].tobytes())
    assert at >= 0, "the evicted bytes are not in the store's file"
    with open(path, "r+b") as f:
        f.seek(at + 10)
        f.write(bytes([raw[at + 10] ^ 0xFF]))
        f.flush()
        os.fsync(f.fileno())


@pytest.mark.parametrize("backend", ["lmdb", "slotfile"])
def test_a_flipped_byte_is_caught_on_a_bounce_restore(
    tmp_path: Path, make_mgr: MakeMgr, backend: str
) -> None:
    store = tmp_path / "s"
    m = make_mgr(
        budget="16MiB", store=str(store), store_size="64MiB", store_backend=backend, transfer="bounce"
    )
    data = pattern(3 * MiB, 9)  # more than a chunk: streamed back, not lent
    bo = m.alloc(data.nbytes)
    bo.write(data)
    bo.evict()
    _flip_a_byte_of(store / ("slots.bin" if backend == "slotfile" else "data.mdb"), data[2 * MiB :])
    with pytest.raises(gpubo.IntegrityError) as info:
        bo.restore()
    assert info.value.offset == 2 * MiB
    assert bo.state is gpubo.State.SWAPPED
    check_budget(m)


@pytest.mark.parametrize("backend", ["lmdb", "slotfile"])
def test_a_large_restore_hashed_on_the_worker_reports_the_first_bad_chunk(
    tmp_path: Path, make_mgr: MakeMgr, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    """A large entry read into a mapping of its buffer is hashed on the hash
    worker while the store copies (read_hashing_aside). The bytes still come
    back exact, and of two damaged chunks the first, in order, is reported."""
    from gpubo.store import hashing

    hashed_on: list[tuple[str, list[int]]] = []
    real = hashing.hash_plans

    def observed(view: memoryview, plans: Any) -> list[int | None]:
        hashed_on.append((threading.current_thread().name, [p.index for p in plans]))
        return real(view, plans)

    monkeypatch.setattr(hashing, "hash_plans", observed)
    store = tmp_path / "s"
    m = make_mgr(budget="32MiB", store=str(store), store_size="96MiB", store_backend=backend, transfer="map")
    bos, datas = [], []
    for seed in (21, 22):
        data = pattern(12 * MiB, seed)
        data[3 * MiB : 3 * MiB + 4096] = 0  # a zero page: the entry is read, not lent
        bo = m.alloc(data.nbytes)
        bo.write(data)
        bos.append(bo)
        datas.append(data)
    for bo in bos:
        bo.evict()
    hashed_on.clear()
    bos[0].restore()
    assert np.array_equal(bos[0].read(), datas[0])
    assert {name.startswith("gpubo-hash") for name, _ in hashed_on} == {True}
    assert sorted(i for _, indices in hashed_on for i in indices) == list(range(12))

    path = store / ("slots.bin" if backend == "slotfile" else "data.mdb")
    _flip_a_byte_of(path, datas[1][9 * MiB :])
    _flip_a_byte_of(path, datas[1][5 * MiB :])
    with pytest.raises(gpubo.IntegrityError) as info:
        bos[1].restore()
    assert info.value.offset == 5 * MiB
    assert bos[1].state is gpubo.State.SWAPPED
    check_budget(m)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"transfer": "dma"}, ValueError, "transfer must be one of auto, map, bounce"),
        ({"transfer": 3}, TypeError, "transfer must be a str"),
        ({"transfer": "bounce", "bounce_buffers": 1}, ValueError, "bounce_buffers must be >= 2"),
        ({"transfer": "bounce", "bounce_size": "1536KiB"}, ValueError, "multiple of 1 MiB"),
        ({"transfer": "bounce", "bounce_size": "lots"}, ValueError, "bounce_size"),
    ],
)
def test_bad_transfer_arguments_are_refused_and_leave_nothing_open(
    tmp_path: Path, leak_check: None, kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        gpubo.Manager("4MiB", store=str(tmp_path / "s"), store_size="16MiB", **kwargs)  # type: ignore[arg-type]
    m = gpubo.Manager(
        "4MiB", store=str(tmp_path / "s"), store_size="16MiB"
    )  # the store was closed: not locked
    m.close()


@pytest.mark.parametrize("n", [1, 4096, 4097, 3 * 4096 - 5, 64 * KiB, MiB + 4096 * 3 + 11])
def test_device_zero_pages_match_the_host_scan(mgr: gpubo.Manager, n: int) -> None:
    """The bounce path finds zero pages on the device; they must be exactly
    the pages the host scan finds (a store written either way reads the same)."""
    rng = np.random.default_rng(n)
    data = rng.integers(0, 256, n, dtype=np.uint8)
    npages = -(-n // 4096)
    for page in rng.choice(npages, size=max(1, npages // 2), replace=False):
        data[page * 4096 : (page + 1) * 4096] = 0
    if npages > 1:
        data[4096 + 4095 if n > 8191 else n - 1] = 1  # a lone non-zero byte at a page's end
    bo = mgr.alloc(n)
    bo.write(data)
    with bo.pin() as buf:
        device = mgr.backend.zero_pages(buf, n)
    host = scan_zero_pages(memoryview(data), n)
    assert (device is None) == (host is None)
    if host is not None:
        assert device is not None and device.tolist() == host.tolist()


def test_a_bounce_eviction_stores_no_zero_page(make_mgr: MakeMgr) -> None:
    m = make_mgr(budget="16MiB", store_size="64MiB", transfer="bounce", bounce_buffers=2, bounce_size="1MiB")
    data = np.zeros(3 * MiB, np.uint8)
    data[MiB : MiB + 5] = 9  # one non-zero page
    bo = m.alloc(data.nbytes)
    bo.write(data)
    bo.evict()
    assert bo.entry is not None and bo.entry.stored_bytes == 4096
    assert np.array_equal(bo.read(), data)


@pytest.mark.parametrize("checksums", [True, False])
@pytest.mark.parametrize("backend", ["lmdb", "slotfile"])
def test_a_bo_too_large_to_lend_unhashed_is_read_back_exactly(
    make_mgr: MakeMgr, backend: str, checksums: bool
) -> None:
    """An entry of at least LEND_MAX_BYTES is lent only when the host hashes
    it: without checksums its restore maps the device buffer for writing and
    the store reads into it. One just below the limit is always lent."""
    from gpubo.store.base import LEND_MAX_BYTES

    m = make_mgr(
        budget=2 * LEND_MAX_BYTES + 8 * MiB,
        store_size=2 * LEND_MAX_BYTES + 64 * MiB,
        store_backend=backend,
        checksums=checksums,
        transfer="map",
    )
    calls = Calls(m)
    for n, read in [(LEND_MAX_BYTES + 4097, not checksums), (LEND_MAX_BYTES - 4096, False)]:
        data = pattern(n, n % 251)
        bo = m.alloc(n)
        bo.write(data)
        bo.evict()
        before = calls.counts.get("map_write", 0)
        bo.restore()
        assert calls.counts.get("map_write", 0) - before == (1 if read else 0)
        assert np.array_equal(bo.read(), data)
        bo.free()


@pytest.mark.parametrize(
    ("damage", "checksums"), [("flipped byte", True), ("file cut short", True), ("file cut short", False)]
)
def test_a_damaged_slot_file_fails_a_large_restore_with_a_typed_error(
    tmp_path: Path, make_mgr: MakeMgr, damage: str, checksums: bool
) -> None:
    """A large restore verifies what it read, and a file that shrank while
    the store had it open (another program) is a StoreError that says where
    it ends, not the SIGBUS a read of the mapping past the file's end would
    be: with checksums the entry is lent, and the lend checks the file's
    size first; without, it is read with preadv, which reports the short
    read."""
    from gpubo.store.base import LEND_MAX_BYTES

    store = tmp_path / "s"
    m = make_mgr(
        budget=LEND_MAX_BYTES + 8 * MiB,
        store=str(store),
        store_size=LEND_MAX_BYTES + 64 * MiB,
        store_backend="slotfile",
        transfer="map",
        checksums=checksums,
    )
    data = pattern(LEND_MAX_BYTES, 5)
    bo = m.alloc(data.nbytes)
    bo.write(data)
    bo.evict()
    if damage == "flipped byte":
        _flip_a_byte_of(store / "slots.bin", data[7 * MiB :])
        with pytest.raises(gpubo.IntegrityError) as info:
            bo.restore()
        assert info.value.offset == 7 * MiB
    else:
        os.truncate(store / "slots.bin", 4096)
        with pytest.raises(gpubo.StoreError, match="slot file ends at byte 4096"):
            bo.restore()
    assert bo.state is gpubo.State.SWAPPED
    check_budget(m)


@pytest.mark.parametrize("backend", ["lmdb", "slotfile"])
def test_a_store_file_cut_short_is_a_store_error_not_a_sigbus(
    tmp_path: Path, make_mgr: MakeMgr, backend: str
) -> None:
    """Another program truncates the store's mapped data file while the
    store has it open. A restore of a lent entry would read the mapping past
    the file's end and an LMDB eviction would write it: both are a SIGBUS
    that kills the process. Each is a StoreError instead, and the BOs keep
    their state and bytes."""
    store = tmp_path / "s"
    m = make_mgr(budget="8MiB", store=str(store), store_size="64MiB", store_backend=backend, transfer="map")
    swapped, resident = pattern(MiB, 31), pattern(MiB, 32)
    a, b = m.alloc(MiB), m.alloc(MiB)
    a.write(swapped)
    b.write(resident)
    a.evict()
    name = "slots.bin" if backend == "slotfile" else "data.mdb"
    os.truncate(store / name, 4096)
    what = "slot file" if backend == "slotfile" else "store's LMDB file"
    with pytest.raises(gpubo.StoreError, match=f"the {what} ends at byte 4096"):
        a.restore()
    assert a.state is gpubo.State.SWAPPED
    with pytest.raises(gpubo.StoreError, match=f"the {what} ends at byte 4096"):
        b.evict()
    assert b.state is gpubo.State.RESIDENT
    assert np.array_equal(b.read(), resident)
    check_budget(m)


@pytest.mark.parametrize("backend", ["lmdb", "slotfile"])
def test_a_batched_write_to_a_store_file_cut_short_takes_no_space(tmp_path: Path, backend: str) -> None:
    """A batch of small entries written after the store's data file was cut
    short fails with a StoreError before any space is taken: the store's
    used bytes stay as they were. An older entry is read through LMDB's
    map, which the store no longer touches (a StoreError), and from the
    slot file with preadv, which reads it exactly: its slot is in the part
    that is left."""
    from gpubo.store import open_store

    store = open_store(tmp_path / "s", 64 * MiB, backend=backend)
    try:
        src = pattern(64 * KiB, 41)
        older = store.write_batch(memoryview(src), [(0, 4096)])
        used = store.used_bytes
        os.truncate(tmp_path / "s" / ("slots.bin" if backend == "slotfile" else "data.mdb"), 4096)
        with pytest.raises(gpubo.StoreError, match="ends at byte 4096"):
            store.write_batch(memoryview(src), [(0, 4096), (8192, 4096)])
        assert store.used_bytes == used
        out = np.empty(4096, np.uint8)
        if backend == "lmdb":
            with pytest.raises(gpubo.StoreError, match="ends at byte 4096"):
                store.read_into(older[0], memoryview(out), "older")
        else:
            store.read_into(older[0], memoryview(out), "older")
            assert np.array_equal(out, src[:4096])
    finally:
        store.close()
