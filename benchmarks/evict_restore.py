"""Eviction and restore throughput of gpubo, side by side with raw OpenCL copies.

For each BO size, in one run and interleaved rep by rep (so drift hits every
column alike), this measures:

* raw D2H / H2D: a blocking ``enqueue_copy`` between a device buffer and a
  preallocated, already-touched numpy array of the same size;
* evict: ``bo.evict()`` of a resident, written BO (only that call is timed);
* restore: ``bo.restore()`` of the swapped BO while the manager's pool holds
  a device buffer of that size (the steady state under pressure, where the
  victim's buffer is recycled);

once with checksums on and once with them off. Reported: the median of
``--reps`` timed reps after ``--warmup`` untimed ones, as GB/s (10**9
bytes per second) and as a ratio to the raw copy in the same direction
(evict vs D2H, restore vs H2D). Also reported: the very first evict (the
store's mmap pages are first-touch faulted then) and a restore that must
allocate a fresh device buffer (no pooled one).

Usage:
    python benchmarks/evict_restore.py [--sizes 4MiB,64MiB] [--reps 7] [--warmup 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyopencl as cl

import gpubo
from gpubo import BufferObject, Manager, State
from gpubo.backends import OpenCLBackend

#: Restores that allocate a fresh device buffer are slow; a few are enough.
FRESH_BUFFER_REPS = 3


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@dataclass
class Series:
    """Timings (seconds) of one operation on ``nbytes``; the first ``warmup`` are not counted."""

    nbytes: int
    warmup: int
    samples_s: list[float] = field(default_factory=list)

    @property
    def steady_s(self) -> list[float]:
        return self.samples_s[self.warmup :]

    @property
    def median_s(self) -> float:
        return statistics.median(self.steady_s)

    @property
    def gbps(self) -> float:
        return self.nbytes / self.median_s / 1e9

    @property
    def first_gbps(self) -> float:
        return self.nbytes / self.samples_s[0] / 1e9

    def to_json(self) -> dict[str, Any]:
        return {
            "median_gbps": self.gbps,
            "median_s": self.median_s,
            "first_gbps": self.first_gbps,
            "samples_s": self.samples_s,
            "warmup": self.warmup,
        }


class RawCopy:
    """Raw blocking ``enqueue_copy`` both ways between a device buffer and a host array."""

    def __init__(self, context: cl.Context, queue: cl.CommandQueue, nbytes: int) -> None:
        self.queue = queue
        self.host = np.full(nbytes, 0x5A, np.uint8)  # touched: no page faults in the timing
        self.buf = cl.Buffer(context, cl.mem_flags.READ_WRITE, nbytes)
        cl.enqueue_copy(queue, self.buf, self.host, is_blocking=True)

    def d2h(self) -> None:
        cl.enqueue_copy(self.queue, self.host, self.buf, is_blocking=True)

    def h2d(self) -> None:
        cl.enqueue_copy(self.queue, self.buf, self.host, is_blocking=True)

    def release(self) -> None:
        self.buf.release()


class GpuboCase:
    """One manager and one written BO, evicted and restored over and over."""

    def __init__(self, nbytes: int, checksums: bool, device: cl.Context) -> None:
        self.nbytes = nbytes
        # Room for the BO and a pooled buffer; a store that holds a few entries.
        self.mgr = Manager(4 * nbytes, store_size=8 * nbytes + (64 << 20), device=device, checksums=checksums)
        self.bo: BufferObject = self.mgr.alloc(nbytes, name="bench")
        self.expected = np.arange(nbytes // 4, dtype=np.uint32)
        self.bo.write(self.expected)

    def evict(self) -> float:
        assert self.bo.state is State.RESIDENT
        return timed(self.bo.evict)

    def restore(self, pooled: bool) -> float:
        """Time ``bo.restore()`` with a pooled device buffer of the BO's size, or with none.

        Whether ``bo.evict()`` pools the BO's buffer is the manager's policy;
        this sets up the pool either way, outside the timing.
        """
        assert self.bo.state is State.SWAPPED
        if not pooled:
            self.mgr.evict(self.nbytes)  # drains the pool: the restore must allocate
        elif self.mgr.stats().pooled_bytes < self.nbytes:
            self.mgr.alloc(self.nbytes).free()  # a freed BO's buffer stays pooled for reuse
        return timed(self.bo.restore)

    def check(self) -> None:
        if not np.array_equal(self.bo.read(np.uint32), self.expected):
            raise SystemExit(f"bytes changed after evict/restore of {self.nbytes} bytes: benchmark invalid")

    def close(self) -> None:
        self.mgr.close()


def bench_size(nbytes: int, reps: int, warmup: int, context: cl.Context) -> dict[str, Any]:
    """All measurements for one BO size, interleaved rep by rep."""
    queue = cl.CommandQueue(context)
    raw = RawCopy(context, queue, nbytes)
    cases = {on: GpuboCase(nbytes, on, context) for on in (True, False)}
    d2h, h2d = Series(nbytes, warmup), Series(nbytes, warmup)
    evict = {on: Series(nbytes, warmup) for on in cases}
    restore = {on: Series(nbytes, warmup) for on in cases}
    fresh = {on: Series(nbytes, 0) for on in cases}
    try:
        for _ in range(warmup + reps):
            d2h.samples_s.append(timed(raw.d2h))
            h2d.samples_s.append(timed(raw.h2d))
            for on, case in cases.items():
                evict[on].samples_s.append(case.evict())
                restore[on].samples_s.append(case.restore(pooled=True))
        for on, case in cases.items():
            for _ in range(FRESH_BUFFER_REPS):
                case.evict()
                fresh[on].samples_s.append(case.restore(pooled=False))
            case.check()
    finally:
        raw.release()
        for case in cases.values():
            case.close()
    return {
        "nbytes": nbytes,
        "raw_d2h": d2h.to_json(),
        "raw_h2d": h2d.to_json(),
        "gpubo": [
            {
                "checksums": on,
                "evict": evict[on].to_json(),
                "restore": restore[on].to_json(),
                "restore_fresh_buffer": fresh[on].to_json(),
                "evict_vs_d2h": evict[on].gbps / d2h.gbps,
                "restore_vs_h2d": restore[on].gbps / h2d.gbps,
            }
            for on in cases
        ],
    }


def machine(context: cl.Context) -> dict[str, Any]:
    dev = context.devices[0]
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "device": dev.name.strip(),
        "platform": dev.platform.name,
        "device_version": dev.version,
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "pyopencl": cl.VERSION_TEXT,
        "gpubo": gpubo.__version__,
    }


def table(results: list[dict[str, Any]]) -> str:
    headers = [
        "size", "checksums", "raw D2H", "evict", "evict/D2H", "raw H2D", "restore", "restore/H2D",
        "1st evict", "restore, fresh buf",
    ]  # fmt: skip
    rows = []
    for r in results:
        for g in r["gpubo"]:
            rows.append(
                [
                    gpubo.format_bytes(r["nbytes"]),
                    "on" if g["checksums"] else "off",
                    f"{r['raw_d2h']['median_gbps']:.2f}",
                    f"{g['evict']['median_gbps']:.2f}",
                    f"{g['evict_vs_d2h']:.2f}x",
                    f"{r['raw_h2d']['median_gbps']:.2f}",
                    f"{g['restore']['median_gbps']:.2f}",
                    f"{g['restore_vs_h2d']:.2f}x",
                    f"{g['evict']['first_gbps']:.2f}",
                    f"{g['restore_fresh_buffer']['median_gbps']:.2f}",
                ]
            )
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=True)]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(row, widths, strict=True)) for row in [headers, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [gpubo.parse_bytes(part.strip(), "size") for part in text.split(",") if part.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not sizes or any(s <= 0 or s % 4 for s in sizes):
        raise argparse.ArgumentTypeError("give positive sizes that are multiples of 4 bytes")
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=parse_sizes, default=[4 << 20, 64 << 20], help="e.g. 4MiB,64MiB")
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repetitions first")
    parser.add_argument("--json", action="store_true", help="print only the JSON results")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.warmup < 0:
        parser.error("--reps must be >= 1 and --warmup >= 0")

    probe = OpenCLBackend(None)  # the device Manager(device=None) picks
    context = probe.context
    info = machine(context)
    if not args.json:
        print(f"gpubo {info['gpubo']} evict/restore benchmark on {info['device']} ({info['platform']})")
        print(f"host: {info['cpu']}, {info['cpus']} CPUs; pyopencl {info['pyopencl']}")
        print(f"median of {args.reps} reps after {args.warmup} warm-up; GB/s = 10^9 bytes/s", flush=True)
    results = [bench_size(n, args.reps, args.warmup, context) for n in args.sizes]
    blob = {"machine": info, "reps": args.reps, "warmup": args.warmup, "results": results}
    if not args.json:
        print()
        print(table(results))
        print()
        print("evict/D2H and restore/H2D: gpubo throughput over the raw copy (goal >= 0.85x).")
        print("1st evict: the very first eviction into a fresh store (mmap pages faulted in).")
        print("restore, fresh buf: a restore with no pooled device buffer (allocates and zero-fills).")
        print()
    print(json.dumps(blob, separators=(",", ":")) if not args.json else json.dumps(blob, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
