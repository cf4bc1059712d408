"""Host memory pressure: LinuxPressure's signals (on a fake /proc and /sys tree) and the
real "smem-oom" case, a child process hogging host memory while a stress run goes on."""

from __future__ import annotations

import logging
import os
import random
import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyopencl as cl
import pytest
from conftest import INC_SRC, check_budget, pattern

import gpubo
from gpubo.shrinker import LinuxPressure, Pressure, PressureMonitor

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
N = 256 * KiB

MakeMgr = Callable[..., gpubo.Manager]

PSI_CALM = "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"


class FakeHost:
    """A fake filesystem root with the files LinuxPressure reads."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "proc").mkdir(parents=True, exist_ok=True)

    def meminfo(self, total_kb: int | None = 16_000_000, available_kb: int | None = 8_000_000) -> None:
        lines = []
        if total_kb is not None:
            lines.append(f"MemTotal:       {total_kb} kB")
        lines.append("MemFree:         1000000 kB")
        if available_kb is not None:
            lines.append(f"MemAvailable:   {available_kb} kB")
        lines.append("HugePages_Total:       0")
        (self.root / "proc" / "meminfo").write_text("\n".join(lines) + "\n")

    def psi(self, some_avg10: float, full_avg10: float = 0.0) -> None:
        (self.root / "proc" / "pressure").mkdir(exist_ok=True)
        (self.root / "proc" / "pressure" / "memory").write_text(
            f"some avg10={some_avg10:.2f} avg60=0.00 avg300=0.00 total=123\n"
            f"full avg10={full_avg10:.2f} avg60=0.00 avg300=0.00 total=45\n"
        )

    def cgroup(self, current: int, high: str = "max", max_: str = "max", rel: str = "app.slice/job") -> None:
        (self.root / "proc" / "self").mkdir(exist_ok=True)
        (self.root / "proc" / "self" / "cgroup").write_text(f"0::/{rel}\n")
        d = self.root / "sys" / "fs" / "cgroup" / rel
        d.mkdir(parents=True, exist_ok=True)
        (d / "memory.current").write_text(f"{current}\n")
        (d / "memory.high").write_text(f"{high}\n")
        (d / "memory.max").write_text(f"{max_}\n")

    def source(self, **kw: object) -> LinuxPressure:
        return LinuxPressure(root=str(self.root), **kw)  # type: ignore[arg-type]


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    return FakeHost(tmp_path / "root")


def missing_notes(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "not available" in r.getMessage()]


# -- MemAvailable ---------------------------------------------------------------------------------


def test_default_min_available_is_a_tenth_of_memtotal(host: FakeHost) -> None:
    host.meminfo(total_kb=16_000_000, available_kb=8_000_000)
    src = host.source()
    assert src.min_available == 16_000_000 * 1024 // 10
    host.meminfo(total_kb=16_000_000, available_kb=1_000_000)
    p = src.read()
    assert p is not None and p.reclaim_bytes == 16_000_000 * 1024 // 10 - 1_000_000 * 1024


def test_memavailable_below_min_available_asks_for_the_difference(host: FakeHost) -> None:
    host.meminfo(available_kb=2 * GiB // KiB)
    host.psi(0.0)
    src = host.source(min_available=GiB)
    assert src.read() == Pressure(0)
    host.meminfo(available_kb=(GiB - 300 * MiB) // KiB)  # read live, every time
    p = src.read()
    assert p is not None and p.reclaim_bytes == 300 * MiB
    assert "MemAvailable" in p.reason
    host.meminfo(available_kb=GiB // KiB)  # at the threshold: no pressure
    assert src.read() == Pressure(0)


# -- PSI ------------------------------------------------------------------------------------------


def test_psi_some_avg10_above_the_threshold_asks_for_psi_reclaim_bytes(host: FakeHost) -> None:
    host.meminfo()
    host.psi(10.0)
    src = host.source(psi_some_avg10=10.0, psi_reclaim_bytes=32 * MiB, min_available=0)
    assert src.read() == Pressure(0)  # not above
    host.psi(10.01)
    p = src.read()
    assert p is not None and p.reclaim_bytes == 32 * MiB and "PSI" in p.reason
    host.psi(1.0, full_avg10=95.0)  # only "some" counts
    assert src.read() == Pressure(0)


# -- cgroup v2 ------------------------------------------------------------------------------------


def test_cgroup_current_above_a_fraction_of_high_asks_for_the_excess(host: FakeHost) -> None:
    host.meminfo()
    host.cgroup(current=950 * MiB, high=str(1000 * MiB), max_=str(2000 * MiB))
    src = host.source(min_available=0, cgroup_fraction=0.9)
    p = src.read()
    assert p is not None
    assert p.reclaim_bytes == 950 * MiB - int(1000 * MiB * 0.9)
    assert "memory.high" in p.reason
    host.cgroup(current=int(1000 * MiB * 0.9), high=str(1000 * MiB), max_=str(2000 * MiB))
    assert src.read() == Pressure(0)


def test_cgroup_uses_memory_max_when_high_is_unlimited(host: FakeHost) -> None:
    host.meminfo()
    host.cgroup(current=GiB - 10 * MiB, high="max", max_=str(GiB))
    src = host.source(min_available=0, cgroup_fraction=0.5)
    p = src.read()
    assert p is not None
    assert p.reclaim_bytes == GiB - 10 * MiB - GiB // 2
    assert "memory.max" in p.reason
    host.cgroup(current=GiB - 10 * MiB, high="max", max_="max")  # no limit at all
    assert src.read() == Pressure(0)


def test_the_largest_request_wins(host: FakeHost) -> None:
    host.meminfo(available_kb=(GiB - 10 * MiB) // KiB)
    host.psi(50.0)
    host.cgroup(current=900 * MiB, high=str(800 * MiB))
    src = host.source(min_available=GiB, psi_reclaim_bytes=64 * MiB, cgroup_fraction=1.0)
    p = src.read()
    assert p is not None and p.reclaim_bytes == 100 * MiB and "cgroup" in p.reason
    host.cgroup(current=700 * MiB, high=str(800 * MiB))
    p = src.read()
    assert p is not None and p.reclaim_bytes == 64 * MiB and "PSI" in p.reason


# -- missing signals ------------------------------------------------------------------------------


def test_each_missing_signal_is_logged_once_and_the_others_are_used(
    host: FakeHost, caplog: pytest.LogCaptureFixture
) -> None:
    host.meminfo(available_kb=(GiB - MiB) // KiB)  # no PSI, no cgroup
    with caplog.at_level(logging.INFO, logger="gpubo.shrinker"):
        src = host.source(min_available=GiB)
        for _ in range(3):
            p = src.read()
            assert p is not None and p.reclaim_bytes == MiB
    notes = missing_notes(caplog)
    assert len(notes) == 2, notes
    assert sum("PSI" in n for n in notes) == 1
    assert sum("cgroup" in n for n in notes) == 1


def test_psi_alone_is_enough(host: FakeHost, caplog: pytest.LogCaptureFixture) -> None:
    host.psi(80.0)  # no meminfo, no cgroup
    with caplog.at_level(logging.INFO, logger="gpubo.shrinker"):
        src = host.source(psi_reclaim_bytes=5 * MiB)
        for _ in range(3):
            p = src.read()
            assert p is not None and p.reclaim_bytes == 5 * MiB and "PSI" in p.reason
    notes = missing_notes(caplog)
    assert len(notes) == 2, notes
    assert sum("MemAvailable" in n for n in notes) == 1
    assert sum("cgroup" in n for n in notes) == 1


def test_cgroup_alone_is_enough(host: FakeHost, caplog: pytest.LogCaptureFixture) -> None:
    host.cgroup(current=3 * MiB, max_=str(2 * MiB))
    with caplog.at_level(logging.INFO, logger="gpubo.shrinker"):
        src = host.source(cgroup_fraction=1.0)
        p = src.read()
        src.read()
    assert p is not None and p.reclaim_bytes == MiB
    notes = missing_notes(caplog)
    assert sum("MemAvailable" in n for n in notes) == 1 and sum("PSI" in n for n in notes) == 1


def test_a_cgroup_v1_host_has_no_cgroup_signal(host: FakeHost, caplog: pytest.LogCaptureFixture) -> None:
    host.meminfo()
    host.psi(0.0)
    (host.root / "proc" / "self").mkdir()
    (host.root / "proc" / "self" / "cgroup").write_text("4:memory:/process_api/x\n1:cpu:/\n")
    with caplog.at_level(logging.INFO, logger="gpubo.shrinker"):
        src = host.source()
        assert src.read() == Pressure(0)
    notes = missing_notes(caplog)
    assert len(notes) == 1 and "cgroup" in notes[0]


def test_with_no_signal_at_all_read_returns_none(host: FakeHost, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="gpubo.shrinker"):
        src = host.source()
        assert src.min_available is None
        for _ in range(4):
            assert src.read() is None
    notes = missing_notes(caplog)
    assert len(notes) == 3, notes


def test_the_monitor_acts_on_a_linux_reading(mgr: gpubo.Manager, host: FakeHost) -> None:
    bos = [mgr.alloc(N) for _ in range(4)]
    for i, bo in enumerate(bos):
        bo.write(pattern(N, i))
    host.meminfo(available_kb=2 * GiB // KiB)
    host.psi(0.0)
    mon = PressureMonitor(mgr, host.source(min_available=GiB), interval=1.0)
    assert mon.poll() == 0
    host.meminfo(available_kb=(GiB - 2 * N) // KiB)
    assert mon.poll() == 2 * N
    assert [bo.state for bo in bos] == [gpubo.State.SWAPPED] * 2 + [gpubo.State.RESIDENT] * 2
    assert mon.reclaimed_bytes == 2 * N and mon.rounds == 2
    for i, bo in enumerate(bos):
        assert np.array_equal(bo.read(), pattern(N, i))


# -- bad arguments -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "error"),
    [
        ({"min_available": -1}, ValueError),
        ({"min_available": "lots"}, ValueError),
        ({"psi_some_avg10": "x"}, TypeError),
        ({"psi_reclaim_bytes": -5}, ValueError),
        ({"cgroup_fraction": -1.0}, ValueError),
    ],
)
def test_linux_pressure_refuses_bad_arguments_at_once(
    host: FakeHost, kw: dict[str, object], error: type[Exception]
) -> None:
    host.meminfo()
    host.psi(0.0)
    with pytest.raises(error) as info:
        host.source(**kw)
    assert type(info.value) is error, info.value


def test_a_float_min_available_still_gives_int_readings(host: FakeHost) -> None:
    host.meminfo(available_kb=GiB // KiB)
    host.psi(0.0)
    try:
        src = host.source(min_available=float(GiB + N))
    except (TypeError, ValueError):
        return  # refusing it up front is a fix too
    p = src.read()
    assert p is not None and p.reclaim_bytes == N
    assert isinstance(p.reclaim_bytes, int)


# -- the real thing: a memory hog beside a stress run ----------------------------------------------


def _meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            fields = rest.split()
            if fields and fields[0].isdigit():
                out[key] = int(fields[0]) * (1024 if fields[1:2] == ["kB"] else 1)
    return out


class Recording:
    """Wraps a source and keeps every reading with its time."""

    def __init__(self, inner: LinuxPressure) -> None:
        self.inner = inner
        self.readings: list[tuple[float, Pressure | None]] = []

    def read(self) -> Pressure | None:
        p = self.inner.read()
        self.readings.append((time.monotonic(), p))
        return p


def _mem_readings(src: Recording, since: float, until: float) -> list[Pressure]:
    return [
        p
        for t, p in list(src.readings)
        if since <= t <= until and p is not None and p.reclaim_bytes > 0 and "MemAvailable" in p.reason
    ]


@pytest.mark.timeout(60)
def test_smem_oom_a_host_memory_hog_during_a_stress_run_loses_nothing(make_mgr: MakeMgr) -> None:
    info = _meminfo()
    available = info["MemAvailable"]
    hog_bytes = min(2 * GiB, available // 4)
    assert hog_bytes >= 256 * MiB, f"too little memory for the test: {available}"
    floor = max(2 * GiB, info["MemTotal"] // 8)  # the hog never takes the machine below this
    # No pressure now; the hog takes MemAvailable about hog_bytes / 2 below the threshold.
    src = Recording(LinuxPressure(min_available=available - hog_bytes // 2, psi_some_avg10=100.0))
    m = make_mgr(budget=MiB, store_size="64MiB")
    mon = m.watch_pressure(src, interval=0.05)
    inc = cl.Kernel(cl.Program(m.context, INC_SRC).build(), "inc")
    rng = random.Random(7)
    bos = [m.alloc(rng.choice([64, 128, 256]) * KiB) for _ in range(10)]
    models = [np.zeros(bo.nbytes, np.uint8) for bo in bos]

    def step() -> None:
        i = rng.randrange(len(bos))
        bo, model = bos[i], models[i]
        op = rng.random()
        if op < 0.35:
            off = rng.randrange(bo.nbytes)
            data = np.frombuffer(
                rng.randbytes(rng.randrange(1, min(64 * KiB, bo.nbytes - off) + 1)), np.uint8
            )
            bo.write(data, off)
            model[off : off + data.nbytes] = data
        elif op < 0.7:
            off = rng.randrange(bo.nbytes)
            n = rng.randrange(1, bo.nbytes - off + 1)
            assert np.array_equal(bo.read(count=n, offset=off), model[off : off + n]), f"{bo!r} corrupted"
        elif op < 0.8:
            m.launch(inc, (bo.nbytes,), None, bo).wait()
            model += 1
        elif op < 0.9:
            bo.evict()
        else:
            assert np.array_equal(bo.read(), model), f"{bo!r} corrupted"
        check_budget(m)

    start = time.monotonic()
    while time.monotonic() < start + 0.5:  # before the hog
        step()
    hog_start = time.monotonic()
    reclaimed_before = mon.reclaimed_bytes
    calm = _mem_readings(src, start, hog_start)
    # Measured again right before the hog starts (memory another process just gave back
    # must not hide the hog).
    src.inner.min_available = _meminfo()["MemAvailable"] - hog_bytes // 2
    hog = subprocess.Popen(
        [sys.executable, os.path.join(os.path.dirname(__file__), "hog_child.py"), str(hog_bytes), str(floor)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    ready_at: float | None = None
    held = 0
    try:
        assert hog.stdout is not None
        while True:
            now = time.monotonic()
            if ready_at is None:
                if select.select([hog.stdout], [], [], 0)[0]:
                    line = hog.stdout.readline().split()
                    assert line[:1] == ["ready"], f"the hog said {line!r}"
                    held = int(line[1])
                    ready_at = now
                assert now < hog_start + 20, "the hog did not get ready in 20 s"
            elif now > ready_at + 2.5:
                break
            step()
        hog_end = time.monotonic()
        reclaimed_during = mon.reclaimed_bytes - reclaimed_before
    finally:
        hog.kill()
        hog.wait(10)
        for pipe in (hog.stdin, hog.stdout):
            if pipe is not None:
                pipe.close()
    assert held > hog_bytes // 2, f"the hog could only hold {held} bytes"
    # every BO is byte-exact
    for bo, model in zip(bos, models, strict=True):
        assert np.array_equal(bo.read(), model), f"{bo!r} corrupted"
    assert calm == [], f"memory pressure before the hog started: {calm[:3]}"
    assert mon.running and mon.rounds > 0
    assert reclaimed_during > 0, (
        f"the monitor reclaimed nothing while the hog held memory; "
        f"{len(_mem_readings(src, hog_start, hog_end))} pressure readings, {mon.rounds} rounds, {m.stats()}"
    )
    assert _mem_readings(src, hog_start, hog_end), "the monitor never saw the hog's pressure"
    s = check_budget(m)
    assert s.evictions > 0 and s.restores > 0
    # once the hog is gone, the pressure goes away
    deadline = time.monotonic() + 10
    threshold = src.inner.min_available
    assert threshold is not None
    while _meminfo()["MemAvailable"] < threshold:
        assert time.monotonic() < deadline, "MemAvailable did not recover after the hog was killed"
        time.sleep(0.05)
    p = src.inner.read()
    assert p is None or "MemAvailable" not in p.reason
