"""``gpubo bench``: gpubo's eviction and restore side by side with the limits.

One run measures, with several repetitions and medians:

1. ``limit``: raw blocking ``enqueue_copy`` D2H / H2D into preallocated host
   arrays, and ``pwrite`` + ``fdatasync`` of the same bytes (the durable limit);
2. ``throughput``: gpubo eviction and restore per BO size, store backend,
   durability and checksum setting, in GB/s and as a ratio to (1) (each BO is
   dirtied by a 1-byte write before a timed eviction, so it really copies),
   and for BOs of 1 MiB or more in ``lazy`` stores once more after the
   store's pages were written back (what a long run sees);
   ``batched``: small BOs (4 KiB, 64 KiB) evicted many at a time by
   ``mgr.evict`` (gathered on the device into one staging buffer, one store
   transaction), against the raw D2H of each BO and of the same bytes as one
   buffer, and against gpubo evicting them one by one; then the same BOs
   restored by ``mgr.prefetch`` (batched: their copies enqueued together)
   and one by one, against the raw H2D of each BO and of the same bytes as
   one buffer (printed as 2c); each timed call right after its raw copies,
   the four pairs in an order that rotates each rep;
3. ``staged``: download into a freshly allocated host array and
   ``store.write`` that array, against gpubo's direct path; time, and host
   memory allocated while evicting (tracemalloc peak, RSS and anonymous RSS
   growth); the two sides' reps alternate (so do sections 4 and 6's);
4. ``zict``: ``zict.Buffer`` over a dict with a pickling ``zict.File`` slow
   tier spilling and unspilling the same arrays, against gpubo evict+restore
   (skipped, and said so, when zict is not importable: ``pip install gpubo[bench]``);
5. ``bookkeeping``: a ``read`` of a 4 KiB resident BO and an eviction decision
   (``mgr.evict`` of one tiny BO) with 1,000 / 10,000 / 100,000 live BOs;
6. ``gemm``: a blocked matrix multiply (``demos/out_of_core_gemm.py``) with
   operands 4x the budget, against the same multiply with everything resident;
   ``overlap``: a prefetch issued behind a queued 60 ms kernel, against the
   kernel (printed as 6b);
7. ``share``: a device share (:mod:`gpubo._bench_share`): an allocation
   whose room another member process makes on request against one that
   evicts a BO of its own (p50/p99); 4 processes on one share against 4
   processes splitting the budget and one process of 4 threads; and one
   busy process beside 3 idle ones, on one share against a split budget.

The measuring functions return plain data (JSON-ready dicts), each goal's
value rebuilt by ``tests/test_bench.py`` from the samples it rests on;
:func:`combine_runs` judges the goals of several runs on their medians;
printing lives in :func:`tables` and the ``gpubo bench`` command.
The per-size eviction/restore machinery (:class:`Baselines`,
:class:`GpuboCase`, :func:`bench_size`) is shared with
``benchmarks/evict_restore.py``, the detailed benchmark of the copy path.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import mmap
import os
import pickle
import platform
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pyopencl as cl

import gpubo
from gpubo import BufferObject, Manager, State
from gpubo._bench_share import bench_share
from gpubo.backends import OpenCLBackend
from gpubo.store import open_store
from gpubo.store.private import PrivateDir

# -- shared with benchmarks/evict_restore.py -----------------------------------

BACKENDS = ("lmdb", "slotfile")
DURABILITIES = ("lazy", "sync", "direct")
#: Which durability modes each backend can do.
SUPPORTED = {"lmdb": ("lazy", "sync"), "slotfile": ("lazy", "sync", "direct")}
#: Restores that allocate a fresh device buffer are slow; a few are enough.
FRESH_BUFFER_REPS = 3
PAGE = 4096


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@dataclass
class Series:
    """Timings (seconds) of one operation on ``nbytes``; the first ``warmup`` are not counted."""

    nbytes: int
    warmup: int
    samples_s: list[float] = field(default_factory=list)

    def add(self, seconds: float) -> None:
        self.samples_s.append(seconds)

    @property
    def steady_s(self) -> list[float]:
        return self.samples_s[self.warmup :]

    @property
    def median_s(self) -> float:
        return statistics.median(self.steady_s)

    @property
    def gbps(self) -> float:
        return self.nbytes / self.median_s / 1e9

    @property
    def first_gbps(self) -> float:
        return self.nbytes / self.samples_s[0] / 1e9

    def to_json(self, throughput: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"median_s": self.median_s, "median_us": self.median_s * 1e6}
        if throughput:
            out["median_gbps"] = self.gbps
            out["first_gbps"] = self.first_gbps
        out["samples_s"] = self.samples_s
        out["warmup"] = self.warmup
        return out


def ratio(gpubo_series: Series, baseline: Series) -> dict[str, float]:
    """gpubo throughput over the baseline's: of the medians (the headline), the
    median of per-rep ratios, and of the best reps (what a quiet machine allows)."""
    g, b = gpubo_series.steady_s, baseline.steady_s
    paired = [bs / gs for gs, bs in zip(g, b, strict=False)]
    return {
        "of_medians": statistics.median(b) / statistics.median(g),
        "median_paired": statistics.median(paired),
        "of_best": min(b) / min(g),
    }


# -- baselines -----------------------------------------------------------------


class RawCopy:
    """Raw blocking ``enqueue_copy`` both ways between a device buffer and a host array."""

    def __init__(self, context: cl.Context, queue: cl.CommandQueue, host: np.ndarray) -> None:
        self.queue = queue
        self.host = host
        self.buf = cl.Buffer(context, cl.mem_flags.READ_WRITE, host.nbytes)
        cl.enqueue_copy(queue, self.buf, self.host, is_blocking=True)

    def d2h(self) -> None:
        cl.enqueue_copy(self.queue, self.host, self.buf, is_blocking=True)

    def h2d(self) -> None:
        cl.enqueue_copy(self.queue, self.buf, self.host, is_blocking=True)

    def release(self) -> None:
        self.buf.release()


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        n = os.pwrite(fd, data[done:], offset + done)
        if n <= 0:
            raise OSError(f"short write ({done} of {len(data)} bytes)")
        done += n


class FileWrite:
    """Plain file writes of the same bytes into preallocated files in ``directory``.

    Both files are preallocated and written once before any timing, as a
    store's slots are after their first use (no extent conversion in the
    timings).
    """

    def __init__(self, directory: str, host: np.ndarray, direct: bool) -> None:
        self.nbytes = host.nbytes
        self.src = host.data.cast("B")
        self.path = os.path.join(directory, f"baseline-{self.nbytes}.bin")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.posix_fallocate(self.fd, 0, self.nbytes)
        self.write_fdatasync()
        self.direct_fd = -1
        self.aligned: mmap.mmap | None = None
        if direct:
            padded = -(-self.nbytes // PAGE) * PAGE  # O_DIRECT wants whole blocks
            self.direct_path = os.path.join(directory, f"baseline-direct-{self.nbytes}.bin")
            fd = os.open(self.direct_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.posix_fallocate(fd, 0, padded)
            finally:
                os.close(fd)
            self.direct_fd = os.open(self.direct_path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
            self.aligned = mmap.mmap(-1, padded)  # page-aligned, like gpubo's bounce buffer
            np.frombuffer(self.aligned, np.uint8)[: self.nbytes] = host
            self.write_direct()

    def write(self) -> None:
        _pwrite_all(self.fd, self.src, 0)

    def write_fdatasync(self) -> None:
        _pwrite_all(self.fd, self.src, 0)
        os.fdatasync(self.fd)

    def write_direct(self) -> None:
        assert self.aligned is not None
        _pwrite_all(self.direct_fd, memoryview(self.aligned), 0)

    def close(self) -> None:
        os.close(self.fd)
        if self.direct_fd >= 0:
            os.close(self.direct_fd)
        if self.aligned is not None:
            self.aligned.close()


# -- gpubo ---------------------------------------------------------------------


@dataclass(frozen=True)
class CaseKey:
    """One store configuration; ``checksums`` as ``Manager`` takes it
    (``True``, ``False``, ``"host"`` or ``"device"``)."""

    backend: str
    durability: str
    checksums: bool | str

    @property
    def checksums_label(self) -> str:
        """``off``, ``on`` (where the transfer strategy puts them), ``host`` or ``device``."""
        if isinstance(self.checksums, str):
            return self.checksums
        return "on" if self.checksums else "off"

    @property
    def label(self) -> str:
        return f"{self.backend}/{self.durability}/checksums {self.checksums_label}"


class Baselines:
    """Every baseline of one size; each measurement is also kept in ``all`` (timed reps only)."""

    def __init__(self, context: cl.Context, directory: str, nbytes: int, direct: bool) -> None:
        self.queue = cl.CommandQueue(context)
        host = np.full(nbytes, 0x5A, np.uint8)  # touched: no page faults in the timings
        self.raw = RawCopy(context, self.queue, host)
        self.files = FileWrite(directory, host, direct)
        self.ops: dict[str, Callable[[], None]] = {
            "d2h": self.raw.d2h,
            "h2d": self.raw.h2d,
            "write": self.files.write,
            "write_fdatasync": self.files.write_fdatasync,
        }
        if direct:
            self.ops["write_direct"] = self.files.write_direct
        self.all = {name: Series(nbytes, 0) for name in self.ops}
        self.steady = False  # set once the warm-up reps are over

    def run(self, name: str) -> float:
        seconds = timed(self.ops[name])
        if self.steady:
            self.all[name].add(seconds)
        return seconds

    def close(self) -> None:
        self.raw.release()
        self.files.close()
        with contextlib.suppress(OSError):
            os.unlink(self.files.path)
        if hasattr(self.files, "direct_path"):
            with contextlib.suppress(OSError):
                os.unlink(self.files.direct_path)


def _state(bo: BufferObject) -> State:
    return bo.state


class GpuboCase:
    """One manager with one BO of non-zero data, evicted and restored over and over.

    Each timed eviction and restore is preceded by its baseline (raw D2H
    before an eviction, raw H2D before a restore, and for ``sync`` and
    ``direct`` the durable write too), so that every ratio compares
    measurements taken moments apart.
    """

    def __init__(self, key: CaseKey, nbytes: int, directory: str, context: cl.Context, warmup: int) -> None:
        self.key = key
        self.nbytes = nbytes
        self.store_dir = os.path.join(
            directory, f"{key.backend}-{key.durability}-cs-{key.checksums_label}-{nbytes}"
        )
        # Room for the BO, a zero BO and a pooled buffer; a store that holds
        # both BOs' entries plus LMDB's copy-on-write transit.
        self.mgr = Manager(
            4 * nbytes,
            store=self.store_dir,
            store_size=4 * nbytes + (64 << 20),
            device=context,
            store_backend=key.backend,
            durability=key.durability,
            checksums=key.checksums,
        )
        self.expected = np.arange(nbytes // 4, dtype=np.uint32)  # no zero page
        self.first_byte = self.expected.view(np.uint8)[:1].copy()
        self.zeros = np.zeros(nbytes, np.uint8)
        self.bo: BufferObject = self.mgr.alloc(nbytes)
        self.bo.write(self.expected)
        # The store's data file, to write its cached pages back (lazy only; see rep()).
        data = os.path.join(self.store_dir, "slots.bin" if key.backend == "slotfile" else "data.mdb")
        self.data_file = data if key.durability == "lazy" and os.path.exists(data) else None
        w = warmup
        self.series = {
            name: Series(nbytes, w)
            for name in (
                "dirty", "evict", "restore", "clean_evict", "zero_untouched", "zero_written",
                "evict_after_writeback", "d2h", "h2d", "d2h_writeback", "durable",
            )
        }  # fmt: skip
        self.fresh = Series(nbytes, 0)

    def _add(self, name: str, seconds: float) -> None:
        self.series[name].add(seconds)

    def _evicted(self) -> int:
        return self.mgr.stats().bytes_evicted

    def _timed_evict(self, bo: BufferObject, copies: int) -> float:
        """Time ``bo.evict()``, checking that it copied exactly ``copies`` bytes into the store."""
        assert bo.state is State.RESIDENT
        before = self._evicted()
        seconds = timed(bo.evict)
        copied = self._evicted() - before
        if _state(bo) is not State.SWAPPED or copied != copies:
            raise SystemExit(
                f"{self.key.label}: an eviction copied {copied} bytes, expected {copies}: benchmark invalid"
            )
        return seconds

    def _restore(self) -> float:
        """Time ``bo.restore()`` with a pooled device buffer of the BO's size."""
        assert self.bo.state is State.SWAPPED
        if self.mgr.stats().pooled_bytes < self.nbytes:
            self.mgr.alloc(self.nbytes).free()  # a freed BO's buffer stays pooled for reuse
        return timed(self.bo.restore)

    def _dirty(self) -> float:
        """Make the BO differ from its swap-cache copy, so the next eviction copies."""
        return timed(lambda: self.bo.write(self.first_byte, 0))

    def rep(self, base: Baselines) -> None:
        self._add("dirty", self._dirty())
        if self.key.durability == "sync":
            self._add("durable", base.run("write_fdatasync"))
        elif self.key.durability == "direct":
            self._add("durable", base.run("write_direct"))
        self._add("d2h", base.run("d2h"))
        self._add("evict", self._timed_evict(self.bo, self.nbytes))
        self._add("h2d", base.run("h2d"))
        self._add("restore", self._restore())
        # Clean: restored and unchanged, the swap cache holds its bytes.
        self._add("clean_evict", self._timed_evict(self.bo, 0))
        self._restore()
        # Zero BOs: fresh (known zero) and written with zeros (zero-page scan).
        zero = self.mgr.alloc(self.nbytes)
        self._add("zero_untouched", self._timed_evict(zero, 0))
        zero.free()
        zero = self.mgr.alloc(self.nbytes)
        zero.write(self.zeros)
        self._add("zero_written", self._timed_evict(zero, 0))
        zero.free()

    def writeback_rep(self, base: Baselines) -> None:
        """Lazy only: evict once the OS has written the store's pages back (as
        its flusher does for a file dirty for ~30 s), so that the mapped pages
        are clean and write-protected again. The write-back is forced here,
        untimed. A separate phase: with LMDB's copy-on-write pages it would
        otherwise slow the next rep's ordinary eviction too."""
        assert self.data_file is not None
        self._dirty()
        fd = os.open(self.data_file, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)
        self._add("d2h_writeback", base.run("d2h"))
        self._add("evict_after_writeback", self._timed_evict(self.bo, self.nbytes))
        self._restore()

    def fresh_restores(self) -> None:
        """Restores that allocate a fresh device buffer (the pool drained first)."""
        for _ in range(FRESH_BUFFER_REPS):
            self.bo.evict()
            self.mgr.evict(self.nbytes)  # drains the pool: the restore must allocate
            self.fresh.add(timed(self.bo.restore))

    def check(self) -> None:
        if not np.array_equal(self.bo.read(np.uint32), self.expected):
            raise SystemExit(f"{self.key.label}: bytes changed after evict/restore of {self.nbytes}: invalid")

    def close(self) -> None:
        self.mgr.close()
        shutil.rmtree(self.store_dir, ignore_errors=True)

    def to_json(self) -> dict[str, Any]:
        key, s = self.key, self.series
        row: dict[str, Any] = {
            "backend": key.backend,
            "durability": key.durability,
            "checksums": key.checksums,
            # Where the manager computes them: off, host or device.
            "checksums_where": self.mgr.stats().checksums,
            "evict": s["evict"].to_json(),
            "restore": s["restore"].to_json(),
            "dirty_write_1_byte": s["dirty"].to_json(throughput=False),
            "clean_reevict": s["clean_evict"].to_json(throughput=False),
            "zero_untouched_evict": s["zero_untouched"].to_json(throughput=False),
            "zero_written_evict": s["zero_written"].to_json(throughput=False),
            "paired_raw_d2h": s["d2h"].to_json(),
            "paired_raw_h2d": s["h2d"].to_json(),
            "evict_vs_d2h": ratio(s["evict"], s["d2h"]),
            "restore_vs_h2d": ratio(s["restore"], s["h2d"]),
            "zero_written_evict_vs_d2h": ratio(s["zero_written"], s["d2h"]),
        }
        if self.fresh.samples_s:
            row["restore_fresh_buffer"] = self.fresh.to_json()
        if s["durable"].samples_s:
            row["durable_baseline"] = "write_fdatasync" if key.durability == "sync" else "write_direct"
            row["paired_durable"] = s["durable"].to_json()
            row["evict_vs_durable"] = ratio(s["evict"], s["durable"])
        if s["evict_after_writeback"].samples_s:
            row["evict_after_writeback"] = s["evict_after_writeback"].to_json()
            row["paired_raw_d2h_writeback"] = s["d2h_writeback"].to_json()
            row["evict_after_writeback_vs_d2h"] = ratio(s["evict_after_writeback"], s["d2h_writeback"])
        return row


def case_keys(backends: list[str], durabilities: list[str], on: bool | str = True) -> list[CaseKey]:
    """Every case of ``backends`` x ``durabilities``, checksums off and ``on``."""
    return [
        CaseKey(b, d, cs) for b in backends for d in durabilities if d in SUPPORTED[b] for cs in (False, on)
    ]


def bench_size(
    nbytes: int, reps: int, warmup: int, context: cl.Context, keys: list[CaseKey], directory: str
) -> dict[str, Any]:
    """All measurements for one BO size, interleaved rep by rep."""
    base = Baselines(context, directory, nbytes, direct=any(k.durability == "direct" for k in keys))
    cases: list[GpuboCase] = []
    try:
        for key in keys:
            cases.append(GpuboCase(key, nbytes, directory, context, warmup))
        for rep in range(warmup + reps):
            base.steady = rep >= warmup
            base.run("write")  # informational: a plain write into the page cache
            shift = rep % len(cases)
            for case in cases[shift:] + cases[:shift]:
                case.rep(base)
        lazy = [case for case in cases if case.data_file is not None]
        for rep in range(warmup + reps if lazy else 0):
            base.steady = False  # these D2H copies are not part of the baseline table
            shift = rep % len(lazy)
            for case in lazy[shift:] + lazy[:shift]:
                case.writeback_rep(base)
        for case in cases:
            case.fresh_restores()
            case.check()
    finally:
        base.close()
        for case in cases:
            case.close()
    return {
        "nbytes": nbytes,
        "baselines": {name: s.to_json() for name, s in base.all.items() if s.samples_s},
        "gpubo": [case.to_json() for case in cases],
    }


def _filesystem(path: str) -> dict[str, str]:
    """Mount point, type and source of the filesystem holding ``path``."""
    real = os.path.realpath(path)
    best = {"mount": "?", "type": "?", "source": "?"}
    try:
        with open("/proc/mounts") as f:
            for line in f:
                source, mount, fstype = line.split()[:3]
                mount = mount.replace("\\040", " ")
                inside = real == mount or real.startswith(mount.rstrip("/") + "/")
                if inside and (best["mount"] == "?" or len(mount) >= len(best["mount"])):
                    best = {"mount": mount, "type": fstype, "source": source}
    except OSError:
        pass
    return best


def machine(context: cl.Context, directory: str) -> dict[str, Any]:
    dev = context.devices[0]
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    mem = 0
    with contextlib.suppress(OSError, ValueError, StopIteration), open("/proc/meminfo") as f:
        mem = int(next(line for line in f if line.startswith("MemTotal")).split()[1]) * 1024
    return {
        "device": dev.name.strip(),
        "platform": dev.platform.name,
        "device_version": dev.version,
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_bytes": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pyopencl": cl.VERSION_TEXT,
        "gpubo": gpubo.__version__,
        "store_dir": directory,
        "filesystem": _filesystem(directory),
    }


def _fmt_ratio(row: dict[str, Any], name: str) -> str:
    return f"{row[name]['of_medians']:.2f}x" if name in row else "-"


def render_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=True)]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(row, widths, strict=True)) for row in [headers, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@contextlib.contextmanager
def bench_directory(parent: str) -> Iterator[str]:
    private = PrivateDir("gpubo-bench-", parent)
    try:
        yield private.path
    finally:
        private.remove()


def direct_ok(directory: str) -> bool:
    """Whether the filesystem of ``directory`` takes O_DIRECT."""
    path = os.path.join(directory, "probe-direct")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT | os.O_CLOEXEC, 0o600)
    except OSError:
        return False
    os.close(fd)
    os.unlink(path)
    return True


# -- gpubo bench ---------------------------------------------------------------

KiB = 1 << 10
MiB = 1 << 20
DEFAULT_SIZES = [4 * KiB, 64 * KiB, 1 * MiB, 16 * MiB, 64 * MiB]
QUICK_SIZES = [4 * KiB, 1 * MiB, 16 * MiB]
#: The goals the benchmark checks (ratios in one run; reported, never asserted).
GOAL_EVICT = 0.90
GOAL_EVICT_CHECKSUMS = 0.85
GOAL_STAGED = 1.5
GOAL_HOST_ALLOC = 0.01
GOAL_ZICT = 2.0
GOAL_SMALL_EVICTIONS_PER_S = 50_000
GOAL_BOOKKEEPING_FLAT = 1.5
GOAL_GEMM = 0.8
# Small tiles (64 KiB of float32, the --quick shape) pay the fixed cost of
# each transfer on a quarter of the bytes; issue 16 asks 0.6x of them.
GOAL_GEMM_SMALL_TILES = 0.6
GEMM_SMALL_TILE_BYTES = 64 * KiB


@dataclass
class BenchConfig:
    """What one ``gpubo bench`` run measures; :func:`config` gives the presets."""

    sizes: list[int] = field(default_factory=lambda: list(DEFAULT_SIZES))
    cases: list[CaseKey] = field(default_factory=list)
    reps: int = 5
    warmup: int = 1
    batched_sizes: list[int] = field(default_factory=lambda: [4 * KiB, 64 * KiB])
    batched_total: int = 8 * MiB
    staged_total: int = 1024 * MiB
    staged_chunk: int = 16 * MiB
    staged_reps: int = 3
    zict_total: int = 256 * MiB
    zict_chunk: int = 4 * MiB
    bookkeeping_counts: list[int] = field(default_factory=lambda: [1_000, 10_000, 100_000])
    bookkeeping_reps: int = 200
    gemm_n: int = 1024
    gemm_tile: int = 256
    gemm_reps: int = 3
    #: At least a share's request step (1 MiB here): each allocation is one request for one BO.
    share_sizes: list[int] = field(default_factory=lambda: [MiB, 4 * MiB])
    share_reps: int = 50
    share_seconds: float = 4.0
    share_contention_reps: int = 2
    parent_dir: str | None = None
    checksums: bool | str = True


def config(
    quick: bool = False,
    full: bool = False,
    sizes: list[int] | None = None,
    reps: int | None = None,
    checksums: bool | str = True,
) -> BenchConfig:
    """The default preset (about 2 to 3 minutes on 2 cores), ``quick`` (about 30 s)
    or ``full`` (every backend x durability x checksums case); the cases with
    checksums compute them where ``checksums`` says (``True``: where the
    transfer strategy puts them, ``"host"`` or ``"device"``)."""
    durabilities = list(DURABILITIES) if full else ["lazy"]
    cfg = BenchConfig(cases=case_keys(list(BACKENDS), durabilities, checksums), checksums=checksums)
    if quick:
        cfg.sizes = list(QUICK_SIZES)
        cfg.reps, cfg.warmup = 3, 1
        cfg.staged_total, cfg.staged_chunk, cfg.staged_reps = 64 * MiB, 8 * MiB, 2
        cfg.batched_sizes, cfg.batched_total = [4 * KiB], 2 * MiB
        cfg.zict_total, cfg.zict_chunk = 32 * MiB, 2 * MiB
        cfg.bookkeeping_counts = [1_000, 10_000]
        cfg.bookkeeping_reps = 50
        cfg.gemm_n, cfg.gemm_tile, cfg.gemm_reps = 512, 128, 1
        cfg.share_sizes, cfg.share_reps, cfg.share_seconds, cfg.share_contention_reps = [MiB], 20, 1.5, 1
    if sizes is not None:
        cfg.sizes = list(sizes)
    if reps is not None:
        cfg.reps = reps
    return cfg


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _status_bytes(field_name: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``RssAnon``) in bytes; 0 if unknown."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    return 0


@contextlib.contextmanager
def _host_memory() -> Iterator[dict[str, int]]:
    """Host memory allocated inside the block: tracemalloc peak, RSS and RssAnon growth."""
    out: dict[str, int] = {}
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base_traced = tracemalloc.get_traced_memory()[0]
    rss, anon = _status_bytes("VmRSS"), _status_bytes("RssAnon")
    try:
        yield out
    finally:
        out["tracemalloc_peak_bytes"] = max(0, tracemalloc.get_traced_memory()[1] - base_traced)
        out["rss_growth_bytes"] = max(0, _status_bytes("VmRSS") - rss)
        out["rss_anon_growth_bytes"] = max(0, _status_bytes("RssAnon") - anon)
        if not was_tracing:
            tracemalloc.stop()


# 1 and 2: the limit, and eviction / restore throughput -------------------------


def bench_throughput(
    context: cl.Context, directory: str, nbytes: int, keys: list[CaseKey], reps: int, warmup: int
) -> dict[str, Any]:
    """The limit (raw D2H/H2D, write+fdatasync) and gpubo's eviction and restore
    of one BO of ``nbytes`` for each case, interleaved rep by rep (the case order
    rotates), each gpubo call right after its paired baseline (see :class:`GpuboCase`);
    then, for BOs of 1 MiB or more in ``lazy`` stores, evictions after the
    store's pages were written back (:meth:`GpuboCase.writeback_rep`)."""
    base = Baselines(context, directory, nbytes, direct=any(k.durability == "direct" for k in keys))
    cases: list[GpuboCase] = []
    try:
        cases = [GpuboCase(key, nbytes, directory, context, warmup) for key in keys]
        for rep in range(warmup + reps):
            base.steady = rep >= warmup
            base.run("write_fdatasync")
            base.run("write")  # into the page cache: what a lazy store's write costs at best
            shift = rep % len(cases)
            for case in cases[shift:] + cases[:shift]:
                case.rep(base)
        # What a long run sees: evictions into store pages the OS has
        # written back (LMDB's in particular fault on every first write).
        lazy = [case for case in cases if case.data_file is not None] if nbytes >= MiB else []
        for rep in range(warmup + reps if lazy else 0):
            base.steady = False  # these D2H copies are paired in the cases, not the limit table
            shift = rep % len(lazy)
            for case in lazy[shift:] + lazy[:shift]:
                case.writeback_rep(base)
        for case in cases:
            case.check()
        rows = [case.to_json() for case in cases]
    finally:
        base.close()
        for case in cases:
            case.close()
    limit = {name: base.all[name].to_json() for name in ("d2h", "h2d", "write", "write_fdatasync")}
    for row in rows:
        row["evictions_per_s"] = 1.0 / row["evict"]["median_s"]
        row["evict_vs_write"] = limit["write"]["median_s"] / row["evict"]["median_s"]
        row["restores_per_s"] = 1.0 / row["restore"]["median_s"]
    return {"nbytes": nbytes, "limit": limit, "cases": rows}


# 3: the staged path against the direct one ------------------------------------


def bench_batched(
    context: cl.Context, directory: str, key: CaseKey, nbytes: int, total: int, reps: int, warmup: int
) -> dict[str, Any]:
    """Evict ``total`` bytes of dirty ``nbytes`` BOs that fill the budget, all
    at once with ``mgr.evict(total)`` (batched), against: the raw blocking
    D2H of each BO into a preallocated host array, the raw D2H of the same
    bytes as one buffer, and gpubo evicting the BOs one by one
    (``bo.evict()``). Each rep first rewrites one byte of every BO (which
    restores it), untimed. The budget starts full, so the first batches are
    small: a staging buffer comes from free room only.

    Then the way back: the BOs, swapped with their device buffers pooled (as
    after ``bo.evict()``), are restored by ``mgr.prefetch(bos)`` (batched)
    and, swapped again, one by one (``bo.restore()``), against the raw
    blocking H2D of each BO."""
    count = max(2, total // nbytes)
    total = count * nbytes
    queue = cl.CommandQueue(context)
    mgr = Manager(
        total,
        store=os.path.join(directory, f"batched-{key.backend}-{nbytes}"),
        store_size=4 * total + (64 << 20),
        device=context,
        store_backend=key.backend,
        durability=key.durability,
        checksums=key.checksums,
    )
    raw_bufs: list[cl.Buffer] = []
    one_buf = None
    times: dict[str, list[float]] = {
        "batched": [], "singles": [], "raw_each": [], "raw_one": [], "raw_each_singles": [],
        "prefetch": [], "restore_singles": [], "raw_h2d_each": [], "raw_h2d_one": [],
        "raw_h2d_each_singles": [],
    }  # fmt: skip
    batches: list[int] = []
    restore_batches: list[int] = []
    try:
        datas = [_patterned(nbytes, i) for i in range(count)]
        bos = [mgr.alloc(nbytes) for _ in range(count)]
        for bo, data in zip(bos, datas, strict=True):
            bo.write(data)
        host = np.empty(total, np.uint8)
        host[:] = 1  # touched: no page faults in the raw timings
        for i, data in enumerate(datas):
            buf = cl.Buffer(context, cl.mem_flags.READ_WRITE, nbytes)
            cl.enqueue_copy(queue, buf, data, is_blocking=True)
            raw_bufs.append(buf)
            host[i * nbytes : (i + 1) * nbytes] = data.view(np.uint8)
        one_buf = cl.Buffer(context, cl.mem_flags.READ_WRITE, total)
        cl.enqueue_copy(queue, one_buf, host, is_blocking=True)

        def dirty(rep: int) -> None:
            stamp = np.array([rep & 0xFF], np.uint8)
            for bo, data in zip(bos, datas, strict=True):
                bo.write(stamp, 0)
                data.view(np.uint8)[0] = stamp[0]

        def raw_each() -> None:
            for i, buf in enumerate(raw_bufs):
                cl.enqueue_copy(queue, host[i * nbytes : (i + 1) * nbytes], buf, is_blocking=True)

        def raw_one() -> None:
            cl.enqueue_copy(queue, host, one_buf, is_blocking=True)

        def singles() -> None:
            for bo in bos:
                bo.evict()

        def raw_h2d_each() -> None:
            for i, buf in enumerate(raw_bufs):
                cl.enqueue_copy(queue, buf, host[i * nbytes : (i + 1) * nbytes], is_blocking=True)

        def prefetch() -> None:
            for future in mgr.prefetch(bos):
                future.result()

        def restore_singles() -> None:
            for bo in bos:
                bo.restore()

        def raw_h2d_one() -> None:
            cl.enqueue_copy(queue, one_buf, host, is_blocking=True)

        def all_swapped_pooled() -> None:
            """Untimed: every BO swapped, its device buffer pooled (as after ``bo.evict()``)."""
            for bo in bos:
                if bo.state is not State.RESIDENT:
                    bo.restore()
            singles()

        # Each timed gpubo call comes right after its paired raw copy; the
        # four pairs run in an order that rotates each rep. Each pair sets up
        # its own starting state, untimed.
        def evict_batched(rep: int, steady: bool) -> None:
            dirty(rep)
            raw = timed(raw_one)
            raw_e = timed(raw_each)
            before = mgr.stats()
            seconds = timed(lambda: mgr.evict(total))
            after = mgr.stats()
            if after.bytes_evicted - before.bytes_evicted != total or after.resident_bytes:
                raise RuntimeError("batched benchmark: mgr.evict did not copy every BO out")
            if steady:
                times["raw_one"].append(raw)
                times["raw_each"].append(raw_e)
                times["batched"].append(seconds)
                batches.append(after.eviction_batches - before.eviction_batches)

        def evict_singles(rep: int, steady: bool) -> None:
            dirty(rep + 100)
            raw = timed(raw_each)
            seconds = timed(singles)  # leaves every BO swapped, its buffer pooled
            if steady:
                times["raw_each_singles"].append(raw)
                times["singles"].append(seconds)

        def restore_prefetch(rep: int, steady: bool) -> None:
            all_swapped_pooled()
            raw = timed(raw_h2d_one)
            raw_e = timed(raw_h2d_each)
            ahead = mgr.stats()
            seconds = timed(prefetch)
            back = mgr.stats()
            if back.restores - ahead.restores != count:
                raise RuntimeError("batched benchmark: mgr.prefetch did not restore every BO")
            if steady:
                times["raw_h2d_one"].append(raw)
                times["raw_h2d_each"].append(raw_e)
                times["prefetch"].append(seconds)
                restore_batches.append(back.restore_batches - ahead.restore_batches)

        def restore_one_by_one(rep: int, steady: bool) -> None:
            all_swapped_pooled()
            raw = timed(raw_h2d_each)
            seconds = timed(restore_singles)
            if steady:
                times["raw_h2d_each_singles"].append(raw)
                times["restore_singles"].append(seconds)

        pairs = [evict_batched, evict_singles, restore_prefetch, restore_one_by_one]
        for rep in range(warmup + reps):
            shift = rep % len(pairs)
            for pair in pairs[shift:] + pairs[:shift]:
                pair(rep, rep >= warmup)
        for bo, data in zip(bos, datas, strict=True):
            if not np.array_equal(bo.read(np.uint32), data):
                raise SystemExit(f"batched benchmark: a {nbytes}-byte BO changed: invalid")
    finally:
        for buf in raw_bufs:
            buf.release()
        if one_buf is not None:
            one_buf.release()
        mgr.close()
        shutil.rmtree(os.path.join(directory, f"batched-{key.backend}-{nbytes}"), ignore_errors=True)
    med = {name: _median(values) for name, values in times.items()}
    return {
        "case": key.label,
        "backend": key.backend,
        "checksums": key.checksums,
        "nbytes": nbytes,
        "count": count,
        "total_bytes": total,
        "reps": reps,
        "batches_per_evict": int(_median([float(b) for b in batches])),
        **{f"{name}_s": value for name, value in med.items()},
        **{f"{name}_samples_s": values for name, values in times.items()},
        "batched_evictions_per_s": count / med["batched"],
        "singles_evictions_per_s": count / med["singles"],
        "batched_gbps": total / med["batched"] / 1e9,
        "raw_one_gbps": total / med["raw_one"] / 1e9,
        "batched_vs_singles": med["singles"] / med["batched"],
        # Against one blocking D2H per BO (what evicting them one by one
        # would cost at best), and against the honest baseline for a batch:
        # the same bytes as one copy.
        "batched_vs_raw_each": med["raw_each"] / med["batched"],
        "batched_vs_raw_one": med["raw_one"] / med["batched"],
        "singles_vs_raw_each": med["raw_each_singles"] / med["singles"],
        "restore_batches_per_prefetch": int(_median([float(b) for b in restore_batches])),
        "prefetch_restores_per_s": count / med["prefetch"],
        "singles_restores_per_s": count / med["restore_singles"],
        "prefetch_vs_singles": med["restore_singles"] / med["prefetch"],
        "prefetch_vs_raw_h2d_each": med["raw_h2d_each"] / med["prefetch"],
        "prefetch_vs_raw_h2d_one": med["raw_h2d_one"] / med["prefetch"],
        "restore_singles_vs_raw_h2d_each": med["raw_h2d_each_singles"] / med["restore_singles"],
    }


def _patterned(nbytes: int, seed: int) -> np.ndarray:
    """Non-zero, per-BO distinct bytes (no zero pages to skip)."""
    data = np.arange(nbytes // 4, dtype=np.uint32)
    data += np.uint32(seed * 7919 + 1)
    return data


def bench_staged(
    context: cl.Context, directory: str, key: CaseKey, total: int, chunk: int, reps: int
) -> dict[str, Any]:
    """Evict ``total`` bytes as BOs of ``chunk`` bytes, gpubo's direct path against
    the staged path (``enqueue_copy`` into a fresh ``np.empty`` array, then
    ``store.write(memoryview(array))`` into a store of the same kind), their
    reps alternating (the order swaps each rep). Each rep rewrites every BO's
    first byte first (gpubo) or releases the previous rep's entries (staged),
    so every rep copies all bytes. Host memory is measured on the last rep of
    each."""
    count = max(1, total // chunk)
    total = count * chunk
    store_size = 2 * total + (64 << 20)
    queue = cl.CommandQueue(context)
    direct_s: list[float] = []
    staged_s: list[float] = []
    direct_mem: dict[str, int] = {}
    staged_mem: dict[str, int] = {}
    # gpubo's direct path, and the staged path into a store of the same
    # backend, durability and checksums, both set up first: their reps
    # alternate, the order swapping each rep.
    mgr = Manager(
        total + chunk,
        store=os.path.join(directory, "staged-gpubo"),
        store_size=store_size,
        device=context,
        store_backend=key.backend,
        durability=key.durability,
        checksums=key.checksums,
    )
    store: Any = None
    bufs: list[cl.Buffer] = []
    try:
        store = open_store(
            os.path.join(directory, "staged-store"),
            store_size,
            backend=key.backend,
            checksums=key.checksums is not False,  # a host store.write hashes on the host
            durability=key.durability,
        )
        bos = []
        for i in range(count):
            bo = mgr.alloc(chunk)
            bo.write(_patterned(chunk, i))
            bos.append(bo)
            buf = cl.Buffer(context, cl.mem_flags.READ_WRITE, chunk)
            cl.enqueue_copy(queue, buf, _patterned(chunk, i), is_blocking=True)
            bufs.append(buf)
        one = np.ones(1, np.uint8)
        entries: list[Any] = []

        def direct(rep: int) -> None:
            nonlocal direct_mem
            for bo in bos:
                if bo.state is not State.RESIDENT:
                    bo.restore()
                bo.write(one, 0)
            before = mgr.stats().bytes_evicted
            with _host_memory() as mem:
                start = time.perf_counter()
                for bo in bos:
                    bo.evict()
                seconds = time.perf_counter() - start
            if mgr.stats().bytes_evicted - before != total:
                raise RuntimeError("staged benchmark: gpubo's evictions did not copy every byte")
            if rep:
                direct_s.append(seconds)
                direct_mem = mem

        def staged(rep: int) -> None:
            nonlocal staged_mem, entries
            for entry in entries:
                store.release(entry)
            entries = []
            with _host_memory() as mem:
                start = time.perf_counter()
                for buf in bufs:
                    host = np.empty(chunk, np.uint8)
                    cl.enqueue_copy(queue, host, buf, is_blocking=True)
                    entries.append(store.write(host.data))  # memoryview(host)
                    del host
                seconds = time.perf_counter() - start
            if rep:
                staged_s.append(seconds)
                staged_mem = mem

        for rep in range(reps + 1):  # rep 0 warms the stores' pages up
            for side in (direct, staged) if rep % 2 == 0 else (staged, direct):
                side(rep)
    finally:
        for buf in bufs:
            buf.release()
        mgr.close()
        if store is not None:
            store.close()
    d, s = _median(direct_s), _median(staged_s)
    return {
        "case": key.label,
        "total_bytes": total,
        "chunk_bytes": chunk,
        "reps": reps,
        "direct": {"median_s": d, "gbps": total / d / 1e9, "samples_s": direct_s, **direct_mem},
        "staged": {"median_s": s, "gbps": total / s / 1e9, "samples_s": staged_s, **staged_mem},
        "direct_vs_staged": s / d,
        "direct_alloc_fraction": direct_mem["tracemalloc_peak_bytes"] / total,
        "staged_alloc_fraction": staged_mem["tracemalloc_peak_bytes"] / total,
    }


# 4: zict ------------------------------------------------------------------------


def zict_available() -> bool:
    return importlib.util.find_spec("zict") is not None


def bench_zict(
    context: cl.Context, directory: str, key: CaseKey, total: int, chunk: int, reps: int
) -> dict[str, Any]:
    """Spill and unspill the same numpy arrays through ``zict.Buffer(fast=dict,
    slow=zict.Func(pickle.dumps, pickle.loads, zict.File(dir)))`` and through
    gpubo (evict every BO, then restore every BO), ``reps`` times each; the
    round trip is spill + unspill. Returns ``{"available": False}`` without zict."""
    if not zict_available():
        return {"available": False, "reason": "zict is not importable (pip install 'gpubo[bench]')"}
    import zict

    count = max(1, total // chunk)
    total = count * chunk
    arrays = {f"a{i}": _patterned(chunk, i).view(np.uint8) for i in range(count)}
    zdir = os.path.join(directory, "zict")
    spill_s: list[float] = []
    unspill_s: list[float] = []
    evict_s: list[float] = []
    restore_s: list[float] = []

    def zict_round(rep: int) -> None:
        shutil.rmtree(zdir, ignore_errors=True)
        slow = zict.Func(pickle.dumps, pickle.loads, zict.File(zdir))
        buf = zict.Buffer({}, slow, n=total + 1, weight=lambda k, v: v.nbytes)
        for name, arr in arrays.items():
            buf[name] = arr.copy()
        start = time.perf_counter()
        while buf.fast:
            buf.fast.evict()
        spilled = time.perf_counter() - start
        if len(buf.slow) != count:
            raise RuntimeError("zict benchmark: not everything spilled")
        start = time.perf_counter()
        back = [buf[name] for name in arrays]
        unspilled = time.perf_counter() - start
        if len(buf.fast) != count or not np.array_equal(back[-1], arrays[f"a{count - 1}"]):
            raise RuntimeError("zict benchmark: unspill went wrong")
        del back
        buf.close()
        if rep:
            spill_s.append(spilled)
            unspill_s.append(unspilled)

    mgr = Manager(
        total + chunk,
        store=os.path.join(directory, "zict-gpubo"),
        store_size=2 * total + (64 << 20),
        device=context,
        store_backend=key.backend,
        durability=key.durability,
        checksums=key.checksums,
    )
    try:
        bos = []
        for arr in arrays.values():
            bo = mgr.alloc(chunk)
            bo.write(arr)
            bos.append(bo)

        def gpubo_round(rep: int) -> None:
            for bo in bos:
                bo.write(arrays["a0"][:1], 0)  # dirty: the eviction copies
            start = time.perf_counter()
            for bo in bos:
                bo.evict()
            evicted = time.perf_counter() - start
            start = time.perf_counter()
            for bo in bos:
                bo.restore()
            restored = time.perf_counter() - start
            if rep:
                evict_s.append(evicted)
                restore_s.append(restored)

        # The two alternate, the order swapping each rep; rep 0 warms up.
        for rep in range(reps + 1):
            for side in (zict_round, gpubo_round) if rep % 2 == 0 else (gpubo_round, zict_round):
                side(rep)
    finally:
        mgr.close()
    zict_rounds = [a + b for a, b in zip(spill_s, unspill_s, strict=True)]
    gpubo_rounds = [a + b for a, b in zip(evict_s, restore_s, strict=True)]
    z, g = _median(zict_rounds), _median(gpubo_rounds)
    return {
        "available": True,
        "zict_version": getattr(zict, "__version__", "?"),
        "case": key.label,
        "total_bytes": total,
        "chunk_bytes": chunk,
        "reps": reps,
        "zict_spill_s": _median(spill_s),
        "zict_unspill_s": _median(unspill_s),
        "zict_round_trip_s": z,
        "gpubo_evict_s": _median(evict_s),
        "gpubo_restore_s": _median(restore_s),
        "gpubo_round_trip_s": g,
        "zict_round_trip_samples_s": zict_rounds,
        "gpubo_round_trip_samples_s": gpubo_rounds,
        # zict's round-trip time over gpubo's: how many times faster gpubo is.
        "gpubo_vs_zict": z / g,
    }


# 5: bookkeeping -------------------------------------------------------------------


def bench_bookkeeping(context: cl.Context, directory: str, count: int, reps: int) -> dict[str, Any]:
    """With ``count`` live tiny (64-byte) BOs, all resident and the budget full:
    the median time of ``read`` of a resident 4 KiB BO, and of ``mgr.evict(1)``
    (one eviction decision: pick the LRU victim and evict it; a tiny copy). The
    pool is drained, untimed, before each timed eviction so that the call must
    choose a victim."""
    tiny = 64
    store_dir = os.path.join(directory, f"bookkeeping-{count}")
    mgr = Manager(
        count * tiny + 4 * KiB,
        store=store_dir,
        store_size=max(64 << 20, 4 * count * 4 * KiB),
        device=context,
        store_backend="slotfile",
        checksums=False,
    )
    try:
        start = time.perf_counter()
        probe = mgr.alloc(4 * KiB)
        probe.write(np.ones(4 * KiB, np.uint8))
        for _ in range(count):
            mgr.alloc(tiny)
        setup_s = time.perf_counter() - start
        out = np.empty(4 * KiB, np.uint8)
        read_s = []
        for _ in range(reps):
            start = time.perf_counter()
            probe.read(out=out)
            read_s.append(time.perf_counter() - start)
        evict_s = []
        for _ in range(min(reps, count // 2)):
            pooled = mgr.stats().pooled_bytes
            if pooled:
                mgr.evict(pooled)
            before = mgr.stats().evictions
            start = time.perf_counter()
            mgr.evict(1)
            evict_s.append(time.perf_counter() - start)
            if mgr.stats().evictions != before + 1:
                raise RuntimeError("bookkeeping benchmark: mgr.evict(1) did not evict exactly one BO")
            probe.read(out=out)  # keep the probe at the LRU tail
        live = mgr.stats().bo_count
    finally:
        mgr.close()
        shutil.rmtree(store_dir, ignore_errors=True)
    return {
        "bos": count,
        "live_bos": live,
        "setup_s": setup_s,
        "read_4k_us": _median(read_s) * 1e6,
        "evict_decision_us": _median(evict_s) * 1e6,
        "reps": reps,
    }


# 6: the oversubscribed blocked multiply --------------------------------------------


def _gemm_demo() -> ModuleType | None:
    """``demos/out_of_core_gemm.py`` of the source tree, if there is one."""
    path = Path(__file__).resolve().parent.parent / "demos" / "out_of_core_gemm.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("gpubo_bench_out_of_core_gemm", path)
    if spec is None or spec.loader is None:
        return None
    module = sys.modules.get(spec.name)
    if module is None:
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up there
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[spec.name]
            raise
    return module


def bench_gemm(n: int, tile: int, reps: int, depth: int = 1) -> dict[str, Any]:
    """The demo's blocked multiply with A, B and C 4x the budget (prefetching
    ``depth`` steps ahead) against a budget holding every tile, after one
    untimed run that holds every tile; the multiply
    phase's median time of each, and their ratio (in memory over oversubscribed:
    1.0 means no slowdown)."""
    demo = _gemm_demo()
    if demo is None:
        return {"available": False, "reason": "demos/out_of_core_gemm.py not found (not a source tree)"}
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a_tiles, b_tiles = demo.tiles_of(a, tile), demo.tiles_of(b, tile)
    total = 3 * n * n * 4
    store_size = max(64 << 20, 2 * total)
    expected = a @ b
    out: dict[str, Any] = {"available": True, "n": n, "tile": tile, "depth": depth, "total_bytes": total}
    sides = [("oversubscribed", total // 4), ("in_memory", total)]
    times: dict[str, list[float]] = {label: [] for label, _ in sides}
    ends: dict[str, list[float]] = {label: [] for label, _ in sides}
    evictions: dict[str, int] = {}
    # Untimed: the first launch of a kernel in a process builds its code for
    # the work-group size (PoCL: hundreds of ms, without its disk cache), which
    # would fall on whichever side runs first (with one rep, always the same).
    demo.multiply(a_tiles, b_tiles, tile, total, depth, store_size)
    for rep in range(reps):  # the two alternate, the order swapping each rep
        for label, budget in sides if rep % 2 == 0 else sides[::-1]:
            run = demo.multiply(a_tiles, b_tiles, tile, budget, depth, store_size)
            if not np.allclose(run.product, expected, rtol=1e-4, atol=1e-6 * n):
                raise RuntimeError(f"gemm benchmark: {label} product does not match numpy")
            times[label].append(run.multiply_s)
            ends[label].append(run.upload_s + run.multiply_s + run.download_s)
            evictions[label] = run.multiply_evictions
    for label, budget in sides:
        out[label] = {
            "budget_bytes": budget,
            "multiply_s": _median(times[label]),
            "end_to_end_s": _median(ends[label]),
            "multiply_evictions": evictions[label],
            "samples_s": times[label],
        }
    out["speed_ratio"] = out["in_memory"]["multiply_s"] / out["oversubscribed"]["multiply_s"]
    out["end_to_end_speed_ratio"] = out["in_memory"]["end_to_end_s"] / out["oversubscribed"]["end_to_end_s"]
    return out


_SPIN_SRC = """
__kernel void gpubo_bench_spin(__global uint *out, uint iters) {
    uint x = get_global_id(0);
    for (uint i = 0; i < iters; i++)
        x = x * 1664525u + 1013904223u;
    out[get_global_id(0)] = x;
}
"""


def bench_overlap(context: cl.Context, directory: str, nbytes: int, reps: int, warmup: int) -> dict[str, Any]:
    """A prefetch issued right after a long kernel (about 60 ms, on another
    BO) was queued on ``mgr.queue``: the time until the prefetched BO is
    resident, against the time until the kernel is done. Restores go on the
    transfer queue; on one in-order queue the prefetch would end after the
    kernel. The kernel is one work item, so that a CPU device keeps a core
    free for the copy, as a GPU keeps its copy engines free of kernels."""
    path = os.path.join(directory, "overlap")
    mgr = Manager(4 * nbytes, store=path, store_size=4 * nbytes + (64 << 20), device=context)
    prefetch_s: list[float] = []
    kernel_s: list[float] = []
    try:
        kernel = cl.Kernel(cl.Program(context, _SPIN_SRC).build(), "gpubo_bench_spin")
        busy, bo = mgr.alloc(nbytes), mgr.alloc(nbytes)
        data = _patterned(nbytes, 3)
        bo.write(data)

        def spin(iters: int) -> None:
            mgr.launch(kernel, (1,), (1,), busy, np.uint32(iters)).wait()

        iters = 1 << 16
        spin(iters)  # the first launch may compile
        for _ in range(12):  # calibrate: about 50 ms of kernel
            seconds = timed(functools.partial(spin, iters))
            if seconds >= 0.04:
                break
            iters = min(int(iters * 0.06 / max(seconds, 1e-4)) + 1, 1 << 31)
        for rep in range(warmup + reps):
            bo.evict()
            start = time.perf_counter()
            event = mgr.launch(kernel, (1,), (1,), busy, np.uint32(iters))
            bo.prefetch().result()
            resident = time.perf_counter() - start
            event.wait()
            done = time.perf_counter() - start
            if rep >= warmup:
                prefetch_s.append(resident)
                kernel_s.append(done)
        if not np.array_equal(bo.read(np.uint32), data):
            raise SystemExit("overlap benchmark: the prefetched BO changed: invalid")
    finally:
        mgr.close()
        shutil.rmtree(path, ignore_errors=True)
    return {
        "nbytes": nbytes,
        "reps": reps,
        "kernel_iters": iters,
        "prefetch_s": _median(prefetch_s),
        "kernel_s": _median(kernel_s),
        "prefetch_samples_s": prefetch_s,
        "kernel_samples_s": kernel_s,
        "prefetch_vs_kernel": _median(prefetch_s) / _median(kernel_s),
    }


# -- one run -----------------------------------------------------------------------


def _staged_key(cfg: BenchConfig) -> CaseKey:
    """The case the staged, zict and oversubscription sections use: slotfile lazy
    with checksums if measured, else the first case."""
    want = CaseKey("slotfile", "lazy", cfg.checksums)
    return want if want in cfg.cases else cfg.cases[0]


def run(cfg: BenchConfig, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure every section of ``cfg``; return the JSON-ready results."""
    say = progress or (lambda _text: None)
    probe = OpenCLBackend(None)  # the device Manager(device=None) picks
    context = probe.context
    parent = cfg.parent_dir if cfg.parent_dir is not None else tempfile.gettempdir()
    start = time.perf_counter()
    key = _staged_key(cfg)
    with bench_directory(parent) as directory:
        info = machine(context, directory)
        throughput = []
        for n in cfg.sizes:
            say(f"throughput: {gpubo.format_bytes(n)}")
            throughput.append(bench_throughput(context, directory, n, cfg.cases, cfg.reps, cfg.warmup))
        batched = []
        for n in cfg.batched_sizes:
            for k in cfg.cases:
                say(f"batched: {gpubo.format_bytes(n)} {k.label}")
                batched.append(
                    bench_batched(context, directory, k, n, cfg.batched_total, cfg.reps, cfg.warmup)
                )
        say("staged vs direct")
        staged = bench_staged(context, directory, key, cfg.staged_total, cfg.staged_chunk, cfg.staged_reps)
        say("zict")
        peer = bench_zict(context, directory, key, cfg.zict_total, cfg.zict_chunk, cfg.staged_reps)
        bookkeeping = []
        for count in cfg.bookkeeping_counts:
            say(f"bookkeeping: {count} BOs")
            bookkeeping.append(bench_bookkeeping(context, directory, count, cfg.bookkeeping_reps))
        say("gemm")
        gemm = bench_gemm(cfg.gemm_n, cfg.gemm_tile, cfg.gemm_reps)
        say("prefetch behind a queued kernel")
        overlap = bench_overlap(context, directory, MiB, cfg.gemm_reps + 2, 1)
    say("device share")
    share = bench_share(cfg.share_sizes, cfg.share_reps, 3, cfg.share_seconds, cfg.share_contention_reps)
    results: dict[str, Any] = {
        "machine": info,
        "config": {
            "sizes": cfg.sizes,
            "cases": [k.label for k in cfg.cases],
            "reps": cfg.reps,
            "warmup": cfg.warmup,
            # What GPUBO_TRANSFER asks of the managers (``gpubo bench --transfer``).
            "transfer": os.environ.get("GPUBO_TRANSFER") or "auto",
            # Where the cases with checksums ask for them (``gpubo bench --checksums``).
            "checksums": CaseKey("", "", cfg.checksums).checksums_label,
        },
        "limit": [{"nbytes": t["nbytes"], **t["limit"]} for t in throughput],
        "throughput": [{"nbytes": t["nbytes"], "cases": t["cases"]} for t in throughput],
        "fixed_cost": fixed_costs(throughput),
        "batched": batched,
        "staged": staged,
        "zict": peer,
        "bookkeeping": bookkeeping,
        "gemm": gemm,
        "overlap": overlap,
        "share": share,
    }
    results["goals"] = goals(results)
    results["elapsed_s"] = time.perf_counter() - start
    return results


def fixed_costs(throughput: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per case, the fixed cost of an eviction and of a restore (and of the
    raw copies paired with them): the median time at the smallest size
    minus that size's bytes at the copy rate, the paired raw copy's rate at
    the largest size. Empty unless the sizes span at least 1 MiB."""
    if len(throughput) < 2 or throughput[-1]["nbytes"] < MiB:
        return []
    small, large = throughput[0], throughput[-1]
    n = small["nbytes"]
    rows = []
    for c, big in zip(small["cases"], large["cases"], strict=True):
        d2h = big["paired_raw_d2h"]["median_gbps"] * 1e9  # bytes/s
        h2d = big["paired_raw_h2d"]["median_gbps"] * 1e9
        row: dict[str, Any] = {
            "nbytes": n,
            "backend": c["backend"],
            "durability": c["durability"],
            "checksums_where": c["checksums_where"],
            "d2h_rate_gbps": d2h / 1e9,
            "h2d_rate_gbps": h2d / 1e9,
        }
        for name, series, rate in (
            ("evict", "evict", d2h),
            ("restore", "restore", h2d),
            ("raw_d2h", "paired_raw_d2h", d2h),
            ("raw_h2d", "paired_raw_h2d", h2d),
        ):
            us = c[series]["median_s"] * 1e6
            row[f"{name}_us"] = us
            row[f"{name}_fixed_us"] = us - n / rate * 1e6
        rows.append(row)
    return rows


def combine_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Results of several runs of one configuration: the last run's sections,
    and each goal judged on the median of its value over the runs (met only
    if that median meets it), with every run's value and their spread.
    ``runs_goals`` keeps each run's own goals."""
    if not runs:
        raise ValueError("combine_runs needs at least one run")
    values: dict[str, list[float]] = {}
    for r in runs:
        for g in r["goals"]:
            values.setdefault(g["goal"], []).append(g["value"])
    judged = []
    for g in runs[-1]["goals"]:
        seen = values[g["goal"]]
        med = statistics.median(seen)
        met = med >= g["target"] if g["higher"] else med <= g["target"]
        judged.append({**g, "value": med, "met": met, "values": seen, "spread": [min(seen), max(seen)]})
    return {
        **runs[-1],
        "runs": len(runs),
        "runs_goals": [r["goals"] for r in runs],
        "goals": judged,
        "elapsed_s": sum(r["elapsed_s"] for r in runs),
    }


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 6's goals, each with the measured value and whether it is met."""
    out: list[dict[str, Any]] = []

    def add(goal: str, value: float, minimum: float, unit: str = "x", higher: bool = True) -> None:
        met = value >= minimum if higher else value <= minimum
        out.append(
            {"goal": goal, "value": value, "target": minimum, "unit": unit, "higher": higher, "met": met}
        )

    for t in results["throughput"]:
        if t["nbytes"] < MiB:
            continue
        for c in t["cases"]:
            minimum = GOAL_EVICT_CHECKSUMS if c["checksums"] else GOAL_EVICT
            where = f"{gpubo.format_bytes(t['nbytes'])} {c['backend']}/{c['durability']}"
            where += f"/checksums {c['checksums_where']}"
            add(f"evict/D2H {where}", c["evict_vs_d2h"]["of_medians"], minimum)
            add(f"restore/H2D {where}", c["restore_vs_h2d"]["of_medians"], minimum)
            if "evict_after_writeback_vs_d2h" in c:
                add(
                    f"evict/D2H after writeback {where}",
                    c["evict_after_writeback_vs_d2h"]["of_medians"],
                    minimum,
                )
    for b in results.get("batched", []):
        if b["nbytes"] == 4 * KiB:
            add(
                f"4 KiB evictions per second, batched ({b['case']})",
                b["batched_evictions_per_s"],
                GOAL_SMALL_EVICTIONS_PER_S,
                "/s",
            )
    s = results["staged"]
    add("direct path / staged path", s["direct_vs_staged"], GOAL_STAGED)
    add("direct path host allocation / bytes evicted", s["direct_alloc_fraction"], GOAL_HOST_ALLOC, "", False)
    z = results["zict"]
    if z.get("available"):
        add("gpubo speed-up over zict (zict round-trip time / gpubo's)", z["gpubo_vs_zict"], GOAL_ZICT)
    b = results["bookkeeping"]
    if len(b) >= 2:
        first, last = b[0], b[-1]
        for name, text in (("read_4k_us", "4 KiB read"), ("evict_decision_us", "eviction decision")):
            add(
                f"{text}: {last['bos']} BOs / {first['bos']} BOs (time)",
                last[name] / first[name],
                GOAL_BOOKKEEPING_FLAT,
                "x",
                False,
            )
    g = results["gemm"]
    if g.get("available"):
        small = g["tile"] * g["tile"] * 4 <= GEMM_SMALL_TILE_BYTES
        add(
            "oversubscribed multiply speed / in-memory",
            g["speed_ratio"],
            GOAL_GEMM_SMALL_TILES if small else GOAL_GEMM,
        )
    return out


# -- reporting ------------------------------------------------------------------------


def _f(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}"


def _batch_row(b: dict[str, Any], batches: str, *cells: str) -> list[str]:
    """A row of sections 2b and 2c: the BO size, count, case and batches, then ``cells``."""
    return [gpubo.format_bytes(b["nbytes"]), f"{b['count']:,}", b["case"], str(b[batches]), *cells]


def tables(results: dict[str, Any]) -> str:
    """The human-readable report of :func:`run`'s results."""
    fmt = gpubo.format_bytes
    info = results["machine"]
    fs = info["filesystem"]
    cfg = results["config"]
    parts = [
        f"gpubo {info['gpubo']} bench on {info['device']} ({info['platform']}); "
        f"{info['cpu']}, {info['cpus']} CPUs, {fmt(info['memory_bytes'])} RAM, Linux {info['kernel']}",
        f"stores in {fs['type']} on {fs['source']} at {fs['mount']}; median of {cfg['reps']} reps "
        f"after {cfg['warmup']} warm-up; GB/s = 10^9 bytes/s",
        "",
        "1. The limit (GB/s, median):",
        render_table(
            ["size", "raw D2H", "raw H2D", "write (page cache)", "write+fdatasync"],
            [
                [fmt(r["nbytes"])]
                + [_f(r[k]["median_gbps"]) for k in ("d2h", "h2d", "write", "write_fdatasync")]
                for r in results["limit"]
            ],
        ),
        "",
        "2. gpubo eviction (of a dirtied BO) and restore (GB/s, median; ratio to the raw copy "
        "paired with each call; evict/write: to a plain write of the same bytes into the page cache; "
        "after writeback: evict/D2H once the store's pages were written back, as in a long run):",
    ]
    rows = []
    for t in results["throughput"]:
        for c in t["cases"]:
            rows.append(
                [
                    fmt(t["nbytes"]),
                    c["backend"],
                    c["durability"],
                    c.get("checksums_where", "on" if c["checksums"] else "off"),
                    _f(c["evict"]["median_gbps"]),
                    _f(c["evict_vs_d2h"]["of_medians"]) + "x",
                    _f(c["evict_vs_write"]) + "x",
                    f"{c['evictions_per_s']:.0f}",
                    _f(c["restore"]["median_gbps"]),
                    _f(c["restore_vs_h2d"]["of_medians"]) + "x",
                    _f(c["evict_after_writeback_vs_d2h"]["of_medians"]) + "x"
                    if "evict_after_writeback_vs_d2h" in c
                    else "",
                ]
            )
    parts.append(
        render_table(
            [
                "size",
                "backend",
                "durability",
                "checksums",
                "evict",
                "evict/D2H",
                "evict/write",
                "evicts/s",
                "restore",
                "restore/H2D",
                "after writeback",
            ],
            rows,
        )
    )
    if results.get("fixed_cost"):
        parts += [
            "",
            "2a. Fixed cost per operation (us): the median time at the smallest size minus its bytes "
            "at the copy rate (the paired raw copy's rate at the largest size); the raw copies' own "
            "fixed cost beside it, for what the device's round trip costs by itself",
            render_table(
                ["size", "backend", "durability", "checksums", "evict", "raw D2H", "restore", "raw H2D"],
                [
                    [
                        fmt(r["nbytes"]),
                        r["backend"],
                        r["durability"],
                        r["checksums_where"],
                        _f(r["evict_fixed_us"], 0),
                        _f(r["raw_d2h_fixed_us"], 0),
                        _f(r["restore_fixed_us"], 0),
                        _f(r["raw_h2d_fixed_us"], 0),
                    ]
                    for r in results["fixed_cost"]
                ],
            ),
        ]
    if results.get("batched"):
        parts += [
            "",
            "2b. Small BOs evicted together by mgr.evict (the budget full of dirty BOs; medians; each "
            "gpubo call right after its raw copies, the pairs' order rotating each rep): evictions per "
            "second, and speed against gpubo one by one, one raw D2H per BO, and the same bytes as one "
            "raw D2H (the honest baseline for a batch)",
            render_table(
                [
                    "size",
                    "BOs",
                    "case",
                    "batches",
                    "evicts/s",
                    "GB/s",
                    "one by one/s",
                    "vs one by one",
                    "vs a D2H per BO",
                    "vs one D2H of all",
                ],
                [
                    _batch_row(
                        b,
                        "batches_per_evict",
                        f"{b['batched_evictions_per_s']:,.0f}",
                        _f(b["batched_gbps"]),
                        f"{b['singles_evictions_per_s']:,.0f}",
                        _f(b["batched_vs_singles"]) + "x",
                        _f(b["batched_vs_raw_each"]) + "x",
                        _f(b["batched_vs_raw_one"]) + "x",
                    )
                    for b in results["batched"]
                ],
            ),
            "",
            "2c. The same BOs restored by mgr.prefetch (batched: copies enqueued together) and one by one "
            "(bo.restore()), their buffers pooled (medians, paired and rotated as 2b): restores per "
            "second, and speed against one raw H2D per BO and the same bytes as one raw H2D",
            render_table(
                [
                    "size",
                    "BOs",
                    "case",
                    "batches",
                    "restores/s",
                    "one by one/s",
                    "vs one by one",
                    "vs an H2D per BO",
                    "vs one H2D of all",
                ],
                [
                    _batch_row(
                        b,
                        "restore_batches_per_prefetch",
                        f"{b['prefetch_restores_per_s']:,.0f}",
                        f"{b['singles_restores_per_s']:,.0f}",
                        _f(b["prefetch_vs_singles"]) + "x",
                        _f(b["prefetch_vs_raw_h2d_each"]) + "x",
                        _f(b["prefetch_vs_raw_h2d_one"]) + "x",
                    )
                    for b in results["batched"]
                ],
            ),
        ]
    s = results["staged"]
    parts += [
        "",
        f"3. Evicting {fmt(s['total_bytes'])} as {fmt(s['chunk_bytes'])} BOs ({s['case']}): "
        f"direct is {_f(s['direct_vs_staged'])}x the staged path",
        render_table(
            ["path", "GB/s", "seconds", "tracemalloc peak", "RSS growth", "RssAnon growth", "peak/evicted"],
            [
                [
                    name,
                    _f(s[name]["gbps"]),
                    _f(s[name]["median_s"], 3),
                    fmt(s[name]["tracemalloc_peak_bytes"]),
                    fmt(s[name]["rss_growth_bytes"]),
                    fmt(s[name]["rss_anon_growth_bytes"]),
                    f"{s[name]['tracemalloc_peak_bytes'] / s['total_bytes']:.2%}",
                ]
                for name in ("direct", "staged")
            ],
        ),
        "",
    ]
    z = results["zict"]
    if z.get("available"):
        parts += [
            f"4. zict {z['zict_version']} (Buffer over dict / Func(pickle) / File) vs gpubo ({z['case']}), "
            f"{fmt(z['total_bytes'])} as {fmt(z['chunk_bytes'])} arrays (seconds, median):",
            render_table(
                ["", "spill / evict", "unspill / restore", "round trip"],
                [
                    ["zict", *(_f(z[k], 3) for k in ("zict_spill_s", "zict_unspill_s", "zict_round_trip_s"))],
                    [
                        "gpubo",
                        *(_f(z[k], 3) for k in ("gpubo_evict_s", "gpubo_restore_s", "gpubo_round_trip_s")),
                    ],
                ],
            ),
            f"   gpubo's round trip is {_f(z['gpubo_vs_zict'])}x as fast as zict's",
        ]
    else:
        parts.append(f"4. zict: skipped: {z['reason']}")
    parts += [
        "",
        "5. Bookkeeping (microseconds, median; 64-byte BOs, budget full):",
        render_table(
            ["live BOs", "4 KiB read", "eviction decision (mgr.evict)", "setup s"],
            [
                [f"{b['bos']:,}", _f(b["read_4k_us"], 1), _f(b["evict_decision_us"], 1), _f(b["setup_s"], 1)]
                for b in results["bookkeeping"]
            ],
        ),
        "",
    ]
    g = results["gemm"]
    if g.get("available"):
        parts += [
            f"6. Blocked multiply {g['n']} x {g['n']} float32, {g['tile']} x {g['tile']} tiles "
            f"({fmt(g['total_bytes'])} of tiles), prefetch depth {g['depth']} (seconds, median):",
            render_table(
                ["budget", "bytes", "multiply", "end to end", "evictions"],
                [
                    [
                        name,
                        fmt(g[name]["budget_bytes"]),
                        _f(g[name]["multiply_s"], 3),
                        _f(g[name]["end_to_end_s"], 3),
                        str(g[name]["multiply_evictions"]),
                    ]
                    for name in ("oversubscribed", "in_memory")
                ],
            ),
            f"   oversubscribed runs at {_f(g['speed_ratio'])}x the in-memory speed "
            f"(end to end {_f(g['end_to_end_speed_ratio'])}x)",
        ]
    else:
        parts.append(f"6. gemm: skipped: {g['reason']}")
    o = results.get("overlap")
    if o:
        parts += [
            "",
            f"6b. bo.prefetch() of a swapped {fmt(o['nbytes'])} BO issued right after a kernel was queued "
            f"on mgr.queue (medians of {o['reps']}): resident after {_f(o['prefetch_s'] * 1e3, 1)} ms, "
            f"the kernel done after {_f(o['kernel_s'] * 1e3, 1)} ms ({_f(o['prefetch_vs_kernel'])}x; "
            "restores use the transfer queue, not the kernels' queue)",
        ]
    parts += _share_tables(results.get("share"))
    runs = results.get("runs", 1)
    judged = (
        "in this one run" if runs == 1 else f"on the median of {runs} runs (spread: their lowest and highest)"
    )
    parts += ["", f"Goals (met / MISSED {judged}; not asserted anywhere):"]
    for item in results["goals"]:
        op = ">=" if item["higher"] else "<="
        value = f"{item['value']:.4g}{item['unit']}"
        target = f"{item['target']:g}{item['unit']}"
        spread = ""
        if runs > 1:
            low, high = item["spread"]
            spread = f", spread {low:.4g}-{high:.4g}{item['unit']}"
        parts.append(
            f"  {'met   ' if item['met'] else 'MISSED'}  {item['goal']}: {value} ({op} {target}{spread})"
        )
    parts += ["", f"elapsed {results['elapsed_s']:.1f} s"]
    return "\n".join(parts)


def _share_tables(sh: dict[str, Any] | None) -> list[str]:
    if not sh:
        return []
    fmt = gpubo.format_bytes
    c, u = sh["contention"], sh["uneven"]
    return [
        "",
        "7. A device share: an allocation whose room another member process makes on request "
        "(the request's round trip, its eviction, the ledger) against one that evicts a BO of its "
        "own (no share); ms, alternating:",
        render_table(
            ["size", "reps", "other process p50", "p99", "own eviction p50", "p99", "added p50"],
            [
                [
                    fmt(r["nbytes"]),
                    str(r["reps"]),
                    _f(r["cross"]["p50_ms"], 3),
                    _f(r["cross"]["p99_ms"], 3),
                    _f(r["local"]["p50_ms"], 3),
                    _f(r["local"]["p99_ms"], 3),
                    _f(r["added_p50_ms"], 3),
                ]
                for r in sh["request"]
            ],
        ),
        f"7b. The stress workload ({fmt(c['total_bytes'])} of {fmt(c['bo_bytes'])} BOs on a "
        f"{fmt(c['budget_bytes'])} budget, {c['seconds']:g} s, median of {c['reps']}; operations/s):",
        render_table(
            [
                "4 processes, one share",
                "4 processes, split budget",
                "1 process, 4 threads",
                "share / one",
                "split / one",
            ],
            [
                [
                    _f(c["shared_4"]["ops_per_s"], 0),
                    _f(c["split_4"]["ops_per_s"], 0),
                    _f(c["one_process"]["ops_per_s"], 0),
                    _f(c["shared_vs_one"]),
                    _f(c["split_vs_one"]),
                ]
            ],
        ),
        f"7c. One busy process (a {fmt(u['working_set_bytes'])} working set of the stress workload) beside 3 "
        f"idle ones that filled the rest, on a {fmt(u['budget_bytes'])} budget (median of {u['reps']}): "
        f"{_f(u['shared']['ops_per_s'], 0)} operations/s on one share ({u['shared']['run_evictions']:g} "
        f"evictions while it ran), {_f(u['split']['ops_per_s'], 0)} with a quarter of the budget each "
        f"({u['split']['run_evictions']:g} evictions): {_f(u['shared_vs_split'])}x",
    ]


# -- command line ------------------------------------------------------------------------


def parse_sizes(text: str) -> list[int]:
    """``4KiB,1MiB`` -> byte counts (positive multiples of 4)."""
    sizes = [gpubo.parse_bytes(part.strip(), "size") for part in text.split(",") if part.strip()]
    if not sizes or any(s <= 0 or s % 4 for s in sizes):
        raise ValueError("give positive sizes that are multiples of 4 bytes")
    return sizes
