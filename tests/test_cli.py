"""The ``gpubo`` command line, driven through click's CliRunner on the real device."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result

from gpubo import cli

SMALL = ["--budget", "4MiB", "--total", "16MiB", "--size", "1MiB"]


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli.main, list(args))


def stress_json(*args: str) -> tuple[Result, dict[str, Any]]:
    result = invoke("stress", *SMALL, "--json", *args)
    return result, json.loads(result.stdout)


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


def test_short_stress_passes_and_evicts() -> None:
    result, report = stress_json("--seconds", "2")
    assert result.exit_code == 0, result.output
    assert report["ok"] is True
    assert report["mismatch_count"] == 0
    assert report["mismatches"] == []
    assert report["error"] is None
    assert report["operations"] > 0
    assert report["kernels"] > 0
    assert report["stats"]["evictions"] > 0
    assert report["stats"]["restores"] > 0
    assert report["stats"]["resident_bytes"] <= report["stats"]["budget"]


def test_stress_prints_seed_summary_and_pass() -> None:
    result = invoke("stress", *SMALL, "--loops", "40", "--seed", "7")
    assert result.exit_code == 0, result.output
    assert "seed 7" in result.output
    assert "Summary" in result.output
    assert "mismatches" in result.output
    assert result.output.rstrip().endswith("PASS")


def test_same_seed_replays_the_same_run() -> None:
    runs = [stress_json("--loops", "60", "--seed", "1234")[1] for _ in range(2)]
    keys = ("operations", "kernels", "run_evictions", "run_restores", "written_bytes", "stats")
    assert [runs[0][k] for k in keys] == [runs[1][k] for k in keys]


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


def test_a_corrupted_bo_is_reported_and_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """Corrupt one word behind the model's back: the run must name BO, offset, expected and found."""
    rewrite = cli.PatternSet.rewrite

    def corrupting_rewrite(self: cli.PatternSet, index: int, seed: int) -> None:
        rewrite(self, index, seed)
        self.bos[index].write(np.array([0xDEADBEEF], np.uint32), offset=12)

    monkeypatch.setattr(cli.PatternSet, "rewrite", corrupting_rewrite)
    result, report = stress_json("--loops", "30", "--seed", "3")
    assert result.exit_code == 1
    assert report["ok"] is False
    assert report["mismatch_count"] > 0
    first = report["mismatches"][0]
    assert first["offset"] == 12
    assert first["bad_words"] == 1
    assert first["expected"] != first["found"]
    assert "MISMATCHES" in result.stderr


def test_store_too_small_is_an_error_not_a_crash() -> None:
    result = invoke("stress", *SMALL, "--loops", "5", "--store-size", "8MiB")
    assert result.exit_code == 3
    assert "StoreFull" in result.output


def test_python_dash_m_gpubo() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gpubo", "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "stress" in proc.stdout
    assert "info" in proc.stdout
