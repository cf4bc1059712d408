"""A blocked matrix product on a Dask LocalCluster whose workers keep their
tiles in device memory with gpubo (``gpubo.dask``): the tiles and the
partial products are ``DeviceArray``s, several times the workers' device
limits in all, multiplied on the device by an OpenCL kernel, spilled and
restored by gpubo, moved between workers by Dask.

    python demos/dask_tiles.py [--n 512] [--tile 128] [--workers 2] [--device-limit 512KiB]

Prints each worker's device use and evictions, and checks the product
against numpy (exit 1 if it differs).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np
import pyopencl as cl

import gpubo
import gpubo.dask

MATMUL = """
__kernel void matmul(const int n, __global const float *a, __global const float *b, __global float *c) {
    int row = get_global_id(0), col = get_global_id(1);
    float acc = 0.0f;
    for (int k = 0; k < n; k++) acc += a[row * n + k] * b[k * n + col];
    c[row * n + col] = acc;
}
"""
_kernels: dict[int, Any] = {}


def to_device(values: np.ndarray) -> gpubo.DeviceArray:
    return gpubo.dask.manager().asarray(values)


def tile_matmul(a: gpubo.DeviceArray, b: gpubo.DeviceArray) -> gpubo.DeviceArray:
    """``a @ b`` on the device, into a new array of the worker's manager."""
    mgr = gpubo.dask.manager()
    kernel = _kernels.get(id(mgr))
    if kernel is None:
        kernel = _kernels[id(mgr)] = cl.Kernel(cl.Program(mgr.context, MATMUL).build(), "matmul")
    c = mgr.empty(a.shape, np.float32)
    mgr.launch(kernel, a.shape, None, np.int32(a.shape[0]), a, b, c).wait()
    return c


def tile_sum(*parts: gpubo.DeviceArray) -> gpubo.DeviceArray:
    total = parts[0].get()
    for p in parts[1:]:
        total += p.get()
    return gpubo.dask.manager().asarray(total)


def to_host(a: gpubo.DeviceArray) -> np.ndarray:
    return a.get()


def main(argv: list[str] | None = None) -> int:
    from distributed import Client, LocalCluster

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512, help="matrix size (default 512)")
    parser.add_argument("--tile", type=int, default=128, help="tile size (default 128)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--device-limit", default="512KiB", help="each worker's device budget")
    args = parser.parse_args(argv)
    n, t = args.n, args.tile
    if n <= 0 or t <= 0 or n % t:
        parser.error("--n must be a positive multiple of --tile")
    limit = gpubo.parse_bytes(args.device_limit, "--device-limit")
    tiles = n // t
    tile_bytes = t * t * 4
    arrays = (2 * tiles * tiles + tiles**3 + tiles * tiles) * tile_bytes
    print(
        f"{n} x {n} float32 in {t} x {t} tiles: {gpubo.format_bytes(arrays)} of device arrays in the graph, "
        f"{arrays / (args.workers * limit):.1f}x the {args.workers} workers' "
        f"{gpubo.format_bytes(limit)} device limits"
    )
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(np.float32)
    b = rng.standard_normal((n, n)).astype(np.float32)

    def block(m: np.ndarray, r: int, c: int) -> np.ndarray:
        return m[r * t : (r + 1) * t, c * t : (c + 1) * t]

    start = time.perf_counter()
    with (
        LocalCluster(
            n_workers=args.workers,
            threads_per_worker=1,
            dashboard_address=None,
            data=gpubo.dask.device_data(limit, store_size=max(64 << 20, 4 * arrays)),
        ) as cluster,
        Client(cluster) as client,
    ):
        da = {(i, k): client.submit(to_device, block(a, i, k)) for i in range(tiles) for k in range(tiles)}
        db = {(k, j): client.submit(to_device, block(b, k, j)) for k in range(tiles) for j in range(tiles)}
        dc = {}
        for i in range(tiles):
            for j in range(tiles):
                parts = [client.submit(tile_matmul, da[i, k], db[k, j]) for k in range(tiles)]
                dc[i, j] = client.submit(tile_sum, *parts)
        rows = [[client.submit(to_host, dc[i, j]) for j in range(tiles)] for i in range(tiles)]
        product = np.block(client.gather(rows))
        stats = client.run(gpubo.dask.worker_stats)
    elapsed = time.perf_counter() - start
    for address, s in sorted(stats.items()):
        g = s["gpubo"]
        print(
            f"  worker {address}: resident {gpubo.format_bytes(g['resident_bytes'])} of "
            f"{gpubo.format_bytes(g['budget'])}, {g['evictions']} evictions, {g['restores']} restores, "
            f"{gpubo.format_bytes(g['bytes_evicted'])} evicted, {s['sent']['arrays']} arrays sent "
            f"({s['sent']['from_store']} straight from the store)"
        )
    print(f"  {elapsed:.2f} s with the cluster's start and stop")
    ok = np.allclose(product, a @ b, rtol=1e-4, atol=1e-3)
    print("  result: OK" if ok else "  result: MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
