"""Kill tests: a child process syncs versions of named BOs in a loop and is
killed with SIGKILL at random moments; the parent reopens the store and
checks that every named BO holds its last confirmed version or the one after
it (a sync in flight may have committed), never an older one and never a mix,
and that the recovered store has no leak (fsck is clean).

The child (tests/crash_child.py) is restarted on the same store after every
kill, so every run also recovers what the previous kill left. Durability
modes rotate from run to run. The random seed is in every failure message.
"""

from __future__ import annotations

import os
import random
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from crash_child import SIZES

import gpubo
from gpubo.store import PAGE_BYTES, LmdbStore, detect_backend, open_existing, open_store
from gpubo.store.base import plan_chunks

CHILD = Path(__file__).with_name("crash_child.py")
KILLS = 20
MiB = 1 << 20
NAMES = [f"bo{i}" for i in range(len(SIZES))]
DURABILITIES = {"lmdb": ["lazy", "sync"], "slotfile": ["lazy", "sync", "direct"]}
#: How long after "ready" the child may run before it is killed.
MAX_RUN_S = 0.35
#: Share of kills that land anywhere from start-up (imports, opening and
#: recovering the store) on, instead of after "ready".
EARLY_KILLS = 0.2


class Run:
    """One child process on the store, killed at a random moment."""

    def __init__(self, path: Path, backend: str, durability: str, first: int, log: Path) -> None:
        self.err = open(log, "wb")  # noqa: SIM115 - closed in finish()
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD), str(path), backend, durability, str(first)],
            stdout=subprocess.PIPE,
            stderr=self.err,
            bufsize=0,
        )
        self.started = time.monotonic()
        self.out = b""
        self.log = log

    def _read_until(self, deadline: float, want: bytes | None = None) -> None:
        """Collect stdout until ``deadline``, EOF, or ``want`` appears."""
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while want is None or want not in self.out:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                if not sel.select(left):
                    return
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    return
                self.out += chunk

    def kill_at_random(self, rng: random.Random, early_ok: bool) -> None:
        if early_ok and rng.random() < EARLY_KILLS:
            self._read_until(self.started + rng.uniform(0.0, 0.8))
        else:
            self._read_until(time.monotonic() + 30, want=b"ready\n")
            assert b"ready\n" in self.out, self._why("the child never got ready")
            self._read_until(time.monotonic() + rng.uniform(0.0, MAX_RUN_S))
        assert self.proc.poll() is None, self._why("the child exited before it was killed")
        self.proc.send_signal(signal.SIGKILL)

    def finish(self) -> int | None:
        """Reap the child; the last version it confirmed, if any."""
        self._read_until(time.monotonic() + 30)  # what it printed before it died
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        rc = self.proc.wait(30)
        self.err.close()
        assert rc == -signal.SIGKILL, self._why(f"the child ended with {rc}, not by SIGKILL")
        versions = [
            int(line.split()[1]) for line in self.out.decode().splitlines() if line.startswith("synced ")
        ]
        assert versions == sorted(versions)
        return versions[-1] if versions else None

    def abort(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.err.close()

    def _why(self, what: str) -> str:
        err = self.log.read_bytes()[-3000:].decode(errors="replace")
        return f"{what}; stdout {self.out[-200:]!r}; stderr {err}"


def _version(words: np.ndarray, index: int, where: str) -> int:
    """The one version every word of BO ``index`` holds (fails on a mix)."""
    values = np.unique(words)
    assert len(values) == 1, f"{where}: torn content, versions {sorted({int(v) >> 8 for v in values})}"
    word = int(values[0])
    assert word & 0xFF == index, f"{where}: holds another BO's content ({word:#x})"
    return word >> 8


def _check_versions(versions: dict[str, int], last: int | None, where: str) -> None:
    allowed = {1} if last is None else {last, last + 1}
    if last is not None:
        assert sorted(versions) == NAMES, f"{where}: names {sorted(versions)} after a confirmed sync"
    for name, v in versions.items():
        assert v in allowed, f"{where}: {name} holds version {v}; last confirmed {last}"
    # Syncs run bo0, bo1, bo2 in order and each is durable when it returns:
    # a later BO never holds a newer version than an earlier one.
    ordered = [versions[n] for n in NAMES if n in versions]
    assert ordered == sorted(ordered, reverse=True), f"{where}: versions out of sync order: {versions}"
    assert list(versions) == NAMES[: len(versions)], f"{where}: names {sorted(versions)}"


def _check_left_behind(path: Path, last: int | None, where: str) -> None:
    """What the kill left, read without reclaiming anything: records intact."""
    store = open_existing(path, reclaim=False)
    try:
        report = store.fsck()
        # Anonymous data of the dead process may still be there (reclaimed on
        # the next open); nothing else may be wrong.
        bad = [p for p in report.problems if not p.startswith("leak:")]
        assert not bad, f"{where}: {bad}"
        if not isinstance(store, LmdbStore):
            assert report.ok, f"{where}: {report.problems}"
        versions = {}
        for i, name in enumerate(NAMES):
            entry = store.lookup(name)
            if entry is None:
                continue
            try:
                assert entry.nbytes == SIZES[i]
                words = np.empty(entry.nbytes // 4, np.uint32)
                store.read_into(entry, memoryview(words).cast("B"), name)
            finally:
                store.release(entry)
            versions[name] = _version(words, i, f"{where} (store) {name}")
        _check_versions(versions, last, f"{where} (store)")
    finally:
        store.close()


def _check_recovered(path: Path, backend: str, last: int | None, where: str) -> None:
    """Reopen with a Manager (which recovers the store) and check every named BO."""
    with gpubo.Manager(budget=4 * MiB, store=path, store_size=32 * MiB, store_backend=backend) as m:
        versions = {}
        for i, name in enumerate(m.names()):
            assert name == NAMES[i], f"{where}: names {m.names()}"
            bo = m.open(name)
            assert bo.state is gpubo.State.SWAPPED and bo.nbytes == SIZES[i]
            versions[name] = _version(bo.read(np.uint32), i, f"{where} {name}")
        _check_versions(versions, last, where)
        s = m.stats()
        assert s.bo_count == len(versions)
        # The opened BOs share their records' entries; nothing else survived the reopen.
        assert s.store_used_bytes == m.store.record_bytes, f"{where}: anonymous entries survived"
    store = open_store(path, 32 * MiB)  # backend detected
    try:
        assert store.backend_name == backend
        report = store.fsck()
        assert report.ok, f"{where}: fsck after recovery: {report.problems}"
        assert report.names == NAMES[: len(report.names)]
        assert store.used_bytes == store.record_bytes == report.used_bytes, f"{where}: leaked space"
        records = []
        for name in report.names:
            entry = store.lookup(name)
            assert entry is not None
            store.release(entry)
            records.append(entry)
        if isinstance(store, LmdbStore):
            chunks = sum(1 for e in records for p in plan_chunks(e.nbytes, e.zero_pages()) if p.stored_bytes)
        else:
            chunks = sum(e.footprint // PAGE_BYTES for e in records)
        assert store.chunk_count() == chunks, f"{where}: stored data nobody owns"
    finally:
        store.close()


@pytest.mark.timeout(150)
@pytest.mark.parametrize(
    "backend",
    [
        "lmdb",
        "slotfile",
    ],
)
def test_sigkill_during_sync_never_tears_a_named_bo(tmp_path: Path, leak_check: None, backend: str) -> None:
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    path = tmp_path / "store"
    last: int | None = None
    confirmed_runs = 0
    for k in range(KILLS):
        durability = DURABILITIES[backend][k % len(DURABILITIES[backend])]
        where = f"seed {seed}, kill {k} ({durability})"
        run = Run(path, backend, durability, (last or 0) + 1, tmp_path / f"child{k}.err")
        try:
            # The first run creates the store: wait for it (a kill in the
            # middle of that is test_slot_file_killed_while_being_created_reopens).
            run.kill_at_random(rng, early_ok=k > 0)
            got = run.finish()
        except BaseException:
            run.abort()
            raise
        if got is not None:
            assert last is None or got > last
            last = got
            confirmed_runs += 1
        assert detect_backend(path) == backend
        _check_left_behind(path, last, where)
        _check_recovered(path, backend, last, where)
    assert last is not None and confirmed_runs >= KILLS // 3, (
        f"seed {seed}: only {confirmed_runs} of {KILLS} runs confirmed a sync; the kills came too early"
    )


# -- a kill while the store is being created ----------------------------------


def test_slot_file_killed_while_being_created_reopens(leak_check: None, tmp_path: Path) -> None:
    """slots.bin is preallocated under a temporary name and renamed: a kill in
    between leaves only the temporary file, and the store is simply created."""
    path = tmp_path / "s"
    path.mkdir()
    (path / "slots.bin.tmp").write_bytes(b"")  # what such a kill leaves
    store = open_store(path, 8 * MiB, backend="slotfile")
    try:
        assert store.capacity_bytes == 8 * MiB
        assert os.path.getsize(path / "slots.bin") == 8 * MiB
        data = np.arange(100_000, dtype=np.uint32)
        entry = store.write(memoryview(data).cast("B"))
        out = np.empty_like(data)
        store.read_into(entry, memoryview(out).cast("B"), "t")
        assert np.array_equal(out, data)
    finally:
        store.close()


def test_truncated_slot_file_is_a_clear_error(leak_check: None, tmp_path: Path) -> None:
    path = tmp_path / "s"
    open_store(path, 8 * MiB, backend="slotfile").close()
    os.truncate(path / "slots.bin", 0)
    with pytest.raises(gpubo.StoreError, match="slot file"):
        open_store(path, 8 * MiB, backend="slotfile")
