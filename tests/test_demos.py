"""The demos run, check their own answers against numpy and say so.

Each demo runs as a subprocess (as a user would run it), with sizes small
enough to take a few seconds on the PoCL device.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

DEMOS = Path(__file__).resolve().parent.parent / "demos"


def run_demo(name: str, *args: str, timeout: float = 120) -> str:
    """Run ``demos/<name>`` with ``args``; return its stdout, failing on a non-zero exit."""
    proc = subprocess.run(
        [sys.executable, str(DEMOS / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_out_of_core_gemm() -> None:
    out = run_demo("out_of_core_gemm.py", "--n", "256", "--tile", "64", "--depth", "2")
    assert "4.0x)" in out  # the tiles are four times the budget by default
    assert out.count("  result: OK") == 2  # oversubscribed and in memory
    assert re.search(r"oversubscribed / in memory: multiply \d+\.\d\dx", out)
    over = out.split("gpubo, oversubscribed")[1].split("gpubo, in memory")[0]
    assert re.search(r"multiply .*\(([1-9]\d*) evictions .* ([1-9]\d*) restores", over), over
    assert out.rstrip().endswith("result: OK")


def test_out_of_core_gemm_rejects_bad_tiles() -> None:
    proc = subprocess.run(
        [sys.executable, str(DEMOS / "out_of_core_gemm.py"), "--n", "256", "--tile", "100"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "--tile must be a positive multiple of 16" in proc.stderr


def test_mlp_inference_read_only_weights() -> None:
    out = run_demo(
        "mlp_inference.py", "--layers", "6", "--width", "256", "--batch", "32", "--budget", "640KiB"
    )
    assert out.count("output OK") == 2
    # The second pass evicts weights again, and copies nothing doing so.
    assert re.search(r"pass 2: .* [1-9]\d* evictions copying 0B", out), out
    assert "check: bytes_evicted flat in pass 2: OK" in out
    assert out.rstrip().endswith("result: OK")


def test_mlp_inference_writable_weights_copy_again() -> None:
    out = run_demo(
        "mlp_inference.py",
        "--layers", "6", "--width", "256", "--batch", "32", "--budget", "640KiB",
        "--writable-weights",
    )  # fmt: skip
    assert out.count("output OK") == 2
    assert not re.search(r"pass 2: .* evictions copying 0B", out), out
    assert out.rstrip().endswith("result: OK")


SMALL_LIFE = ["--boards", "4", "--size", "128", "--steps", "12", "--budget", "32KiB"]


def test_hibernate_resume_spawns_the_second_process() -> None:
    out = run_demo("hibernate_resume.py", *SMALL_LIFE)
    pids = re.findall(r"process (\d) \(pid (\d+)\)", out)
    assert [p for p, _ in pids] == ["1", "2"], out
    assert pids[0][1] != pids[1][1]
    assert "9 records committed" in out  # 4 boards x 2 buffers + the meta record
    assert "opened 9 records (4 boards, 6 of 12 steps done)" in out
    assert "every board equals numpy's" in out
    assert out.rstrip().endswith("result: OK")


@pytest.mark.parametrize("hard_exit", [False, True], ids=["close", "exit-without-close"])
def test_hibernate_then_resume_in_separate_runs(tmp_path: Path, hard_exit: bool) -> None:
    store = str(tmp_path / "store")
    first = ["--store", store, "--no-resume", "--steps-first", "5"]
    out = run_demo(
        "hibernate_resume.py", *SMALL_LIFE, *first, *(["--exit-without-close"] if hard_exit else [])
    )
    assert "process 2" not in out
    assert Path(store).is_dir()
    out = run_demo("hibernate_resume.py", "--store", store, "--resume", "--budget", "32KiB")
    assert "(4 boards, 5 of 12 steps done)" in out  # an odd split: the board is in "b"
    assert out.rstrip().endswith("result: OK")
    # The resumed run left the store consistent.
    fsck = subprocess.run(
        [sys.executable, "-m", "gpubo", "fsck", store],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_hibernate_resume_without_a_store_is_usage_error() -> None:
    proc = subprocess.run(
        [sys.executable, str(DEMOS / "hibernate_resume.py"), "--resume"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "need --store" in proc.stderr


def test_oversubscribe() -> None:
    out = run_demo("oversubscribe.py")
    assert "all correct" in out


def test_dask_tiles() -> None:
    out = run_demo("dask_tiles.py", "--n", "256", "--tile", "64", "--device-limit", "128KiB")
    # 16 + 16 input tiles, 64 partial products and 16 sums of 16 KiB: 7x the limits.
    assert "1.8MiB of device arrays in the graph, 7.0x the 2 workers' 128.0KiB device limits" in out
    workers = re.findall(r"worker \S+: resident .* of 128\.0KiB, (\d+) evictions, (\d+) restores", out)
    assert len(workers) == 2 and all(int(e) > 0 for e, _ in workers), out
    assert out.rstrip().endswith("result: OK")
