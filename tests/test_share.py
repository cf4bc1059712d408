"""A device share: several processes on one budget, evicting for each other.

Real member processes (tests/share_child.py) on the real PoCL device, a real
ledger file under a real flock, real UNIX sockets; faults are a SIGKILL, a
held lock, a damaged ledger file, open permissions.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import gpubo
from gpubo import ShareError
from gpubo._share import read_ledger

CHILD = Path(__file__).with_name("share_child.py")
MiB = 1 << 20


@pytest.fixture
def share_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "shares"
    monkeypatch.setenv("GPUBO_SHARE_DIR", str(root))
    monkeypatch.delenv("GPUBO_SHARE", raising=False)
    return root


class Watcher:
    """Samples the ledger (without its lock, as `gpubo top` does) every few
    milliseconds: the budget must hold in every sample."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.samples = 0
        self.violations: list[str] = []
        self.seen: dict[str, int] = {}  # member -> pid
        self.gone_at: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                state = read_ledger(self.path)
            except ShareError as e:  # e.g. more granted than the budget
                self.violations.append(str(e))
                state = None
            if state is not None:
                self.check(state)
            time.sleep(0.005)

    def check(self, state: dict[str, Any]) -> None:
        self.samples += 1
        members = state["members"]
        reserved = sum(m["reserved"] for m in members.values())
        charged = sum(m["charged"] for m in members.values())
        if reserved > state["budget"] or charged > state["budget"]:
            self.violations.append(f"reserved {reserved} charged {charged} > budget {state['budget']}")
        for k, m in members.items():
            if m["charged"] > m["reserved"]:
                self.violations.append(f"member {k}: charged {m['charged']} > reserved {m['reserved']}")
            self.seen[k] = m["pid"]
        for k in self.seen:
            if k not in members and k not in self.gone_at:
                self.gone_at[k] = time.monotonic()


def start_child(
    share: str, mode: str, count: int, size: int, seconds: float, seed: int, **kw: Any
) -> subprocess.Popen[str]:
    args = [sys.executable, str(CHILD), share, mode, str(count), str(size), str(seconds), str(seed)]
    args += [f"{k}={v}" for k, v in kw.items()]
    return subprocess.Popen(
        args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_line(proc: subprocess.Popen[str], expected: str, timeout: float = 60.0) -> None:
    assert proc.stdout is not None
    done = threading.Event()
    got: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        got.append(proc.stdout.readline().strip())
        done.set()

    threading.Thread(target=read, daemon=True).start()
    assert done.wait(timeout), f"child printed nothing in {timeout} s"
    if got[0] != expected:
        _, err = proc.communicate(timeout=30)
        raise AssertionError(f"child said {got[0]!r}, not {expected!r}: {err}")


def say(proc: subprocess.Popen[str], line: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()


def finish(proc: subprocess.Popen[str], timeout: float = 120.0) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"child exited {proc.returncode}: {out}\n{err}"
    assert "Traceback" not in err, err
    report: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return report


@pytest.fixture
def members() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def test_members_oversubscribe_one_share(share_dir: Path, members: list[subprocess.Popen[str]]) -> None:
    """3 members of 4.5 MiB each on a 8 MiB share: every byte right, the
    ledger's sum never above the budget, every member evicts for the others."""
    for seed in range(3):
        members.append(start_child("over", "work", 9, 512 << 10, 4.0, seed, budget="8MiB"))
    with Watcher(share_dir / "over" / "ledger.json") as w:
        for p in members:
            wait_line(p, "ready")
        for p in members:  # all at once
            say(p, "go")
        reports = [finish(p) for p in members]
    assert w.samples > 100 and not w.violations, w.violations[:5]
    for r in reports:
        assert r["mismatches"] == 0 and r["checks"] > 50, r
        assert r["served"] > 0 and r["given"] > 0, r  # its idle BOs went for the others' requests
        assert r["sent"] > 0, r
    assert not (share_dir / "over" / "ledger.json").exists()  # the last one out removed it


def test_sleeping_member_gives_up_idle_bos(
    share_dir: Path, members: list[subprocess.Popen[str]], make_mgr: Callable[..., gpubo.Manager]
) -> None:
    """A member whose main thread sleeps answers from its listener thread."""
    members.append(start_child("nap", "sleep", 6, MiB, 0, 7, budget="8MiB"))
    wait_line(members[0], "ready")
    m = make_mgr(budget=None, share="nap")
    assert m.budget == 8 * MiB
    bos = [m.alloc(MiB) for _ in range(7)]  # needs 5 of the sleeper's 6 MiB
    for i, bo in enumerate(bos):
        bo.write(np.full(MiB // 4, i, np.uint32))
    rows = {r.pid: r for r in m.share_stats()}
    sleeper = rows[members[0].pid]
    assert sleeper.resident_bytes <= MiB and sleeper.swapped_bytes >= 5 * MiB, sleeper
    assert m.stats().resident_bytes == 7 * MiB
    assert sum(r.reserved_bytes for r in rows.values()) <= 8 * MiB
    assert members[0].stdin is not None
    members[0].stdin.write("go\n")
    members[0].stdin.flush()
    report = finish(members[0])  # it restores its BOs, evicting ours: all its bytes right
    assert report["mismatches"] == 0 and report["served"] >= 1 and report["given"] >= 5 * MiB, report
    for i, bo in enumerate(bos):
        assert (bo.read(np.uint32) == i).all()


def test_killed_members_charge_is_reclaimed(share_dir: Path, members: list[subprocess.Popen[str]]) -> None:
    """SIGKILL of members, one while it holds the ledger's lock and two at
    random points of their work: each one's charge is gone within a second,
    the survivors finish byte-exact."""
    ledger = share_dir / "kill" / "ledger.json"
    survivors = [start_child("kill", "work", 8, 512 << 10, 120.0, seed, budget="8MiB") for seed in (1, 2)]
    members.extend(survivors)
    for p in survivors:
        wait_line(p, "ready")
        say(p, "go")
    victims = [start_child("kill", "work", 8, 512 << 10, 60.0, seed) for seed in (4, 5)]
    members.extend(victims)
    for v in victims:
        wait_line(v, "ready")
        say(v, "go")
    with Watcher(ledger) as w:
        locker = start_child("kill", "lock", 0, 4096, 0, 3)
        members.append(locker)
        wait_line(locker, "locked")
        time.sleep(0.3)  # the others now wait for the lock
        for v, delay in ((locker, 0.0), (victims[0], 0.37), (victims[1], 0.81)):
            time.sleep(delay)
            key = next(k for k, pid in w.seen.items() if pid == v.pid)
            killed = time.monotonic()
            v.send_signal(signal.SIGKILL)
            while key not in w.gone_at and time.monotonic() - killed < 10:
                time.sleep(0.01)
            assert key in w.gone_at, f"member {key} of a killed process is still in the ledger"
            assert w.gone_at[key] - killed < 1.0, f"its charge stayed {w.gone_at[key] - killed:.2f} s"
        for p in survivors:
            say(p, "stop")
        reports = [finish(p) for p in survivors]
    assert w.samples > 100 and not w.violations, w.violations[:5]
    for r in reports:
        assert r["mismatches"] == 0, r
    assert not ledger.exists()


def test_share_min_protects_and_share_max_caps(
    share_dir: Path, make_mgr: Callable[..., gpubo.Manager]
) -> None:
    a = make_mgr(budget="8MiB", share="lim", share_min="3MiB")
    a_bos = [a.alloc(MiB) for _ in range(3)]
    b = make_mgr(budget=None, share="lim", share_max="4MiB")
    b_bos = [b.alloc(MiB) for _ in range(7)]  # capped at 4: its own are evicted
    for i, bo in enumerate(b_bos):
        bo.write(np.full(MiB, i, np.uint8))
    assert b.stats().resident_bytes <= 4 * MiB and b.stats().evictions >= 3
    rows = {r.member: r for r in b.share_stats()}
    assert max(r.reserved_bytes for r in rows.values() if r.max_bytes == 4 * MiB) <= 4 * MiB
    c = make_mgr(budget=None, share="lim")
    c_bos = [c.alloc(MiB) for _ in range(4)]  # b gives back; a (at its min) gives nothing
    assert a.stats().evictions == 0 and a.stats().resident_bytes == 3 * MiB
    assert b.stats().resident_bytes <= MiB
    with pytest.raises(gpubo.OutOfDeviceMemory, match="share 'lim'"):
        c.alloc(6 * MiB)  # a's 3 MiB of the 8 are protected
    for i, bo in enumerate(b_bos):
        assert (bo.read(np.uint8) == i % 256).all()
    assert all(bo.state is gpubo.State.RESIDENT for bo in a_bos)
    mgrs = (a, b, c)
    assert sum(m.stats().resident_bytes + m.stats().pooled_bytes for m in mgrs) <= 8 * MiB
    del c_bos


def test_share_min_is_kept_with_whole_bos(share_dir: Path, make_mgr: Callable[..., gpubo.Manager]) -> None:
    """A member at 4 MiB with share_min 3 MiB holds one 4 MiB BO: evicting it
    would leave it below its min, so it stays, and the asker is refused."""
    a = make_mgr(budget="8MiB", share="whole", share_min="3MiB")
    big = a.alloc(4 * MiB)
    big.write(np.full(4 * MiB, 9, np.uint8))
    b = make_mgr(budget=None, share="whole")
    with pytest.raises(gpubo.OutOfDeviceMemory, match="share 'whole'"):
        b.alloc(5 * MiB)
    assert big.state is gpubo.State.RESIDENT and a.stats().evictions == 0
    b.alloc(4 * MiB)  # what is free is its
    assert (big.read(np.uint8) == 9).all()


def test_members_asking_each_other_do_not_deadlock(
    share_dir: Path, make_mgr: Callable[..., gpubo.Manager]
) -> None:
    """Two members that need room at once, each able to free only by asking
    the other (their own BOs mostly pinned): both finish, in time, with a
    clean result (room or OutOfDeviceMemory), no BO changed."""
    a = make_mgr(budget="8MiB", share="mutual")
    b = make_mgr(budget=None, share="mutual")
    held: list[Any] = []
    pins = contextlib.ExitStack()
    for m in (a, b):
        bos = [m.alloc(MiB) for _ in range(4)]
        for i, bo in enumerate(bos):
            bo.write(np.full(MiB, i, np.uint8))
        held.append(bos)
        for bo in bos[:3]:
            pins.enter_context(bo.pin())
    barrier = threading.Barrier(2)
    results: dict[int, Any] = {}

    def need_room(i: int, m: gpubo.Manager) -> None:
        barrier.wait()
        try:
            results[i] = m.alloc(2 * MiB)
        except gpubo.OutOfDeviceMemory as e:
            results[i] = e

    threads = [threading.Thread(target=need_room, args=(i, m)) for i, m in enumerate((a, b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "members asking each other hung"
    assert len(results) == 2
    assert all(isinstance(r, (gpubo.BufferObject, gpubo.OutOfDeviceMemory)) for r in results.values())
    # 6 MiB pinned and 2 MiB idle of 8: one gets its 2 MiB at least (the other
    # may then take them from it, since a new BO is idle); never both at once.
    assert any(isinstance(r, gpubo.BufferObject) for r in results.values()), results
    resident = [
        r for r in results.values() if isinstance(r, gpubo.BufferObject) and r.state is gpubo.State.RESIDENT
    ]
    assert len(resident) <= 1, results
    pins.close()
    for bos in held:
        for i, bo in enumerate(bos):
            assert (bo.read(np.uint8) == i).all()


def test_bad_share_input(
    share_dir: Path, make_mgr: Callable[..., gpubo.Manager], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match="share"):
        make_mgr(share="bad/name")
    with pytest.raises(ValueError, match="need a share"):
        make_mgr(share_min="1MiB")
    with pytest.raises(ValueError, match="share_min"):
        make_mgr(share="x", share_min="2MiB", share_max="1MiB")
    a = make_mgr(budget="8MiB", share="x")
    with pytest.raises(ValueError, match=r"4\.0MiB.*8\.0MiB"):
        make_mgr(budget="4MiB", share="x")  # names both budgets
    a.alloc(MiB)
    # Open permissions on the share's directory.
    open_root = tmp_path / "open"
    open_root.mkdir(mode=0o755)
    open_root.chmod(0o755)
    monkeypatch.setenv("GPUBO_SHARE_DIR", str(open_root))
    with pytest.raises(gpubo.ShareError, match="0755"):
        make_mgr(share="y")


@pytest.mark.parametrize(
    "content, match",
    [
        (b"\x00garbage{", "damaged"),
        (b'{"format": "gpubo-share", "version": 99, "budget": 1, "device": "", "members": {}}', "version 99"),
        (
            b'{"format": "gpubo-share", "version": 1, "budget": 4194304, "device": "", "members": '
            b'{"1-1": {"pid": 1, "start": 0, "reserved": 0, "charged": 0, "min": 0, "low": 0, '
            b'"oldest": "x"}}}',
            "member",
        ),
        (
            b'{"format": "gpubo-share", "version": 1, "budget": 1024, "device": "", "members": '
            b'{"1-1": {"pid": 1, "start": 0, "reserved": 4096, "charged": 0, "min": 0, "low": 0}}}',
            "grants",
        ),
    ],
)
def test_damaged_ledger_is_refused(
    share_dir: Path, make_mgr: Callable[..., gpubo.Manager], content: bytes, match: str
) -> None:
    a = make_mgr(budget="4MiB", share="dmg")
    bo = a.alloc(MiB)
    bo.write(np.full(MiB, 7, np.uint8))
    ledger = share_dir / "dmg" / "ledger.json"
    with open(share_dir / "dmg" / "lock", "rb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as a member writes it: no tick rewrites it meanwhile
        saved = ledger.read_bytes()
        ledger.write_bytes(content)
    with pytest.raises(gpubo.ShareError, match=match):
        make_mgr(budget=None, share="dmg")
    with pytest.raises(gpubo.ShareError, match=match):
        a.alloc(3 * MiB)  # growing the reservation reads the ledger
    assert (bo.read(np.uint8) == 7).all()  # what it holds is intact
    with open(share_dir / "dmg" / "lock", "rb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ledger.write_bytes(saved)
    a.alloc(MiB)


def test_two_devices_in_one_share(share_dir: Path) -> None:
    code = (
        "import gpubo\n"
        "a = gpubo.Manager(budget='4MiB', share='dev', device='basic')\n"
        "try:\n"
        "    gpubo.Manager(budget='4MiB', share='dev', device='pthread')\n"
        "except ValueError as e:\n"
        "    print('refused:', e)\n"
        "a.close()\n"
    )
    env = {**os.environ, "POCL_DEVICES": "basic pthread"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "refused:" in out.stdout and "basic" in out.stdout and "pthread" in out.stdout, out.stdout


def test_stress_share_and_top(share_dir: Path, members: list[subprocess.Popen[str]]) -> None:
    """`gpubo stress --processes 3 --share` passes with the ledger checked at
    every sample; `gpubo top` shows a member, as a table and as JSON."""
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpubo",
            "stress",
            "--processes",
            "3",
            "--share",
            "--budget",
            "8MiB",
            "--size",
            "256KiB",
            "--seconds",
            "3",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert report["ok"] and report["mismatch_count"] == 0
    assert report["share_samples"] > 3 and report["share_violations"] == 0
    assert report["run_evictions"] > 0 and report["stats"]["budget"] == 8 * MiB
    assert report["config"]["share"]

    members.append(start_child("view", "sleep", 2, MiB, 0, 1, budget="8MiB"))
    wait_line(members[0], "ready")
    gpubo_top = [sys.executable, "-m", "gpubo", "top", "view", "--interval", "0.2"]
    once = subprocess.run([*gpubo_top, "--once"], capture_output=True, text=True, timeout=60)
    assert once.returncode == 0, once.stderr
    assert f"\n{members[0].pid} " in once.stdout and "2.0MiB" in once.stdout, once.stdout
    js = subprocess.run([*gpubo_top, "--json"], capture_output=True, text=True, timeout=60)
    payload = json.loads(js.stdout)
    assert payload["budget_bytes"] == 8 * MiB and payload["reserved_bytes"] >= 2 * MiB
    (row,) = payload["members"]
    assert row["pid"] == members[0].pid and row["resident_bytes"] == 2 * MiB and row["requests_per_s"] == 0
    assert "share_child.py view sleep" in row["command"]
    missing = subprocess.run([*gpubo_top[:4], "nosuch", "--once"], capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "Traceback" not in missing.stderr and "nosuch" in missing.stderr
    assert members[0].stdin is not None
    members[0].stdin.write("go\n")
    members[0].stdin.flush()
    assert finish(members[0])["mismatches"] == 0


def test_share_files_are_private(share_dir: Path, make_mgr: Callable[..., gpubo.Manager]) -> None:
    m = make_mgr(budget="4MiB", share="priv")
    m.alloc(MiB)
    assert stat.S_IMODE(share_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((share_dir / "priv").stat().st_mode) == 0o700
    files = list((share_dir / "priv").iterdir())
    assert {p.suffix for p in files} == {"", ".json", ".sock"}, files
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p


def test_a_forked_child_is_not_a_member(share_dir: Path) -> None:
    """A child forked from a member neither acts for it nor removes it: its
    share calls raise ShareError; the parent's entry, socket and lock stay."""
    code = (
        "import os, sys, gpubo\n"
        "m = gpubo.Manager(budget='8MiB', share='fork', store_size='64MiB')\n"
        "m.alloc(1 << 20)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    try:\n"
        "        m.share_stats()\n"
        "        os._exit(1)\n"
        "    except gpubo.ShareError:\n"
        "        pass\n"
        "    try:\n"
        "        m.alloc(1 << 20)  # nothing of the parent's reservation is the child's\n"
        "        os._exit(2)\n"
        "    except gpubo.ShareError:\n"
        "        os._exit(0)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "assert os.waitstatus_to_exitcode(status) == 0, status\n"
        "rows = m.share_stats()\n"
        "assert [r.pid for r in rows] == [os.getpid()], rows\n"
        "m.alloc(4 << 20)  # grows its reservation: the ledger's lock still works\n"
        "print('parent ok', len(os.listdir(os.path.join(os.environ['GPUBO_SHARE_DIR'], 'fork'))))\n"
        "m.close()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "parent ok 3" in out.stdout, out.stdout  # lock, ledger, its socket


def test_a_share_of_another_pid_namespace_is_refused_untouched(
    share_dir: Path, make_mgr: Callable[..., gpubo.Manager]
) -> None:
    """Its members' pids mean nothing here: the joiner is refused before it
    could take them for dead, and the ledger stays as it was."""
    directory = share_dir / "ns"
    share_dir.mkdir(mode=0o700)
    directory.mkdir(mode=0o700)
    ledger = directory / "ledger.json"
    member = {"pid": 999999, "start": 1, "reserved": 4 * MiB, "charged": 4 * MiB, "min": 0, "low": 0}
    state = {"format": "gpubo-share", "version": 1, "budget": 8 * MiB, "device": "", "pidns": 1}
    ledger.write_text(json.dumps({**state, "members": {"999999-1": member}}))
    ledger.chmod(0o600)
    before = ledger.read_bytes()
    with pytest.raises(ValueError, match="pid namespace"):
        make_mgr(budget=None, share="ns")
    assert ledger.read_bytes() == before
