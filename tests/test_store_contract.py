"""The swap-slot store contract, one suite for every backend and durability.

Store level (gpubo.store.open_store): entries, zero pages, refcounts, store
full, named records, reopening, format version, backend detection, file
modes, locking, corruption. Manager level: the swap cache, untouched BOs,
named buffers that survive the process, hibernate, remove.

Nothing is mocked: stores live in real directories, faults are injected by
editing the real files (a flipped byte, a bogus format value) or by a real
child process that dies without closing its store.
"""

from __future__ import annotations

import os
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import lmdb
import numpy as np
import pytest
import xxhash
from conftest import AXPY_SRC, INC_SRC, footprint_of, stored_units_of

import gpubo
from gpubo.store import (
    CHUNK_BYTES,
    PAGE_BYTES,
    LmdbStore,
    SlotFileStore,
    SwapStore,
    detect_backend,
    open_existing,
    open_store,
)
from gpubo.store.base import FORMAT_VERSION, Entry
from gpubo.store.entry import XXH3

KiB = 1 << 10
MiB = 1 << 20
R, S = gpubo.State.RESIDENT, gpubo.State.SWAPPED

BACKENDS = ["lmdb", "slotfile"]
COMBOS = [
    pytest.param("lmdb", "lazy", id="lmdb-lazy"),
    pytest.param("lmdb", "sync", id="lmdb-sync"),
    pytest.param("slotfile", "lazy", id="slotfile-lazy"),
    pytest.param("slotfile", "sync", id="slotfile-sync"),
    pytest.param("slotfile", "direct", id="slotfile-direct"),
]
DATA_FILE = {"lmdb": "data.mdb", "slotfile": "slots.bin"}
STORE_CLASS = {"lmdb": LmdbStore, "slotfile": SlotFileStore}


def data_of(nbytes: int, seed: int) -> np.ndarray:
    """Bytes 1..255: no page of it is all zeros."""
    return np.random.default_rng(seed).integers(1, 256, nbytes, dtype=np.uint8)


def write(store: SwapStore, data: np.ndarray) -> Entry:
    return store.write(memoryview(np.ascontiguousarray(data)).cast("B"))


def read(store: SwapStore, entry: Entry, garbage: int = 0xA5) -> np.ndarray:
    """Read into a buffer pre-filled with garbage, so zero fill is checked too."""
    out = np.full(entry.nbytes, garbage, np.uint8)
    store.read_into(entry, memoryview(out), "test")
    return out


@pytest.fixture
def stores(leak_check: None) -> Iterator[Callable[..., SwapStore]]:
    """open_store(...) that closes what it opened at teardown (a leaked fd fails the test)."""
    opened: list[SwapStore] = []

    def make(path: Path | str | None, size: int = 16 * MiB, **kwargs: object) -> SwapStore:
        s = open_store(path, size, **kwargs)  # type: ignore[arg-type]
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()


# -- entries ------------------------------------------------------------------


SIZES = [1, 100, 4095, 4096, 4097, 3 * 4096 + 100, CHUNK_BYTES - 1, CHUNK_BYTES, CHUNK_BYTES + 1]
SIZES += [2 * CHUNK_BYTES + 5000]


@pytest.mark.parametrize(("backend", "durability"), COMBOS)
def test_roundtrip_sizes(
    stores: Callable[..., SwapStore], tmp_path: Path, backend: str, durability: str
) -> None:
    s = stores(tmp_path / "s", backend=backend, durability=durability)
    assert isinstance(s, STORE_CLASS[backend]) and s.durability.value == durability
    live: list[tuple[Entry, np.ndarray]] = []
    for i, n in enumerate(SIZES):
        data = data_of(n, i)
        used = s.used_bytes
        e = write(s, data)
        assert e.nbytes == n and e.stored_bytes == n and e.zeromap is None
        assert e.footprint == footprint_of(s, n) == s.footprint(n)
        assert s.used_bytes == used + e.footprint
        assert e.checksums is not None and len(e.checksums) == -(-n // CHUNK_BYTES)
        assert all(c is not None for c in e.checksums)
        live.append((e, data))
    assert s.chunk_count() == stored_units_of(s, [e for e, _ in live])
    for e, data in live:  # every entry still reads back after the later writes
        assert np.array_equal(read(s, e), data)
    for e, _ in live:
        s.release(e)
    assert s.used_bytes == 0 and s.chunk_count() == 0


@pytest.mark.parametrize("tail_zero", [False, True], ids=["tail-data", "tail-zero"])
@pytest.mark.parametrize(("backend", "durability"), COMBOS)
def test_zero_pages_inside_chunks_are_not_stored(
    stores: Callable[..., SwapStore], tmp_path: Path, backend: str, durability: str, tail_zero: bool
) -> None:
    s = stores(tmp_path / "s", backend=backend, durability=durability)
    n = 3 * CHUNK_BYTES + 2 * PAGE_BYTES + 100  # a partial last page
    data = data_of(n, 42)
    pages_per_chunk = CHUNK_BYTES // PAGE_BYTES
    zero_pages = {0, 5, 6, 7, pages_per_chunk - 1, pages_per_chunk}  # across the chunk 0/1 border
    zero_pages |= set(range(2 * pages_per_chunk, 3 * pages_per_chunk))  # all of chunk 2
    last = n // PAGE_BYTES
    if tail_zero:
        zero_pages.add(last)
    for p in zero_pages:
        data[p * PAGE_BYTES : (p + 1) * PAGE_BYTES] = 0
    zero_bytes = int(np.count_nonzero(data == 0))
    e = write(s, data)
    assert e.stored_bytes == n - zero_bytes
    flags = e.zero_pages()
    assert flags is not None and set(np.flatnonzero(flags).tolist()) == zero_pages
    assert e.checksums is not None and e.checksums[2] is None  # nothing stored for chunk 2
    assert all(e.checksums[i] is not None for i in (0, 1, 3))
    assert e.footprint < footprint_of(s, n) and s.used_bytes == e.footprint
    if backend == "slotfile":
        assert e.footprint == -(-e.stored_bytes // PAGE_BYTES) * PAGE_BYTES
        assert sum(c for _, c in e.extents) * PAGE_BYTES == e.footprint
    assert s.chunk_count() == stored_units_of(s, [e])
    assert np.array_equal(read(s, e), data)
    s.release(e)
    assert s.used_bytes == 0 and s.chunk_count() == 0


@pytest.mark.parametrize(("backend", "durability"), COMBOS)
def test_all_zero_data_writes_nothing(
    stores: Callable[..., SwapStore], tmp_path: Path, backend: str, durability: str
) -> None:
    s = stores(tmp_path / "s", backend=backend, durability=durability)
    keep = write(s, data_of(5000, 1))
    used, units = s.used_bytes, s.chunk_count()
    n = 2 * CHUNK_BYTES + 123
    for e in (write(s, np.zeros(n, np.uint8)), s.write_zeros(n)):
        assert e.nbytes == n and e.stored_bytes == 0 and e.footprint == 0
        assert s.used_bytes == used and s.chunk_count() == units, "an all-zero entry wrote data"
        assert not read(s, e).any()
        s.release(e)
        assert s.used_bytes == used and s.chunk_count() == units
    assert np.array_equal(read(s, keep), data_of(5000, 1))


@pytest.mark.parametrize(("backend", "durability"), COMBOS)
def test_refcounts_give_space_back_only_at_the_last_release(
    stores: Callable[..., SwapStore], tmp_path: Path, backend: str, durability: str
) -> None:
    s = stores(tmp_path / "s", backend=backend, durability=durability)
    a_data, b_data = data_of(CHUNK_BYTES + 7, 1), data_of(30_000, 2)
    a = write(s, a_data)
    b = write(s, b_data)
    full = s.used_bytes
    assert full == a.footprint + b.footprint
    s.retain(a)
    s.retain(a)
    for _ in range(2):
        s.release(a)
        assert s.used_bytes == full, "space given back before the last release"
        assert np.array_equal(read(s, a), a_data)
    s.release(a)
    assert s.used_bytes == b.footprint
    assert s.chunk_count() == stored_units_of(s, [b])
    assert np.array_equal(read(s, b), b_data)
    # The space is reusable: many entries, released in a random order, leave nothing.
    rng = np.random.default_rng(3)
    live = [b] + [write(s, data_of(int(rng.integers(1, 300_000)), 10 + i)) for i in range(12)]
    for i in rng.permutation(len(live)):
        s.release(live[i])
    assert s.used_bytes == 0 and s.chunk_count() == 0


@pytest.mark.parametrize(("backend", "durability"), COMBOS)
def test_store_full_changes_nothing(
    stores: Callable[..., SwapStore], tmp_path: Path, backend: str, durability: str
) -> None:
    s = stores(tmp_path / "s", size=MiB, backend=backend, durability=durability)
    n = 200 * KiB + 1
    live: list[tuple[Entry, np.ndarray]] = []
    with pytest.raises(gpubo.StoreFull) as info:
        for i in range(100):
            data = data_of(n, i)
            live.append((write(s, data), data))
    assert 2 <= len(live) < 100
    e = info.value
    assert isinstance(e, gpubo.StoreError) and e.nbytes == n
    assert e.free_bytes < footprint_of(s, n)
    used, units = s.used_bytes, s.chunk_count()
    assert used == sum(x.footprint for x, _ in live) <= s.capacity_bytes
    for _ in range(3):  # refused again and again, nothing moves
        with pytest.raises(gpubo.StoreFull):
            write(s, data_of(n, 999))
        assert s.used_bytes == used and s.chunk_count() == units
    zeros = write(s, np.zeros(n, np.uint8))  # needs no room: still fine
    s.release(zeros)
    for x, data in live:
        assert np.array_equal(read(s, x), data)
    # Room given back is room to write again.
    s.release(live[0][0])
    again = data_of(n, 1234)
    entry = write(s, again)
    assert np.array_equal(read(s, entry), again)
    for x, data in live[1:]:
        assert np.array_equal(read(s, x), data)


def _with_zero_pages(data: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Zero a few random runs of pages (and maybe the partial tail)."""
    npages = -(-data.nbytes // PAGE_BYTES)
    for _ in range(int(rng.integers(0, 4))):
        lo = int(rng.integers(0, npages))
        hi = min(npages, lo + int(rng.integers(1, 300)))
        data[lo * PAGE_BYTES : hi * PAGE_BYTES] = 0
    return data


@pytest.mark.parametrize(("backend", "durability"), COMBOS)
def test_fragmented_store_roundtrips(
    stores: Callable[..., SwapStore], tmp_path: Path, backend: str, durability: str
) -> None:
    """Entries written into a store full of holes (several extents each) read back exactly."""
    s = stores(tmp_path / "s", size=16 * MiB, backend=backend, durability=durability)
    rng = np.random.default_rng(21)
    live: list[tuple[Entry, np.ndarray]] = []
    # Fill with small entries, then free every other one: holes everywhere.
    for i in range(150):
        data = data_of(int(rng.integers(1, 40)) * PAGE_BYTES - int(rng.integers(0, 100)), 1000 + i)
        live.append((write(s, data), data))
    for e, _ in live[::2]:
        s.release(e)
    live = live[1::2]
    most_extents = 1
    for step in range(60):
        n = int(rng.choice([rng.integers(1, 3 * CHUNK_BYTES), rng.integers(1, 100_000)]))
        data = _with_zero_pages(data_of(n, 5000 + step), rng)
        while True:
            try:
                e = write(s, data)
                break
            except gpubo.StoreFull:
                victim, _ = live.pop(int(rng.integers(0, len(live))))
                s.release(victim)
        most_extents = max(most_extents, len(e.extents))
        assert np.array_equal(read(s, e), data), f"step {step}: {n} bytes in {len(e.extents)} extents"
        live.append((e, data))
        if step % 10 == 9:
            for x, d in live:
                assert np.array_equal(read(s, x), d)
            assert s.chunk_count() == stored_units_of(s, [x for x, _ in live])
            assert s.used_bytes == sum(x.footprint for x, _ in live)
    if backend == "slotfile":
        assert most_extents >= 3, "the test did not fragment the slot file"
    for e, _ in live:
        s.release(e)
    assert s.used_bytes == 0 and s.chunk_count() == 0


@pytest.mark.parametrize(("backend", "durability"), COMBOS)
def test_concurrent_writes_reads_and_releases(
    stores: Callable[..., SwapStore], tmp_path: Path, backend: str, durability: str
) -> None:
    s = stores(tmp_path / "s", size=64 * MiB, backend=backend, durability=durability)
    shared_data = data_of(CHUNK_BYTES + 3, 9)
    shared = write(s, shared_data)
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def worker(t: int) -> None:
        try:
            rng = np.random.default_rng(t)
            mine: list[tuple[Entry, np.ndarray]] = []
            start.wait()
            for i in range(40):
                op = rng.random()
                if op < 0.45 or not mine:
                    n = int(rng.integers(1, 600_000))
                    data = _with_zero_pages(data_of(n, 100 * t + i), rng)
                    mine.append((write(s, data), data))
                elif op < 0.7:
                    e, data = mine.pop(int(rng.integers(0, len(mine))))
                    assert np.array_equal(read(s, e), data)
                    s.release(e)
                elif op < 0.85:
                    s.retain(shared)
                    assert np.array_equal(read(s, shared), shared_data)
                    s.release(shared)
                else:
                    e, data = mine[int(rng.integers(0, len(mine)))]
                    assert np.array_equal(read(s, e), data)
                    if rng.random() < 0.3:
                        s.commit_name(f"t{t}", e)
            for e, data in mine:
                assert np.array_equal(read(s, e), data)
                s.release(e)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors, errors
    assert np.array_equal(read(s, shared), shared_data)
    s.release(shared)
    # Only the named records remain.
    assert s.used_bytes == s.record_bytes
    report = s.fsck()
    assert report.ok, report.problems
    for name in list(s.names()):
        s.remove_name(name)
    assert s.used_bytes == 0 and s.chunk_count() == 0


# -- named records ------------------------------------------------------------


@pytest.mark.parametrize(("backend", "durability"), COMBOS)
def test_named_records(
    stores: Callable[..., SwapStore], tmp_path: Path, backend: str, durability: str
) -> None:
    s = stores(tmp_path / "s", backend=backend, durability=durability)
    assert s.names() == [] and s.lookup("a") is None and s.record_bytes == 0
    d1, d2 = data_of(CHUNK_BYTES + 99, 1), data_of(5000, 2)
    e1 = write(s, d1)
    s.commit_name("a", e1)
    s.commit_name("a", e1)  # the same entry again: no second reference
    s.release(e1)  # the writer's reference; the record keeps the entry
    assert s.names() == ["a"] and s.used_bytes == e1.footprint
    assert s.record_footprint("a") == e1.footprint == s.record_bytes
    got = s.lookup("a")
    assert got is not None and got.key == e1.key
    assert np.array_equal(read(s, got), d1)
    s.release(got)  # lookup's reference
    assert s.used_bytes == e1.footprint

    # Replacing the record frees the old entry's space.
    e2 = write(s, d2)
    s.commit_name("a", e2)
    s.release(e2)
    assert s.used_bytes == e2.footprint and s.record_bytes == e2.footprint
    assert s.chunk_count() == stored_units_of(s, [e2])
    got = s.lookup("a")
    assert got is not None and got.key == e2.key and np.array_equal(read(s, got), d2)
    s.release(got)

    # Two names on one entry: counted once, and it lives until both are gone.
    s.commit_name("b", e2)
    assert s.names() == ["a", "b"] and s.record_bytes == e2.footprint
    assert s.remove_name("a") is True
    assert s.remove_name("a") is False
    assert s.names() == ["b"] and s.used_bytes == e2.footprint
    got = s.lookup("b")
    assert got is not None and np.array_equal(read(s, got), d2)
    s.release(got)
    assert s.remove_name("b") is True
    assert s.names() == [] and s.lookup("b") is None
    assert s.used_bytes == 0 and s.chunk_count() == 0 and s.record_bytes == 0
    report = s.fsck()
    assert report.ok, report.problems


def _populate(s: SwapStore) -> dict[str, np.ndarray]:
    """Records and anonymous entries interleaved; the newest entry is a record."""
    big = data_of(2 * CHUNK_BYTES + 3 * PAGE_BYTES + 10, 7)
    big[CHUNK_BYTES : CHUNK_BYTES + 5 * PAGE_BYTES] = 0  # zero pages survive too
    records = {"alpha": big, "beta": data_of(3000, 8), "gamma": np.zeros(70_000, np.uint8)}
    write(s, data_of(CHUNK_BYTES + 5, 100))  # anonymous, never released
    for i, (name, data) in enumerate(records.items()):
        e = write(s, data)
        s.commit_name(name, e)
        if name != "beta":
            s.release(e)  # "beta" keeps its writer's reference, like a live BO would
        if name != "gamma":
            write(s, data_of(40_000 + i, 101 + i))  # anonymous, between records
    replaced = write(s, data_of(9000, 200))
    s.commit_name("beta", replaced)  # replaces beta; the old entry is still referenced
    records["beta"] = data_of(9000, 200)
    return records


@pytest.mark.parametrize(("backend", "durability"), COMBOS)
def test_reopen_keeps_records_and_reclaims_anonymous_entries(
    stores: Callable[..., SwapStore], tmp_path: Path, backend: str, durability: str
) -> None:
    path = tmp_path / "s"
    s = stores(path, backend=backend, durability=durability)
    size, capacity = s.size_bytes, s.capacity_bytes
    records = _populate(s)
    assert s.used_bytes > s.record_bytes  # anonymous entries hold space now
    s.close()

    r = stores(path, size=32 * MiB, backend=backend, durability=durability)  # another size: ignored
    assert r.size_bytes == size and r.capacity_bytes == capacity
    assert r.names() == sorted(records)
    entries = {name: r.lookup(name) for name in records}
    for name, data in records.items():
        e = entries[name]
        assert e is not None
        assert np.array_equal(read(r, e), data), name
    live = [e for e in entries.values() if e is not None]
    assert r.used_bytes == r.record_bytes == sum(e.footprint for e in live)
    assert r.chunk_count() == stored_units_of(r, live), "stored data of anonymous entries survived"
    # New entries never land on a record's bytes (keys, slots).
    fresh = [write(r, data_of(150_000 + i * 70_000, 300 + i)) for i in range(6)]
    for name, data in records.items():
        e = entries[name]
        assert e is not None and np.array_equal(read(r, e), data), name
    for i, e in enumerate(fresh):
        assert np.array_equal(read(r, e), data_of(150_000 + i * 70_000, 300 + i))
        r.release(e)
    for e in live:
        r.release(e)  # lookup's references; fsck expects only the records' own
    assert r.used_bytes == r.record_bytes
    report = r.fsck()
    assert report.ok, report.problems
    assert report.names == sorted(records) and report.used_bytes == r.record_bytes


@pytest.mark.parametrize(
    "backend",
    [
        "lmdb",
        "slotfile",
    ],
)
def test_reopen_reclaims_the_newest_entry_when_it_is_anonymous(
    stores: Callable[..., SwapStore], tmp_path: Path, backend: str
) -> None:
    """What a process killed between writing an entry and committing its
    record leaves behind: the newest stored data belongs to no record."""
    path = tmp_path / "s"
    s = stores(path, backend=backend)
    kept = data_of(70_000, 1)
    s.commit_name("kept", write(s, kept))
    write(s, data_of(CHUNK_BYTES + 3, 2))  # anonymous, and the newest
    s.close()
    r = stores(path, backend=backend)
    assert r.names() == ["kept"]
    e = r.lookup("kept")
    assert e is not None and np.array_equal(read(r, e), kept)
    r.release(e)
    assert r.used_bytes == r.record_bytes and r.chunk_count() == stored_units_of(r, [e])
    assert r.fsck().ok


# -- opening ------------------------------------------------------------------


def _set_format(path: Path, value: bytes | None) -> bytes:
    """Replace (or read, with None) the format value in the store's meta DB."""
    size = max(os.path.getsize(path / "data.mdb"), MiB)
    env = lmdb.open(str(path), map_size=size, max_dbs=4, subdir=True)
    try:
        db = env.open_db(b"meta")
        with env.begin(write=value is not None, db=db) as txn:
            old = txn.get(b"format")
            assert old is not None, "the store has no format value"
            old = bytes(old)
            if value is not None:
                txn.put(b"format", value)
        return old
    finally:
        env.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_format_version_mismatch_is_refused(
    stores: Callable[..., SwapStore], tmp_path: Path, backend: str
) -> None:
    path = tmp_path / "s"
    s = stores(path, backend=backend)
    data = data_of(20_000, 1)
    s.commit_name("w", write(s, data))
    s.close()
    good = _set_format(path, f"gpubo-store 99 {backend}".encode())
    assert good == f"gpubo-store {FORMAT_VERSION} {backend}".encode()
    for opener in (
        lambda: open_store(path, 16 * MiB, backend=backend),
        lambda: open_store(path, 16 * MiB),
        lambda: open_existing(path),
    ):
        with pytest.raises(gpubo.StoreError) as info:
            opener()
        msg = str(info.value)
        assert "99" in msg and str(FORMAT_VERSION) in msg, msg
    # The refused opens changed nothing and left the store unlocked.
    assert _set_format(path, None) == f"gpubo-store 99 {backend}".encode()
    assert detect_backend(path) == backend
    _set_format(path, b"something else entirely")
    with pytest.raises(gpubo.StoreError):
        open_store(path, 16 * MiB, backend=backend)
    _set_format(path, good)
    r = stores(path, backend=backend)
    e = r.lookup("w")
    assert e is not None and np.array_equal(read(r, e), data)
    r.release(e)


@pytest.mark.parametrize(("backend", "other"), [("lmdb", "slotfile"), ("slotfile", "lmdb")])
def test_other_backend_is_refused_and_detected(
    stores: Callable[..., SwapStore], tmp_path: Path, backend: str, other: str
) -> None:
    path = tmp_path / "s"
    s = stores(path, backend=backend)
    data = data_of(CHUNK_BYTES + 1, 5)
    s.commit_name("w", write(s, data))
    s.close()
    assert detect_backend(path) == backend
    with pytest.raises(gpubo.StoreError) as info:
        open_store(path, 16 * MiB, backend=other)
    assert backend in str(info.value)
    assert detect_backend(path) == backend, "a refused open changed the store's backend files"
    assert sorted(os.listdir(path)) == sorted(
        ["gpubo.lock", "gpubo.state", "data.mdb", "lock.mdb"]
        + (["slots.bin"] if backend == "slotfile" else [])
    )
    r = stores(path, 64 * MiB)  # backend=None: detected
    assert isinstance(r, STORE_CLASS[backend]) and r.backend_name == backend
    e = r.lookup("w")
    assert e is not None and np.array_equal(read(r, e), data)
    r.release(e)
    assert r.fsck().ok


def test_new_store_without_backend_is_lmdb(stores: Callable[..., SwapStore], tmp_path: Path) -> None:
    s = stores(tmp_path / "fresh")
    assert isinstance(s, LmdbStore)
    assert detect_backend(tmp_path / "fresh") == "lmdb"
    assert detect_backend(tmp_path / "nothing-here") is None


@pytest.mark.parametrize(("backend", "durability"), COMBOS)
def test_store_files_are_private(
    stores: Callable[..., SwapStore], tmp_path: Path, backend: str, durability: str
) -> None:
    old = os.umask(0)  # the modes must come from gpubo, not from a kind umask
    try:
        s = stores(tmp_path / "deep" / "s", backend=backend, durability=durability)
        s.commit_name("x", write(s, data_of(10_000, 1)))
    finally:
        os.umask(old)
    d = tmp_path / "deep" / "s"
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    files = sorted(os.listdir(d))
    assert DATA_FILE[backend] in files and "gpubo.lock" in files
    for name in files:
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o600, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_open_is_refused(stores: Callable[..., SwapStore], tmp_path: Path, backend: str) -> None:
    path = tmp_path / "s"
    first = stores(path, backend=backend)
    data = data_of(50_000, 3)
    e = write(first, data)
    for kwargs in ({"backend": backend}, {}):
        with pytest.raises(gpubo.StoreError, match="already open"):
            open_store(path, 16 * MiB, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(gpubo.StoreError):
        open_existing(path, reclaim=False)
    other_process = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, gpubo\n"
            "from gpubo.store import open_store\n"
            "try:\n"
            "    open_store(sys.argv[1], 16 << 20)\n"
            "except gpubo.StoreError as e:\n"
            "    print('refused:', e)\n",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert other_process.stdout.startswith("refused:") and "already open" in other_process.stdout, (
        other_process.stdout + other_process.stderr
    )
    # The refused opens did not disturb the first one.
    assert np.array_equal(read(first, e), data)
    e2 = write(first, data)
    first.commit_name("n", e2)
    first.close()
    second = stores(path, backend=backend)
    got = second.lookup("n")
    assert got is not None and np.array_equal(read(second, got), data)
    second.release(got)


def test_direct_needs_the_slotfile_backend(stores: Callable[..., SwapStore], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"store_backend.*slotfile"):
        open_store(tmp_path / "s", 16 * MiB, backend="lmdb", durability="direct")
    assert not (tmp_path / "s").exists(), "a refused open left files behind"
    with pytest.raises(ValueError, match="durability"):
        open_store(tmp_path / "s", 16 * MiB, backend="slotfile", durability="eventually")
    with pytest.raises(ValueError, match="store_backend"):
        open_store(tmp_path / "s", 16 * MiB, backend="tape")


def test_manager_direct_needs_the_slotfile_backend(leak_check: None, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"store_backend.*slotfile"):
        gpubo.Manager(
            budget="1MiB", store=tmp_path / "s", store_size="8MiB", store_backend="lmdb", durability="direct"
        )
    with gpubo.Manager(
        budget="1MiB", store=tmp_path / "d", store_size="8MiB", store_backend="slotfile", durability="direct"
    ) as m:
        assert isinstance(m.store, SlotFileStore) and m.store.durability.value == "direct"


# -- corruption ---------------------------------------------------------------


def _flip(path: Path, needle: bytes, delta: int) -> None:
    raw = path.read_bytes()
    pos = raw.find(needle)
    assert pos >= 0, f"pattern not found in {path.name}"
    assert raw.find(needle, pos + 1) < 0, f"pattern found twice in {path.name}"
    with open(path, "r+b") as f:
        f.seek(pos + delta)
        byte = f.read(1)
        f.seek(pos + delta)
        f.write(bytes([byte[0] ^ 0x10]))


@pytest.mark.parametrize("chunk", [0, 1, 2])
@pytest.mark.parametrize(("backend", "durability"), COMBOS)
def test_flipped_byte_raises_integrity_error(
    stores: Callable[..., SwapStore], tmp_path: Path, backend: str, durability: str, chunk: int
) -> None:
    path = tmp_path / "s"
    s = stores(path, backend=backend, durability=durability)
    n = 2 * CHUNK_BYTES + 5000
    data = data_of(n, 77)
    victim = write(s, data)
    s.commit_name("victim", victim)
    s.release(victim)  # the record's reference only, as fsck expects
    bystander_data = data_of(30_000, 78)
    bystander = write(s, bystander_data)
    s.commit_name("bystander", bystander)
    s.release(bystander)
    at = chunk * CHUNK_BYTES + 2000
    _flip(path / DATA_FILE[backend], data[at : at + 64].tobytes(), 33)
    for _ in range(2):  # it stays detected; nothing was "repaired"
        with pytest.raises(gpubo.IntegrityError) as info:
            read(s, victim)
        assert info.value.offset == chunk * CHUNK_BYTES
        assert info.value.bo == "test" and str(chunk * CHUNK_BYTES) in str(info.value)
    report = s.fsck()
    assert not report.ok
    assert len(report.problems) == 1 and "victim" in report.problems[0], report.problems
    assert str(chunk * CHUNK_BYTES) in report.problems[0]
    other = s.lookup("bystander")
    assert other is not None and np.array_equal(read(s, other), bystander_data)
    s.release(other)


def test_lmdb_missing_chunk_raises_integrity_error(stores: Callable[..., SwapStore], tmp_path: Path) -> None:
    """A chunk value deleted from the closed store's data DB: a clear IntegrityError, not zeros."""
    path = tmp_path / "s"
    s = stores(path, backend="lmdb")
    data = data_of(2 * CHUNK_BYTES + 10, 4)
    e = write(s, data)
    s.commit_name("w", e)
    s.release(e)
    s.close()
    env = lmdb.open(str(path), map_size=os.path.getsize(path / "data.mdb"), max_dbs=4, subdir=True)
    try:
        db = env.open_db(b"data")
        with env.begin(write=True, db=db) as txn:
            assert txn.delete(struct.pack(">QI", e.key, 1)), "chunk 1 not found under its key"
    finally:
        env.close()
    r = stores(path, backend="lmdb")
    got = r.lookup("w")
    assert got is not None
    with pytest.raises(gpubo.IntegrityError) as info:
        read(r, got)
    assert info.value.offset == CHUNK_BYTES
    r.release(got)
    report = r.fsck()
    assert not report.ok and str(CHUNK_BYTES) in " ".join(report.problems)


def test_truncated_slot_file_is_a_clear_error(stores: Callable[..., SwapStore], tmp_path: Path) -> None:
    """A truncated slot file opens for reading: records inside what is left
    read back, the others raise IntegrityError, writes are refused."""
    path = tmp_path / "s"
    s = stores(path, size=8 * MiB, backend="slotfile")
    small_data = data_of(64 * 1024, 2)
    s.commit_name("small", write(s, small_data))  # at the start of the file
    big = write(s, data_of(6 * MiB, 1))  # reaches past the half of the file
    s.commit_name("big", big)
    s.close()
    os.truncate(path / "slots.bin", 4 * MiB)
    r = stores(path, 8 * MiB, backend="slotfile")
    assert r.names() == ["big", "small"]
    with pytest.raises(gpubo.IntegrityError, match="damaged"):
        r.lookup("big")
    small = r.lookup("small")
    assert small is not None and np.array_equal(read(r, small), small_data)
    with pytest.raises(gpubo.StoreError, match="reading only"):
        write(r, small_data)
    report = r.fsck()
    assert not report.ok and any("truncated" in p for p in report.problems)
    assert any("'big' is damaged" in p for p in report.problems)


# -- manager: swap cache and zero BOs -------------------------------------------


@pytest.fixture(params=[p.values for p in COMBOS], ids=[p.id for p in COMBOS])
def combo(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(backend, durability)"""
    return request.param  # type: ignore[no-any-return]


def test_swap_cache_copies_only_dirty_content(
    make_mgr: Callable[..., gpubo.Manager], build_kernel: Callable, tmp_path: Path, combo: tuple[str, str]
) -> None:
    backend, durability = combo
    m = make_mgr(store=tmp_path / "s", store_backend=backend, durability=durability)
    inc = build_kernel(m, INC_SRC, "inc")
    n = CHUNK_BYTES + 12_345
    data = data_of(n, 1)
    bo = m.alloc(n)
    bo.write(data)
    s0 = m.stats()
    base_used = s0.store_used_bytes
    bo.evict()
    s1 = m.stats()
    assert s1.evictions == s0.evictions + 1 and s1.bytes_evicted == s0.bytes_evicted + n
    assert s1.store_used_bytes == s0.store_used_bytes + footprint_of(m.store, n)

    def clean_reevict() -> None:
        before = m.stats()
        assert bo.state is R and bo.entry is not None, "a restored, unmodified BO keeps its store copy"
        bo.evict()
        after = m.stats()
        assert after.evictions == before.evictions + 1
        assert after.bytes_evicted == before.bytes_evicted, "a clean re-eviction copied bytes"
        assert after.store_used_bytes == before.store_used_bytes

    def dirty_reevict(expect: np.ndarray) -> None:
        before = m.stats()
        assert bo.state is R and bo.entry is None, "a modified BO still has its old store copy"
        assert before.store_used_bytes == base_used, "dirtying did not release the old entry"
        bo.evict()
        after = m.stats()
        assert after.evictions == before.evictions + 1
        assert after.bytes_evicted == before.bytes_evicted + n
        assert after.store_used_bytes == base_used + footprint_of(m.store, n)
        assert np.array_equal(bo.read(), expect)

    assert np.array_equal(bo.read(), data)  # restore
    assert m.stats().restores == s1.restores + 1
    clean_reevict()
    bo.read(count=1)
    clean_reevict()  # twice: still no copy

    bo.write(b"\x00", offset=7)  # one byte dirties it
    data[7] = 0
    dirty_reevict(data)
    clean_reevict()

    with bo.pin():  # a pin may write through the buffer: dirty
        pass
    dirty_reevict(data)

    m.launch(inc, (n,), None, bo).wait()  # a kernel writes it: dirty
    data += 1
    dirty_reevict(data)

    # A read-only argument keeps the clean copy; the written one is dirtied.
    axpy = build_kernel(m, AXPY_SRC, "axpy")
    y = m.alloc(1024 * 4)
    y.write(np.ones(1024, np.float32))
    y.evict()
    y.read(count=1)
    assert y.entry is not None
    bo.read(count=1)
    before = m.stats()
    m.launch(axpy, (1024,), None, gpubo.readonly(bo), y, np.float32(0.0), np.int32(0)).wait()
    assert y.entry is None and bo.entry is not None
    bo.evict()
    assert m.stats().bytes_evicted == before.bytes_evicted
    assert np.array_equal(bo.read(), data)
    bo.free()
    y.free()
    assert m.stats().store_used_bytes == 0 and m.store.chunk_count() == 0


def test_untouched_bo_evicts_without_data_io(
    make_mgr: Callable[..., gpubo.Manager], tmp_path: Path, combo: tuple[str, str]
) -> None:
    backend, durability = combo
    m = make_mgr(store=tmp_path / "s", store_backend=backend, durability=durability)
    n = 2 * CHUNK_BYTES + 100
    # Dirty some slots first, so that zeros cannot come from a fresh file.
    old = m.alloc(n)
    old.write(data_of(n, 3))
    old.evict()
    old.free()
    assert m.stats().store_used_bytes == 0
    s0 = m.stats()
    bo = m.alloc(n)
    bo.evict()
    s1 = m.stats()
    assert bo.state is S and bo.entry is not None and bo.entry.stored_bytes == 0
    assert s1.evictions == s0.evictions + 1 and s1.bytes_evicted == s0.bytes_evicted
    assert s1.store_used_bytes == s0.store_used_bytes == 0 and m.store.chunk_count() == 0
    out = bo.read()
    assert out.nbytes == n and not out.any()
    # Zeros written explicitly are found by the zero-page scan: nothing copied either.
    bo.write(np.zeros(n, np.uint8))
    bo.evict()
    s2 = m.stats()
    assert s2.bytes_evicted == s1.bytes_evicted and s2.store_used_bytes == 0
    assert not bo.read().any()


# -- manager: named buffers ---------------------------------------------------


def test_named_buffer_survives_close_and_reopen(
    make_mgr: Callable[..., gpubo.Manager], tmp_path: Path, combo: tuple[str, str]
) -> None:
    backend, durability = combo
    path = tmp_path / "s"
    m = make_mgr(store=path, store_backend=backend, durability=durability)
    n = CHUNK_BYTES + 4321
    data = data_of(n, 10)
    bo = m.alloc(n, name="weights")
    bo.write(data)
    bo.sync()
    assert bo.state is R, "sync must keep a BO that fits resident"
    assert m.names() == ["weights"]
    anon = m.alloc(70_000)
    anon.write(data_of(70_000, 11))
    anon.evict()
    m.close()

    m2 = make_mgr(store=path, durability=durability)  # backend detected
    assert m2.store.backend_name == backend
    assert m2.names() == ["weights"]
    s = m2.stats()
    assert s.bo_count == 0 and s.store_used_bytes == m2.store.record_bytes == footprint_of(m2.store, n)
    w = m2.open("weights")
    assert w.state is S and w.nbytes == n and w.name == "weights"
    assert m2.stats().swapped_bytes == n
    assert np.array_equal(w.read(), data)
    assert w.state is R

    # Changes are not durable until synced; a sync replaces the record.
    data[100:200] = 7
    w.write(data[100:200], offset=100)
    w.sync()
    assert w.state is R
    assert m2.stats().store_used_bytes == m2.store.record_bytes == footprint_of(m2.store, n)
    w.write(b"\x09\x09", offset=0)  # not synced: must not show up after reopen
    m2.close()

    m3 = make_mgr(store=path, store_backend=backend, durability=durability)
    w3 = m3.open("weights")
    assert np.array_equal(w3.read(), data)
    w3.sync()  # unchanged: the same record, no new copy
    assert m3.stats().store_used_bytes == footprint_of(m3.store, n)
    before = m3.stats().bytes_evicted
    w3.evict()
    assert m3.stats().bytes_evicted == before
    # Two BOs opened from one record each get its content.
    again = m3.open("weights")
    assert np.array_equal(again.read(), data) and np.array_equal(w3.read(), data)


def test_hibernate(make_mgr: Callable[..., gpubo.Manager], tmp_path: Path, combo: tuple[str, str]) -> None:
    backend, durability = combo
    path = tmp_path / "s"
    m = make_mgr(budget="4MiB", store=path, store_backend=backend, durability=durability)
    contents = {
        "a": data_of(300_000, 1),
        "pinned": data_of(200_000, 2),
        "swapped": data_of(150_000, 3),
    }
    bos = {}
    for name, data in contents.items():
        bos[name] = m.alloc(data.nbytes, name=name)
        bos[name].write(data)
    anon = m.alloc(100_000)
    anon.write(data_of(100_000, 4))
    anon_swapped = m.alloc(50_000)
    anon_swapped.write(data_of(50_000, 5))
    anon_swapped.evict()
    bos["swapped"].evict()
    with bos["pinned"].pin():
        assert m.names() == []
        swapped = m.hibernate()
        assert swapped == 2  # "a" and anon; the others were swapped already, or pinned
        assert bos["a"].state is S and anon.state is S and bos["swapped"].state is S
        assert bos["pinned"].state is R, "hibernate moved a pinned BO"
        assert m.names() == ["a", "pinned", "swapped"]
        s = m.stats()
        assert s.resident_bytes == s.pinned_bytes == contents["pinned"].nbytes
        assert s.pooled_bytes == 0
    assert np.array_equal(anon.read(), data_of(100_000, 4))
    m.close()
    m2 = make_mgr(budget="4MiB", store=path, store_backend=backend, durability=durability)
    assert m2.names() == ["a", "pinned", "swapped"]
    for name, data in contents.items():
        assert np.array_equal(m2.open(name).read(), data), name


def test_remove_and_missing_names(
    make_mgr: Callable[..., gpubo.Manager], tmp_path: Path, combo: tuple[str, str]
) -> None:
    backend, durability = combo
    path = tmp_path / "s"
    m = make_mgr(store=path, store_backend=backend, durability=durability)
    data = data_of(123_456, 1)
    bo = m.alloc(data.nbytes, name="x")
    bo.write(data)
    bo.sync()
    keep = m.alloc(1000, name="keep")
    keep.write(data_of(1000, 2))
    keep.sync()
    assert m.names() == ["keep", "x"]
    assert m.remove("x") is True
    assert m.remove("x") is False
    assert m.names() == ["keep"]
    assert bo.state is R and np.array_equal(bo.read(), data), "remove touched the live BO"
    for missing in ("x", "never-was"):
        with pytest.raises(gpubo.NameNotFound) as info:
            m.open(missing)
        assert isinstance(info.value, KeyError) and missing in str(info.value)
    with pytest.raises(KeyError):
        m.open("x")
    anon = m.alloc(4096)
    with pytest.raises(ValueError, match="name"):
        anon.sync()
    assert m.names() == ["keep"]
    bo.evict()
    assert np.array_equal(bo.read(), data)  # the BO's own store copy is still good
    m.close()
    m2 = make_mgr(store=path, store_backend=backend, durability=durability)
    assert m2.names() == ["keep"]
    assert m2.stats().store_used_bytes == footprint_of(m2.store, 1000)
    with pytest.raises(gpubo.NameNotFound):
        m2.open("x")


@pytest.mark.parametrize("name", ["", "x" * 600], ids=["empty", "600-bytes"])
def test_a_name_alloc_accepts_can_be_synced(
    make_mgr: Callable[..., gpubo.Manager], tmp_path: Path, name: str
) -> None:
    m = make_mgr(store=tmp_path / "s")
    try:
        bo = m.alloc(4096, name=name)
    except ValueError:
        return  # refused early: fine
    bo.write(b"abc")
    bo.sync()
    assert m.names() == [name]
    assert m.open(name).read(count=3).tobytes() == b"abc"


_DEAD_CHILD = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    import gpubo
    path, backend = sys.argv[1], sys.argv[2]
    m = gpubo.Manager(budget="2MiB", store=path, store_size="32MiB", store_backend=backend)
    first = m.alloc(300_000)
    first.write(np.full(300_000, 1, np.uint8))
    first.evict()
    named = m.alloc(250_000, name="named")
    named.write(np.full(250_000, 2, np.uint8))
    named.sync()
    resident = m.alloc(100_000)
    resident.write(np.full(100_000, 3, np.uint8))
    last = m.alloc(1_500_000)
    last.write(np.full(1_500_000, 4, np.uint8))
    last.evict()
    print(m.stats().store_used_bytes, flush=True)
    os._exit(0)  # dies without closing anything
    """
)


@pytest.mark.parametrize(
    "backend",
    [
        "lmdb",
        "slotfile",
    ],
)
def test_anonymous_bos_of_a_dead_process_are_reclaimed(
    make_mgr: Callable[..., gpubo.Manager], tmp_path: Path, backend: str
) -> None:
    path = tmp_path / "s"
    child = subprocess.run(
        [sys.executable, "-c", _DEAD_CHILD, str(path), backend],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == 0, child.stderr
    used_in_child = int(child.stdout.split()[-1])
    # Check first what the dead process left, without reclaiming it.
    left = open_existing(path, reclaim=False)
    try:
        assert left.names() == ["named"]
        record = left.record_bytes
        assert used_in_child > record
    finally:
        left.close()
    m = make_mgr(store=path, store_backend=backend)
    assert m.names() == ["named"]
    s = m.stats()
    assert s.bo_count == 0 and s.store_used_bytes == m.store.record_bytes == record
    record = m.store.lookup("named")
    assert record is not None
    m.store.release(record)
    assert m.store.chunk_count() == stored_units_of(m.store, [record])
    bo = m.open("named")
    assert (bo.read() == 2).all()
    bo.free()
    m.close()
    after = open_store(path, 32 * MiB)
    try:
        report = after.fsck()
        assert report.ok, report.problems
        assert report.used_bytes == after.record_bytes
    finally:
        after.close()


# -- verified views (one copy straight from the store to the device) ----------


def _stored_xxh3s(data: np.ndarray) -> list[int | None]:
    """Per chunk, the xxh3-64 of its pages that are not all zeros, in order
    (None when every page is zero): computed here, apart from the store."""
    sums: list[int | None] = []
    for start in range(0, data.nbytes, MiB):
        chunk = data[start : start + MiB]
        pages = [chunk[p : p + PAGE_BYTES] for p in range(0, chunk.nbytes, PAGE_BYTES)]
        kept = [page for page in pages if page.any()]
        sums.append(xxhash.xxh3_64_intdigest(np.concatenate(kept).tobytes()) if kept else None)
    return sums


@pytest.mark.parametrize(("backend", "durability"), COMBOS)
def test_large_entries_hashed_on_the_worker_keep_the_checksums_of_their_stored_bytes(
    stores: Callable[..., SwapStore], tmp_path: Path, backend: str, durability: str
) -> None:
    """Entries of 4 MiB and more are hashed on a second thread while they
    are copied: the checksums are still each chunk's stored bytes (zero
    pages left out, also inside a chunk), reads verify them, and a flipped
    stored byte is still caught."""
    s = stores(tmp_path / "s", 64 * MiB, backend=backend, durability=durability)
    plain = data_of(4 * MiB, 5)
    holes = data_of(6 * MiB + 12345, 6)
    holes[MiB + 3 * PAGE_BYTES : MiB + 7 * PAGE_BYTES] = 0  # zero pages inside chunk 1
    holes[3 * MiB : 4 * MiB] = 0  # a chunk of zero pages only
    first = write(s, plain)
    for data in (plain, holes):
        e = first if data is plain else write(s, data)
        assert e.hashing == XXH3
        assert list(e.checksums or ()) == _stored_xxh3s(data)
        assert np.array_equal(read(s, e), data)
    # A flipped stored byte in chunk 2 of the plain entry.
    path = tmp_path / "s" / ("slots.bin" if backend == "slotfile" else "data.mdb")
    needle = plain[2 * MiB + 100 : 2 * MiB + 164].tobytes()
    raw = path.read_bytes()
    at = raw.find(needle)
    assert at >= 0
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(bytes([raw[at] ^ 0x01]))
        f.flush()
        os.fsync(f.fileno())
    with pytest.raises(gpubo.IntegrityError) as info:
        read(s, first)
    assert info.value.offset == 2 * MiB


def _fork_a_large_write(tmp_path: Path, data: np.ndarray) -> int:
    """Fork a child that exits 0 only if a large write into a new store
    completes with the right checksums; its pid."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            child = open_store(tmp_path / "child", 32 * MiB)
            e = write(child, data)
            code = 0 if list(e.checksums or ()) == _stored_xxh3s(data) else 3
            child.close()
        finally:
            os._exit(code)
    return pid


def _wait_child(pid: int, what: str) -> int:
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(what)
        time.sleep(0.05)


def test_a_fork_while_another_thread_hands_work_to_the_hasher_does_not_hang_the_child(
    tmp_path: Path,
) -> None:
    """A parent thread inside the hand-off (holding its lock) at the moment
    of the fork: the child's lock is a fresh one, not that held copy."""
    from gpubo.store import hashing

    data = data_of(4 * MiB, 8)
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with hashing._lock:
            held.set()
            release.wait(30)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(30)
    try:
        pid = _fork_a_large_write(tmp_path, data)
    finally:
        release.set()
        t.join(30)
    assert _wait_child(pid, "the forked child's large write hung on the parent's lock") == 0


def test_a_large_eviction_after_the_main_thread_returned_still_hashes() -> None:
    """At interpreter shutdown ``concurrent.futures`` refuses new work before
    it joins the remaining threads: a thread still evicting then hashes inline
    (it used to get a RuntimeError)."""
    script = textwrap.dedent(
        """
        import threading, time
        import numpy as np
        import gpubo
        m = gpubo.Manager(budget="12MiB", store_size="128MiB", checksums="host")
        a = m.alloc(8 << 20)
        a.write(np.arange(2 << 20, dtype=np.uint32))
        def late():
            time.sleep(0.5)  # the main thread has returned by now
            b = m.alloc(8 << 20)  # evicts a: 8 MiB, hashed
            assert a.state is gpubo.State.SWAPPED
            b.free()
            assert (a.read(np.uint32) == np.arange(2 << 20, dtype=np.uint32)).all()
            m.close()
            print("late thread: ok")
        threading.Thread(target=late).start()
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0 and "late thread: ok" in done.stdout, done.stderr[-3000:]


def test_a_forked_child_hashes_large_entries_on_its_own_worker(tmp_path: Path) -> None:
    """The parent's hashing thread does not exist in a forked child: the
    child's first large write must start its own (not wait forever)."""
    data = data_of(4 * MiB, 7)
    parent = open_store(tmp_path / "parent", 32 * MiB)
    try:
        write(parent, data)  # the worker thread now runs in this process
    finally:
        parent.close()
    pid = _fork_a_large_write(tmp_path, data)
    assert _wait_child(pid, "the forked child's large write hung") == 0


@pytest.mark.parametrize(("backend", "durability"), COMBOS)
def test_lent_chunks_lend_each_chunk_of_an_entry_without_zero_pages(
    stores: Callable[..., SwapStore], tmp_path: Path, backend: str, durability: str
) -> None:
    """lent_chunks: per chunk, read-only segments that together are the
    chunk's bytes; None for entries with zero pages, over ``max_chunks``,
    or under ``direct``; check_lent accepts each good chunk."""
    s = stores(tmp_path / "s", 32 * MiB, backend=backend, durability=durability)
    big = data_of(3 * MiB + 100, 8)
    small = data_of(5000, 9)
    holed = data_of(2 * MiB, 10)
    holed[PAGE_BYTES : 2 * PAGE_BYTES] = 0
    entries = [write(s, d) for d in (big, small, holed)]
    labels = ["big", "small", "holed"]
    with s.lent_chunks(entries, labels) as lent:
        if durability == "direct":
            assert lent == [None, None, None]
            return
        assert lent[2] is None
        for data, entry, label, chunks in zip((big, small), entries, labels, lent, strict=False):
            assert chunks is not None and len(chunks) == -(-data.nbytes // MiB)
            for index, segments in enumerate(chunks):
                assert all(seg.readonly for seg in segments)
                got = np.concatenate([np.frombuffer(seg, np.uint8) for seg in segments])
                assert np.array_equal(got, data[index * MiB : (index + 1) * MiB])
                s.check_lent(entry, index, segments, label)
    with s.lent_chunks(entries, labels, max_chunks=1) as lent:
        assert lent[0] is None and lent[1] is not None


@pytest.mark.parametrize(("backend", "durability"), COMBOS)
def test_verified_view_lends_one_chunk_entries(
    stores: Callable[..., SwapStore], tmp_path: Path, backend: str, durability: str
) -> None:
    s = stores(tmp_path / "s", backend=backend, durability=durability)
    small = data_of(10_000, 1)
    one_chunk = data_of(MiB, 2)
    zero_page = data_of(3 * PAGE_BYTES, 3)
    zero_page[PAGE_BYTES : 2 * PAGE_BYTES] = 0
    for data, lent in ((small, True), (one_chunk, True), (data_of(MiB + 1, 4), False), (zero_page, False)):
        e = write(s, data)
        with s.verified_view(e, "test") as view:
            if not lent or durability == "direct":  # direct reads bypass the page cache
                assert view is None
            else:
                assert view is not None and view.readonly
                assert np.array_equal(np.frombuffer(view, np.uint8), data)
        assert np.array_equal(read(s, e), data)  # read_into agrees either way
        s.release(e)
    assert s.chunk_count() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_verified_view_refuses_a_flipped_byte(
    stores: Callable[..., SwapStore], tmp_path: Path, backend: str
) -> None:
    path = tmp_path / "s"
    s = stores(path, backend=backend)
    data = data_of(50_000, 9)
    e = write(s, data)
    _flip(path / DATA_FILE[backend], data[40_000:40_064].tobytes(), 5)
    with pytest.raises(gpubo.IntegrityError) as info, s.verified_view(e, "victim"):
        pytest.fail("a corrupted entry was lent")
    assert info.value.offset == 0 and info.value.bo == "victim"
    with pytest.raises(gpubo.IntegrityError):
        read(s, e)
    s.release(e)


@pytest.mark.parametrize("backend", BACKENDS)
def test_restore_from_a_corrupted_small_entry_changes_nothing(
    make_mgr: Callable[..., gpubo.Manager], tmp_path: Path, backend: str
) -> None:
    """A one-chunk BO restores by one copy straight from the store: a flipped
    byte is caught before the copy, and the BO stays swapped with its entry."""
    m = make_mgr(store=tmp_path / "s", store_size="8MiB", store_backend=backend)
    data = data_of(20_000, 11)
    bo = m.alloc(data.nbytes, name="small")
    bo.write(data)
    good = m.alloc(data.nbytes, name="good")
    good.write(data[::-1].copy())
    bo.evict()
    good.evict()
    _flip(tmp_path / "s" / DATA_FILE[backend], data[12_000:12_064].tobytes(), 1)
    before = m.stats()
    with pytest.raises(gpubo.IntegrityError) as info:
        bo.restore()
    assert info.value.offset == 0 and "small" in info.value.bo
    after = m.stats()
    assert bo.state is S and after.restores == before.restores
    assert after.swapped_bytes == before.swapped_bytes and after.resident_bytes == before.resident_bytes
    assert np.array_equal(good.read(), data[::-1])  # restored through the same path
    bo.free()
    good.free()
    assert m.stats().store_used_bytes == 0
