"""The two bookkeeping costs of ``gpubo bench`` section 5, in isolation, for
A/B runs of two checkouts: the median time of ``read`` of a resident 4 KiB
BO, and of ``mgr.evict(1)`` (pick the LRU victim and evict it); and two
costs of the allocation path, which a device share hooks into (measured to
show that a manager without a share pays nothing for it): ``alloc`` plus
``free`` of a 4 KiB BO (its buffer from the pool), and the restore of a
swapped 64 KiB BO that must evict another (the budget holds one).

Run it for each checkout in turn, several times, alternating, with
``PYTHONPATH`` naming the checkout so that its ``gpubo`` is imported (an
editable install of another one would win otherwise)::

    PYTHONPATH=/path/to/old python benchmarks/bookkeeping_ab.py old
    PYTHONPATH=/path/to/new python benchmarks/bookkeeping_ab.py new

It prints the minimum, 10th percentile and median of each (on a shared VM
the medians of one run move by tens of percent; the minimum moves least).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

import gpubo

KiB = 1 << 10
BOS = 1000
TINY = 64


def _summary_us(samples: list[float]) -> dict[str, float]:
    samples = sorted(samples)
    return {
        "min": samples[0] * 1e6,
        "p10": samples[len(samples) // 10] * 1e6,
        "median": statistics.median(samples) * 1e6,
    }


def _timed(f: Callable[[], object], n: int) -> list[float]:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        f()
        samples.append(time.perf_counter() - start)
    return samples


def main(label: str) -> None:
    m = gpubo.Manager(BOS * TINY + 4 * KiB, store_size=64 << 20, store_backend="slotfile", checksums=False)
    with m:
        probe = m.alloc(4 * KiB)
        probe.write(np.ones(4 * KiB, np.uint8))
        for _ in range(BOS):
            m.alloc(TINY)
        out = np.empty(4 * KiB, np.uint8)
        read = _summary_us(_timed(lambda: probe.read(out=out), 5000))
        evict_s = []
        for _ in range(450):
            pooled = m.stats().pooled_bytes
            if pooled:
                m.evict(pooled)  # untimed: the timed call must choose a victim
            start = time.perf_counter()
            m.evict(1)
            evict_s.append(time.perf_counter() - start)
            probe.read(out=out)  # keep the probe at the LRU tail
        evict = _summary_us(evict_s)
        alloc = _summary_us(_timed(lambda: m.alloc(4 * KiB).free(), 3000))
    with gpubo.Manager(64 * KiB, store_size=64 << 20, store_backend="slotfile", checksums=False) as m2:
        pair = [m2.alloc(64 * KiB), m2.alloc(64 * KiB)]
        for bo in pair:
            bo.write(np.ones(64, np.uint8))
        turn = iter(range(10**9))
        restore = _summary_us(_timed(lambda: pair[next(turn) % 2].read(np.uint8, 1), 2000))
    figures = {
        "read_4k_us": read,
        "evict_decision_us": evict,
        "alloc_free_4k_us": alloc,
        "restore_64k_us": restore,
    }
    print(
        f"{label}: "
        + "; ".join(
            f"{k} min/p10/median {v['min']:.1f}/{v['p10']:.1f}/{v['median']:.1f}" for k, v in figures.items()
        )
    )
    print(json.dumps({"label": label, **figures}), file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gpubo")
