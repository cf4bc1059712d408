"""gpubo.dask on a real distributed.LocalCluster (worker processes, PoCL)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pytest
from dask.sizeof import sizeof
from distributed import Client, LocalCluster, wait
from distributed.protocol import deserialize, serialize

import gpubo
import gpubo.dask

KiB, MiB = 1 << 10, 1 << 20
TILE = 128  # 128 x 128 float32: 64 KiB tiles

# The demo's tasks (the worker processes import them by name: spawned
# children start with this process's sys.path).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "demos"))
from dask_tiles import tile_matmul, tile_sum, to_device, to_host  # noqa: E402

# -- tasks (module level: worker processes import them by reference) ----------------------


def slow_double(a: gpubo.DeviceArray, delay: float) -> gpubo.DeviceArray:
    time.sleep(delay)
    return gpubo.dask.manager().asarray(2 * a.get())


def evict_everything(dask_worker: Any) -> int:
    return int(dask_worker.data.manager.evict(dask_worker.data.manager.budget))


def state_of(key: str, dask_worker: Any) -> str:
    return str(dask_worker.data.device[key].bo.state.value)


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[LocalCluster, Client]]:
    """Two worker processes, one thread each, a 512 KiB device limit each."""
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            local_directory=str(tmp_path / "dask"),
            data=gpubo.dask.device_data("512KiB", store_size="64MiB"),
        ) as c,
        Client(c) as client,
    ):
        yield c, client


class Watcher:
    """Samples every worker's gpubo stats while a graph runs."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.extend(self.client.run(gpubo.dask.worker_stats).values())
            except Exception:  # the cluster is going away
                return
            self._stop.wait(0.02)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


# -- the cluster tests --------------------------------------------------------------------


def test_a_blocked_product_4x_the_device_limits_matches_numpy(cluster: tuple[LocalCluster, Client]) -> None:
    _, client = cluster
    n, t = 512, TILE
    rng = np.random.default_rng(1)
    a = rng.standard_normal((n, n)).astype(np.float32)
    b = rng.standard_normal((n, n)).astype(np.float32)
    tiles = n // t
    with Watcher(client) as watcher:
        da = {
            (i, k): client.submit(to_device, a[i * t : (i + 1) * t, k * t : (k + 1) * t])
            for i in range(tiles)
            for k in range(tiles)
        }
        db = {
            (k, j): client.submit(to_device, b[k * t : (k + 1) * t, j * t : (j + 1) * t])
            for k in range(tiles)
            for j in range(tiles)
        }
        dc = {}
        for i in range(tiles):
            for j in range(tiles):
                parts = [client.submit(tile_matmul, da[i, k], db[k, j]) for k in range(tiles)]
                dc[i, j] = client.submit(tile_sum, *parts)
        out = np.block(
            [[client.submit(to_host, dc[i, j]).result() for j in range(tiles)] for i in range(tiles)]
        )
    np.testing.assert_allclose(out, a @ b, rtol=1e-4, atol=1e-3)
    # 32 input tiles, 64 partial products and 16 sums of 64 KiB: 7 MiB of
    # arrays, 7x the two workers' 1 MiB of device memory.
    stats = client.run(gpubo.dask.worker_stats)
    assert len(stats) == 2
    assert sum(s["gpubo"]["evictions"] for s in stats.values()) > 0
    assert watcher.samples, "the watcher took no sample"
    for s in watcher.samples:
        g = s["gpubo"]
        assert g["resident_bytes"] + g["pooled_bytes"] <= g["budget"] == 512 * KiB
    assert sum(s["sent"]["arrays"] for s in stats.values()) > 0  # arrays moved between workers
    for s in stats.values():  # gpubo's swapped bytes are reported as spilled
        assert s["spilled_total"]["disk"] >= s["gpubo"]["swapped_bytes"]


def test_a_swapped_array_moves_to_another_worker_straight_from_the_store(
    cluster: tuple[LocalCluster, Client],
) -> None:
    _, client = cluster
    first, second = sorted(client.scheduler_info()["workers"])
    values = np.arange(256 * 256, dtype=np.float32).reshape(256, 256)
    x = client.submit(to_device, values, workers=[first])
    wait(x)
    assert client.run(evict_everything, workers=[first])[first] > 0
    assert client.run(state_of, x.key, workers=[first])[first] == "swapped"
    before = client.run(gpubo.dask.worker_stats, workers=[first])[first]
    y = client.submit(to_host, x, workers=[second])
    np.testing.assert_array_equal(y.result(), values)
    after = client.run(gpubo.dask.worker_stats, workers=[first])[first]
    assert after["sent"]["from_store"] == before["sent"]["from_store"] + 1
    assert after["gpubo"]["restores"] == before["gpubo"]["restores"]  # not restored to be sent
    assert client.run(state_of, x.key, workers=[first])[first] == "swapped"


def test_a_worker_killed_mid_graph_is_recomputed_and_its_store_does_not_leak(
    cluster: tuple[LocalCluster, Client],
) -> None:
    _, client = cluster
    values = [np.full((64, 64), i, np.float32) for i in range(12)]
    xs = [client.submit(to_device, v) for v in values]
    ys = [client.submit(slow_double, x, 0.15) for x in xs]
    time.sleep(0.5)  # some done, some running
    stats = client.run(gpubo.dask.worker_stats)
    victim, victim_stats = next(iter(stats.items()))
    os.kill(victim_stats["pid"], signal.SIGKILL)
    results = client.gather([client.submit(to_host, y) for y in ys])
    for i, r in enumerate(results):
        np.testing.assert_array_equal(r, 2 * values[i])
    # The nanny starts a new worker; its workspace purges the dead one's
    # directory, the store inside it included.
    dead_dir = Path(victim_stats["store_dir"]).parent
    deadline = time.monotonic() + 30
    while dead_dir.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not dead_dir.exists(), f"the killed worker's directory {dead_dir} was left behind"
    client.wait_for_workers(2, timeout=30)
    assert victim not in client.scheduler_info()["workers"]  # the replacement has a new address


def make_host_value(i: int) -> np.ndarray:
    return np.full(MiB // 8, i, np.float64)  # 1 MiB on the host


def describe(a: gpubo.DeviceArray, h: np.ndarray, label: str) -> str:
    return f"{label}:{float(a.get().sum())}:{float(h.sum())}"


def test_mixed_values_host_ones_spill_through_dasks_own_buffer(tmp_path: Path) -> None:
    config = {
        "distributed.worker.memory.target": 0.5,  # SpillBuffer target: half the memory limit
        "distributed.worker.memory.spill": False,  # no process-memory spilling, pausing or killing:
        "distributed.worker.memory.pause": False,  # a PoCL worker's RSS is far above this tiny limit
        "distributed.worker.memory.terminate": False,
    }
    with (
        dask.config.set(config),
        LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            memory_limit="8MiB",
            local_directory=str(tmp_path / "dask"),
            data=gpubo.dask.device_data("256KiB", store_size="64MiB"),
        ) as c,
        Client(c) as client,
    ):
        hosts = [client.submit(make_host_value, i) for i in range(10)]  # 10 MiB: past the 4 MiB target
        arrays = [client.submit(to_device, np.full((64, 64), i, np.float32)) for i in range(10)]
        labels = [client.submit(str, f"tile-{i}") for i in range(10)]
        out = client.gather(
            [client.submit(describe, a, h, s) for a, h, s in zip(arrays, hosts, labels, strict=True)]
        )
        assert out == [f"tile-{i}:{i * 4096.0}:{i * float(MiB // 8)}" for i in range(10)]
        (stats,) = client.run(gpubo.dask.worker_stats).values()
        host_spilled = stats["spilled_total"]["disk"] - stats["gpubo"]["swapped_bytes"]
        assert host_spilled > 0, stats  # numpy values went to Dask's disk tier
        assert stats["device_keys"] == 10 and stats["host_keys"] >= 20


# -- in one process: the mapping, serialization, sizeof, errors -----------------------------


@pytest.fixture
def data(tmp_path: Path) -> Iterator[gpubo.dask.DeviceData]:
    func, kwargs = gpubo.dask.device_data("1MiB", store_size="64MiB", store_backend="slotfile")
    d = func(worker_local_directory=str(tmp_path), **kwargs)
    yield d
    d.close()
    gpubo.set_default_manager(None)


def test_the_mapping_keeps_arrays_in_gpubo_and_the_rest_in_a_spill_buffer(data: Any) -> None:
    mgr = data.manager
    data["a"] = mgr.asarray(np.ones(1024, np.float32))
    data["h"] = np.ones(1024)
    data["s"] = "text"
    assert set(data) == {"a", "h", "s"} and len(data) == 3 and "a" in data
    assert list(data.device) == ["a"] and set(data.host) == {"h", "s"}
    assert data.evict() > 0  # the memory monitor's call spills a host value
    assert data.host.spilled_total.disk > 0
    bo = data["a"].bo
    data["a"] = "now a string"  # a key that changes kind moves
    assert "a" not in data.device and data["a"] == "now a string"
    _until(lambda: bo.state is gpubo.State.FREED)  # nothing else referenced it: freed off the loop
    shared = mgr.asarray(np.arange(4, dtype=np.int32))
    data["x"] = data["y"] = shared  # two keys, one array: counted once, kept while referenced
    del data["x"]
    assert shared.bo.state is gpubo.State.RESIDENT
    shared.bo.evict()
    spilled, host = data.spilled_total, data.host.spilled_total
    # disk: the swapped bytes; memory: what Dask counted for the value (its sizeof), not its bytes
    assert spilled.disk - host.disk == mgr.stats().swapped_bytes == 16
    assert spilled.memory - host.memory == sizeof(shared) < 1024
    foreign = gpubo.Manager(budget="1MiB", store_size="64MiB")
    try:  # an array of another manager (another in-process worker's) is copied in
        theirs = foreign.asarray(np.arange(8, dtype=np.int64))
        data["f"] = theirs
        assert data["f"].manager is mgr and data["f"] is not theirs
        np.testing.assert_array_equal(data["f"].get(), np.arange(8))
    finally:
        foreign.close()
    np.testing.assert_array_equal(data["f"].get(), np.arange(8))  # ours outlives theirs
    with pytest.raises(KeyError):
        data["missing"]


def test_serialization_sends_a_swapped_array_from_the_store_and_refuses_damage(
    data: Any, tmp_path: Path
) -> None:
    mgr = data.manager
    values = np.random.default_rng(2).integers(0, 1 << 30, (512, 512), dtype=np.int32)
    a = mgr.asarray(values)
    a.bo.evict()
    restores = mgr.stats().restores
    header, frames = serialize(a, serializers=("dask",))
    assert (
        header["sub-header"]["shape"] == [512, 512]
        and sum(len(memoryview(f)) for f in frames) == values.nbytes
    )
    assert a.bo.state is gpubo.State.SWAPPED and mgr.stats().restores == restores
    b = deserialize(header, frames)
    assert isinstance(b, gpubo.DeviceArray) and b.manager is mgr and b.bo is not a.bo
    np.testing.assert_array_equal(b.get(), values)
    assert sizeof(a) < 1024  # device bytes are not host memory
    slots = tmp_path / gpubo.dask.STORE_DIRNAME / "slots.bin"
    raw = slots.read_bytes()
    at = raw.find(values.reshape(-1)[1000:1016].tobytes())
    with open(slots, "r+b") as f:
        f.seek(at + 3)
        f.write(bytes([raw[at + 3] ^ 1]))
    with pytest.raises(TypeError, match="Could not serialize") as info:  # Dask wraps the cause
        serialize(a, serializers=("dask",), on_error="raise")
    cause = info.value.__cause__ or info.value.__context__
    assert isinstance(cause, gpubo.IntegrityError), cause
    assert a.bo.state is gpubo.State.SWAPPED  # the damaged entry is neither sent nor restored


def _until(condition: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_structured_dtype_survives_dask_serialization(data: Any) -> None:
    dt = np.dtype([("a", "<i4"), ("b", "<f8", (2,))])
    values = np.zeros(5, dt)
    values["a"] = np.arange(5)
    values["b"] = np.arange(10).reshape(5, 2) / 4
    a = data.manager.asarray(values)
    b = deserialize(*serialize(a, serializers=("dask",), on_error="raise"))
    assert b.dtype == dt
    np.testing.assert_array_equal(b.get(), values)


def test_bad_input_and_use_outside_a_worker_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="device_memory_limit"):
        gpubo.dask.device_data(0)
    with pytest.raises(ValueError, match="sets budget itself"):
        gpubo.dask.device_data("1MiB", budget="2MiB")
    with pytest.raises(ValueError):
        gpubo.dask.device_data("lots")
    with pytest.raises(ValueError, match="store_size"):
        gpubo.dask.device_data("1MiB", store_size="lots")
    with pytest.raises(TypeError, match=r"gpubo\.Manager"):
        gpubo.dask.device_data("1MiB", store_sise="64MiB")  # misspelt: refused here, not in every worker
    with pytest.raises(ValueError, match="host_target"):
        gpubo.dask.device_data("1MiB", host_target="much")
    with pytest.raises(gpubo.GpuboError, match="tasks running on a Dask worker"):
        gpubo.dask.manager()


def test_gpubo_dask_worker_joins_a_scheduler_and_closes_on_sigterm(tmp_path: Path) -> None:
    import subprocess
    import sys

    def make(n: int) -> Any:
        import numpy as np

        import gpubo.dask as gd

        return gd.manager().asarray(np.arange(n, dtype=np.float64))

    def total(a: Any) -> float:
        return float(a.get().sum())

    with (
        LocalCluster(n_workers=0, processes=False, protocol="tcp://", dashboard_address=None) as c,
        Client(c) as client,
    ):
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gpubo",
                "dask-worker",
                c.scheduler_address,
                "--device-memory-limit",
                "1MiB",
                "--store-size",
                "64MiB",
                "--local-directory",
                str(tmp_path / "w"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            client.wait_for_workers(1, timeout=60)
            assert client.submit(total, client.submit(make, 1000)).result(timeout=60) == 999 * 1000 / 2
            (stats,) = client.run(gpubo.dask.worker_stats).values()
            assert stats["gpubo"]["budget"] == MiB and stats["pid"] == worker.pid
            worker.send_signal(signal.SIGTERM)
            _, err = worker.communicate(timeout=60)
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    assert worker.returncode == 0, err[-3000:]
    assert "Traceback" not in err, err[-3000:]


def test_gpubo_dask_worker_refuses_a_bad_limit_without_a_traceback() -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "gpubo", "dask-worker", "tcp://127.0.0.1:1", "--device-memory-limit", "lots"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2 and "device-memory-limit" in done.stderr and "Traceback" not in done.stderr


def test_the_dask_benchmark_runs_both_sides_and_its_ratio_follows_from_them() -> None:
    import json
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "dask_tiles.py"
    done = subprocess.run(
        [sys.executable, str(script), "--n", "256", "--tile", "64", "--limit", "128KiB", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    gp, npy = out["results"]
    assert (gp["side"], npy["side"]) == ("gpubo", "numpy")
    assert out["numpy_wall_over_gpubo_wall"] == npy["wall_s"] / gp["wall_s"]
    assert out["tile_bytes_in_graph"] == (2 * 16 + 64 + 16) * 64 * 64 * 4  # 7x the two limits
    # Both sides had to spill: gpubo by evicting, Dask by writing its spill files.
    assert all(w["gpubo_evicted_bytes"] > 0 for w in gp["per_worker"].values())
    assert sum(w["dask_disk_write_bytes"] for w in npy["per_worker"].values()) > 0
    assert gp["bytes_spilled"] == sum(w["gpubo_evicted_bytes"] for w in gp["per_worker"].values())


def test_the_store_goes_with_the_worker_directory_when_the_cluster_closes(tmp_path: Path) -> None:
    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            dashboard_address=None,
            local_directory=str(tmp_path / "dask"),
            data=gpubo.dask.device_data("256KiB", store_size="64MiB"),
        ) as c,
        Client(c) as client,
    ):
        x = client.submit(to_device, np.ones((128, 128), np.float32))
        assert client.submit(to_host, x).result().sum() == 128 * 128
        (stats,) = client.run(gpubo.dask.worker_stats).values()
        store = Path(stats["store_dir"])
        assert store.is_dir() and store.parent.parent == tmp_path / "dask" / "dask-scratch-space"
    assert not store.exists() and not store.parent.exists()
