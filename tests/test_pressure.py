"""The memory-pressure suite: stress shapes, the RFC's scenario, faults at real boundaries.

Run it alone with ``pytest -m pressure``. It finishes in about a minute;
``GPUBO_HEAVY=1 pytest -m pressure`` makes the stress shapes 8 times bigger
and longer (64 MiB budgets, 4 to 16 MiB BOs, 8 s runs) for a soak of a few
minutes.

The fast part is the same list of checks that ``gpubo selftest`` runs
(:data:`gpubo.stress.SELFTEST_CHECKS`). Nothing is mocked: faults are a
store too small, a budget too small, a process killed with SIGKILL, a
real address-space limit, a child process holding host memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import AXPY_SRC, cachestat, check_budget, pattern

import gpubo
from gpubo import cli
from gpubo.stress import SELFTEST_CHECKS, HostPressure, StressConfig, StressReport, run_selftest, run_stress

pytestmark = pytest.mark.pressure

KiB = 1 << 10
MiB = 1 << 20

HEAVY = os.environ.get("GPUBO_HEAVY", "0") not in ("", "0")
SCALE = 8 if HEAVY else 1
TIMEOUT = 900 if HEAVY else 120


def assert_clean(r: StressReport) -> None:
    """Every check of a stress run passed, the run really swapped, and nothing leaked."""
    assert r.error is None, r.error
    assert r.mismatch_count == 0, r.mismatches
    assert r.leaks == []
    assert r.budget_violations == 0
    assert r.swept and r.swept_bytes == r.allocated_bytes
    assert r.ok
    assert r.stats["evictions"] > 0 and r.stats["restores"] > 0
    for s in r.timeline:
        assert s.resident_bytes + s.pooled_bytes <= s.budget_bytes, s


def children_of(pid: int) -> set[int]:
    """Live (not zombie) child processes of ``pid``, but multiprocessing's resource tracker.

    (``spawn`` starts one tracker per parent process, for its lifetime.)
    """
    out: set[int] = set()
    with contextlib.suppress(FileNotFoundError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.update(int(c) for c in f.read().split())
    return {c for c in out if alive(c) and b"resource_tracker" not in _cmdline(c)}


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def wait_gone(pids: set[int], timeout_s: float) -> set[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = {p for p in pids if alive(p)}
        if not pids:
            break
        time.sleep(0.05)
    return pids


@contextlib.contextmanager
def _no_new_children() -> Iterator[None]:
    before = children_of(os.getpid())
    yield
    left = wait_gone(children_of(os.getpid()) - before, 10)
    assert left == set(), f"child processes left behind: {left}"


# -- the fast part: the checks of `gpubo selftest` ----------------------------------------


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize("name", list(SELFTEST_CHECKS))
def test_selftest_check(name: str, leak_check: None) -> None:
    """basic, verify, random, heavy, multi, parallel, processes, store-full, budget-smaller-than-bo."""
    [result] = run_selftest([name], scale=SCALE)
    assert result.ok, f"{name}: {result.detail}"


# -- stress shapes, looked at closely ----------------------------------------------------------


def _config(**kw: object) -> StressConfig:
    base: dict[str, object] = {
        "budget_bytes": 8 * MiB * SCALE,
        "total_bytes": 12 * MiB * SCALE,
        "min_nbytes": MiB,
        "max_nbytes": MiB,
        "seconds": 120.0 * SCALE,  # a ceiling only: runs end after their loops
        "loops": 200 * SCALE,  # per worker: fixed, so the work does not depend on the device's speed
        "seed": 5,
        "store_size_bytes": 64 * MiB * SCALE,
    }
    base.update(kw)
    return StressConfig(**base)  # type: ignore[arg-type]


@pytest.mark.timeout(TIMEOUT)
def test_random_multi_parallel_run_keeps_every_promise(leak_check: None) -> None:
    """Threads, random sizes and multi-BO launches at once; every sample within the budget."""
    config = _config(
        min_nbytes=4 * KiB,
        max_nbytes=2 * MiB,
        threads=3,
        multi=True,
        kernel_every=2,
        budget_bytes=12 * MiB * SCALE,
        total_bytes=18 * MiB * SCALE,
    )
    r = run_stress(config)
    assert_clean(r)
    assert r.multi_launches > 0 and r.kernels > r.multi_launches // 2
    assert r.allocated_bytes >= 18 * MiB * SCALE  # 1.5x the budget, at least
    assert r.verified_bytes > 0 and r.restoring_uses > 0
    assert r.restore_latency_p50_ms <= r.restore_latency_p99_ms
    assert len(r.timeline) >= 3
    assert [s.phase for s in r.timeline][-1] == "done"
    elapsed = [s.elapsed_s for s in r.timeline]
    assert elapsed == sorted(elapsed)


@pytest.mark.timeout(TIMEOUT)
def test_one_thread_runs_replay_exactly(leak_check: None) -> None:
    config = _config(min_nbytes=4 * KiB, max_nbytes=MiB, loops=100 * SCALE, seed=42)
    a, b = run_stress(config), run_stress(config)
    assert_clean(a)
    keys = ("bo_count", "allocated_bytes", "operations", "uses", "kernels", "written_bytes", "verified_bytes")
    assert [getattr(a, k) for k in keys] == [getattr(b, k) for k in keys]
    assert (a.run_evictions, a.run_restores, a.stats) == (b.run_evictions, b.run_restores, b.stats)


@pytest.mark.timeout(TIMEOUT)
def test_processes_each_get_their_share_and_store(tmp_path: Path, leak_check: None) -> None:
    config = _config(
        processes=2,
        threads=2,
        budget_bytes=16 * MiB * SCALE,
        total_bytes=24 * MiB * SCALE,
        store=str(tmp_path / "stores"),
    )
    with _no_new_children():
        r = run_stress(config)
    assert_clean(r)
    assert r.stats["budget"] == 16 * MiB * SCALE  # two managers of half the budget each
    assert r.bo_count == 24 * SCALE
    assert sorted(p.name for p in (tmp_path / "stores").iterdir()) == ["proc0", "proc1"]


# -- the RFC's scenario -----------------------------------------------------------------------


@pytest.mark.timeout(TIMEOUT)
def test_rfc_back_up_until_the_store_is_full_then_recover_every_one(
    make_mgr: Callable[..., gpubo.Manager],
) -> None:
    """Mixed-size BOs until the store refuses one (a clean StoreFull), then all back up and recovered."""
    m = make_mgr(budget=2 * MiB, store_size=16 * MiB)
    rng = np.random.default_rng(7)
    bos: list[tuple[gpubo.BufferObject, np.ndarray]] = []
    for _ in range(10_000):
        n = int(rng.integers(1, 256)) * 4 * KiB + int(rng.integers(0, 1024)) * 4
        try:
            bo = m.alloc(n)
        except gpubo.StoreFull as e:
            assert e.nbytes == n
            break
        data = pattern(n, len(bos))
        bo.write(data)
        bos.append((bo, data))
        check_budget(m)
    else:
        pytest.fail("the store never filled up")
    total = sum(bo.nbytes for bo, _ in bos)
    assert total > 4 * m.budget
    before = m.stats()
    with pytest.raises(gpubo.StoreFull):
        m.alloc(n)
    assert m.stats() == before, "a refused alloc changed something"
    # Back every one up...
    m.evict(m.budget)
    s = m.stats()
    assert (s.resident_bytes, s.pooled_bytes, s.swapped_bytes) == (0, 0, total)
    assert all(bo.state is gpubo.State.SWAPPED for bo, _ in bos)
    # ...and recover every one, in random order, byte-exact.
    for i in rng.permutation(len(bos)):
        bo, data = bos[i]
        assert np.array_equal(bo.read(), data), f"{bo!r} came back wrong"
        check_budget(m)
    for bo, _ in bos:
        bo.free()
    s = m.stats()
    assert (s.bo_count, s.swapped_bytes, s.store_used_bytes) == (0, 0, 0)


@pytest.mark.timeout(TIMEOUT)
def test_rfc_a_budget_full_of_pinned_bos_is_a_clean_out_of_memory(
    make_mgr: Callable[..., gpubo.Manager],
) -> None:
    m = make_mgr(budget=4 * MiB, store_size=64 * MiB)
    bos = []
    for i in range(8):
        bo = m.alloc(MiB)
        bo.write(pattern(MiB, i))
        bos.append(bo)
    with contextlib.ExitStack() as pins:
        for bo in bos[:4]:
            pins.enter_context(bo.pin())
        before = m.stats()
        with pytest.raises(gpubo.OutOfDeviceMemory):
            bos[6].read()
        with pytest.raises(gpubo.OutOfDeviceMemory):
            m.alloc(MiB)
        assert m.stats() == before
        assert bos[6].state is gpubo.State.SWAPPED
    for i, bo in enumerate(bos):
        assert np.array_equal(bo.read(), pattern(MiB, i))


# -- faults at real boundaries ----------------------------------------------------------------


@pytest.mark.timeout(TIMEOUT)
def test_a_tiny_store_ends_the_run_with_store_full_and_no_leak(leak_check: None) -> None:
    r = run_stress(_config(budget_bytes=4 * MiB, total_bytes=16 * MiB, store_size_bytes=8 * MiB, loops=10))
    assert r.error is not None and r.error.startswith("StoreFull"), r.error
    assert not r.ok and not r.check_failed
    assert r.leaks == []  # the BOs it did allocate were all given back


@pytest.mark.timeout(TIMEOUT)
def test_a_budget_smaller_than_one_bo(make_mgr: Callable[..., gpubo.Manager], build_kernel: Callable) -> None:
    with pytest.raises(ValueError, match="budget"):
        _config(budget_bytes=MiB, min_nbytes=2 * MiB, max_nbytes=2 * MiB).check()
    m = make_mgr(budget=2 * MiB, store_size=64 * MiB)
    x, y = m.alloc(2 * MiB), m.alloc(MiB)
    x.write(np.ones(MiB // 2, np.float32))
    axpy = build_kernel(m, AXPY_SRC, "axpy")
    before = m.stats()
    # Two arguments that cannot be resident together: refused before anything moves.
    with pytest.raises(gpubo.OutOfDeviceMemory):
        m.launch(axpy, (MiB // 4,), None, x, y, np.float32(2), np.int32(MiB // 4))
    assert m.stats() == before
    with pytest.raises(gpubo.OutOfDeviceMemory):
        m.alloc(2 * MiB + 4)
    assert m.stats() == before
    assert (x.read(np.float32) == 1).all()


def _spawn_stress(*args: str, tmpdir: Path | None = None) -> subprocess.Popen[str]:
    env = None if tmpdir is None else {**os.environ, "TMPDIR": str(tmpdir)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpubo", "stress", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    banner = proc.stdout.readline()  # printed just before the manager opens
    assert banner.startswith("gpubo stress"), banner + proc.stderr.read()  # type: ignore[union-attr]
    return proc


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def _wait_until_evicting(proc: subprocess.Popen[str], stores: Callable[[], list[Path]], count: int) -> None:
    """The handshake: ``count`` stores each hold 2 MiB of evicted bytes in
    the page cache (seen by cachestat(2)), while ``proc`` still runs."""
    deadline = time.monotonic() + 60
    while sum(_store_pages(s) >= 2 * MiB // 4096 for s in stores()) < count:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the stress run never evicted into its stores"
        time.sleep(0.01)


def _store_pages(store: Path) -> int:
    """Pages of the store's data file in the page cache (0 before it exists)."""
    try:
        return cachestat(store / "data.mdb").cached
    except FileNotFoundError:
        return 0


def _reopens_empty(store: Path) -> None:
    m = gpubo.Manager(budget=4 * MiB, store=str(store), store_size=64 * MiB)
    with m:
        s = m.stats()
        assert (s.bo_count, s.store_used_bytes) == (0, 0), s
        bo = m.alloc(MiB)
        bo.write(pattern(MiB, 1))
        bo.evict()
        assert np.array_equal(bo.read(), pattern(MiB, 1))


@pytest.mark.timeout(TIMEOUT)
def test_a_process_killed_mid_run_leaves_a_store_that_reopens(tmp_path: Path, leak_check: None) -> None:
    store = tmp_path / "store"
    proc = _spawn_stress("--budget", "4MiB", "--size", "1MiB", "--seconds", "60", "--store", str(store))
    try:
        # The handshake: evicted bytes have reached the store's file (its
        # pages in the host's page cache, seen by cachestat(2)).
        deadline = time.monotonic() + 60
        while _store_pages(store) < 2 * MiB // 4096:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the stress run never evicted into its store"
            time.sleep(0.01)
        assert proc.poll() is None, proc.communicate()
    finally:
        _kill(proc)
    _reopens_empty(store)
    # And the same run on that store, to the end.
    result = CliRunner().invoke(
        cli.main,
        ["stress", "--budget", "4MiB", "--size", "1MiB", "--loops", "30", "--store", str(store), "--json"],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ok"] is True


@pytest.mark.timeout(TIMEOUT)
def test_killing_a_multi_process_run_takes_its_children_down(tmp_path: Path, leak_check: None) -> None:
    store = tmp_path / "stores"
    proc = _spawn_stress(
        "--processes", "2", "--budget", "8MiB", "--size", "1MiB", "--seconds", "60", "--store", str(store)
    )
    try:
        # the children opened their stores and are swapping
        _wait_until_evicting(proc, lambda: [store / f"proc{i}" for i in range(2)], 2)
        children = children_of(proc.pid)
        assert len(children) >= 2, children
    finally:
        _kill(proc)
    assert wait_gone(children, 10) == set(), "children outlived their parent"
    for i in range(2):
        _reopens_empty(store / f"proc{i}")


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize(
    "shape", [[], ["--parallel", "2"], ["--processes", "2"]], ids=["one", "threads", "processes"]
)
def test_ctrl_c_stops_the_run_cleanly(shape: list[str], leak_check: None, tmp_path: Path) -> None:
    """SIGINT (to the parent only) ends the run between operations: swept, freed, reported, exit 130."""
    proc = _spawn_stress("--budget", "8MiB", "--size", "1MiB", "--seconds", "60", *shape, tmpdir=tmp_path)
    stores = 2 if "--processes" in shape else 1
    _wait_until_evicting(
        proc, lambda: [p.parent for p in tmp_path.glob("gpubo-stress-*/**/data.mdb")], stores
    )
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    assert "INTERRUPTED" in err
    assert "check: final sweep  OK" in out
    assert "check: leaks        OK" in out
    assert "Traceback" not in out + err


# -- host memory pressure ---------------------------------------------------------------------


@pytest.mark.timeout(TIMEOUT)
def test_host_pressure_runs_beside_the_stress_and_goes_away(leak_check: None) -> None:
    with _no_new_children():
        r = run_stress(_config(host_pressure=0.02 * SCALE, threads=2))
    assert_clean(r)
    assert r.host_pressure_bytes > 0


@pytest.mark.timeout(TIMEOUT)
def test_host_pressure_never_takes_the_floor(leak_check: None) -> None:
    """With a reserve larger than the machine, the hog must hold nothing."""
    with open("/proc/meminfo") as f:
        total = int(next(line for line in f if line.startswith("MemTotal:")).split()[1]) * 1024
    with _no_new_children(), HostPressure(0.5, reserve_bytes=total, ramp_timeout_s=10) as hog:
        assert hog.held_bytes == 0
    assert hog.peak_bytes == 0
