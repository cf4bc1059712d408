"""What waiting for a copy costs on the device: a blocking wait against the
backend's spin-then-block wait (``OpenCLBackend._await``), side by side.

Per size and rep, in an order that rotates every rep, on one device buffer
and one preallocated, already-touched host array of that size:

* D2H / H2D, blocking: ``enqueue_copy(..., is_blocking=True)``, which
  sleeps in ``clWaitForEvents`` (what a plain pyopencl program does);
* D2H / H2D, gpubo: ``backend.download`` / ``backend.upload`` (the same
  copy enqueued without blocking, then flushed and spun on);
* map, blocking: a blocking ``enqueue_map_buffer`` for reading (its unmap
  enqueued after the timer stops and waited for untimed);
* map, gpubo: ``backend.map_read`` entered (the map the eviction path uses);
  its unmap is likewise outside the timer.

Reported: p50 and minimum in microseconds over ``--reps`` reps after
``--warmup``, and the ratio of p50s blocking / gpubo (above 1: the spin is
faster). ``--json`` prints only the machine-readable table, with every
sample.

    python benchmarks/wait_latency.py [--reps 450] [--sizes 4096,1048576]
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import click
import numpy as np
import pyopencl as cl

from gpubo.backends.opencl import SPIN_S, OpenCLBackend


def _cases(backend: OpenCLBackend, nbytes: int) -> dict[str, Callable[[], float]]:
    q = backend.queue
    buf = backend.allocate(nbytes, kernel_queue=True)
    host = np.full(nbytes, 0x5A, np.uint8)
    backend.upload(buf, host, 0)

    def d2h_block() -> float:
        t = time.perf_counter()
        cl.enqueue_copy(q, host, buf, is_blocking=True)
        return time.perf_counter() - t

    def d2h_gpubo() -> float:
        t = time.perf_counter()
        backend.download(buf, host, 0)
        return time.perf_counter() - t

    def h2d_block() -> float:
        t = time.perf_counter()
        cl.enqueue_copy(q, buf, host, is_blocking=True)
        return time.perf_counter() - t

    def h2d_gpubo() -> float:
        t = time.perf_counter()
        backend.upload(buf, host, 0)
        return time.perf_counter() - t

    def map_block() -> float:
        t = time.perf_counter()
        arr, _ = cl.enqueue_map_buffer(
            q, buf, cl.map_flags.READ, 0, (nbytes,), np.dtype(np.uint8), is_blocking=True
        )
        took = time.perf_counter() - t
        arr.base.release(q).wait()
        return took

    def map_gpubo() -> float:
        t = time.perf_counter()
        with backend.map_read(buf, nbytes) as view:
            took = time.perf_counter() - t
            assert view.nbytes == nbytes
        backend.finish()  # the unmap, untimed
        return took

    return {
        "D2H, blocking": d2h_block,
        "D2H, gpubo": d2h_gpubo,
        "H2D, blocking": h2d_block,
        "H2D, gpubo": h2d_gpubo,
        "map, blocking": map_block,
        "map, gpubo": map_gpubo,
    }


def _bad_sizes(value: str) -> list[int]:
    raise click.BadParameter(f"{value!r}: give positive byte counts, comma-separated")


@click.command()
@click.option("--reps", default=450, show_default=True, type=click.IntRange(min=5))
@click.option("--warmup", default=50, show_default=True, type=click.IntRange(min=0))
@click.option(
    "--sizes",
    default="4096,1048576",
    show_default=True,
    help="bytes, comma-separated",
    callback=lambda _ctx, _param, v: (
        [int(s) for s in v.split(",")]
        if all(s.strip().isdigit() and int(s) > 0 for s in v.split(","))
        else _bad_sizes(v)
    ),
)
@click.option("--json", "as_json", is_flag=True, help="also print the table as JSON")
def main(reps: int, warmup: int, sizes: list[int], as_json: bool) -> None:
    backend = OpenCLBackend()
    out: dict[str, dict[str, dict[str, Any]]] = {}
    say = (lambda _: None) if as_json else click.echo
    say(f"device: {backend.name}; spin bound {SPIN_S * 1e6:.0f} us; {reps} reps")
    for nbytes in sizes:
        cases = _cases(backend, nbytes)
        names = list(cases)
        times: dict[str, list[float]] = {n: [] for n in names}
        for rep in range(warmup + reps):
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                took = cases[name]()
                if rep >= warmup:
                    times[name].append(took)
        row = out.setdefault(str(nbytes), {})
        say(f"\n{nbytes} bytes        p50 us   min us")
        for name in names:
            p50 = statistics.median(times[name]) * 1e6
            row[name] = {"p50_us": p50, "min_us": min(times[name]) * 1e6, "samples_s": times[name]}
            say(f"  {name:16s} {p50:7.1f}  {row[name]['min_us']:7.1f}")
        for kind in ("D2H", "H2D", "map"):
            ratio = row[f"{kind}, blocking"]["p50_us"] / row[f"{kind}, gpubo"]["p50_us"]
            row[f"{kind}, blocking / gpubo"] = {"p50_ratio": ratio}
            say(f"  {kind} blocking / gpubo (p50): {ratio:.2f}x")
    if as_json:
        click.echo(json.dumps({"spin_s": SPIN_S, "reps": reps, "sizes": out}, indent=1))


if __name__ == "__main__":
    main()
