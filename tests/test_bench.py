"""``gpubo bench --quick --json`` runs and reports every section (no timing assertions)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from gpubo.cli import main

SECTIONS = (
    "machine", "config", "limit", "throughput", "batched", "staged", "zict", "bookkeeping", "gemm", "overlap",
    "goals",
)  # fmt: skip


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def results() -> dict:
    result = CliRunner().invoke(main, ["bench", "--quick", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_every_section_is_there(results: dict) -> None:
    for name in SECTIONS:
        assert name in results, name
    assert results["elapsed_s"] > 0


def test_limit_and_throughput_are_positive(results: dict) -> None:
    assert results["limit"] and results["throughput"]
    for row in results["limit"]:
        for name in ("d2h", "h2d", "write", "write_fdatasync"):
            assert _positive(row[name]["median_gbps"]), (row["nbytes"], name)
    for row in results["throughput"]:
        assert row["cases"]
        for case in row["cases"]:
            for name in ("evict", "restore"):
                assert _positive(case[name]["median_gbps"]), (row["nbytes"], name)
            assert _positive(case["evict_vs_d2h"]["of_medians"])
            assert _positive(case["evict_vs_write"])
            assert _positive(case["restore_vs_h2d"]["of_medians"])
            assert _positive(case["evictions_per_s"])


def test_batched_section(results: dict) -> None:
    rows = results["batched"]
    assert rows and {r["backend"] for r in rows} == {"lmdb", "slotfile"}
    for row in rows:
        assert row["count"] * row["nbytes"] == row["total_bytes"]
        # The budget starts full: the first BO goes alone, then batches grow.
        assert row["batches_per_evict"] >= 2, row
        assert row["restore_batches_per_prefetch"] >= 1, row
        for name in (
            "batched_evictions_per_s", "singles_evictions_per_s", "batched_vs_raw_one",
            "prefetch_restores_per_s", "singles_restores_per_s", "prefetch_vs_raw_h2d_each",
        ):  # fmt: skip
            assert _positive(row[name]), name
    assert any(g["goal"].startswith("4 KiB evictions per second, batched") for g in results["goals"])


def test_staged_section(results: dict) -> None:
    staged = results["staged"]
    for path in ("direct", "staged"):
        assert _positive(staged[path]["gbps"])
        assert staged[path]["tracemalloc_peak_bytes"] >= 0
    assert _positive(staged["direct_vs_staged"])
    # The staged path allocates a host array of each BO; the direct one does not.
    assert staged["staged"]["tracemalloc_peak_bytes"] >= staged["chunk_bytes"]


def test_zict_section(results: dict) -> None:
    peer = results["zict"]
    if not peer["available"]:
        assert "zict" in peer["reason"]
        pytest.skip("zict is not installed")
    for name in ("zict_round_trip_s", "gpubo_round_trip_s", "gpubo_vs_zict"):
        assert _positive(peer[name]), name


def test_bookkeeping_section(results: dict) -> None:
    rows = results["bookkeeping"]
    assert [r["bos"] for r in rows] == sorted(r["bos"] for r in rows) and len(rows) >= 2
    for row in rows:
        assert row["live_bos"] >= row["bos"]
        assert _positive(row["read_4k_us"]) and _positive(row["evict_decision_us"])


def test_gemm_section(results: dict) -> None:
    gemm = results["gemm"]
    assert gemm["available"], gemm
    assert gemm["oversubscribed"]["multiply_evictions"] > 0
    for name in ("oversubscribed", "in_memory"):
        assert _positive(gemm[name]["multiply_s"])
    assert _positive(gemm["speed_ratio"])


def test_goals_listed(results: dict) -> None:
    assert results["goals"]
    for goal in results["goals"]:
        assert isinstance(goal["met"], bool) and goal["goal"]


def test_overlap_section(results: dict) -> None:
    o = results["overlap"]
    assert o["reps"] >= 1 and o["kernel_iters"] >= 1
    for name in ("prefetch_s", "kernel_s", "prefetch_vs_kernel"):
        assert _positive(o[name]), name
    assert len(o["prefetch_samples_s"]) == len(o["kernel_samples_s"]) == o["reps"]


def test_checksums_option_puts_the_cases_with_checksums_where_it_says(tmp_path: Path) -> None:
    """``gpubo bench --checksums device``: the cases with checksums run with
    device checksums, and each row says where its manager computed them."""
    from gpubo import bench
    from gpubo.backends import OpenCLBackend

    cfg = bench.config(quick=True, checksums="device")
    assert {k.checksums_label for k in cfg.cases} == {"off", "device"}
    context = OpenCLBackend(None).context
    keys = [bench.CaseKey("lmdb", "lazy", False), bench.CaseKey("slotfile", "lazy", "device")]
    out = bench.bench_throughput(context, str(tmp_path), 2 << 20, keys, reps=1, warmup=0)
    assert [c["checksums_where"] for c in out["cases"]] == ["off", "device"]
    assert all(_positive(c["evict"]["median_gbps"]) for c in out["cases"])


def test_a_bad_checksums_choice_is_a_usage_error() -> None:
    result = CliRunner().invoke(main, ["bench", "--checksums", "gpu"])
    assert result.exit_code == 2
    assert "'gpu' is not one of 'auto', 'host', 'device'" in result.output
