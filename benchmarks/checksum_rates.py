"""How fast each checksum is computed, by itself, on this machine.

For each size: the device kernel behind ``checksums="device"``
(``OpenCLBackend.chunk_digests``: per-page XXH64, then per chunk, plus the
zero-page flags, over a device buffer, the digests copied back), the host's
xxh3-64 behind ``checksums="host"`` (one call per 1 MiB chunk, as the store
hashes), and the host's recomputation of the device digests
(``page_digest``, what ``gpubo fsck`` and a host reader do). The three are
timed in turn within each repetition, the order rotating; medians of
``--reps`` repetitions after one warm-up.

    python benchmarks/checksum_rates.py [--sizes 1MiB,16MiB,64MiB] [--reps 7] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
import xxhash

import gpubo
from gpubo.backends import OpenCLBackend
from gpubo.store.entry import CHUNK_BYTES, page_digest


def _rates(backend: OpenCLBackend, nbytes: int, reps: int) -> dict[str, float]:
    data = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)
    buf = backend.allocate(nbytes)
    try:
        backend.upload(buf, data, 0)
        chunks = [memoryview(data[at : at + CHUNK_BYTES]) for at in range(0, nbytes, CHUNK_BYTES)]
        ways: dict[str, Callable[[], object]] = {
            "device_page_xxh64": lambda: backend.chunk_digests(buf, nbytes),
            "host_xxh3": lambda: [xxhash.xxh3_64_intdigest(c) for c in chunks],
            "host_page_xxh64": lambda: [page_digest(c) for c in chunks],
        }
        names = list(ways)
        times: dict[str, list[float]] = {name: [] for name in names}
        for rep in range(reps + 1):
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                ways[name]()
                if rep:
                    times[name].append(time.perf_counter() - start)
        return {name: nbytes / statistics.median(t) / 1e9 for name, t in times.items()}
    finally:
        backend.release(buf)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1MiB,16MiB,64MiB")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--json", action="store_true", help="print only JSON")
    args = parser.parse_args()
    backend = OpenCLBackend(None)
    why = backend.digests_available()
    if why is not None:
        raise SystemExit(f"checksum_rates: {why}")
    rows = []
    for text in args.sizes.split(","):
        nbytes = gpubo.parse_bytes(text)
        rows.append({"nbytes": nbytes, **_rates(backend, nbytes, args.reps)})
    if args.json:
        print(json.dumps({"device": backend.device.name.strip(), "reps": args.reps, "rows": rows}, indent=2))
        return
    print(f"device: {backend.device.name.strip()}; GB/s, medians of {args.reps} reps")
    print(f"{'size':>8} {'device page-XXH64':>18} {'host xxh3':>10} {'host page-XXH64':>16}")
    for r in rows:
        print(
            f"{gpubo.format_bytes(r['nbytes']):>8} {r['device_page_xxh64']:>18.2f} "
            f"{r['host_xxh3']:>10.2f} {r['host_page_xxh64']:>16.2f}"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
