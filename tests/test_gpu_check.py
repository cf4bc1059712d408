"""``benchmarks/gpu_check.sh``: the parts that run without a GPU (arguments,
the ICD discovery against a fake NVIDIA library, the summary it gathers),
run for real on this machine with the PoCL device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"

pytestmark = pytest.mark.timeout(120)


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "GPUBO_DEVICE": "cpu", **(env or {})}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=full, timeout=110)


def steps_of(out: Path) -> dict[str, int]:
    rows = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]
    return {step: int(status) for step, status, _ in rows}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "give an output folder"),
        (("--steps", "install,launch", "out"), "unknown step launch"),
        (("--frobnicate", "out"), "unknown option --frobnicate"),
        (("--wheels",), "--wheels needs a folder"),
        (("--wheels", "/nonexistent/wheels", "out"), "is not a folder"),
        (("a", "b"), "one OUT_DIR only"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    r = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, cwd=tmp_path, timeout=30)
    assert r.returncode == 2, r
    assert message in r.stderr
    assert not (tmp_path / "out").exists()  # nothing made before the arguments are checked


def test_help_shows_the_usage() -> None:
    r = run("--help")
    assert r.returncode == 0
    assert "OUT_DIR" in r.stdout and "--wheels" in r.stdout and "OCL_ICD_VENDORS" in r.stdout


def test_icd_file_written_for_a_found_nvidia_library(tmp_path: Path) -> None:
    libs = tmp_path / "lib"
    libs.mkdir()
    fake = libs / "libnvidia-opencl.so.1"
    fake.write_bytes(b"\x7fELF not really")
    out = tmp_path / "out"
    r = run(
        "--python",
        sys.executable,
        "--steps",
        "icd",
        str(out),
        env={"GPUBO_CHECK_LIB_DIRS": f"/nonexistent:{libs}"},
    )
    assert r.returncode == 0, r.stderr
    assert (out / "icd" / "nvidia.icd").read_text().strip() == str(fake)
    assert f"OCL_ICD_VENDORS={out}/icd" in (out / "icd.txt").read_text()
    assert steps_of(out) == {"icd": 0}


def test_no_nvidia_library_writes_no_icd(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    r = run("--python", sys.executable, "--steps", "icd", str(out), env={"GPUBO_CHECK_LIB_DIRS": str(empty)})
    assert r.returncode == 0, r.stderr
    assert not (out / "icd").exists()
    assert "was not found" in (out / "icd.txt").read_text()


def test_info_and_summary_gather_what_the_steps_left(tmp_path: Path) -> None:
    """Real `gpubo info` on this machine; the test and bench outputs that the
    other steps would write are put in place, and the summary reads them all."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "tests.xml").write_text(
        '<testsuites><testsuite name="pytest" tests="7" failures="1" errors="0" skipped="2"/></testsuites>'
    )
    bench = {
        "machine": {"device": "Fake GPU"},
        "config": {"transfer": "map", "checksums": "device"},
        "throughput": [
            {
                "nbytes": 16 << 20,
                "cases": [
                    {
                        "backend": "lmdb",
                        "checksums_where": "device",
                        "evict_vs_d2h": {"of_medians": 0.91},
                        "restore_vs_h2d": {"of_medians": 0.95},
                    }
                ],
            }
        ],
        "goals": [{"goal": "evict/D2H 16MiB", "value": 0.93, "target": 0.9, "unit": "x", "met": True}],
    }
    (out / "bench-map-device.json").write_text(json.dumps(bench))
    (out / "bench-bounce-host.json").write_text("Traceback: not JSON")
    r = run("--python", sys.executable, "--steps", "info,summary", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [s["step"] for s in summary["steps"]] == ["info"] and summary["steps"][0]["status"] == 0
    assert summary["info"]["devices"] and summary["info"]["error"] is None, summary["info"]
    assert summary["tests"] == {"tests": 7, "failures": 1, "errors": 0, "skipped": 2}
    assert summary["bench"]["bench-map-device"]["device"] == "Fake GPU"
    assert summary["bench"]["bench-map-device"]["goals"][0]["met"] is True
    assert summary["bench"]["bench-map-device"]["checksums"] == "device"
    assert summary["bench"]["bench-map-device"]["throughput"] == [
        {
            "nbytes": 16 << 20,
            "backend": "lmdb",
            "checksums": "device",
            "evict_vs_d2h": 0.91,
            "restore_vs_h2d": 0.95,
        }
    ]
    assert "not JSON" in summary["bench"]["bench-bounce-host"]["error"]


def test_a_failing_step_is_recorded_and_the_exit_status_says_so(tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = run("--python", "/nonexistent/python", "--steps", "info,summary", str(out))
    assert r.returncode == 1
    assert steps_of(out)["info"] != 0
