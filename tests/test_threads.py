"""Several threads alloc, write, read, pin, launch, evict and free at once."""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable

import numpy as np
import pyopencl as cl
import pytest
from conftest import INC_SRC

import gpubo

KiB = 1 << 10
MiB = 1 << 20

N_THREADS = 4
STEPS = 1500  # per worker: a fixed count, so the work does not depend on the device's speed
MAX_BOS_PER_THREAD = 6
READS = 600  # per reader thread in the shared-BO test
SMALL_STEPS = 1200  # per worker in the batched-prefetch test


class Worker:
    """One thread's BOs and their expected bytes (its own model)."""

    def __init__(
        self, m: gpubo.Manager, inc: cl.Kernel, seed: int, stop: threading.Event, steps: int = STEPS
    ) -> None:
        self.m = m
        self.steps = steps
        self.inc = inc
        self.rng = np.random.default_rng(seed)
        self.seed = seed
        self.stop = stop
        self.bos: list[tuple[gpubo.BufferObject, np.ndarray]] = []
        self.ops: dict[str, int] = {}
        self.errors: list[str] = []

    def _size(self) -> int:
        n = int(self.rng.integers(64 * KiB, MiB + 1))
        return n if self.rng.integers(0, 2) else n - int(self.rng.integers(1, 4096))

    def _pick(self) -> tuple[gpubo.BufferObject, np.ndarray]:
        return self.bos[int(self.rng.integers(0, len(self.bos)))]

    def _verify(self, bo: gpubo.BufferObject, model: np.ndarray, what: str) -> None:
        got = bo.read()
        if not np.array_equal(got, model):
            bad = np.flatnonzero(got != model)
            raise AssertionError(
                f"thread {self.seed} {what}: {bo!r} differs at {bad.size} bytes, first at {bad[0]}"
            )

    def step(self) -> None:
        ops = [
            "alloc",
            "write",
            "read",
            "read_slice",
            "pin",
            "launch",
            "evict",
            "restore",
            "free",
            "mgr_evict",
        ]
        op = ops[int(self.rng.integers(0, len(ops)))]
        if not self.bos or (op == "alloc" and len(self.bos) < MAX_BOS_PER_THREAD):
            op = "alloc"
        elif op == "alloc":
            op = "free"
        self.ops[op] = self.ops.get(op, 0) + 1
        if op == "alloc":
            n = self._size()
            bo = self.m.alloc(n, name=f"t{self.seed}", priority=int(self.rng.integers(0, 4)))
            model = np.zeros(n, np.uint8)
            self._verify(bo, model, "fresh alloc")
            model[:] = self.rng.integers(0, 256, n, dtype=np.uint8)
            bo.write(model)
            self.bos.append((bo, model))
            return
        bo, model = self._pick()
        if op == "write":
            off = int(self.rng.integers(0, bo.nbytes))
            length = int(self.rng.integers(0, bo.nbytes - off + 1))
            data = self.rng.integers(0, 256, length, dtype=np.uint8)
            bo.write(data, offset=off)
            model[off : off + length] = data
        elif op == "read":
            self._verify(bo, model, "read")
        elif op == "read_slice":
            off = int(self.rng.integers(0, bo.nbytes))
            count = int(self.rng.integers(0, bo.nbytes - off + 1))
            if not np.array_equal(bo.read(count=count, offset=off), model[off : off + count]):
                raise AssertionError(f"thread {self.seed}: slice {off}+{count} of {bo!r} differs")
        elif op == "pin":
            with bo.pin() as buf:
                assert bo.state is gpubo.State.RESIDENT
                host = np.empty(bo.nbytes, np.uint8)
                cl.enqueue_copy(self.m.queue, host, buf, is_blocking=True)
                if not np.array_equal(host, model):
                    raise AssertionError(f"thread {self.seed}: pinned {bo!r} differs")
        elif op == "launch":
            self.m.launch(self.inc, (bo.nbytes,), None, bo)  # not waited for: left busy
            model += 1
        elif op == "evict":
            bo.evict()
        elif op == "restore":
            bo.restore()
        elif op == "mgr_evict":
            self.m.evict(int(self.rng.integers(0, 2 * MiB)))
        elif op == "free":
            self._verify(bo, model, "before free")
            bo.free()
            self.bos.remove((bo, model))

    def run(self) -> None:
        try:
            for _ in range(self.steps):
                if self.stop.is_set():  # another worker failed
                    return
                self.step()
            for bo, model in self.bos:
                self._verify(bo, model, "final")
                bo.free()
        except BaseException:
            self.errors.append(traceback.format_exc())
            self.stop.set()


def run_workers(workers: list[Worker], stop: threading.Event, *others: threading.Thread) -> None:
    """Run ``workers`` to the end of their steps, and ``others`` until then
    (they loop until ``stop``); assert none hung or failed."""
    threads = [threading.Thread(target=w.run, name=f"gpubo-worker-{w.seed}") for w in workers]
    for t in [*threads, *others]:
        t.start()
    for t in threads:
        t.join(90)
        assert not t.is_alive(), f"{t.name} hung"
    stop.set()
    for t in others:
        t.join(30)
        assert not t.is_alive(), f"{t.name} hung"
    errors = [e for w in workers for e in w.errors]
    assert not errors, "\n".join(errors)


@pytest.mark.pressure
@pytest.mark.timeout(120)
def test_threads_random_ops(make_mgr: Callable[..., gpubo.Manager], build_kernel: Callable) -> None:
    m = make_mgr(budget="4MiB", store_size="64MiB")
    inc = build_kernel(m, INC_SRC, "inc")
    stop = threading.Event()
    workers = [Worker(m, inc, seed, stop) for seed in range(N_THREADS)]
    violations: list[str] = []
    samples = [0]

    def sampler() -> None:
        while not stop.is_set():
            s = m.stats()
            samples[0] += 1
            if s.resident_bytes + s.pooled_bytes > s.budget:
                violations.append(repr(s))
            if s.pinned_bytes > s.resident_bytes:
                violations.append(f"pinned > resident: {s!r}")
            time.sleep(0.001)

    run_workers(workers, stop, threading.Thread(target=sampler, name="gpubo-sampler"))
    assert not violations, violations[:5]
    assert samples[0] > 0

    s = m.stats()
    assert s.evictions > 0 and s.restores > 0, "the test must put the budget under pressure"
    assert sum(w.ops.get("launch", 0) for w in workers) > 0
    assert s.bo_count == 0 and s.resident_bytes == 0 and s.swapped_bytes == 0 and s.pinned_bytes == 0
    assert s.store_used_bytes == 0 and m.store.chunk_count() == 0
    assert s.resident_bytes + s.pooled_bytes <= s.budget


@pytest.mark.pressure
@pytest.mark.timeout(120)
def test_threads_share_bos_for_reading(make_mgr: Callable[..., gpubo.Manager]) -> None:
    """Readers of the same BOs race with each other's restores and evictions."""
    m = make_mgr(budget="2MiB", store_size="32MiB")
    datas = [np.random.default_rng(i).integers(0, 256, 700 * KiB + i, dtype=np.uint8) for i in range(6)]
    bos = []
    for d in datas:
        bo = m.alloc(d.nbytes)
        bo.write(d)
        bos.append(bo)
    errors: list[str] = []

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(READS):
                i = int(rng.integers(0, len(bos)))
                if rng.integers(0, 4) == 0:
                    bos[i].evict()
                elif not np.array_equal(bos[i].read(), datas[i]):
                    errors.append(f"bo {i} differs")
        except BaseException:
            errors.append(traceback.format_exc())

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    assert not errors, errors[:3]
    for bo, d in zip(bos, datas, strict=True):
        assert np.array_equal(bo.read(), d)


class SmallWorker(Worker):
    """A worker of small BOs (batched on eviction and on prefetch) that also
    prefetches its BOs, while the others evict, launch, read and write."""

    def _size(self) -> int:
        return int(self.rng.choice([4 * KiB, 4 * KiB + 100, 16 * KiB, 64 * KiB, 256 * KiB]))

    def step(self) -> None:
        if self.bos and self.rng.integers(0, 5) == 0:
            self.ops["prefetch"] = self.ops.get("prefetch", 0) + 1
            for future in self.m.prefetch([bo for bo, _ in self.bos]):
                future.result(timeout=60)
            return
        super().step()


@pytest.mark.pressure
@pytest.mark.timeout(120)
def test_threads_prefetch_small_bos_in_batches(
    make_mgr: Callable[..., gpubo.Manager], build_kernel: Callable
) -> None:
    """Batched prefetches race with other threads' evictions (batched too),
    launches, writes and frees: every byte stays right and the budget holds."""
    m = make_mgr(budget="1MiB", store_size="64MiB")
    inc = build_kernel(m, INC_SRC, "inc")
    stop = threading.Event()
    workers = [SmallWorker(m, inc, seed, stop, steps=SMALL_STEPS) for seed in range(100, 100 + N_THREADS)]
    run_workers(workers, stop)
    s = m.stats()
    assert sum(w.ops.get("prefetch", 0) for w in workers) > 0
    assert s.restore_batches > 0 and s.eviction_batches > 0, s
    assert s.bo_count == 0 and s.resident_bytes == 0 and s.swapped_bytes == 0 and s.pinned_bytes == 0
    assert s.store_used_bytes == 0 and m.store.chunk_count() == 0
    assert s.resident_bytes + s.pooled_bytes <= s.budget
