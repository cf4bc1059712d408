"""Eviction and restore cost of gpubo per store backend, durability mode and
checksum setting, side by side with raw copies and raw file writes of the
same bytes.

For each BO size, one run measures everything, interleaved rep by rep (the
order of the gpubo cases rotates every rep, so drift and background
writeback hit every column alike).

Baselines, of the same bytes:

* raw D2H / H2D: a blocking ``enqueue_copy`` between a device buffer and a
  preallocated, already-touched numpy array;
* write+fdatasync: ``pwrite`` of the bytes from that array into a
  preallocated, already-written file in the benchmark directory (beside the
  stores, same filesystem), then ``fdatasync``: the durable limit that
  ``sync`` is held to;
* O_DIRECT write: one ``pwrite`` with ``O_DIRECT`` from page-aligned memory
  into such a file (what ``direct`` is compared with; no fdatasync, as
  gpubo's ``direct`` eviction does none);
* write (page cache): the plain ``pwrite``, no sync (context for ``lazy``).

Every timed gpubo eviction is run right after its own baseline (raw D2H, and
for ``sync``/``direct`` the durable write too) and every timed restore right
after a raw H2D, so each ratio compares measurements taken moments apart.

Per case (backend x durability x checksums on/off): one manager with its
store in its own directory, one BO of non-zero data, and per rep:

* dirty: ``bo.write`` of one byte, so the BO differs from its swap-cache
  copy and the next eviction really copies (it also releases the old store
  entry); timed on its own, never part of an eviction;
* evict: ``bo.evict()`` of that dirty BO; only that call is timed, and
  ``stats().bytes_evicted`` is checked to grow by the BO's size;
* restore: ``bo.restore()`` with the evicted BO's device buffer pooled (the
  steady state under pressure, where a victim's buffer is recycled);
* clean re-evict: ``bo.evict()`` again right after the restore, unchanged:
  the swap cache keeps the entry and nothing is copied (checked:
  ``bytes_evicted`` does not grow); then restored again, untimed;
* zero BO, untouched: ``bo.evict()`` of a freshly allocated BO (known to be
  all zeros: no data I/O);
* zero BO, written: ``bo.evict()`` of a BO whose every byte ``bo.write``
  set to zero (zero-page detection reads it all and stores nothing).

Then, for ``lazy`` cases, a separate phase: evict after write-back (the
store's data file is ``fdatasync``-ed, untimed, before the dirty BO is
evicted, as the OS's flusher does for a file dirty for ~30 s; the mapped
store pages are then clean and write-protected, and the next copy into them
faults page by page). Last, restores that must allocate a fresh device
buffer (no pooled one), and a byte-exact check of every BO.

Reported: medians of ``--reps`` timed reps after ``--warmup`` untimed ones;
throughput in GB/s (10**9 bytes per second); ratios as gpubo throughput over
the baseline's (ratio of medians; the JSON also has the median of per-rep
ratios and the ratio of the best reps); small operations in microseconds.

Stores live in a fresh directory under ``--dir`` (default: the system temp
directory, ``$TMPDIR`` or else ``/tmp``), removed at the end; its filesystem
is printed. ``direct`` is skipped where the filesystem refuses O_DIRECT
(tmpfs).

Usage:
    python benchmarks/evict_restore.py [--sizes 4MiB,64MiB] [--reps 9] [--warmup 2]
        [--backends lmdb,slotfile] [--durability lazy,sync,direct] [--dir PATH] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyopencl as cl

import gpubo
from gpubo import BufferObject, Manager, State, StoreError
from gpubo.backends import OpenCLBackend

BACKENDS = ("lmdb", "slotfile")
DURABILITIES = ("lazy", "sync", "direct")
#: Which durability modes each backend can do.
SUPPORTED = {"lmdb": ("lazy", "sync"), "slotfile": ("lazy", "sync", "direct")}
#: Restores that allocate a fresh device buffer are slow; a few are enough.
FRESH_BUFFER_REPS = 3
PAGE = 4096

#: Goals from the issue: (backend, durability, checksums, measure, minimum, text). The
#: raw-copy goals are for lazy, where an eviction is a copy into the page cache.
GOALS = [
    ("slotfile", "lazy", False, "evict_vs_d2h", 0.90, "slot-file eviction >= 0.9x raw D2H"),
    ("slotfile", "lazy", True, "evict_vs_d2h", 0.85, "slot-file eviction, checksums, >= 0.85x raw D2H"),
    ("slotfile", "sync", False, "evict_vs_durable", 0.80, "slot-file sync >= 0.8x write+fdatasync"),
    (
        "slotfile",
        "sync",
        True,
        "evict_vs_durable",
        0.80,
        "slot-file sync, checksums, >= 0.8x write+fdatasync",
    ),
    ("lmdb", "sync", False, "evict_vs_durable", 0.80, "lmdb sync >= 0.8x write+fdatasync"),
    ("lmdb", "sync", True, "evict_vs_durable", 0.80, "lmdb sync, checksums, >= 0.8x write+fdatasync"),
]


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
    backend: str
    durability: str
    checksums: bool

    @property
    def label(self) -> str:
        return f"{self.backend}/{self.durability}/checksums {'on' if self.checksums else 'off'}"


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
            directory, f"{key.backend}-{key.durability}-{'cs' if key.checksums else 'nocs'}-{nbytes}"
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
            "evict": s["evict"].to_json(),
            "restore": s["restore"].to_json(),
            "restore_fresh_buffer": self.fresh.to_json(),
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
        if s["durable"].samples_s:
            row["durable_baseline"] = "write_fdatasync" if key.durability == "sync" else "write_direct"
            row["paired_durable"] = s["durable"].to_json()
            row["evict_vs_durable"] = ratio(s["evict"], s["durable"])
        if s["evict_after_writeback"].samples_s:
            row["evict_after_writeback"] = s["evict_after_writeback"].to_json()
            row["paired_raw_d2h_writeback"] = s["d2h_writeback"].to_json()
            row["evict_after_writeback_vs_d2h"] = ratio(s["evict_after_writeback"], s["d2h_writeback"])
        return row


def case_keys(backends: list[str], durabilities: list[str]) -> list[CaseKey]:
    return [
        CaseKey(b, d, cs) for b in backends for d in durabilities if d in SUPPORTED[b] for cs in (False, True)
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


# -- reporting -----------------------------------------------------------------


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


def _render(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=True)]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(row, widths, strict=True)) for row in [headers, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def baseline_table(results: list[dict[str, Any]]) -> str:
    headers = ["size", "raw D2H", "raw H2D", "write (page cache)", "write+fdatasync", "O_DIRECT write"]
    rows = []
    for r in results:
        b = r["baselines"]
        rows.append(
            [gpubo.format_bytes(r["nbytes"])]
            + [
                f"{b[name]['median_gbps']:.2f}" if name in b else "-"
                for name in ("d2h", "h2d", "write", "write_fdatasync", "write_direct")
            ]
        )
    return _render(headers, rows)


def _case_cells(r: dict[str, Any], g: dict[str, Any]) -> list[str]:
    return [gpubo.format_bytes(r["nbytes"]), g["backend"], g["durability"], "on" if g["checksums"] else "off"]


def throughput_table(results: list[dict[str, Any]]) -> str:
    headers = [
        "size", "backend", "durability", "checksums", "evict", "evict/D2H", "evict/durable",
        "restore", "restore/H2D",
    ]  # fmt: skip
    rows = []
    for r in results:
        for g in r["gpubo"]:
            rows.append(
                [
                    *_case_cells(r, g),
                    f"{g['evict']['median_gbps']:.2f}",
                    _fmt_ratio(g, "evict_vs_d2h"),
                    _fmt_ratio(g, "evict_vs_durable"),
                    f"{g['restore']['median_gbps']:.2f}",
                    _fmt_ratio(g, "restore_vs_h2d"),
                ]
            )
    return _render(headers, rows)


def other_table(results: list[dict[str, Any]]) -> str:
    headers = [
        "size", "backend", "durability", "checksums", "evict after writeback", "(vs D2H)", "1st evict",
        "restore, fresh buf",
    ]  # fmt: skip
    rows = []
    for r in results:
        for g in r["gpubo"]:
            wb = g.get("evict_after_writeback")
            rows.append(
                [
                    *_case_cells(r, g),
                    f"{wb['median_gbps']:.2f}" if wb else "-",
                    _fmt_ratio(g, "evict_after_writeback_vs_d2h"),
                    f"{g['evict']['first_gbps']:.2f}",
                    f"{g['restore_fresh_buffer']['median_gbps']:.2f}",
                ]
            )
    return _render(headers, rows)


def latency_table(results: list[dict[str, Any]]) -> str:
    headers = [
        "size", "backend", "durability", "checksums", "clean re-evict", "zero BO evict",
        "zero-written evict", "(vs D2H)", "dirty (1-byte write)",
    ]  # fmt: skip
    rows = []
    for r in results:
        for g in r["gpubo"]:
            rows.append(
                [
                    *_case_cells(r, g),
                    f"{g['clean_reevict']['median_us']:.0f}",
                    f"{g['zero_untouched_evict']['median_us']:.0f}",
                    f"{g['zero_written_evict']['median_us']:.0f}",
                    _fmt_ratio(g, "zero_written_evict_vs_d2h"),
                    f"{g['dirty_write_1_byte']['median_us']:.0f}",
                ]
            )
    return _render(headers, rows)


def goals(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in results:
        for backend, durability, checksums, measure, minimum, text in GOALS:
            for g in r["gpubo"]:
                if (g["backend"], g["durability"], g["checksums"]) == (backend, durability, checksums) and (
                    measure in g
                ):
                    value = g[measure]["of_medians"]
                    out.append(
                        {
                            "nbytes": r["nbytes"],
                            "goal": text,
                            "measure": measure,
                            "minimum": minimum,
                            "value": value,
                            "paired": g[measure]["median_paired"],
                            "best": g[measure]["of_best"],
                            "met": value >= minimum,
                        }
                    )
    return out


def goals_text(items: list[dict[str, Any]]) -> str:
    lines = []
    for item in items:
        mark = "met" if item["met"] else "MISSED"
        lines.append(
            f"  {gpubo.format_bytes(item['nbytes']):>8}  {item['goal']:<54} {item['value']:.2f}x  {mark:<6}"
            f"  (per-rep {item['paired']:.2f}x, best reps {item['best']:.2f}x)"
        )
    return "\n".join(lines)


# -- command line --------------------------------------------------------------


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [gpubo.parse_bytes(part.strip(), "size") for part in text.split(",") if part.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not sizes or any(s <= 0 or s % 4 for s in sizes):
        raise argparse.ArgumentTypeError("give positive sizes that are multiples of 4 bytes")
    return sizes


def _choices(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [part.strip() for part in text.split(",") if part.strip()]
        bad = [x for x in items if x not in allowed]
        if not items or bad:
            raise argparse.ArgumentTypeError(
                f"choose from {','.join(allowed)}, comma-separated; got {text!r}"
            )
        return list(dict.fromkeys(items))

    return parse


@contextlib.contextmanager
def bench_directory(parent: str) -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="gpubo-bench-", dir=parent)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _direct_ok(directory: str) -> bool:
    """Whether the filesystem of ``directory`` takes O_DIRECT."""
    path = os.path.join(directory, "probe-direct")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT | os.O_CLOEXEC, 0o600)
    except OSError:
        return False
    os.close(fd)
    os.unlink(path)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=parse_sizes, default=[4 << 20, 64 << 20], help="e.g. 4MiB,64MiB")
    parser.add_argument("--reps", type=int, default=9, help="timed repetitions (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repetitions first")
    parser.add_argument(
        "--backends", type=_choices(BACKENDS), default=list(BACKENDS), help="comma-separated: lmdb,slotfile"
    )
    parser.add_argument(
        "--durability",
        type=_choices(DURABILITIES),
        default=list(DURABILITIES),
        help="comma-separated: lazy,sync,direct (direct: slotfile only)",
    )
    parser.add_argument(
        "--dir",
        default=None,
        help="where the stores and baseline files go (a fresh subdirectory, removed at the end); "
        "default: the system temp directory ($TMPDIR, else /tmp)",
    )
    parser.add_argument("--json", action="store_true", help="print only the JSON results")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.warmup < 0:
        parser.error("--reps must be >= 1 and --warmup >= 0")
    parent = args.dir if args.dir is not None else tempfile.gettempdir()
    if not os.path.isdir(parent):
        parser.error(f"--dir {parent!r} is not a directory")

    probe = OpenCLBackend(None)  # the device Manager(device=None) picks
    context = probe.context
    notes: list[str] = []
    start = time.perf_counter()
    with bench_directory(parent) as directory:
        durabilities = list(args.durability)
        if "direct" in durabilities and not _direct_ok(directory):
            durabilities.remove("direct")
            notes.append(f"direct skipped: the filesystem of {directory} refuses O_DIRECT")
        keys = case_keys(args.backends, durabilities)
        if not keys:
            parser.error("no backend supports the durability modes chosen (direct needs slotfile)")
        info = machine(context, directory)
        if not args.json:
            fs = info["filesystem"]
            print(f"gpubo {info['gpubo']} evict/restore benchmark on {info['device']} ({info['platform']})")
            print(f"device: {info['device_version']}")
            print(
                f"host: {info['cpu']}, {info['cpus']} CPUs, {gpubo.format_bytes(info['memory_bytes'])} RAM, "
                f"Linux {info['kernel']}; Python {info['python']}, numpy {info['numpy']}, "
                f"pyopencl {info['pyopencl']}"
            )
            print(
                f"stores and baseline files in {directory}: {fs['type']} on {fs['source']} at {fs['mount']}"
            )
            print(f"cases: {', '.join(k.label for k in keys)}")
            print(f"median of {args.reps} reps after {args.warmup} warm-up; GB/s = 10^9 bytes/s", flush=True)
            for note in notes:
                print(f"note: {note}")
        try:
            results = [bench_size(n, args.reps, args.warmup, context, keys, directory) for n in args.sizes]
        except StoreError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    elapsed = time.perf_counter() - start
    checked = goals(results)
    blob = {
        "machine": info,
        "reps": args.reps,
        "warmup": args.warmup,
        "backends": args.backends,
        "durability": durabilities,
        "notes": notes,
        "elapsed_s": elapsed,
        "results": results,
        "goals": checked,
    }
    if args.json:
        print(json.dumps(blob, indent=2))
        return 0
    print()
    print("Baselines (GB/s, median):")
    print(baseline_table(results))
    print()
    print("Eviction and restore throughput (GB/s, median) and ratios to the baselines:")
    print(throughput_table(results))
    print()
    print("Other evictions and restores (GB/s, median):")
    print(other_table(results))
    print()
    print("Small operations (microseconds, median):")
    print(latency_table(results))
    print()
    print("Ratios: gpubo throughput over its baseline's, each baseline run just before the gpubo call")
    print("  it is paired with (ratio of the medians; the JSON also has the median of per-rep ratios")
    print("  and the ratio of the best reps).")
    print("evict/D2H, restore/H2D: over the raw copy of the same bytes.")
    print("evict/durable: sync over write+fdatasync, direct over an O_DIRECT write, of the same bytes.")
    print("evict after writeback (lazy): the store's file fdatasync'ed (untimed) before the eviction,")
    print("  as the OS's flusher does after ~30 s: the mapped pages are clean and fault on write again.")
    print("1st evict: the very first eviction into a fresh store (its pages first touched then).")
    print("restore, fresh buf: a restore with no pooled device buffer (allocates and zero-fills).")
    print("clean re-evict: evict right after a restore, unchanged; the swap cache copies nothing.")
    print("zero BO evict: a fresh, untouched BO (no data I/O); zero-written: every byte written as 0")
    print("  (zero-page detection reads it all, stores nothing); (vs D2H) its speed over raw D2H.")
    print("dirty: the 1-byte bo.write before each copying eviction (drops the swap-cache copy).")
    if checked:
        print()
        print("Goals (issue 3; met or MISSED by the ratio of medians; per-rep: median of the per-rep")
        print("ratios; best reps: fastest gpubo rep over fastest baseline rep):")
        print(goals_text(checked))
    print()
    print(f"elapsed {elapsed:.1f} s")
    print()
    print(json.dumps(blob, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
