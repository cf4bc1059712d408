"""SIGTERM and the private stores a killed process leaves: the CLI cleans
up on SIGTERM as on Ctrl-C; a library process killed without a handler
leaves its directory, which the next private store's creation (or
``gpubo fsck --clean-tmp``) sweeps, never touching a live one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cachestat

import gpubo

MiB = 1 << 20

pytestmark = pytest.mark.timeout(120)

HOLDER = """
import sys, time, gpubo
m = gpubo.Manager(budget="1MiB", store_size="64MiB")
m.alloc(4096).write(b"x" * 4096)
print(m.store.path, flush=True)
time.sleep(600)
"""


def _env(tmpdir: Path) -> dict[str, str]:
    return {**os.environ, "TMPDIR": str(tmpdir)}


def _leftovers(tmpdir: Path) -> list[str]:
    return sorted(p.name for p in tmpdir.iterdir() if p.name.startswith("gpubo-"))


def _start_holder(tmpdir: Path) -> tuple[subprocess.Popen[str], Path]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER], env=_env(tmpdir), stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line, "the holder did not start"
    path = Path(line)
    assert path.parent == tmpdir and (path / "data.mdb").exists()
    return proc, path


def test_a_killed_process_store_is_swept_by_the_next_private_store(tmp_path: Path) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    dead, dead_path = _start_holder(tmpdir)
    alive, alive_path = _start_holder(tmpdir)
    try:
        dead.send_signal(signal.SIGTERM)
        assert dead.wait(30) == -signal.SIGTERM
        assert dead_path.exists()  # the library installs no handler: it is left behind
        subprocess.run(
            [sys.executable, "-c", "import gpubo; gpubo.Manager(budget='1MiB', store_size='8MiB').close()"],
            env=_env(tmpdir),
            check=True,
            timeout=60,
        )
        assert not dead_path.exists(), "the dead process's private store was not swept"
        assert alive_path.exists() and (alive_path / "data.mdb").exists(), "a live store was swept"
    finally:
        alive.kill()
        alive.wait()
    # the live one died too now (SIGKILL): fsck --clean-tmp sweeps it
    result = subprocess.run(
        [sys.executable, "-m", "gpubo", "fsck", "--clean-tmp"],
        env=_env(tmpdir),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert str(alive_path) in result.stdout
    assert _leftovers(tmpdir) == []


def test_a_directory_without_a_marker_is_never_swept(tmp_path: Path) -> None:
    from gpubo.store.private import sweep

    (tmp_path / "gpubo-store-someone").mkdir()  # not made by PrivateDir (or not finished)
    (tmp_path / "gpubo-store-someone" / "data.mdb").write_bytes(b"keep")
    assert sweep(str(tmp_path)) == []
    assert (tmp_path / "gpubo-store-someone" / "data.mdb").exists()


def test_sigterm_stops_gpubo_stress_cleanly(tmp_path: Path) -> None:
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpubo", "stress", "--budget", "4MiB", "--size", "1MiB", "--seconds", "60"],
        env=_env(tmpdir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:  # the handshake: the run has evicted 2 MiB into its store (cachestat(2) sees the pages)
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the stress run never evicted into its store"
            stores = list(tmpdir.glob("gpubo-stress-*/**/data.mdb"))
            if stores and cachestat(stores[0]).cached >= 2 * MiB // 4096:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "check: leaks        OK" in out  # it swept, freed and reported
    assert _leftovers(tmpdir) == []


def test_private_store_creation_leaves_no_window_for_a_sweeper(tmp_path: Path) -> None:
    """A private store being made while another process sweeps is never taken."""
    from gpubo.store.private import PrivateDir, sweep

    made = [PrivateDir("gpubo-store-", str(tmp_path)) for _ in range(20)]
    try:
        assert sweep(str(tmp_path)) == []
        assert all(os.path.isdir(d.path) for d in made)
    finally:
        for d in made:
            d.remove()
    assert _leftovers(tmp_path) == []
    with gpubo.Manager(budget="1MiB", store_size="8MiB") as m:  # the default path works as before
        assert os.path.isdir(m.store.path)
