"""Run a kernel over four times more data than the device budget allows.

A Manager with a 16 MiB budget holds 8 pairs of float32 arrays (x, y) of
4 MiB each: 64 MiB in all. For every pair the kernel computes
``y = a * x + y`` (SAXPY) through ``mgr.launch``, which brings x and y back
onto the device when they were evicted, and evicts the least recently used
arrays to make room. The results are checked with numpy.

    python demos/oversubscribe.py
"""

from __future__ import annotations

import time

import numpy as np
import pyopencl as cl

import gpubo

BUDGET = "16MiB"
PAIRS = 8
N = 1 << 20  # float32 elements per array: 4 MiB
A = np.float32(2.5)

SAXPY = """
__kernel void saxpy(const float a, __global const float *x, __global float *y)
{
    size_t i = get_global_id(0);
    y[i] = a * x[i] + y[i];
}
"""


def main() -> None:
    rng = np.random.default_rng(0)
    with gpubo.Manager(budget=BUDGET, store_size="256MiB") as mgr:
        saxpy = cl.Program(mgr.context, SAXPY).build().saxpy
        print(f"{mgr!r}")

        # 1. Upload 4x the budget; gpubo evicts the oldest arrays as we go.
        start = time.perf_counter()
        xs, ys, x_host, y_host = [], [], [], []
        for i in range(PAIRS):
            x = rng.standard_normal(N, dtype=np.float32)
            y = rng.standard_normal(N, dtype=np.float32)
            xs.append(mgr.alloc(x.nbytes, name=f"x{i}"))
            ys.append(mgr.alloc(y.nbytes, name=f"y{i}"))
            xs[i].write(x)
            ys[i].write(y)
            x_host.append(x)
            y_host.append(y)
        upload_s = time.perf_counter() - start
        total = sum(bo.nbytes for bo in xs + ys)
        print(f"uploaded {gpubo.format_bytes(total)} into a {BUDGET} budget in {upload_s:.2f} s: {mgr!r}")

        # 2. y = a*x + y for every pair; launch makes both arguments resident.
        start = time.perf_counter()
        for x_bo, y_bo in zip(xs, ys, strict=True):
            mgr.launch(saxpy, (N,), None, A, x_bo, y_bo)
        mgr.queue.finish()
        compute_s = time.perf_counter() - start
        print(f"launched {PAIRS} kernels in {compute_s:.2f} s: {mgr!r}")

        # 3. Check every result against numpy (reading restores evicted arrays).
        start = time.perf_counter()
        for i, y_bo in enumerate(ys):
            expected = A * x_host[i] + y_host[i]
            got = y_bo.read(np.float32)
            if not np.allclose(got, expected, rtol=1e-6, atol=1e-6):
                raise SystemExit(f"y{i}: wrong result (max error {np.abs(got - expected).max()})")
        check_s = time.perf_counter() - start
        print(f"checked {PAIRS} results with numpy in {check_s:.2f} s: all correct")

        s = mgr.stats()
        print(
            f"stats: {s.evictions} evictions ({gpubo.format_bytes(s.bytes_evicted)}), "
            f"{s.restores} restores ({gpubo.format_bytes(s.bytes_restored)}), "
            f"resident {gpubo.format_bytes(s.resident_bytes)}/{gpubo.format_bytes(s.budget)}, "
            f"swapped {gpubo.format_bytes(s.swapped_bytes)}"
        )
        print(s)


if __name__ == "__main__":
    main()
