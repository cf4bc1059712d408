"""What the huge-page advice for a CPU device's buffers buys
(``gpubo.backends._pages``), paired in one process.

Two device buffers of ``--size`` bytes hold the same patterned bytes: one
allocated with the advice (``backend.huge_pages`` on), one without. Per
store backend (lmdb, slotfile) and checksums off and on, each rep evicts
(``gpubo._transfer.swap_out``) and restores (``swap_in_batch``) through
both, in an order that swaps every rep, and times a raw D2H and H2D
(blocking) of each beside them. Reported: p50 in milliseconds of each, and
advised / plain (below 1: the advice is faster). The bytes of both buffers
are compared at the end. ``--json`` prints only the table, with every
sample. The device must be a CPU device on Linux (else the advice is never
given, and the script says so and exits 2).

    python benchmarks/huge_pages.py                 # 64 MiB, 30 reps
    python benchmarks/huge_pages.py --size 4194304 --reps 3 --json   # what tests/test_bench.py runs
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from typing import Any

import click
import numpy as np
import pyopencl as cl

from gpubo._transfer import swap_in_batch, swap_out
from gpubo.backends._pages import HUGE_PAGES_MIN_BYTES
from gpubo.backends.opencl import OpenCLBackend
from gpubo.store import open_store

OPS = ("evict", "restore", "raw D2H", "raw H2D")
SIDES = ("plain", "advised")


@click.command()
@click.option("--size", default=64 << 20, show_default=True, type=click.IntRange(min=HUGE_PAGES_MIN_BYTES))
@click.option("--reps", default=30, show_default=True, type=click.IntRange(min=3))
@click.option("--dir", "directory", default=None, type=click.Path(file_okay=False), help="where stores go")
@click.option("--json", "as_json", is_flag=True, help="print only the table, as JSON")
def main(size: int, reps: int, directory: str | None, as_json: bool) -> None:
    backend = OpenCLBackend()
    if not backend.huge_pages:
        click.echo(f"{backend.name}: no huge-page advice here (not a CPU device on Linux)", err=True)
        raise SystemExit(2)
    data = (np.arange(size, dtype=np.uint64) * 2654435761 % 251 + 1).astype(np.uint8)
    host = np.empty(size, np.uint8)
    bufs: dict[str, Any] = {}
    for side in SIDES:
        backend.huge_pages = side == "advised"
        bufs[side] = backend.allocate(size, kernel_queue=True)
        backend.upload(bufs[side], data, 0)
    backend.huge_pages = True
    say = (lambda _: None) if as_json else click.echo
    say(f"device: {backend.name}; {size} bytes; {reps} reps; p50 in ms")
    out: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory(dir=directory, prefix="gpubo-pages-") as tmp:
            for name in ("lmdb", "slotfile"):
                for checksums in (False, True):
                    store = open_store(
                        os.path.join(tmp, f"{name}-{int(checksums)}"),
                        4 * size + (64 << 20),
                        backend=name,
                        checksums=checksums,
                    )
                    times: dict[str, list[float]] = {f"{op}, {s}": [] for op in OPS for s in SIDES}
                    try:
                        for rep in range(reps):
                            for side in SIDES if rep % 2 else SIDES[::-1]:
                                buf = bufs[side]
                                t0 = time.perf_counter()
                                entry = swap_out(backend, store, buf, size)
                                t1 = time.perf_counter()
                                swap_in_batch(backend, store, [(entry, buf, "pages")])
                                t2 = time.perf_counter()
                                store.release(entry)
                                cl.enqueue_copy(backend.queue, host, buf, is_blocking=True)
                                t3 = time.perf_counter()
                                cl.enqueue_copy(backend.queue, buf, data, is_blocking=True)
                                t4 = time.perf_counter()
                                for op, took in zip(OPS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                                    times[f"{op}, {side}"].append(took)
                    finally:
                        store.close()
                    label = f"{name} checksums {'on' if checksums else 'off'}"
                    row: dict[str, Any] = {
                        k: {"p50_ms": statistics.median(v) * 1e3, "samples_s": v} for k, v in times.items()
                    }
                    say(f"\n{label}            plain   advised  advised/plain")
                    for op in OPS:
                        plain, advised = row[f"{op}, plain"]["p50_ms"], row[f"{op}, advised"]["p50_ms"]
                        row[f"{op}, advised / plain"] = {"p50_ratio": advised / plain}
                        say(f"  {op:10s} {plain:14.3f} {advised:9.3f}  {advised / plain:12.2f}x")
                    out[label] = row
        for side, buf in bufs.items():
            backend.download(buf, host, 0)
            if not np.array_equal(host, data):
                raise SystemExit(f"the {side} buffer's bytes changed: benchmark invalid")
    finally:
        for buf in bufs.values():
            backend.release(buf)
    if as_json:
        click.echo(json.dumps({"size": size, "reps": reps, "cases": out}, indent=1))


if __name__ == "__main__":
    main()
