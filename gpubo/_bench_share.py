"""``gpubo bench`` section 7: the device share (:mod:`gpubo._share`).

* ``request``: the latency of an allocation whose room comes from another
  process (a member that holds the whole share evicts one BO on request:
  the request's round trip, that member's eviction, the ledger updates)
  against an allocation whose room comes from evicting one of the
  process's own BOs (no share), the same BO size; the two alternate, the
  order swapping each rep; p50 and p99 of each, and their difference (what
  the request adds).
* ``contention``: the stress workload (``gpubo stress``: verified reads and
  writes, kernel launches) with one working set on one budget, run as 4
  processes on one share, as 4 processes splitting the budget, and as one
  process with 4 threads; operations per second of each, and the ratios
  to one process. The runs rotate.
* ``uneven``: one busy process beside 3 idle ones, on one share against a
  split budget: what a share is for.

Run as ``python -m gpubo._bench_share NAME COUNT SIZE`` it is the member
process of ``request``: it joins share NAME with COUNT dirty BOs of SIZE
(the whole budget), says ``ready``, and sleeps until its stdin closes.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np

import gpubo
from gpubo.stress import StressConfig, run_stress

__all__ = ["bench_contention", "bench_request", "bench_share", "bench_uneven"]

MiB = 1 << 20


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _member(name: str, count: int, nbytes: int, budget: int | None = None) -> subprocess.Popen[str]:
    budget = count * nbytes if budget is None else budget
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpubo._bench_share", name, str(count), str(nbytes), str(budget)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != "ready":
        proc.kill()
        proc.wait()
        raise RuntimeError(f"the share bench's member process did not start (it said {line!r})")
    return proc


def bench_request(nbytes: int, reps: int, warmup: int) -> dict[str, Any]:
    """Allocation latency with the room made by another member of a share
    against one made by an eviction of the process's own (see the module
    docstring); milliseconds. For one request per allocation, ``nbytes``
    must be at least the share's request step (1 MiB while ``reps +
    warmup`` is at most 64): a smaller BO is asked for a step at a time.

    Raises:
        ValueError: ``nbytes`` is below the step.
    """
    count = reps + warmup
    step = max(MiB, min(count * nbytes // 64, 64 * MiB))
    if nbytes < step:
        raise ValueError(f"bench_request: {nbytes} bytes is below the request step {step}")
    budget = count * nbytes
    store_size = max(64 * MiB, 4 * budget)
    name = f"bench-{os.getpid()}-{nbytes}"
    member = _member(name, count, nbytes)
    try:
        with (
            gpubo.Manager(budget=budget, share=name, store_size=store_size) as shared,
            gpubo.Manager(budget=budget, store_size=store_size) as local,
        ):
            for _ in range(count):  # the local side holds its whole budget too, dirty
                local.alloc(nbytes).write(np.ones(16, np.uint8))
            held = []
            times: dict[str, list[float]] = {"cross": [], "local": []}
            sides = [("cross", shared), ("local", local)]
            for rep in range(count):
                for label, m in sides if rep % 2 == 0 else sides[::-1]:
                    start = time.perf_counter()
                    held.append(m.alloc(nbytes))
                    elapsed = time.perf_counter() - start
                    if rep >= warmup:
                        times[label].append(elapsed * 1e3)
            served = {r.pid: r.requests_served for r in shared.share_stats()}[member.pid]
            evicted_local = local.stats().evictions
    finally:
        assert member.stdin is not None
        member.stdin.close()
        member.wait(timeout=60)
    out: dict[str, Any] = {
        "nbytes": nbytes,
        "reps": reps,
        "requests_served": served,
        "local_evictions": evicted_local,
    }
    for label, samples in times.items():
        out[label] = {
            "p50_ms": statistics.median(samples),
            "p99_ms": _percentile(samples, 0.99),
            "samples_ms": samples,
        }
    out["added_p50_ms"] = out["cross"]["p50_ms"] - out["local"]["p50_ms"]
    return out


def bench_contention(seconds: float, reps: int, budget: int = 16 * MiB) -> dict[str, Any]:
    """The stress workload on one budget as 4 share members, 4 split
    processes and one 4-thread process (see the module docstring)."""
    base = StressConfig(
        budget_bytes=budget,
        total_bytes=2 * budget,
        min_nbytes=256 << 10,
        max_nbytes=256 << 10,
        seconds=seconds,
        loops=None,
        seed=1,
        store_size_bytes=8 * budget,
        progress_s=0.25,
    )
    shapes: dict[str, dict[str, Any]] = {
        "shared_4": {"processes": 4, "share": f"bench-{os.getpid()}-contention"},
        "split_4": {"processes": 4},
        "one_process": {"threads": 4},
    }
    samples: dict[str, list[float]] = {k: [] for k in shapes}
    mismatches = 0
    order = list(shapes)
    for rep in range(reps):
        for label in order[rep % len(order) :] + order[: rep % len(order)]:
            config = dataclasses.replace(base, **shapes[label])
            report = run_stress(config)
            if not report.ok:
                raise RuntimeError(
                    f"share bench: the {label} stress run failed: {report.error or 'a check failed'}"
                )
            mismatches += report.mismatch_count
            samples[label].append(report.operations / report.run_s)
    out: dict[str, Any] = {
        "budget_bytes": budget,
        "total_bytes": 2 * budget,
        "bo_bytes": 256 << 10,
        "seconds": seconds,
        "reps": reps,
        "mismatches": mismatches,
    }
    for label, values in samples.items():
        out[label] = {"ops_per_s": statistics.median(values), "samples_ops_per_s": values}
    one = out["one_process"]["ops_per_s"]
    out["shared_vs_one"] = out["shared_4"]["ops_per_s"] / one
    out["split_vs_one"] = out["split_4"]["ops_per_s"] / one
    return out


def bench_uneven(seconds: float, reps: int, budget: int = 16 * MiB) -> dict[str, Any]:
    """One busy process (the stress workload, a working set of half the
    budget) beside 3 idle ones that each filled a quarter of it: on one
    share (the idle ones give their memory up on request) against a split
    budget (a quarter each: the busy one thrashes); its operations/s."""
    bo = 256 << 10
    base = StressConfig(
        budget_bytes=budget // 4,
        total_bytes=budget // 2,
        min_nbytes=bo,
        max_nbytes=bo,
        seconds=seconds,
        loops=None,
        seed=2,
        store_size_bytes=8 * budget,
    )
    samples: dict[str, list[float]] = {"shared": [], "split": []}
    evictions: dict[str, list[int]] = {"shared": [], "split": []}
    for rep in range(reps):
        for label in ("shared", "split") if rep % 2 == 0 else ("split", "shared"):
            if label == "split":
                report = run_stress(base)
            else:
                name = f"bench-{os.getpid()}-uneven-{rep}"
                idle = [_member(name, budget // 4 // bo, bo, budget) for _ in range(3)]
                try:
                    report = run_stress(dataclasses.replace(base, budget_bytes=budget, share=name))
                finally:
                    for p in idle:
                        assert p.stdin is not None
                        p.stdin.close()
                        p.wait(timeout=60)
            if not report.ok:
                raise RuntimeError(
                    f"share bench: the uneven {label} run failed: {report.error or 'a check failed'}"
                )
            samples[label].append(report.operations / report.run_s)
            evictions[label].append(report.run_evictions)
    out: dict[str, Any] = {
        "budget_bytes": budget,
        "working_set_bytes": budget // 2,
        "bo_bytes": bo,
        "reps": reps,
    }
    for label, values in samples.items():
        out[label] = {
            "ops_per_s": statistics.median(values),
            "samples_ops_per_s": values,
            "run_evictions": statistics.median(evictions[label]),
            "samples_run_evictions": evictions[label],
        }
    out["shared_vs_split"] = out["shared"]["ops_per_s"] / out["split"]["ops_per_s"]
    return out


def bench_share(
    sizes: list[int], reps: int, warmup: int, seconds: float, contention_reps: int
) -> dict[str, Any]:
    return {
        "request": [bench_request(n, reps, warmup) for n in sizes],
        "contention": bench_contention(seconds, contention_reps),
        "uneven": bench_uneven(seconds, contention_reps),
    }


def _member_main(argv: list[str]) -> None:
    name, count, nbytes, budget = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    with gpubo.Manager(budget=budget, share=name, store_size=max(64 * MiB, 4 * count * nbytes)) as m:
        for _ in range(count):
            m.alloc(nbytes).write(np.ones(16, np.uint8))  # dirty: giving one up copies it out
        sys.stdout.write("ready\n")  # the protocol of this entry point with its parent, not a log
        sys.stdout.flush()
        sys.stdin.read()


if __name__ == "__main__":
    _member_main(sys.argv[1:])
