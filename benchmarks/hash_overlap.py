"""Checksums off the critical path, against inline hashing: one process,
the two settings alternating call by call on the same BO.

- Eviction: an entry of at least ``gpubo.store.hashing.PARALLEL_HASH_MIN_BYTES``
  is hashed on a worker thread while the store copies it ("aside"), or on
  the copying thread right after each step of the copy ("inline", what
  smaller entries do).
- Restore: each lent store chunk of at least
  ``gpubo._transfer.OVERLAP_MIN_BYTES`` is hashed while the device copies
  it ("aside"), or before its copy is enqueued ("inline").

The "inline" side sets those two module constants out of reach for the
calls it times, and restores them after. Prints a table, or JSON with
``--json``; figures are medians over ``--reps`` pairs and the ratio is
aside time / inline time (below 1: the overlap saves time).

    python benchmarks/hash_overlap.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

import gpubo
import gpubo._transfer as transfer
import gpubo.store.base as store_base
from gpubo.bench import render_table

MiB = 1 << 20
_NEVER = 1 << 62


@contextlib.contextmanager
def inline() -> Iterator[None]:
    """Hash every entry inline, as before the overlap."""
    saved = store_base.PARALLEL_HASH_MIN_BYTES, transfer.OVERLAP_MIN_BYTES
    store_base.PARALLEL_HASH_MIN_BYTES = transfer.OVERLAP_MIN_BYTES = _NEVER
    try:
        yield
    finally:
        store_base.PARALLEL_HASH_MIN_BYTES, transfer.OVERLAP_MIN_BYTES = saved


def measure(nbytes: int, backend: str, reps: int, directory: str) -> dict[str, Any]:
    store = f"{directory}/{backend}-{nbytes}"
    mgr = gpubo.Manager(
        4 * nbytes, store=store, store_size=4 * nbytes + 64 * MiB, store_backend=backend, checksums="host"
    )
    try:
        expected = np.arange(nbytes // 4, dtype=np.uint32)  # no zero page
        bo = mgr.alloc(nbytes)
        bo.write(expected)
        one = expected.view(np.uint8)[:1].copy()
        samples: dict[str, list[float]] = {
            "evict_aside": [],
            "evict_inline": [],
            "restore_aside": [],
            "restore_inline": [],
        }
        for rep in range(reps + 1):  # the first pair warms up
            sides = ["aside", "inline"] if rep % 2 else ["inline", "aside"]
            for side in sides:
                with inline() if side == "inline" else contextlib.nullcontext():
                    bo.write(one, 0)  # dirty: the eviction copies
                    t = time.perf_counter()
                    bo.evict()
                    evict_s = time.perf_counter() - t
                    if mgr.stats().pooled_bytes < nbytes:
                        mgr.alloc(nbytes).free()  # a pooled buffer, as a steady run has
                    t = time.perf_counter()
                    bo.restore()
                    restore_s = time.perf_counter() - t
                if rep:
                    samples[f"evict_{side}"].append(evict_s)
                    samples[f"restore_{side}"].append(restore_s)
        if not np.array_equal(bo.read(np.uint32), expected):
            raise SystemExit(f"{backend} {nbytes}: bytes changed: benchmark invalid")
    finally:
        mgr.close()
        shutil.rmtree(store, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "nbytes": nbytes,
        "backend": backend,
        "reps": reps,
        "samples_s": samples,
        "median_us": {k: v * 1e6 for k, v in med.items()},
        "evict_aside_vs_inline": med["evict_aside"] / med["evict_inline"],
        "restore_aside_vs_inline": med["restore_aside"] / med["restore_inline"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 and 16 MiB, 5 pairs")
    parser.add_argument("--reps", type=int, default=None, help="timed pairs per case")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    sizes = [MiB, 16 * MiB] if args.quick else [MiB, 16 * MiB, 64 * MiB]
    reps = args.reps or (5 if args.quick else 15)
    with tempfile.TemporaryDirectory(prefix="gpubo-overlap-") as directory:
        rows = [measure(n, b, reps, directory) for n in sizes for b in ("lmdb", "slotfile")]
    if args.json:
        print(json.dumps({"results": rows}, indent=2))
        return 0
    print(f"Hashing aside vs inline (medians of {reps} alternating pairs, us; ratio = aside / inline time)")
    print(
        render_table(
            [
                "size",
                "backend",
                "evict inline",
                "evict aside",
                "ratio",
                "restore inline",
                "restore aside",
                "ratio",
            ],
            [
                [
                    gpubo.format_bytes(r["nbytes"]),
                    r["backend"],
                    f"{r['median_us']['evict_inline']:.0f}",
                    f"{r['median_us']['evict_aside']:.0f}",
                    f"{r['evict_aside_vs_inline']:.2f}",
                    f"{r['median_us']['restore_inline']:.0f}",
                    f"{r['median_us']['restore_aside']:.0f}",
                    f"{r['restore_aside_vs_inline']:.2f}",
                ]
                for r in rows
            ],
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
