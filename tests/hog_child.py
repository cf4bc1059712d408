"""Child process for test_host_pressure.py: holds host memory until told to stop.

Usage: python hog_child.py NBYTES FLOOR_BYTES

Maps 64 MiB anonymous chunks, populated (MAP_POPULATE: every page really
allocated, faster than touching them one by one), until it holds NBYTES, but stops
early if the host's MemAvailable would drop below FLOOR_BYTES. Prints
``ready HELD`` and then waits until its stdin closes (or it is killed). It
asks the kernel to kill it first under memory pressure (oom_score_adj 1000)
and to kill it when its parent dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import signal
import sys
import threading

import numpy as np

CHUNK = 64 << 20


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("no MemAvailable in /proc/meminfo")


def main() -> None:
    target, floor = int(sys.argv[1]), int(sys.argv[2])
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass

    def watch_parent() -> None:  # belt and braces if prctl is unavailable
        while True:
            if os.getppid() != parent:
                os._exit(1)
            threading.Event().wait(0.5)

    threading.Thread(target=watch_parent, daemon=True).start()
    chunks = []
    held = 0
    while held < target:
        n = min(CHUNK, target - held)
        if mem_available() - n < floor:
            break
        populate = getattr(mmap, "MAP_POPULATE", 0)
        chunk = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate)
        if not populate:
            np.frombuffer(chunk, np.uint8).fill(1)  # touch every page: really resident
        chunks.append(chunk)
        held += n
    print("ready", held, flush=True)
    sys.stdin.read()  # until the parent closes it


if __name__ == "__main__":
    main()
