"""The backend's waits on the real PoCL device: ``wait_copies`` (and every
blocking copy: ``OpenCLBackend._await``, which flushes, spins on the
events' status for up to ``SPIN_S``, then blocks) and ``wait`` (blocks at
once). Every copy and kernel they return from is complete, also past the
spin bound, and ``benchmarks/wait_latency.py`` reports what it measured."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyopencl as cl
import pytest
from conftest import SLOW_SRC

from gpubo.backends.opencl import SPIN_S, OpenCLBackend

MiB = 1 << 20


@pytest.mark.parametrize("how", ["wait", "wait_copies"])
def test_a_kernel_longer_than_the_spin_is_complete_when_wait_returns(how: str) -> None:
    backend = OpenCLBackend()
    kernel = cl.Kernel(cl.Program(backend.context, SLOW_SRC).build(), "slow")
    items, iters = 1024, 1 << 14
    buf = backend.allocate(4 * items, kernel_queue=True)
    backend.finish()
    start = time.perf_counter()
    event = backend.launch(kernel, (items,), None, [buf, np.uint32(iters)], None)
    getattr(backend, how)([event])
    took = time.perf_counter() - start
    assert event.command_execution_status == cl.command_execution_status.COMPLETE
    assert took > SPIN_S, f"the kernel took {took * 1e6:.0f} us: lengthen it, it must outlast the spin"
    want = np.arange(items, dtype=np.uint32)
    with np.errstate(over="ignore"):
        for _ in range(iters):
            want = want * np.uint32(1664525) + np.uint32(1013904223)
    got = np.empty(items, np.uint32)
    backend.download(buf, got, 0)
    assert np.array_equal(got, want)
    backend.release(buf)


def test_copies_of_every_size_are_byte_exact_once_they_return() -> None:
    """Small copies end inside the spin, 64 MiB ones after it (blocking)."""
    backend = OpenCLBackend()
    rng = np.random.default_rng(7)
    for nbytes in (1, 4096, MiB + 3, 64 * MiB):
        data = rng.integers(0, 256, nbytes, dtype=np.uint8)
        buf = backend.allocate(nbytes, kernel_queue=True, zero=False)
        backend.upload(buf, data, 0)
        back = np.empty_like(data)
        backend.download(buf, back, 0)
        assert np.array_equal(back, data)
        with backend.map_read(buf, nbytes) as view:
            assert np.array_equal(np.frombuffer(view, np.uint8), data)
        fresh = backend.allocate(nbytes, zero=False)
        with backend.map_write(fresh, nbytes) as view:
            np.frombuffer(view, np.uint8)[:] = data[::-1]
        backend.download(fresh, back, 0)
        assert np.array_equal(back, data[::-1])
        backend.zero(fresh, nbytes)
        backend.download(fresh, back, 0)
        assert not back.any()
        backend.release(buf)
        backend.release(fresh)


def test_wait_latency_quick_runs_and_its_ratios_follow_from_its_samples() -> None:
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [
            sys.executable,
            str(root / "benchmarks" / "wait_latency.py"),
            "--reps", "6", "--warmup", "1", "--sizes", "4096,65536", "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    assert out["spin_s"] == SPIN_S
    assert set(out["sizes"]) == {"4096", "65536"}
    for row in out["sizes"].values():
        for kind in ("D2H", "H2D", "map"):
            p50 = {}
            for side in ("blocking", "gpubo"):
                case = row[f"{kind}, {side}"]
                assert len(case["samples_s"]) == 6 and min(case["samples_s"]) > 0
                assert math.isclose(case["p50_us"], statistics.median(case["samples_s"]) * 1e6)
                assert math.isclose(case["min_us"], min(case["samples_s"]) * 1e6)
                p50[side] = case["p50_us"]
            want = p50["blocking"] / p50["gpubo"]
            assert math.isclose(row[f"{kind}, blocking / gpubo"]["p50_ratio"], want)
