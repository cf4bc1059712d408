"""The ``gpubo`` command line, driven through click's CliRunner on the real device."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result

from gpubo import cli, stress
from gpubo.stress import Sample, StressConfig

MiB = 1 << 20
SMALL = ["--budget", "4MiB", "--total", "16MiB", "--size", "1MiB"]


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli.main, list(args))


def stress_json(*args: str, small: bool = True) -> tuple[Result, dict[str, Any]]:
    result = invoke("stress", *(SMALL if small else []), "--json", *args)
    try:
        return result, json.loads(result.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"no JSON on stdout (exit {result.exit_code}):\n{result.output}")


def assert_clean(report: dict[str, Any]) -> None:
    """Every check of a stress report passed, and the run really swapped."""
    assert report["ok"] is True, report
    assert report["error"] is None
    assert report["mismatch_count"] == 0 and report["mismatches"] == []
    assert report["leaks"] == []
    assert report["budget_violations"] == 0
    assert report["swept"] is True
    assert report["stats"]["evictions"] > 0 and report["stats"]["restores"] > 0
    assert report["stats"]["resident_bytes"] + report["stats"]["pooled_bytes"] <= report["stats"]["budget"]
    for sample in report["timeline"]:
        assert sample["resident_bytes"] + sample["pooled_bytes"] <= sample["budget_bytes"], sample


# -- gpubo info -------------------------------------------------------------------------


def test_info_lists_the_default_device() -> None:
    result = invoke("info")
    assert result.exit_code == 0, result.output
    assert "OpenCL devices" in result.output
    assert "default device" in result.output


def test_info_json_parses() -> None:
    result = invoke("info", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["devices"], "no OpenCL device listed"
    assert sum(dev["default"] for dev in info["devices"]) == 1
    assert info["default"]["global_mem_bytes"] > 0
    assert info["default"]["max_alloc_bytes"] > 0
    assert info["error"] is None


# -- gpubo stress: runs -------------------------------------------------------------------


def test_short_stress_passes_and_evicts() -> None:
    result, report = stress_json("--seconds", "1")
    assert result.exit_code == 0, result.output
    assert_clean(report)
    assert report["operations"] > 0
    assert report["kernels"] > 0
    assert report["verified_bytes"] > 0  # --verify is the default
    assert report["swept_bytes"] == 16 * MiB
    assert report["restoring_uses"] > 0
    assert 0 < report["restore_latency_p50_ms"] <= report["restore_latency_p99_ms"]
    assert report["timeline"], "no progress samples"


def test_stress_prints_seed_summary_and_pass() -> None:
    result = invoke("stress", *SMALL, "--loops", "40", "--seed", "7")
    assert result.exit_code == 0, result.output
    assert "seed 7" in result.output
    assert "Summary" in result.output
    for row in ("operations", "evicted", "restored", "swap throughput", "restore latency", "mismatches"):
        assert row in result.output
    assert "verify result       PASS" in result.output
    assert result.output.rstrip().endswith("PASS")


def test_progress_is_off_when_not_a_terminal() -> None:
    result = invoke("stress", *SMALL, "--loops", "20", "--seed", "7")
    assert result.exit_code == 0, result.output
    assert "\r" not in result.output
    assert "evict/s" not in result.output


def test_readme_stress_options_still_work() -> None:
    """The README's command (CI runs it for 10 s); here for a few operations."""
    result, report = stress_json(
        "--budget", "64MiB", "--total", "256MiB", "--size", "4MiB", "--loops", "30", small=False
    )
    assert result.exit_code == 0, result.output
    assert_clean(report)
    assert report["bo_count"] == 64


def test_same_seed_replays_the_same_run() -> None:
    runs = [stress_json("--loops", "60", "--seed", "1234")[1] for _ in range(2)]
    keys = ("operations", "kernels", "run_evictions", "run_restores", "written_bytes", "stats")
    assert [runs[0][k] for k in keys] == [runs[1][k] for k in keys]


def test_same_seed_replays_random_sizes() -> None:
    args = ["--budget", "4MiB", "--random", "--max-size", "1MiB", "--loops", "40", "--seed", "99"]
    runs = [stress_json(*args, small=False)[1] for _ in range(2)]
    keys = ("bo_count", "allocated_bytes", "operations", "run_evictions", "run_restores", "stats")
    assert [runs[0][k] for k in keys] == [runs[1][k] for k in keys]


def test_default_working_set_is_one_and_a_half_budgets() -> None:
    result, report = stress_json("--budget", "4MiB", "--size", "512KiB", "--loops", "20", small=False)
    assert result.exit_code == 0, result.output
    assert report["allocated_bytes"] == 6 * MiB


@pytest.mark.parametrize(
    ("args", "allocated"), [(["--heavy"], 12 * MiB), (["--oversubscribe", "2"], 8 * MiB)]
)
def test_heavy_and_oversubscribe(args: list[str], allocated: int) -> None:
    result, report = stress_json("--budget", "4MiB", "--size", "512KiB", "--loops", "30", *args, small=False)
    assert result.exit_code == 0, result.output
    assert_clean(report)
    assert report["allocated_bytes"] == allocated


def test_count_sets_the_number_of_bos() -> None:
    result, report = stress_json(
        "--budget", "2MiB", "--size", "1MiB", "--count", "5", "--loops", "20", small=False
    )
    assert result.exit_code == 0, result.output
    assert report["bo_count"] == 5 and report["allocated_bytes"] == 5 * MiB


def test_random_sizes_stay_in_range() -> None:
    result, report = stress_json(
        "--budget",
        "4MiB",
        "--random",
        "--min-size",
        "8KiB",
        "--max-size",
        "1MiB",
        "--loops",
        "40",
        small=False,
    )
    assert result.exit_code == 0, result.output
    assert_clean(report)
    assert report["allocated_bytes"] >= 6 * MiB  # at least the 1.5x asked for
    assert report["bo_count"] > 6  # sizes below 1MiB: more BOs than the bytes suggest


def test_multi_launches_use_several_bos() -> None:
    result, report = stress_json("--multi", "--kernel-every", "1", "--loops", "40")
    assert result.exit_code == 0, result.output
    assert_clean(report)
    assert report["multi_launches"] > 0
    assert report["uses"] > report["operations"]


def test_no_verify_still_sweeps() -> None:
    result, report = stress_json("--no-verify", "--loops", "40")
    assert result.exit_code == 0, result.output
    assert_clean(report)
    assert report["verified_bytes"] == 0
    assert report["swept_bytes"] == 16 * MiB


def test_parallel_threads_share_one_manager() -> None:
    result, report = stress_json("--parallel", "3", "--seconds", "1")
    assert result.exit_code == 0, result.output
    assert_clean(report)
    assert report["config"]["threads"] == 3
    assert report["stats"]["bo_count"] == 16


def test_processes_split_the_budget() -> None:
    result, report = stress_json("--processes", "2", "--seconds", "1")
    assert result.exit_code == 0, result.output
    assert_clean(report)
    assert report["stats"]["budget"] == 4 * MiB  # two managers of 2 MiB
    assert report["bo_count"] == 16
    assert "2 processes" in result.stderr


def test_a_corrupted_bo_is_reported_and_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """Corrupt one word behind the model's back: the run must name BO, offset, expected and found."""
    step = stress._Worker.step

    def corrupting_step(self: stress._Worker) -> None:
        step(self)
        self.bos[0].write(np.array([0xDEADBEEF], np.uint32), offset=12)

    monkeypatch.setattr(stress._Worker, "step", corrupting_step)
    result, report = stress_json("--loops", "30", "--seed", "3")
    assert result.exit_code == 1
    assert report["ok"] is False
    assert report["mismatch_count"] > 0
    first = report["mismatches"][0]
    assert first["bo"].startswith("'p0.t0.bo0'")
    assert first["offset"] == 12
    assert first["bad_words"] == 1
    assert first["found"] == 0xDEADBEEF != first["expected"]
    assert "MISMATCHES" in result.stderr
    assert "0xdeadbeef" in result.stderr


# -- gpubo stress: bad usage and failures ----------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value"),
    [("--budget", "lots"), ("--budget", "64XB"), ("--budget", "0"), ("--total", "-1MiB"), ("--size", "6")],
)
def test_bad_size_is_a_usage_error_naming_the_option(option: str, value: str) -> None:
    result = invoke("stress", option, value)
    assert result.exit_code == 2
    assert option in result.output
    assert "Traceback" not in result.output


def test_bo_larger_than_budget_is_a_usage_error() -> None:
    result = invoke("stress", "--budget", "1MiB", "--size", "2MiB", "--total", "8MiB")
    assert result.exit_code == 2
    assert "--size" in result.output


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--total", "8MiB", "--oversubscribe", "2"], "--total and --oversubscribe"),
        (["--heavy", "--count", "3"], "--heavy and --count"),
        (["--random", "--size", "1MiB"], "--size"),
        (["--min-size", "8KiB"], "--random"),
        (["--random", "--min-size", "2MiB", "--max-size", "1MiB"], "--min-size"),
        (["--random", "--max-size", "8MiB"], "--max-size"),
        (["--parallel", "8", "--size", "1MiB"], "8 threads"),
        (["--processes", "8", "--size", "1MiB"], "per process"),
        (["--multi", "--size", "3MiB"], "multi"),
    ],
)
def test_options_that_do_not_go_together(args: list[str], needle: str) -> None:
    result = invoke("stress", "--budget", "4MiB", *args)
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert "Traceback" not in result.output


def test_store_too_small_is_an_error_not_a_crash() -> None:
    result = invoke("stress", *SMALL, "--loops", "5", "--store-size", "8MiB")
    assert result.exit_code == 3
    assert "StoreFull" in result.output
    assert "Traceback" not in result.output


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` sees when it is missing
    result = invoke("stress", *SMALL, "--loops", "5", "--plot", "out.png")
    assert result.exit_code == 2
    assert "gpubo[plot]" in result.output
    assert "seed" not in result.output  # refused before the run


def test_plot_writes_a_png(tmp_path: Any) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "run.png"
    result = invoke("stress", *SMALL, "--seconds", "1", "--plot", str(path))
    assert result.exit_code == 0, result.output
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000


# -- the live progress line (a pure function of the samples) -----------------------------


def _sample(t: float, **kw: Any) -> Sample:
    base = dict(
        elapsed_s=t,
        run_s=t,
        phase="run",
        operations=int(100 * t),
        mismatches=0,
        budget_bytes=64 * MiB,
        resident_bytes=64 * MiB,
        pooled_bytes=0,
        swapped_bytes=192 * MiB,
        evictions=int(50 * t),
        restores=int(50 * t),
        bytes_evicted=int(50 * t) * 4 * MiB,
        bytes_restored=int(50 * t) * 4 * MiB,
    )
    base.update(kw)
    return Sample(**base)  # type: ignore[arg-type]


def test_progress_text_shows_live_figures() -> None:
    config = StressConfig(64 * MiB, 256 * MiB, 4 * MiB, 4 * MiB, seconds=10.0, loops=None, seed=1)
    text = cli._progress_text(_sample(5.0), [_sample(4.0)], config)
    assert text.startswith("[#####-----]  50%")
    assert "resident 64.0MiB/64.0MiB" in text
    assert "swapped 192.0MiB" in text
    assert "50 evict/s" in text
    assert "0.42 GB/s" in text  # 100 x 4 MiB moved in one second
    setup = cli._progress_text(_sample(0.5, phase="setup", run_s=0.0), [], config)
    assert setup.startswith("[----------] setup")


# -- gpubo selftest ---------------------------------------------------------------------


def test_selftest_runs_checks_and_passes() -> None:
    result = invoke("selftest", "--check", "basic", "--check", "budget-smaller-than-bo")
    assert result.exit_code == 0, result.output
    assert "PASS  basic" in result.output
    assert "PASS  budget-smaller-than-bo" in result.output
    assert "2 of 2 checks passed" in result.output


def test_selftest_json_and_store_dir(tmp_path: Any) -> None:
    result = invoke("selftest", "--check", "store-full", "--store-dir", str(tmp_path), "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["ok"] is True
    assert [c["name"] for c in payload["checks"]] == ["store-full"]
    assert list(tmp_path.iterdir()) == []  # its store was removed


def test_selftest_failure_is_reported_and_exits_non_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(env: Any) -> str:
        raise stress.CheckFailed("the bytes came back wrong")

    monkeypatch.setitem(stress.SELFTEST_CHECKS, "basic", broken)
    result = invoke("selftest", "--check", "basic", "--check", "budget-smaller-than-bo")
    assert result.exit_code == 1
    assert "FAIL  basic" in result.output
    assert "the bytes came back wrong" in result.output
    assert "PASS  budget-smaller-than-bo" in result.output  # the others still run


def test_python_dash_m_gpubo() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gpubo", "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    for command in ("stress", "info", "selftest"):
        assert command in proc.stdout
