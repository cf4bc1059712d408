"""Durability checked where it happens: in the host's page cache.

Linux's ``cachestat(2)`` (6.5+) reports, for a file range, how many pages
are cached, dirty and under writeback. After a ``sync`` eviction or a
``bo.sync()`` returns, no page of the store's data file is dirty or under
writeback; a ``direct`` eviction leaves the entry's range out of the page
cache; a ``lazy`` one leaves dirty pages (the control that shows the
check can see them). Filesystems are real too: a ramfs (which refuses
``O_DIRECT``) and a 4 MiB tmpfs (too small for the store) are mounted for
the tests that need them.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import cachestat

import gpubo

MiB = 1 << 20
PAGE = 4096


def _data(nbytes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 256, nbytes, dtype=np.uint8)


def _manager(path: Path, backend: str, durability: str) -> gpubo.Manager:
    return gpubo.Manager(
        budget="8MiB", store=path, store_size="64MiB", store_backend=backend, durability=durability
    )


DATA_FILE = {"lmdb": "data.mdb", "slotfile": "slots.bin"}


@pytest.mark.parametrize("backend", ["lmdb", "slotfile"])
def test_a_sync_eviction_leaves_no_dirty_page(tmp_path: Path, backend: str) -> None:
    with _manager(tmp_path / "s", backend, "sync") as m:
        bo = m.alloc(4 * MiB)
        for seed in range(3):  # several evictions: each returns with everything on disk
            bo.write(_data(4 * MiB, seed))
            bo.evict()
            st = cachestat(tmp_path / "s" / DATA_FILE[backend])
            assert st.dirty == 0 and st.writeback == 0, st
            assert np.array_equal(bo.read(), _data(4 * MiB, seed))


@pytest.mark.parametrize("backend", ["lmdb", "slotfile"])
def test_a_lazy_eviction_leaves_dirty_pages(tmp_path: Path, backend: str) -> None:
    """The control: the check above can see dirty pages when there are some."""
    with _manager(tmp_path / "s", backend, "lazy") as m:
        bo = m.alloc(4 * MiB)
        bo.write(_data(4 * MiB, 1))
        bo.evict()
        assert cachestat(tmp_path / "s" / DATA_FILE[backend]).dirty > 0


@pytest.mark.parametrize("backend", ["lmdb", "slotfile"])
def test_bo_sync_in_a_lazy_store_flushes_its_record(tmp_path: Path, backend: str) -> None:
    with _manager(tmp_path / "s", backend, "lazy") as m:
        bo = m.alloc(2 * MiB, name="w")
        bo.write(_data(2 * MiB, 2))
        bo.sync()
        st = cachestat(tmp_path / "s" / DATA_FILE[backend])
        assert st.dirty == 0 and st.writeback == 0, st
        assert cachestat(tmp_path / "s" / "data.mdb").dirty == 0  # the record itself


def test_a_direct_eviction_stays_out_of_the_page_cache(tmp_path: Path) -> None:
    with _manager(tmp_path / "s", "slotfile", "direct") as m:
        bo = m.alloc(4 * MiB)
        bo.write(_data(4 * MiB, 3))
        bo.evict()
        entry = bo.entry
        assert entry is not None and entry.extents
        for slot, count in entry.extents:
            st = cachestat(tmp_path / "s" / "slots.bin", slot * PAGE, count * PAGE)
            assert st.cached == 0, (slot, count, st)
        assert np.array_equal(bo.read(), _data(4 * MiB, 3))  # and a direct restore reads it back


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[callable]:  # type: ignore[valid-type]
    """mount(fstype, options) -> a fresh mount point of that filesystem,
    unmounted at teardown (skipped where this process may not mount)."""
    points: list[Path] = []

    def make(fstype: str, options: str = "") -> Path:
        point = tmp_path / f"mnt{len(points)}"
        point.mkdir()
        cmd = ["mount", "-t", fstype] + (["-o", options] if options else []) + [fstype, str(point)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a {fstype} here: {result.stderr.strip()}")
        points.append(point)
        return point

    yield make
    for point in reversed(points):
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_a_filesystem_that_refuses_o_direct_is_a_clear_error(mount) -> None:  # type: ignore[no-untyped-def]
    fs = mount("ramfs")
    with pytest.raises(OSError):  # the premise: this filesystem refuses it
        os.close(os.open(fs / "probe", os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600))
    with pytest.raises(gpubo.StoreError, match="refuses O_DIRECT"):
        _manager(fs / "s", "slotfile", "direct")
    with _manager(fs / "s", "slotfile", "sync") as m:  # the same store works without it
        bo = m.alloc(MiB)
        bo.write(_data(MiB, 4))
        bo.evict()
        assert np.array_equal(bo.read(), _data(MiB, 4))


@pytest.mark.parametrize("backend", ["lmdb", "slotfile"])
def test_a_filesystem_too_small_for_the_store_is_a_clear_error_at_open(mount, backend: str) -> None:  # type: ignore[no-untyped-def]
    fs = mount("tmpfs", "size=4m")
    with pytest.raises(gpubo.StoreError, match=r"preallocate|cannot create"):
        _manager(fs / "s", backend, "lazy")
    left = sorted(p.name for p in (fs / "s").iterdir())
    assert left == ["gpubo.lock"], f"a failed open left {left} behind"
    with gpubo.Manager(budget="1MiB", store=fs / "small", store_size="2MiB", store_backend=backend) as m:
        bo = m.alloc(64 * 1024)  # a store that fits works
        bo.write(_data(64 * 1024, 5))
        bo.evict()
        assert np.array_equal(bo.read(), _data(64 * 1024, 5))


def test_the_store_cache_shrinker_writes_back_and_drops_the_slot_files_pages(tmp_path: Path) -> None:
    """The page-cache shrinker of the slot-file store (msync, madvise and
    fadvise): after a scan, the evicted bytes are on disk and out of the
    host's page cache, and they still read back."""
    from gpubo.shrinker import StoreCacheShrinker

    with _manager(tmp_path / "s", "slotfile", "lazy") as m:
        bos = [m.alloc(2 * MiB) for _ in range(4)]
        for i, bo in enumerate(bos):
            bo.write(_data(2 * MiB, 10 + i))
            bo.evict()
        slots = tmp_path / "s" / "slots.bin"
        before = cachestat(slots)
        assert before.dirty > 0 and before.cached >= 4 * (2 * MiB // PAGE)
        shrinker = next(s for s in m.shrinkers if isinstance(s, StoreCacheShrinker))
        assert shrinker.count() == 4 * 2 * MiB
        assert shrinker.scan(8 * MiB) == 4 * 2 * MiB
        after = cachestat(slots)
        assert after.dirty == 0 and after.writeback == 0, after
        assert after.cached == 0, after
        assert shrinker.count() == 0
        for i, bo in enumerate(bos):
            assert np.array_equal(bo.read(), _data(2 * MiB, 10 + i))


def test_the_lmdb_store_cache_shrinker_writes_back_but_keeps_its_map(tmp_path: Path) -> None:
    """LMDB keeps its whole map mapped: the scan writes the pages back (the
    host may then reclaim them) and reports nothing dropped."""
    from gpubo.shrinker import StoreCacheShrinker

    with _manager(tmp_path / "s", "lmdb", "lazy") as m:
        bo = m.alloc(2 * MiB)
        bo.write(_data(2 * MiB, 20))
        bo.evict()
        assert cachestat(tmp_path / "s" / "data.mdb").dirty > 0
        shrinker = next(s for s in m.shrinkers if isinstance(s, StoreCacheShrinker))
        assert shrinker.scan(8 * MiB) == 0
        st = cachestat(tmp_path / "s" / "data.mdb")
        assert st.dirty == 0 and st.writeback == 0, st
        assert np.array_equal(bo.read(), _data(2 * MiB, 20))
