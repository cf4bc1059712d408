"""A member process of a device share, for test_share.py.

Usage: python share_child.py SHARE MODE COUNT SIZE SECONDS SEED [key=value ...]

Joins SHARE (``$GPUBO_SHARE_DIR``), allocates COUNT BOs of SIZE bytes, each
holding a pattern of (SEED, index, version), and then:

* ``work``: prints ``ready``, waits for a line on stdin (``go``), then for
  SECONDS or until a second line (``stop``) reads a random BO and checks it,
  and now and then rewrites one with a new version (every byte checked on
  every read);
* ``sleep``: prints ``ready``, sleeps in its main thread until a line comes
  on stdin, then checks every BO;
* ``lock``: prints ``locked`` while holding the share's ledger lock (the
  ``flock`` every member takes), and sleeps until it is killed.

Extra ``key=value`` arguments go to the Manager (``budget``, ``share_min``,
...). Prints one JSON line at the end: mismatches, its share row's
counters, its evictions. Exits 0 when every byte matched.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import sys
import threading
import time

import numpy as np

import gpubo
from gpubo._share import share_directory


def pattern(seed: int, index: int, version: int, nbytes: int) -> np.ndarray:
    rng = np.random.default_rng([seed, index, version])
    return rng.integers(0, 2**32, nbytes // 4, dtype=np.uint32)


def main() -> None:
    share, mode, count, size, seconds, seed = sys.argv[1:7]
    n, nbytes, duration, s = int(count), int(size), float(seconds), int(seed)
    kwargs = dict(a.split("=", 1) for a in sys.argv[7:])
    mgr = gpubo.Manager(share=share, store_size=max(64 << 20, 4 * n * nbytes), **kwargs)
    if mode == "lock":
        fd = os.open(share_directory(share) / "lock", os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("locked", flush=True)
        time.sleep(3600)
    bos = [mgr.alloc(nbytes) for _ in range(n)]
    versions = [0] * n
    for i, bo in enumerate(bos):
        bo.write(pattern(s, i, 0, nbytes))
    mismatches = 0
    checks = 0

    def check(i: int) -> None:
        nonlocal mismatches, checks
        checks += 1
        if not np.array_equal(bos[i].read(np.uint32), pattern(s, i, versions[i], nbytes)):
            mismatches += 1

    if mode == "sleep":
        print("ready", flush=True)
        sys.stdin.readline()
    else:
        print("ready", flush=True)
        sys.stdin.readline()  # go
        stop = threading.Event()

        def wait_for_stop() -> None:
            if sys.stdin.readline().strip() == "stop":  # not at end of input: the parent's communicate()
                stop.set()

        threading.Thread(target=wait_for_stop, daemon=True).start()
        rng = random.Random(s)
        end = time.monotonic() + duration
        while time.monotonic() < end and not stop.is_set():
            i = rng.randrange(n)
            if rng.random() < 0.2:
                versions[i] += 1
                bos[i].write(pattern(s, i, versions[i], nbytes))
            else:
                check(i)
    for i in range(n):
        check(i)
    row = next(r for r in mgr.share_stats() if r.pid == os.getpid())
    report = {
        "mismatches": mismatches,
        "checks": checks,
        "served": row.requests_served,
        "given": row.bytes_given,
        "sent": row.requests_sent,
        "evictions": mgr.stats().evictions,
    }
    mgr.close()
    print(json.dumps(report), flush=True)
    sys.exit(1 if mismatches else 0)


if __name__ == "__main__":
    main()
