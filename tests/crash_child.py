"""Child program of tests/test_crash.py: syncs versions of named BOs until killed.

Usage: python crash_child.py STORE BACKEND DURABILITY FIRST_VERSION

Opens a Manager on STORE with a budget smaller than its BOs, so that writing
one BO evicts another. Then, for v = FIRST_VERSION, FIRST_VERSION + 1, ...:
writes every word of each named BO ``bo<i>`` as ``(v << 8) | i`` (in two
halves, so the BO's content is torn between the two writes), syncs it, and
once all are synced prints ``synced v``. An anonymous BO is rewritten and
evicted each round too, so a kill leaves anonymous entries in the store.
"""

from __future__ import annotations

import sys

import numpy as np

import gpubo

KiB = 1 << 10
MiB = 1 << 20
#: The named BOs; the last one is larger than a 1 MiB store chunk.
SIZES = (192 * KiB, 640 * KiB, 2 * MiB + 12 * KiB)
SCRATCH = 384 * KiB
BUDGET = 3 * MiB
STORE_SIZE = 32 * MiB


def main() -> None:
    path, backend, durability, first = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    m = gpubo.Manager(
        budget=BUDGET, store=path, store_size=STORE_SIZE, store_backend=backend, durability=durability
    )
    bos = [m.alloc(n, name=f"bo{i}") for i, n in enumerate(SIZES)]
    scratch = m.alloc(SCRATCH)
    print("ready", flush=True)
    v = first
    while True:
        for i, bo in enumerate(bos):
            words = np.full(bo.nbytes // 4, (v << 8) | i, np.uint32)
            half = len(words) // 2
            bo.write(words[:half])
            bo.write(words[half:], offset=half * 4)
            bo.sync()
        scratch.write(np.full(SCRATCH // 4, v, np.uint32))
        scratch.evict()
        print(f"synced {v}", flush=True)
        v += 1


if __name__ == "__main__":
    main()
