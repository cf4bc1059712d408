"""Out-of-core matrix multiply: C = A @ B with A, B and C four times the budget.

Every matrix is cut into square tiles, one buffer object each, and the
product is computed tile by tile: ``C[i,j] += A[i,k] @ B[k,j]`` by an OpenCL
kernel (float32, 16x16 work-groups sharing tiles in local memory). The
device budget holds a quarter of the tiles, so gpubo evicts and restores
them as the multiply walks the grid; the tiles of the next step are
prefetched on gpubo's worker thread while the current step's kernel is
queued. A and B are declared ``const __global`` and the program is built
with ``-cl-kernel-arg-info``, so launches leave their clean store copies
valid and evicting them again copies nothing.

The same multiply then runs with a budget that holds every tile, and the
demo prints both timings and their ratio. Both results are compared with
numpy; the exit code is 1 on a mismatch.

    python demos/out_of_core_gemm.py                  # 1536 x 1536, 9 MiB budget
    python demos/out_of_core_gemm.py --n 1024 --tile 256 --depth 2
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import pyopencl as cl

import gpubo

#: C[i,j] += A[i,k] @ B[k,j] on n x n row-major tiles; 16 x 16 work-groups.
MATMUL = """
#define TS 16
__kernel void matmul_tile(const int n, __global const float *A, __global const float *B,
                          __global float *C)
{
    const int lr = get_local_id(1), lc = get_local_id(0);
    const int row = get_group_id(1) * TS + lr, col = get_group_id(0) * TS + lc;
    __local float As[TS][TS];
    __local float Bs[TS][TS];
    float acc = 0.0f;
    for (int t = 0; t < n; t += TS) {
        As[lr][lc] = A[row * n + t + lc];
        Bs[lr][lc] = B[(t + lr) * n + col];
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int k = 0; k < TS; k++)
            acc += As[lr][k] * Bs[k][lc];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    C[row * n + col] += acc;
}
"""
GROUP = 16


@dataclass
class Run:
    """What one multiply measured."""

    product: np.ndarray
    upload_s: float
    multiply_s: float
    download_s: float
    stats: gpubo.Stats
    multiply_evictions: int
    multiply_restores: int
    multiply_bytes_evicted: int
    multiply_bytes_restored: int


def tiles_of(m: np.ndarray, tile: int) -> list[list[np.ndarray]]:
    """``m`` cut into a grid of C-contiguous ``tile`` x ``tile`` blocks."""
    g = m.shape[0] // tile
    return [
        [np.ascontiguousarray(m[i * tile : (i + 1) * tile, k * tile : (k + 1) * tile]) for k in range(g)]
        for i in range(g)
    ]


def multiply(
    a: list[list[np.ndarray]], b: list[list[np.ndarray]], tile: int, budget: int, depth: int, store_size: int
) -> Run:
    """C = A @ B through gpubo with ``budget`` bytes of device memory, from
    the tile grids ``a`` and ``b``."""
    g = len(a)
    n = g * tile
    with gpubo.Manager(budget=budget, store_size=store_size) as mgr:
        program = cl.Program(mgr.context, MATMUL).build(options=["-cl-kernel-arg-info"])
        kernel = cl.Kernel(program, "matmul_tile")

        # 1. Upload: A and B tile by tile (gpubo evicts the oldest as we
        # go); C starts as zero tiles, which cost no upload and no eviction I/O.
        start = time.perf_counter()
        a_bo = [[upload(mgr, t, f"A[{i},{k}]") for k, t in enumerate(row)] for i, row in enumerate(a)]
        b_bo = [[upload(mgr, t, f"B[{k},{j}]") for j, t in enumerate(row)] for k, row in enumerate(b)]
        tile_bytes = tile * tile * 4
        c_bo = [[mgr.alloc(tile_bytes, name=f"C[{i},{j}]") for j in range(g)] for i in range(g)]
        upload_s = time.perf_counter() - start

        # 2. Multiply. Step s uses (A[i,k], B[k,j], C[i,j]); before queuing
        # it, ask for the tiles of step s + depth, so that they are restored
        # while this step's kernel runs.
        steps = [(i, j, k) for i in range(g) for j in range(g) for k in range(g)]

        def tiles(step: int) -> list[gpubo.BufferObject]:
            i, j, k = steps[step]
            return [a_bo[i][k], b_bo[k][j], c_bo[i][j]]

        before = mgr.stats()
        start = time.perf_counter()
        futures: list[Future[None]] = []
        for s in range(min(depth, len(steps))):
            futures += mgr.prefetch(tiles(s))
        event = None
        for s in range(len(steps)):
            if depth and s + depth < len(steps):
                futures += mgr.prefetch(tiles(s + depth))
            a_tile, b_tile, c_tile = tiles(s)
            event = mgr.launch(kernel, (tile, tile), (GROUP, GROUP), np.int32(tile), a_tile, b_tile, c_tile)
        if event is not None:
            event.wait()
        for f in futures:
            f.result()  # a failed prefetch was retried by the launch; this re-raises its error
        multiply_s = time.perf_counter() - start
        after = mgr.stats()

        # 3. Download C.
        start = time.perf_counter()
        product = np.empty((n, n), np.float32)
        block = np.empty((tile, tile), np.float32)
        for i in range(g):
            for j in range(g):
                c_bo[i][j].read(out=block)
                product[i * tile : (i + 1) * tile, j * tile : (j + 1) * tile] = block
        download_s = time.perf_counter() - start
        return Run(
            product=product,
            upload_s=upload_s,
            multiply_s=multiply_s,
            download_s=download_s,
            stats=mgr.stats(),
            multiply_evictions=after.evictions - before.evictions,
            multiply_restores=after.restores - before.restores,
            multiply_bytes_evicted=after.bytes_evicted - before.bytes_evicted,
            multiply_bytes_restored=after.bytes_restored - before.bytes_restored,
        )


def upload(mgr: gpubo.Manager, host: np.ndarray, name: str) -> gpubo.BufferObject:
    bo = mgr.alloc(host.nbytes, name=name)
    bo.write(host)
    return bo


def report(label: str, run: Run) -> None:
    fmt = gpubo.format_bytes
    print(f"{label}:")
    print(f"  upload    {run.upload_s:7.2f} s")
    print(
        f"  multiply  {run.multiply_s:7.2f} s  ({run.multiply_evictions} evictions copying "
        f"{fmt(run.multiply_bytes_evicted)}, {run.multiply_restores} restores of "
        f"{fmt(run.multiply_bytes_restored)})"
    )
    print(f"  download  {run.download_s:7.2f} s")
    print(f"  {run.stats}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1536, help="rows and columns of A, B and C (default 1536)")
    p.add_argument(
        "--tile", type=int, default=512, help="tile edge, a multiple of 16 dividing --n (default 512)"
    )
    p.add_argument("--budget", help="device budget (default: a quarter of A, B and C together)")
    p.add_argument("--depth", type=int, default=1, help="steps prefetched ahead of the kernel (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of A and B (default 0)")
    p.add_argument(
        "--skip-in-memory", action="store_true", help="do not run the in-memory comparison multiply"
    )
    args = p.parse_args(argv)
    if args.tile <= 0 or args.tile % GROUP:
        p.error(f"--tile must be a positive multiple of {GROUP}")
    if args.n <= 0 or args.n % args.tile:
        p.error("--n must be a positive multiple of --tile")
    if args.depth < 0:
        p.error("--depth must be >= 0")
    try:
        args.budget = gpubo.parse_bytes(args.budget) if args.budget else 3 * args.n * args.n * 4 // 4
    except (TypeError, ValueError) as e:
        p.error(f"--budget: {e}")
    if args.budget < 3 * args.tile * args.tile * 4:
        p.error("--budget must hold at least three tiles (one step's A, B and C)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    fmt = gpubo.format_bytes
    n, tile = args.n, args.tile
    total = 3 * n * n * 4
    store_size = max(64 << 20, 2 * total)
    rng = np.random.default_rng(args.seed)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a_tiles, b_tiles = tiles_of(a, tile), tiles_of(b, tile)
    g = n // tile
    print(
        f"C = A @ B, {n} x {n} float32, {g}x{g} tiles of {tile} x {tile} ({fmt(tile * tile * 4)} each): "
        f"{fmt(total)} of tiles on a {fmt(args.budget)} budget ({total / args.budget:.1f}x), "
        f"prefetch depth {args.depth}"
    )

    start = time.perf_counter()
    expected = a @ b
    numpy_s = time.perf_counter() - start
    print(f"numpy: {numpy_s:.2f} s")

    runs = [("oversubscribed", multiply(a_tiles, b_tiles, tile, args.budget, args.depth, store_size))]
    if not args.skip_in_memory:
        runs.append(("in memory", multiply(a_tiles, b_tiles, tile, total, args.depth, store_size)))

    # float32 sums of n products of N(0,1) numbers: the entries are about
    # sqrt(n), the rounding errors (different summation orders here and in
    # numpy) about 1e-7 * n; a wrong tile is off by about sqrt(n).
    atol = 1e-6 * n
    ok = True
    for label, run in runs:
        report(f"gpubo, {label} (budget {fmt(run.stats.budget)})", run)
        error = float(np.abs(run.product - expected).max())
        good = bool(np.allclose(run.product, expected, rtol=1e-4, atol=atol))
        ok &= good
        print(f"  result: {'OK' if good else 'MISMATCH'} (max abs error {error:.2e}, tolerance {atol:.1e})")
    if len(runs) == 2:
        over, mem = runs[0][1], runs[1][1]
        over_total = over.upload_s + over.multiply_s + over.download_s
        mem_total = mem.upload_s + mem.multiply_s + mem.download_s
        print(
            f"oversubscribed / in memory: multiply {over.multiply_s / mem.multiply_s:.2f}x "
            f"({over.multiply_s:.2f} s / {mem.multiply_s:.2f} s), end to end {over_total / mem_total:.2f}x"
        )
    print("result: OK" if ok else "result: MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
