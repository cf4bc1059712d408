"""The same tiled workload under Dask two ways, one run of each, same cluster
shape: DeviceArray tiles under ``gpubo.dask`` (each worker's device tier
capped at ``--limit``) against numpy tiles under Dask's own spilling (each
worker's ``SpillBuffer`` target at the same bytes: ``memory_limit`` x
``distributed.worker.memory.target``). Wall time and bytes spilled.

The workload is a blocked product C = A @ B: input tiles, one partial
product per (i, j, k) and one sum per (i, j), every product computed by
numpy on the host on both sides, so that what differs is where the tiles
live and how they leave memory: gpubo evicts device buffers into its store
(no pickling); Dask pickles host values into its spill files.

Both sides run with Dask's process-memory thresholds off (``spill``,
``pause``, ``terminate``: False): a PoCL worker's resident set is far above
the tiny limits used here, and the monitor would pause or kill it. Only the
SpillBuffer's target spills, on the numpy side.

    python benchmarks/dask_tiles.py [--n 2048] [--tile 256] [--workers 2] [--limit 16MiB] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from typing import Any

import dask
import numpy as np
from distributed import Client, LocalCluster

import gpubo
import gpubo.dask

TARGET = 0.6  # Dask's default distributed.worker.memory.target


def dev_in(values: np.ndarray) -> gpubo.DeviceArray:
    return gpubo.dask.manager().asarray(values)


def dev_mul(a: gpubo.DeviceArray, b: gpubo.DeviceArray) -> gpubo.DeviceArray:
    return gpubo.dask.manager().asarray(a.get() @ b.get())


def dev_sum(*parts: gpubo.DeviceArray) -> gpubo.DeviceArray:
    total = parts[0].get()
    for p in parts[1:]:
        total += p.get()
    return gpubo.dask.manager().asarray(total)


def dev_out(a: gpubo.DeviceArray) -> np.ndarray:
    return a.get()


def host_in(values: np.ndarray) -> np.ndarray:
    return values.copy()


def host_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a @ b


def host_sum(*parts: np.ndarray) -> np.ndarray:
    total = parts[0].copy()
    for p in parts[1:]:
        total += p
    return total


def host_out(a: np.ndarray) -> np.ndarray:
    return a


def spilled(dask_worker: Any) -> dict[str, int]:
    """Bytes this worker's data wrote out: gpubo's evictions, Dask's spill writes."""
    data = dask_worker.data
    metrics = getattr(data, "cumulative_metrics", {})
    out = {"dask_disk_write_bytes": int(metrics.get(("disk-write", "bytes"), 0))}
    if isinstance(data, gpubo.dask.DeviceData):
        out["gpubo_evicted_bytes"] = data.manager.stats().bytes_evicted
    return out


def run(side: str, n: int, t: int, workers: int, limit: int, directory: str) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(np.float32)
    b = rng.standard_normal((n, n)).astype(np.float32)
    tiles = n // t
    f_in, f_mul, f_sum, f_out = (
        (dev_in, dev_mul, dev_sum, dev_out) if side == "gpubo" else (host_in, host_mul, host_sum, host_out)
    )
    kwargs: dict[str, Any] = {"n_workers": workers, "threads_per_worker": 1, "dashboard_address": None}
    kwargs["local_directory"] = directory
    if side == "gpubo":
        kwargs["data"] = gpubo.dask.device_data(limit, store_size=max(256 << 20, 8 * n * n * 4 * tiles))
    else:
        kwargs["memory_limit"] = int(limit / TARGET)
    config = {
        "distributed.worker.memory.target": TARGET,
        "distributed.worker.memory.spill": False,
        "distributed.worker.memory.pause": False,
        "distributed.worker.memory.terminate": False,
    }
    with dask.config.set(config), LocalCluster(**kwargs) as cluster, Client(cluster) as client:
        client.run(lambda: None)  # workers up before the clock starts
        start = time.perf_counter()
        ta = {
            (i, k): client.submit(f_in, a[i * t : (i + 1) * t, k * t : (k + 1) * t])
            for i in range(tiles)
            for k in range(tiles)
        }
        tb = {
            (k, j): client.submit(f_in, b[k * t : (k + 1) * t, j * t : (j + 1) * t])
            for k in range(tiles)
            for j in range(tiles)
        }
        rows = []
        for i in range(tiles):
            row = []
            for j in range(tiles):
                parts = [client.submit(f_mul, ta[i, k], tb[k, j]) for k in range(tiles)]
                row.append(client.submit(f_out, client.submit(f_sum, *parts)))
            rows.append(row)
        product = np.block(client.gather(rows))
        wall = time.perf_counter() - start
        per_worker = client.run(spilled)
    if not np.allclose(product, a @ b, rtol=1e-3, atol=1e-2):
        raise SystemExit(f"{side}: the product does not match numpy: benchmark invalid")
    written = sum(v.get("gpubo_evicted_bytes", 0) + v["dask_disk_write_bytes"] for v in per_worker.values())
    return {"side": side, "wall_s": wall, "bytes_spilled": written, "per_worker": per_worker}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--limit", default="16MiB", help="per worker: gpubo's device limit, Dask's target")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.n <= 0 or args.tile <= 0 or args.n % args.tile:
        parser.error("--n must be a positive multiple of --tile")
    limit = gpubo.parse_bytes(args.limit, "--limit")
    tiles = args.n // args.tile
    tile_bytes = args.tile * args.tile * 4
    total = (2 * tiles * tiles + tiles**3 + tiles * tiles) * tile_bytes
    with tempfile.TemporaryDirectory(prefix="gpubo-dask-bench-") as d:
        results = [run(side, args.n, args.tile, args.workers, limit, d) for side in ("gpubo", "numpy")]
    out = {
        "n": args.n,
        "tile": args.tile,
        "workers": args.workers,
        "limit_bytes": limit,
        "tile_bytes_in_graph": total,
        "results": results,
        "numpy_wall_over_gpubo_wall": results[1]["wall_s"] / results[0]["wall_s"],
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(
        f"{args.n} x {args.n} float32 in {args.tile} x {args.tile} tiles "
        f"({gpubo.format_bytes(total)} of tiles in the graph), {args.workers} workers, "
        f"{gpubo.format_bytes(limit)} each"
    )
    for r in results:
        print(f"  {r['side']:6}  wall {r['wall_s']:7.2f} s  spilled {gpubo.format_bytes(r['bytes_spilled'])}")
    ratio = out["numpy_wall_over_gpubo_wall"]
    print(f"  numpy tiles under Dask's spilling take {ratio:.2f}x gpubo's wall time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
