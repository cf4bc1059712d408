"""The stress engine behind ``gpubo stress`` and ``gpubo selftest``.

Modelled on the device-memory swapping stress test that GPU driver developers
run (IGT's ``gem_lmem_swapping``): allocate more buffer objects than the
budget holds, fill BO ``i`` so that its 32-bit word ``j`` is
``(seed_i + j) mod 2**32``, then pick BOs at random and *use* them (a host
read that checks every word, a kernel that adds a constant, a host rewrite
with a new seed), so that the manager keeps evicting and restoring. A model
of every BO's seed says what each word must hold; nothing the manager does
may change that.

Everything here drives the public :class:`gpubo.Manager` API and returns
plain data (:class:`StressReport`, :class:`Sample`, :class:`CheckResult`);
nothing prints. The CLI (``gpubo.cli``) owns the terminal.

Shapes of a run:

* one manager, one worker: every random choice comes from the seed, so the
  same seed and ``loops`` replay the same run exactly;
* ``threads > 1``: worker threads share one manager, each with its own BOs
  and its own model;
* ``processes > 1``: processes started with ``spawn``, each with its own
  manager, budget, BOs and store (a subdirectory of ``store``); the parent
  aggregates their samples and reports;
* ``host_pressure > 0``: a child process holds a bounded part of the host's
  available memory while the run goes on (see :class:`HostPressure`).

Notes on threads: a :class:`_Worker` is driven by one thread; the thread
that runs the engine reads the workers' counters (plain ints) to sample
progress, which is racy only in the sense that a sample may be one
operation old.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import pyopencl as cl

from gpubo import (
    BufferObject,
    GpuboError,
    IntegrityError,
    Manager,
    OutOfDeviceMemory,
    ShareError,
    State,
    StoreFull,
    format_bytes,
)
from gpubo._share import read_share
from gpubo.store.private import PrivateDir

__all__ = [
    "MAX_MULTI",
    "SELFTEST_CHECKS",
    "CheckResult",
    "HostPressure",
    "Mismatch",
    "Sample",
    "StressConfig",
    "StressReport",
    "manager_kwargs",
    "run_selftest",
    "run_stress",
]

log = logging.getLogger(__name__)

KiB = 1 << 10
MiB = 1 << 20

#: The most BOs one ``multi`` kernel launch uses.
MAX_MULTI = 4
#: How many mismatches are kept in detail (all are counted).
MAX_REPORTED_MISMATCHES = 10
#: Latencies kept per worker for the percentiles (the first ones; plenty).
_MAX_LATENCIES = 200_000
#: Kernel launches a worker may leave queued before it waits for the oldest.
_MAX_PENDING_EVENTS = 8
_PHASES = ("setup", "run", "sweep", "done")


def _add_kernel_source(k: int) -> str:
    """``add{k}``: add ``v_i`` to the first ``n_i`` words of each of ``k`` buffers."""
    params = ", ".join(f"__global uint *a{i}, const uint n{i}, const uint v{i}" for i in range(k))
    body = "\n".join(f"    if (g < n{i}) a{i}[g] += v{i};" for i in range(k))
    return f"__kernel void add{k}({params})\n{{\n    const size_t g = get_global_id(0);\n{body}\n}}\n"


_KERNEL_SOURCE = "\n".join(_add_kernel_source(k) for k in range(1, MAX_MULTI + 1))


# -- configuration and results ------------------------------------------------------


@dataclass(frozen=True)
class StressConfig:
    """What a stress run does; sizes are int bytes.

    BOs are ``min_nbytes`` big when ``min_nbytes == max_nbytes``, else of
    random sizes in that range (multiples of 4). ``count`` BOs are made if it
    is given, else about ``total_bytes`` of them. The timed phase stops after
    ``loops`` operations *per worker* if given, else after ``seconds``.

    ``threads``, ``processes``, ``budget_bytes``, ``total_bytes``, ``count``
    and ``store_size_bytes`` describe the whole run; :meth:`for_process`
    splits them between processes. ``manager_options`` are extra keyword
    arguments for every :class:`gpubo.Manager` the run opens (see
    :func:`manager_kwargs`).
    """

    budget_bytes: int
    total_bytes: int
    min_nbytes: int
    max_nbytes: int
    seconds: float
    loops: int | None
    seed: int
    store: str | None = None
    store_size_bytes: int = 64 * MiB
    count: int | None = None
    verify: bool = True
    multi: bool = False
    kernel_every: int = 2
    threads: int = 1
    processes: int = 1
    host_pressure: float = 0.0
    progress_s: float = 0.25
    manager_options: Mapping[str, Any] = field(default_factory=dict)
    process_index: int = 0
    #: A device share that every process joins with the whole budget
    #: (None: the budget is split between processes).
    share: str | None = None

    @property
    def random_sizes(self) -> bool:
        return self.min_nbytes != self.max_nbytes

    @property
    def workers(self) -> int:
        """Worker threads over all processes."""
        return self.threads * self.processes

    def check(self) -> None:
        """Refuse a config that cannot run as asked.

        Raises:
            ValueError: naming the field and why.
        """
        if self.min_nbytes < 4 or self.min_nbytes % 4 or self.max_nbytes % 4:
            raise ValueError("BO sizes must be positive multiples of 4 bytes")
        if self.max_nbytes < self.min_nbytes:
            raise ValueError(f"max_nbytes {self.max_nbytes} is less than min_nbytes {self.min_nbytes}")
        if self.threads < 1 or self.processes < 1:
            raise ValueError("threads and processes must be at least 1")
        if self.seconds <= 0 or (self.loops is not None and self.loops < 1):
            raise ValueError("seconds must be positive and loops at least 1")
        if self.kernel_every < 0:
            raise ValueError("kernel_every must not be negative")
        if not 0 <= self.host_pressure <= 0.9:
            raise ValueError(f"host_pressure must be a fraction in [0, 0.9], got {self.host_pressure}")
        budget = self.budget_bytes // (1 if self.share else self.processes)
        per = " per process" if self.processes > 1 and not self.share else ""
        if self.max_nbytes * self.threads > budget:
            held = f"each of {self.threads} threads may hold" if self.threads > 1 else "the run holds"
            raise ValueError(
                f"{held} a BO of up to {format_bytes(self.max_nbytes)} on the device at once: that needs "
                f"a budget of at least {format_bytes(self.max_nbytes * self.threads)}{per}, "
                f"not {format_bytes(budget)}"
            )
        if self.multi and 2 * self.min_nbytes > budget // self.threads:
            raise ValueError(
                f"multi: two BOs of {format_bytes(self.min_nbytes)} do not fit one thread's share of the "
                f"budget ({format_bytes(budget // self.threads)})"
            )
        if self.count is not None:
            if self.count < self.workers:
                raise ValueError(f"count {self.count} is less than one BO per worker ({self.workers})")
        elif self.total_bytes // self.min_nbytes < self.threads:
            raise ValueError(
                f"total {format_bytes(self.total_bytes)} is less than one BO of "
                f"{format_bytes(self.min_nbytes)} per worker ({self.workers})"
            )

    def for_process(self, index: int) -> StressConfig:
        """The part of process ``index``: budget (unless in a share), BOs and
        store split evenly."""
        p = self.processes
        count = self.count
        if count is None and not self.random_sizes:  # split whole BOs, not bytes
            count = self.total_bytes // self.min_nbytes
        count = None if count is None else _share(count, p, index)
        store = None if self.store is None else os.path.join(self.store, f"proc{index}")
        return dataclasses.replace(
            self,
            budget_bytes=self.budget_bytes // (1 if self.share else p),
            total_bytes=self.total_bytes // p,
            count=count,
            store=store,
            store_size_bytes=self.store_size_bytes // p,
            processes=1,
            host_pressure=0.0,
            process_index=index,
        )


def manager_kwargs(config: StressConfig) -> dict[str, Any]:
    """The keyword arguments of the :class:`gpubo.Manager` that one stress process opens.

    ``config.manager_options`` (store backend, durability, ...) go through
    unchanged, so a new manager option needs no change here.
    """
    kwargs: dict[str, Any] = {
        "budget": config.budget_bytes,
        "store": config.store,
        "store_size": config.store_size_bytes,
        **config.manager_options,
    }
    if config.share is not None:
        kwargs["share"] = config.share
    return kwargs


@dataclass(frozen=True)
class Mismatch:
    """A BO whose bytes differ from the model: its first bad 32-bit word."""

    bo: str
    offset: int  #: byte offset of the first bad word
    expected: int
    found: int
    bad_words: int  #: how many words of the BO were wrong
    operation: int  #: the worker's operation number (-1: the final sweep)


@dataclass(frozen=True)
class Sample:
    """A snapshot of a run, taken every ``progress_s`` (and handed to ``on_sample``).

    Byte and event counts are the manager's (summed over processes); the
    operation count is summed over workers.
    """

    elapsed_s: float  #: since the run started, setup included
    run_s: float  #: into the timed phase (0 during setup)
    phase: str  #: "setup", "run", "sweep" or "done"
    operations: int
    mismatches: int
    budget_bytes: int
    resident_bytes: int
    pooled_bytes: int
    swapped_bytes: int
    evictions: int
    restores: int
    bytes_evicted: int
    bytes_restored: int


@dataclass
class StressReport:
    """What a stress run did and found.

    ``stats`` is ``Manager.stats()`` (summed over processes) just before the
    BOs were freed; ``leaks`` lists what was not back to zero after freeing
    them; ``budget_violations`` counts samples where resident plus pooled
    bytes exceeded the budget.
    """

    config: StressConfig
    device: str = ""
    bo_count: int = 0
    allocated_bytes: int = 0
    setup_s: float = 0.0
    run_s: float = 0.0
    operations: int = 0
    uses: int = 0
    kernels: int = 0
    multi_launches: int = 0
    verified_bytes: int = 0
    written_bytes: int = 0
    swept_bytes: int = 0
    restoring_uses: int = 0
    restore_latency_p50_ms: float = 0.0
    restore_latency_p99_ms: float = 0.0
    run_evictions: int = 0
    run_restores: int = 0
    run_bytes_evicted: int = 0
    run_bytes_restored: int = 0
    mismatch_count: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)
    error: str | None = None
    check_failed: bool = False
    interrupted: bool = False
    swept: bool = False
    budget_violations: int = 0
    #: In a share: samples of its ledger, and those whose sum exceeded the budget.
    share_samples: int = 0
    share_violations: int = 0
    leaks: list[str] = field(default_factory=list)
    host_pressure_bytes: int = 0
    stats: dict[str, Any] = field(default_factory=dict)  # Stats as a dict: ints, and the transfer name
    timeline: list[Sample] = field(default_factory=list)
    #: Latencies (ms) of uses that needed a restore; merged, not serialised.
    latencies_ms: list[float] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        """Every check passed: data, final sweep, budget, leaks, no error."""
        return not (
            self.mismatch_count
            or self.error
            or self.check_failed
            or self.interrupted
            or self.budget_violations
            or self.share_violations
            or self.leaks
        ) and (self.swept or self.bo_count == 0)

    @property
    def swap_gbps(self) -> float:
        """Bytes evicted plus restored per second during the timed phase."""
        return _gbps(self.run_bytes_evicted + self.run_bytes_restored, self.run_s)

    @property
    def verify_gbps(self) -> float:
        return _gbps(self.verified_bytes, self.run_s)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        del out["latencies_ms"]
        out["config"]["manager_options"] = {k: str(v) for k, v in self.config.manager_options.items()}
        out.update(ok=self.ok, swap_gbps=self.swap_gbps, verify_gbps=self.verify_gbps)
        return out


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else 0.0


def _share(n: int, parts: int, index: int) -> int:
    """Part ``index`` of ``n`` split into ``parts`` nearly equal parts."""
    return n // parts + (1 if index < n % parts else 0)


# -- one worker: its BOs and their model --------------------------------------------


class _Kernels:
    """The ``add1``..``add{MAX_MULTI}`` kernels, built once per manager."""

    def __init__(self, mgr: Manager) -> None:
        program = cl.Program(mgr.context, _KERNEL_SOURCE).build()
        self.add = {k: cl.Kernel(program, f"add{k}") for k in range(1, MAX_MULTI + 1)}


class _Worker:
    """One thread's BOs and the model of what each holds.

    BO ``i`` holds word ``j == (seeds[i] + j) mod 2**32``. An operation picks
    one BO (``multi``: up to :data:`MAX_MULTI` whose sizes together fit the
    worker's share of the budget), checks every word of each if ``verify``,
    then either adds a random constant to each with one kernel launch (every
    ``kernel_every``-th operation) or rewrites each from the host with a new
    seed.

    Notes:
        Driven by one thread. The counters are read by the sampling thread.
    """

    def __init__(
        self,
        mgr: Manager,
        kernels: _Kernels,
        config: StressConfig,
        index: int,
        ramp: npt.NDArray[np.uint32],
    ) -> None:
        self.mgr = mgr
        self.kernels = kernels
        self.config = config
        self.label = f"p{config.process_index}.t{index}"
        self.rng = random.Random(f"gpubo-stress/{config.seed}/{config.process_index}/{index}")
        self.share_bytes = config.budget_bytes // config.threads
        self.sizes = self._plan_sizes(index)
        self.bos: list[BufferObject] = []
        self.seeds: list[int] = []
        self._ramp = ramp
        self._scratch = np.empty(config.max_nbytes // 4, np.uint32)
        self._events: deque[cl.Event] = deque()
        # Counters (written by the worker's thread only):
        self.operations = 0
        self.uses = 0
        self.kernel_launches = 0
        self.multi_launches = 0
        self.verified_bytes = 0
        self.written_bytes = 0
        self.swept_bytes = 0
        self.mismatch_count = 0
        self.mismatches: list[Mismatch] = []
        self.latencies_ms: list[float] = []
        self.error: str | None = None
        self.integrity_error = False

    def _plan_sizes(self, index: int) -> list[int]:
        c, rng = self.config, self.rng
        if c.count is not None:
            n = _share(c.count, c.threads, index)
            return [self._draw(rng) for _ in range(n)]
        if not c.random_sizes:
            return [c.min_nbytes] * _share(c.total_bytes // c.min_nbytes, c.threads, index)
        target = _share(c.total_bytes, c.threads, index)
        sizes: list[int] = []
        total = 0
        while total < target:  # overshoots by less than one BO: at least the asked oversubscription
            size = self._draw(rng)
            sizes.append(size)
            total += size
        return sizes

    def _draw(self, rng: random.Random) -> int:
        c = self.config
        if not c.random_sizes:
            return c.min_nbytes
        return 4 * rng.randint(c.min_nbytes // 4, c.max_nbytes // 4)

    # -- model ---------------------------------------------------------------

    def _pattern(self, seed: int, nbytes: int) -> npt.NDArray[np.uint32]:
        """The expected words for ``seed`` (a scratch array, overwritten by the next call)."""
        words = nbytes // 4
        return np.add(self._ramp[:words], np.uint32(seed), out=self._scratch[:words])

    def _new_seed(self) -> int:
        return self.rng.randrange(2**32)

    # -- phases --------------------------------------------------------------

    def setup(self, stop: threading.Event, after_each: Callable[[], None]) -> None:
        """Allocate and fill every BO (more than the budget: this already evicts)."""
        for i, nbytes in enumerate(self.sizes):
            if stop.is_set():
                break
            bo = self.mgr.alloc(nbytes, name=f"{self.label}.bo{i}")
            self.bos.append(bo)
            seed = self._new_seed()
            self.seeds.append(seed)
            bo.write(self._pattern(seed, nbytes))
            after_each()

    def step(self) -> None:
        """One operation (see the class docstring)."""
        rng, c = self.rng, self.config
        picked = self._pick()
        if c.verify:
            for i in picked:
                self.check(i, self.operations)
        if c.kernel_every and self.operations % c.kernel_every == c.kernel_every - 1:
            self._launch(picked, [rng.randrange(1, 2**32) for _ in picked])
        else:
            for i in picked:
                seed = self._new_seed()
                self.bos[i].write(self._pattern(seed, self.sizes[i]))
                self.seeds[i] = seed
                self.written_bytes += self.sizes[i]
        self.uses += len(picked)
        self.operations += 1

    def _pick(self) -> list[int]:
        n = len(self.bos)
        if not self.config.multi:
            return [self.rng.randrange(n)]
        candidates = self.rng.sample(range(n), min(n, MAX_MULTI))
        picked, nbytes = [candidates[0]], self.sizes[candidates[0]]
        for i in candidates[1:]:
            if nbytes + self.sizes[i] <= self.share_bytes:
                picked.append(i)
                nbytes += self.sizes[i]
        return picked

    def _launch(self, picked: list[int], values: list[int]) -> None:
        args: list[Any] = []
        for i, value in zip(picked, values, strict=True):
            args += [self.bos[i], np.uint32(self.sizes[i] // 4), np.uint32(value)]
        words = max(self.sizes[i] for i in picked) // 4
        kernel = self.kernels.add[len(picked)]
        swapped = any(self.bos[i].state is State.SWAPPED for i in picked)
        start = time.perf_counter()
        event = self.mgr.launch(kernel, (words,), None, *args)
        if swapped:
            self._latency(start)
        self._events.append(event)
        if len(self._events) > _MAX_PENDING_EVENTS:
            self._events.popleft().wait()
        for i, value in zip(picked, values, strict=True):
            self.seeds[i] = (self.seeds[i] + value) % 2**32
        self.kernel_launches += 1
        if len(picked) > 1:
            self.multi_launches += 1

    def check(self, index: int, operation: int) -> None:
        """Read BO ``index`` (restoring it if needed) and compare every word with the model."""
        bo, nbytes = self.bos[index], self.sizes[index]
        swapped = bo.state is State.SWAPPED
        start = time.perf_counter()
        found = bo.read(np.uint32)
        if swapped and operation >= 0:
            self._latency(start)
        if operation >= 0:
            self.verified_bytes += nbytes
        else:
            self.swept_bytes += nbytes
        expected = self._pattern(self.seeds[index], nbytes)
        if np.array_equal(found, expected):
            return
        bad = np.flatnonzero(found != expected)
        first = int(bad[0])
        self.mismatch_count += 1
        if len(self.mismatches) < MAX_REPORTED_MISMATCHES:
            self.mismatches.append(
                Mismatch(bo.label(), first * 4, int(expected[first]), int(found[first]), len(bad), operation)
            )
        bo.write(expected)  # resync, so one corruption is reported once

    def _latency(self, start: float) -> None:
        if len(self.latencies_ms) < _MAX_LATENCIES:
            self.latencies_ms.append((time.perf_counter() - start) * 1e3)

    def drain(self) -> None:
        """Wait for every kernel this worker launched."""
        while self._events:
            self._events.popleft().wait()

    def sweep(self) -> None:
        """Check every BO once (the final sweep)."""
        for i in range(len(self.bos)):
            self.check(i, -1)

    def free(self) -> None:
        for bo in self.bos:
            bo.free()

    def run(self, deadline: float, stop: threading.Event, after_each: Callable[[], None]) -> None:
        """Operations until ``loops``, the deadline or ``stop``.

        Errors are recorded (and set ``stop``), not raised; KeyboardInterrupt
        goes through.
        """
        loops = self.config.loops
        try:
            while not stop.is_set():
                if loops is not None:
                    if self.operations >= loops:
                        break
                elif time.monotonic() >= deadline:
                    break
                self.step()
                after_each()
        except Exception as e:
            self.record(e)
            stop.set()

    def record(self, error: BaseException) -> None:
        if self.error is None:
            self.error = f"{type(error).__name__}: {error}"
            if not isinstance(error, GpuboError):
                log.error("worker %s failed unexpectedly", self.label, exc_info=error)
        self.integrity_error = self.integrity_error or isinstance(error, IntegrityError)


# -- one process: a manager and its workers ----------------------------------------


class _LocalRun:
    """One manager and ``config.threads`` workers, in the calling process.

    ``should_stop`` is polled between operations: when it says yes the run
    stops as if its time was up (the operations under way finish, the
    final sweep and the leak checks still run) and is marked interrupted.
    """

    def __init__(
        self,
        config: StressConfig,
        on_sample: Callable[[Sample], None],
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        self.config = config
        self.on_sample = on_sample
        self.should_stop = should_stop or (lambda: False)
        self.report = StressReport(config=config)
        self.workers: list[_Worker] = []
        self.stop = threading.Event()
        self._start = time.monotonic()
        self._run_start: float | None = None
        self._phase = "setup"
        self._next_sample = self._start

    def run(self) -> StressReport:
        r = self.report
        try:
            with (
                _store_path(self.config.store) as store,
                Manager(**manager_kwargs(dataclasses.replace(self.config, store=store))) as mgr,
            ):
                r.device = mgr.backend.name
                self._run_with(mgr)
        except GpuboError as e:
            r.error = r.error or f"{type(e).__name__}: {e}"
        except KeyboardInterrupt:
            r.interrupted = True
        self._phase = "done"
        return r

    def _run_with(self, mgr: Manager) -> None:
        c, r = self.config, self.report
        kernels = _Kernels(mgr)
        ramp = np.arange(c.max_nbytes // 4, dtype=np.uint32)
        self.workers = [_Worker(mgr, kernels, c, t, ramp) for t in range(c.threads)]
        try:
            try:
                for w in self.workers:
                    w.setup(self.stop, lambda: self._sample(mgr))
                r.setup_s = time.monotonic() - self._start
                before = mgr.stats()
                self._timed_phase(mgr)
                after = mgr.stats()
                r.run_evictions = after.evictions - before.evictions
                r.run_restores = after.restores - before.restores
                r.run_bytes_evicted = after.bytes_evicted - before.bytes_evicted
                r.run_bytes_restored = after.bytes_restored - before.bytes_restored
                for w in self.workers:
                    w.drain()
                self._phase = "sweep"
                for w in self.workers:
                    w.sweep()
                r.swept = True
            except KeyboardInterrupt:
                r.interrupted = True
            except Exception as e:
                self.workers[0].record(e)
            r.stats = dataclasses.asdict(mgr.stats())
            self._phase = "done"
            self._sample(mgr, force=True)
        finally:
            r.bo_count = sum(len(w.bos) for w in self.workers)
            r.allocated_bytes = sum(bo.nbytes for w in self.workers for bo in w.bos)
            self._collect()
            self._free_and_check(mgr)

    def _timed_phase(self, mgr: Manager) -> None:
        c = self.config
        self._phase = "run"
        self._run_start = time.monotonic()
        deadline = self._run_start + c.seconds
        if c.threads == 1:
            try:
                self.workers[0].run(deadline, self.stop, lambda: self._sample(mgr))
            finally:
                self.report.run_s = time.monotonic() - self._run_start
            return
        threads = [
            threading.Thread(
                target=w.run, args=(deadline, self.stop, lambda: None), name=f"gpubo-stress-{w.label}"
            )
            for w in self.workers
        ]
        for t in threads:
            t.start()
        try:
            while any(t.is_alive() for t in threads):
                threads[0].join(timeout=min(c.progress_s, 0.05))
                self._sample(mgr)
        except KeyboardInterrupt:
            self.report.interrupted = True
            raise
        finally:
            self.stop.set()
            for t in threads:
                t.join()
            self.report.run_s = time.monotonic() - self._run_start

    def _sample(self, mgr: Manager, force: bool = False) -> None:
        now = time.monotonic()
        if self.should_stop():
            self.stop.set()
            self.report.interrupted = True
        if not force and now < self._next_sample:
            return
        self._next_sample = now + self.config.progress_s
        s = mgr.stats()
        if s.resident_bytes + s.pooled_bytes > s.budget:
            self.report.budget_violations += 1
        sample = Sample(
            elapsed_s=now - self._start,
            run_s=0.0 if self._run_start is None else now - self._run_start,
            phase=self._phase,
            operations=sum(w.operations for w in self.workers),
            mismatches=sum(w.mismatch_count for w in self.workers),
            budget_bytes=s.budget,
            resident_bytes=s.resident_bytes,
            pooled_bytes=s.pooled_bytes,
            swapped_bytes=s.swapped_bytes,
            evictions=s.evictions,
            restores=s.restores,
            bytes_evicted=s.bytes_evicted,
            bytes_restored=s.bytes_restored,
        )
        self.report.timeline.append(sample)
        self.on_sample(sample)

    def _collect(self) -> None:
        r = self.report
        for w in self.workers:
            r.operations += w.operations
            r.uses += w.uses
            r.kernels += w.kernel_launches
            r.multi_launches += w.multi_launches
            r.verified_bytes += w.verified_bytes
            r.written_bytes += w.written_bytes
            r.swept_bytes += w.swept_bytes
            r.mismatch_count += w.mismatch_count
            r.mismatches.extend(w.mismatches)
            r.latencies_ms.extend(w.latencies_ms)
            r.error = r.error or w.error
            r.check_failed = r.check_failed or w.integrity_error
        del r.mismatches[MAX_REPORTED_MISMATCHES:]
        _set_percentiles(r)

    def _free_and_check(self, mgr: Manager) -> None:
        """Free every BO and check that device and store bytes are back to zero."""
        r = self.report
        try:
            for w in self.workers:
                w.drain()
                w.free()
            mgr.evict(mgr.budget)  # the pool too
            s = mgr.stats()
        except GpuboError as e:
            r.leaks.append(f"freeing the BOs failed: {type(e).__name__}: {e}")
            return
        for name in ("bo_count", "resident_bytes", "pooled_bytes", "swapped_bytes", "pinned_bytes"):
            if getattr(s, name):
                r.leaks.append(f"{name} is {getattr(s, name)} after every BO was freed")
        if s.store_used_bytes:
            r.leaks.append(
                f"the store still holds {format_bytes(s.store_used_bytes)} after every BO was freed"
            )


@contextlib.contextmanager
def _store_path(store: str | None, parent: str | None = None) -> Iterator[str]:
    """``store``, or a private temporary directory (under ``parent``) removed afterwards.

    An explicit path, so that ``$GPUBO_STORE`` (which a Manager given
    ``store=None`` would open) never puts a stress run on the user's store,
    nor several processes on one store.
    """
    if store is not None:
        yield store
        return
    private = PrivateDir("gpubo-stress-", parent)
    try:
        yield private.path
    finally:
        private.remove()


def _set_percentiles(r: StressReport) -> None:
    r.restoring_uses = len(r.latencies_ms)
    if r.latencies_ms:
        r.restore_latency_p50_ms = float(np.percentile(r.latencies_ms, 50))
        r.restore_latency_p99_ms = float(np.percentile(r.latencies_ms, 99))


# -- several processes --------------------------------------------------------------


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):  # pragma: no cover - best effort
        pass


def _process_main(
    config: StressConfig, conn: multiprocessing.connection.Connection, parent: int, stop: Any
) -> None:
    """Entry point of one ``--processes`` child: run, stream samples, send the report.

    Ctrl-C is the parent's to handle (it started this process with SIGINT
    ignored); the parent sets ``stop`` (a multiprocessing Event) to end the
    run between operations.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before prctl took effect
        return

    def send(sample: Sample) -> None:
        conn.send(("sample", sample))

    run = _LocalRun(config, send, should_stop=lambda: stop.is_set() or os.getppid() != parent)
    try:
        report = run.run()
    except BaseException as e:  # the parent must always get an answer
        report = StressReport(config=config, error=f"{type(e).__name__}: {e}")
    report.timeline = []  # the parent keeps its own, aggregated
    conn.send(("report", report))
    conn.close()


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Ignore SIGINT inside (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _aggregate(samples: Mapping[int, Sample], elapsed_s: float, shared: bool = False) -> Sample:
    values = list(samples.values())
    phase = min((s.phase for s in values), key=_PHASES.index)

    def total(name: str) -> int:
        return sum(getattr(s, name) for s in values)

    return Sample(
        elapsed_s=elapsed_s,
        run_s=max(s.run_s for s in values),
        phase=phase,
        operations=total("operations"),
        mismatches=total("mismatches"),
        budget_bytes=max(s.budget_bytes for s in values) if shared else total("budget_bytes"),
        resident_bytes=total("resident_bytes"),
        pooled_bytes=total("pooled_bytes"),
        swapped_bytes=total("swapped_bytes"),
        evictions=total("evictions"),
        restores=total("restores"),
        bytes_evicted=total("bytes_evicted"),
        bytes_restored=total("bytes_restored"),
    )


_SUMMED_FIELDS = (
    "bo_count",
    "allocated_bytes",
    "operations",
    "uses",
    "kernels",
    "multi_launches",
    "verified_bytes",
    "written_bytes",
    "swept_bytes",
    "run_evictions",
    "run_restores",
    "run_bytes_evicted",
    "run_bytes_restored",
    "mismatch_count",
    "budget_violations",
)


def _merge(config: StressConfig, parts: list[StressReport]) -> StressReport:
    r = StressReport(config=config)
    r.device = parts[0].device if parts else ""
    for part in parts:
        for name in _SUMMED_FIELDS:
            setattr(r, name, getattr(r, name) + getattr(part, name))
        r.setup_s = max(r.setup_s, part.setup_s)
        r.run_s = max(r.run_s, part.run_s)
        r.mismatches.extend(part.mismatches)
        r.latencies_ms.extend(part.latencies_ms)
        r.error = r.error or part.error
        r.check_failed = r.check_failed or part.check_failed
        r.interrupted = r.interrupted or part.interrupted
        r.leaks.extend(f"process {part.config.process_index}: {leak}" for leak in part.leaks)
        for key, value in part.stats.items():
            if isinstance(value, int):
                r.stats[key] = r.stats.get(key, 0) + value
            else:  # the transfer strategy: the same in every process
                r.stats[key] = value
    if config.share is not None and "budget" in r.stats:
        r.stats["budget"] = config.budget_bytes  # one budget for all, not one each
    r.swept = bool(parts) and all(p.swept or p.bo_count == 0 for p in parts)
    del r.mismatches[MAX_REPORTED_MISMATCHES:]
    _set_percentiles(r)
    return r


def _run_processes(
    config: StressConfig, on_sample: Callable[[Sample], None], should_stop: Callable[[], bool]
) -> StressReport:
    """``config.processes`` children, each a :class:`_LocalRun` on its share.

    When ``should_stop`` says yes, the children are asked (through a shared
    event) to stop between operations and report. They start with SIGINT
    ignored, so that a Ctrl-C on the terminal, which reaches the whole
    process group, cannot kill one half-way; the parent decides.
    """
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    start = time.monotonic()
    children: list[tuple[Any, multiprocessing.connection.Connection]] = []
    if config.store is not None:
        os.makedirs(config.store, mode=0o700, exist_ok=True)
    for i in range(config.processes):
        parent_end, child_end = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=_process_main,
            args=(config.for_process(i), child_end, os.getpid(), stop),
            name=f"gpubo-stress-p{i}",
            daemon=True,
        )
        with _sigint_ignored():  # inherited through exec: the child starts ignoring it
            proc.start()
        child_end.close()
        children.append((proc, parent_end))
    latest: dict[int, Sample] = {}
    reports: dict[int, StressReport] = {}
    timeline: list[Sample] = []
    share_checks = _ShareCheck(config.share)
    errors: list[str] = []
    interrupted = False
    next_sample = start + config.progress_s
    open_conns = {conn: i for i, (_, conn) in enumerate(children)}
    try:
        while open_conns:
            if not interrupted and should_stop():
                interrupted = True
                stop.set()
            for ready in multiprocessing.connection.wait(list(open_conns), timeout=0.05):
                conn = cast(multiprocessing.connection.Connection, ready)
                i = open_conns[conn]
                try:
                    kind, payload = conn.recv()
                except (EOFError, OSError):
                    del open_conns[conn]
                    continue
                if kind == "sample":
                    latest[i] = cast(Sample, payload)
                else:
                    reports[i] = cast(StressReport, payload)
            now = time.monotonic()
            if latest and now >= next_sample:
                next_sample = now + config.progress_s
                sample = _aggregate(latest, now - start, config.share is not None)
                timeline.append(sample)
                on_sample(sample)
                share_checks.check()
    except KeyboardInterrupt:
        interrupted = True  # ask the children to stop, and collect what they send
        stop.set()
        deadline = time.monotonic() + 30
        for i, (_, conn) in enumerate(children):
            while i not in reports and time.monotonic() < deadline and conn.poll(0.1):
                try:
                    kind, payload = conn.recv()
                except (EOFError, OSError):
                    break
                if kind == "report":
                    reports[i] = payload
    finally:
        for proc, conn in children:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
            conn.close()
    for i, (proc, _) in enumerate(children):
        if i not in reports:
            errors.append(f"process {i} died without a report (exit code {proc.exitcode})")
    report = _merge(config, [reports[i] for i in sorted(reports)])
    report.interrupted = report.interrupted or interrupted
    if errors:
        report.error = "; ".join(errors) if report.error is None else f"{report.error}; {'; '.join(errors)}"
    if latest:
        timeline.append(_aggregate(latest, time.monotonic() - start, config.share is not None))
    report.timeline = timeline
    report.share_samples, report.share_violations = share_checks.samples, share_checks.violations
    if share_checks.error:
        report.error = share_checks.error if report.error is None else f"{report.error}; {share_checks.error}"
    return report


class _ShareCheck:
    """Reads a share's ledger at each progress sample: the members'
    reservations and charges must fit the budget in every one."""

    def __init__(self, share: str | None) -> None:
        self.share = share
        self.samples = self.violations = 0
        self.error: str | None = None

    def check(self) -> None:
        if self.share is None:
            return
        try:
            state, rows = read_share(self.share)
        except ShareError as e:
            self.error = f"share ledger: {e}"
            return
        if state is None:
            return
        self.samples += 1
        if (
            sum(r.reserved_bytes for r in rows) > state["budget"]
            or sum(r.charged_bytes for r in rows) > state["budget"]
            or any(r.charged_bytes > r.reserved_bytes for r in rows)
        ):
            self.violations += 1
            log.error("share %s: the ledger exceeds the budget: %s", self.share, rows)


# -- host memory pressure --------------------------------------------------------------

#: The hog: stdlib only, so it starts fast and holds nothing but its chunks.
#: argv: target bytes, floor bytes (MemAvailable it never goes below), parent pid.
_HOG_SOURCE = r"""
import ctypes, mmap, os, signal, sys, time
target, floor, parent = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
try:
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # die with the parent
except Exception:
    pass
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the run; the run stops this child
try:
    with open("/proc/self/oom_score_adj", "w") as f:  # the first one the OOM killer takes
        f.write("1000")
except OSError:
    pass
CHUNK = 64 << 20
BLOCK = b"\xa5" * (1 << 20)
chunks, peak, ready = [], 0, False
stopping = False

def on_term(signum, frame):
    global stopping
    stopping = True

signal.signal(signal.SIGTERM, on_term)

def available():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0

while not stopping and os.getppid() == parent:
    avail = available()
    held = len(chunks) * CHUNK
    if avail < floor and chunks:
        chunks.pop().close()
        continue
    if held + CHUNK <= target and avail - CHUNK > floor:
        m = mmap.mmap(-1, CHUNK)
        for _ in range(CHUNK // len(BLOCK)):
            m.write(BLOCK)
        chunks.append(m)
        peak = max(peak, held + CHUNK)
        continue
    if not ready:
        ready = True
        print("ready", held, flush=True)
    time.sleep(0.05)
print("peak", peak, flush=True)
"""


def _meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, _, rest = line.partition(":")
            out[name] = int(rest.split()[0]) * 1024
    return out


class HostPressure:
    """A child process that holds part of the host's memory while a run goes on.

    It maps and touches 64 MiB chunks until it holds ``fraction`` of the
    ``MemAvailable`` seen at start, but never lets ``MemAvailable`` fall
    below a floor (an eighth of the machine's memory, at least 1 GiB, plus
    ``reserve_bytes`` for the run itself): it gives chunks back when the
    floor is crossed. Its OOM score is the highest, and it dies with its
    parent. :meth:`__exit__` stops it (SIGTERM, then SIGKILL) and reads
    the most it held into ``peak_bytes``.

    Raises (``__enter__``):
        OSError: not Linux (no ``/proc/meminfo``), or the child cannot start.
    """

    def __init__(
        self,
        fraction: float,
        reserve_bytes: int = 0,
        ramp_timeout_s: float = 20.0,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        if not 0 < fraction <= 0.9:
            raise ValueError(f"fraction must be in (0, 0.9], got {fraction}")
        info = _meminfo()
        self.target_bytes = int(fraction * info["MemAvailable"])
        self.floor_bytes = max(1 << 30, info["MemTotal"] // 8) + reserve_bytes
        self.ramp_timeout_s = ramp_timeout_s
        self.should_stop = should_stop or (lambda: False)
        self.held_bytes = 0  #: what it held when it said it was ready
        self.peak_bytes = 0
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> HostPressure:
        args = [str(self.target_bytes), str(self.floor_bytes), str(os.getpid())]
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _HOG_SOURCE, *args],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        try:
            self._wait_ready(self._proc)
        except BaseException:
            self.__exit__()
            raise
        log.info("host pressure: holding %s", format_bytes(self.held_bytes))
        return self

    def _wait_ready(self, proc: subprocess.Popen[str]) -> None:
        """Wait (up to ``ramp_timeout_s``) until the child holds what it will hold."""
        assert proc.stdout is not None
        deadline = time.monotonic() + self.ramp_timeout_s
        while time.monotonic() < deadline and not self.should_stop():
            readable, _, _ = select.select([proc.stdout], [], [], 0.1)
            if readable:
                line = proc.stdout.readline().split()
                if line[:1] == ["ready"]:
                    self.held_bytes = int(line[1])
                return
        if not self.should_stop():
            log.warning("host pressure: still ramping up after %.0f s", self.ramp_timeout_s)

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def __exit__(self, *exc: object) -> None:
        proc = self._proc
        if proc is None:
            return
        self._proc = None
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            out, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        for line in out.splitlines():
            words = line.split()
            if words[:1] == ["peak"]:
                self.peak_bytes = int(words[1])
        self.peak_bytes = max(self.peak_bytes, self.held_bytes)


# -- the entry point --------------------------------------------------------------------


def run_stress(
    config: StressConfig,
    on_sample: Callable[[Sample], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> StressReport:
    """Run the stress workload that ``config`` describes and return its report.

    Errors of gpubo or the device (a store too small, out of memory, a
    checksum mismatch) do not raise: they end the run and are recorded in
    ``report.error`` (``report.check_failed`` for data errors).

    ``should_stop`` (polled between operations) ends the run early and
    cleanly: operations under way finish, the final sweep and the leak
    checks run, and ``report.interrupted`` is set. A KeyboardInterrupt
    raised inside the run also ends it with ``interrupted`` set, but it may
    land in the middle of a gpubo call; callers that can should turn Ctrl-C
    into ``should_stop`` (``gpubo stress`` does).

    Raises:
        ValueError: the config cannot run (see :meth:`StressConfig.check`).
    """
    config.check()
    on_sample = on_sample or (lambda sample: None)
    should_stop = should_stop or (lambda: False)
    pressure: HostPressure | None = None
    with contextlib.ExitStack() as stack:
        if config.host_pressure > 0:
            reserve = 2 * config.budget_bytes + 2 * config.total_bytes + 512 * MiB
            pressure = stack.enter_context(
                HostPressure(config.host_pressure, reserve, should_stop=should_stop)
            )
        if config.processes > 1:
            report = _run_processes(config, on_sample, should_stop)
        else:
            report = _LocalRun(config, on_sample, should_stop).run()
    if pressure is not None:
        report.host_pressure_bytes = pressure.peak_bytes
    return report


# -- selftest: the fast checks of the pressure suite -------------------------------------


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one selftest check."""

    name: str
    ok: bool
    detail: str
    seconds: float


class CheckFailed(AssertionError):
    """A selftest check found gpubo misbehaving."""


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


@dataclass(frozen=True)
class _SelftestEnv:
    """Where selftest checks put their stores, extra Manager options, and a size scale.

    ``scale`` 1 is the fast part (seconds in all); larger scales multiply
    budgets, working sets and run lengths (``gpubo selftest --heavy``,
    ``GPUBO_HEAVY=1`` for the pressure suite).
    """

    store_dir: str | None
    manager_options: Mapping[str, Any]
    scale: int = 1

    @contextlib.contextmanager
    def store(self) -> Iterator[str]:
        """A fresh store directory under ``store_dir`` (or the temporary directory), removed afterwards."""
        with _store_path(None, self.store_dir) as path:
            yield path


def _stress_check(env: _SelftestEnv, oversubscribe: float = 1.5, **overrides: Any) -> str:
    """A short stress run (sized by ``env.scale``); every check it makes must pass, and it must swap."""
    s = env.scale
    size = MiB if s == 1 else 4 * MiB
    base: dict[str, Any] = {
        "budget_bytes": 8 * MiB * s,
        "min_nbytes": size,
        "max_nbytes": size,
        "seconds": 120.0 * s,  # a ceiling only: every check ends after its loops
        "loops": 200 * s,
        "seed": 20240,
        "manager_options": env.manager_options,
    }
    base.update(overrides)
    p, t = base.get("processes", 1), base.get("threads", 1)
    base["total_bytes"] = int(base["budget_bytes"] * oversubscribe)
    base["store_size_bytes"] = p * max(64 * MiB, 2 * (base["total_bytes"] // p + base["max_nbytes"] * t))
    with env.store() as store:
        base["store"] = os.path.join(store, "stores") if p > 1 else store
        config = StressConfig(**base)
        r = run_stress(config)
    _expect(r.error is None, f"error: {r.error}")
    _expect(not r.mismatch_count, f"{r.mismatch_count} mismatches, first {r.mismatches[:1]}")
    _expect(not r.leaks, f"leaks: {r.leaks}")
    _expect(not r.budget_violations, f"budget exceeded in {r.budget_violations} samples")
    _expect(r.swept, "the final sweep did not run")
    _expect(r.allocated_bytes >= oversubscribe * config.budget_bytes, "the budget was not oversubscribed")
    _expect(r.stats.get("evictions", 0) > 0 and r.stats.get("restores", 0) > 0, "nothing was swapped")
    if config.verify:
        _expect(r.verified_bytes > 0, "nothing was verified on use")
    if config.multi:
        _expect(r.multi_launches > 0, "no kernel launch used several BOs")
    return (
        f"{r.operations} operations, {r.stats['evictions']} evictions, {r.stats['restores']} restores, "
        f"{format_bytes(r.verified_bytes + r.swept_bytes)} verified"
    )


def _check_basic(env: _SelftestEnv) -> str:
    return _stress_check(env, verify=False)


def _check_verify(env: _SelftestEnv) -> str:
    return _stress_check(env, verify=True)


def _check_random(env: _SelftestEnv) -> str:
    return _stress_check(env, min_nbytes=4 * KiB, max_nbytes=(2 if env.scale == 1 else 16) * MiB)


def _check_heavy(env: _SelftestEnv) -> str:
    return _stress_check(env, oversubscribe=3.0)


def _check_multi(env: _SelftestEnv) -> str:
    return _stress_check(env, multi=True, kernel_every=1)


def _check_parallel(env: _SelftestEnv) -> str:
    return _stress_check(env, threads=4, budget_bytes=16 * MiB * env.scale)


def _check_processes(env: _SelftestEnv) -> str:
    return _stress_check(env, processes=2, threads=2, budget_bytes=16 * MiB * env.scale)


def _check_store_full(env: _SelftestEnv) -> str:
    """The RFC's scenario: back BOs up until the store is full, then recover every one."""
    nbytes = 256 * KiB
    with env.store() as store, Manager(1 * MiB, store=store, store_size=8 * MiB, **env.manager_options) as m:
        ramp = np.arange(nbytes // 4, dtype=np.uint32)
        bos: list[BufferObject] = []
        for i in range(10_000):
            try:
                bo = m.alloc(nbytes)
            except StoreFull:
                break
            bo.write(ramp + np.uint32(i))
            bos.append(bo)
        else:
            raise CheckFailed("the store never filled up")
        _expect(len(bos) * nbytes > m.budget, "the store filled before the budget was oversubscribed")
        count = m.stats().bo_count
        try:
            m.alloc(nbytes)
        except StoreFull:
            pass
        else:
            raise CheckFailed("an alloc past a full store succeeded")
        _expect(m.stats().bo_count == count, "a refused alloc changed the BO count")
        m.evict(m.budget)
        _expect(m.stats().resident_bytes == 0, "BOs stayed resident after evicting everything")
        for i, bo in enumerate(bos):
            _expect(np.array_equal(bo.read(np.uint32), ramp + np.uint32(i)), f"BO {i} came back wrong")
        bos[0].free()
        m.alloc(nbytes).free()  # freeing one makes room for one again
        for bo in bos[1:]:
            bo.free()
        s = m.stats()
        _expect(s.store_used_bytes == 0 and s.swapped_bytes == 0, f"store not empty after freeing: {s}")
    return f"{len(bos)} BOs of {format_bytes(nbytes)} filled an 8MiB store; all recovered"


def _check_bo_over_budget(env: _SelftestEnv) -> str:
    """A BO larger than the budget is refused up front, and nothing is evicted for it."""
    with env.store() as store, Manager(2 * MiB, store=store, store_size=16 * MiB, **env.manager_options) as m:
        bo = m.alloc(MiB)
        bo.write(np.full(MiB // 4, 7, np.uint32))
        before = m.stats()
        try:
            m.alloc(2 * MiB + 4)
        except OutOfDeviceMemory as e:
            _expect(e.nbytes == 2 * MiB + 4, f"OutOfDeviceMemory.nbytes is {e.nbytes}")
        else:
            raise CheckFailed("a BO larger than the budget was allocated")
        after = m.stats()
        _expect(after == before, f"a refused alloc changed the manager: {before} -> {after}")
        _expect(bo.state is State.RESIDENT, "a refused alloc evicted a BO")
        _expect(bool((bo.read(np.uint32) == 7).all()), "a refused alloc changed a BO")
    return "OutOfDeviceMemory up front, nothing evicted"


#: The checks of ``gpubo selftest`` (and of the pressure suite's fast part), in order.
SELFTEST_CHECKS: dict[str, Callable[[_SelftestEnv], str]] = {
    "basic": _check_basic,
    "verify": _check_verify,
    "random": _check_random,
    "heavy": _check_heavy,
    "multi": _check_multi,
    "parallel": _check_parallel,
    "processes": _check_processes,
    "store-full": _check_store_full,
    "budget-smaller-than-bo": _check_bo_over_budget,
}


def run_selftest(
    names: list[str] | None = None,
    store_dir: str | None = None,
    manager_options: Mapping[str, Any] | None = None,
    on_result: Callable[[CheckResult], None] | None = None,
    scale: int = 1,
) -> list[CheckResult]:
    """Run the selftest checks ``names`` (default: all) and return their results.

    ``scale`` > 1 makes the stress checks that many times bigger and longer.

    A check that raises fails with the exception as its detail; the others
    still run.

    Raises:
        ValueError: an unknown check name.
    """
    names = list(SELFTEST_CHECKS) if names is None else names
    unknown = [n for n in names if n not in SELFTEST_CHECKS]
    if unknown:
        raise ValueError(f"unknown selftest check(s): {', '.join(unknown)}")
    env = _SelftestEnv(store_dir, dict(manager_options or {}), scale)
    results = []
    for name in names:
        start = time.monotonic()
        try:
            detail, ok = SELFTEST_CHECKS[name](env), True
        except CheckFailed as e:
            detail, ok = str(e), False
        except Exception as e:
            detail, ok = f"{type(e).__name__}: {e}", False
            log.debug("selftest check %s raised", name, exc_info=True)
        result = CheckResult(name, ok, detail, time.monotonic() - start)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results
