"""Shrinkers and memory pressure: how gpubo gives memory back when asked.

As in the kernel (include/linux/shrinker.h), a shrinker has two calls:
``count()`` says cheaply how many bytes it could free now, ``scan(nbytes)``
frees up to that many and says how many it did. A :class:`Manager` keeps a
registry and :meth:`Manager.shrink` runs them in order. Built in:

1. :class:`PoolShrinker`: device buffers kept for reuse (no data moves);
2. :class:`DeviceShrinker`: the TTM/xe-style walk over buffer objects:
   purgeable BOs are dropped (no I/O), then idle BOs whose content is
   already in the store (no copy), then other idle BOs, and only then BOs a
   kernel is still using (after waiting for it); groups within their ``min``
   are spared;
3. :class:`StoreCacheShrinker`: store pages held in the host page cache
   (written back, then dropped).

A :class:`PressureMonitor` thread reads a :class:`PressureSource` and, when
it reports pressure, runs the shrinkers without blocking: its walk only
try-locks, never waits for a BO another thread is using, and skips BOs a
kernel is still using. :class:`LinuxPressure` reads PSI
(``/proc/pressure/memory``), ``MemAvailable`` and the cgroup v2 memory
files; a signal the machine lacks is reported once in the log and the others
are used. Any object with a ``read() -> Pressure | None`` method is a source,
so tests and applications can drive the monitor deterministically.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from gpubo._units import parse_bytes

__all__ = [
    "DeviceShrinker",
    "LinuxPressure",
    "PoolShrinker",
    "Pressure",
    "PressureMonitor",
    "PressureSource",
    "Shrinkable",
    "Shrinker",
    "ShrinkerList",
    "StoreCacheShrinker",
]

log = logging.getLogger(__name__)


@runtime_checkable
class Shrinker(Protocol):
    """Anything that can give memory back.

    A shrinker whose ``scan`` also takes ``may_block`` (a keyword: False when
    the pressure monitor asks, so it must not wait) says so with a class
    attribute ``takes_may_block = True``; the built-in ones do.
    """

    def count(self) -> int:
        """Bytes that could be freed now (cheap, approximate)."""
        ...

    def scan(self, nbytes: int) -> int:
        """Free up to ``nbytes``; return the bytes actually freed."""
        ...


class PoolShrinker:
    """Releases device buffers the manager keeps for reuse."""

    name = "pool"
    takes_may_block = True

    def __init__(self, pooled_bytes: Callable[[], int], drain: Callable[[int], int]) -> None:
        self._pooled_bytes = pooled_bytes
        self._drain = drain

    def count(self) -> int:
        return self._pooled_bytes()

    def scan(self, nbytes: int, *, may_block: bool = True) -> int:
        return self._drain(nbytes)  # releases only: never waits for the device


class DeviceShrinker:
    """Purges and evicts buffer objects (see the module docstring for the
    order); with ``may_block`` False it only try-locks and skips busy BOs."""

    name = "device"
    takes_may_block = True

    def __init__(self, evictable_bytes: Callable[[], int], shrink: Callable[[int, bool], int]) -> None:
        self._evictable_bytes = evictable_bytes
        self._shrink = shrink

    def count(self) -> int:
        return self._evictable_bytes()

    def scan(self, nbytes: int, *, may_block: bool = True) -> int:
        return self._shrink(nbytes, may_block)


class _CachedStore(Protocol):
    def cached_bytes(self) -> int: ...
    def drop_cache(self, nbytes: int) -> int: ...


class StoreCacheShrinker:
    """Writes back and drops store pages the host page cache holds."""

    name = "store-cache"
    takes_may_block = True

    def __init__(self, store: _CachedStore) -> None:
        self._store = store

    def count(self) -> int:
        return self._store.cached_bytes()

    def scan(self, nbytes: int, *, may_block: bool = True) -> int:
        return self._store.drop_cache(nbytes)


class Shrinkable(Protocol):
    """What a :class:`PressureMonitor` shrinks (a :class:`~gpubo.Manager`)."""

    def shrink(self, nbytes: int | str, *, may_block: bool = True) -> int: ...


class ShrinkerList:
    """The registry a manager runs, in order (thread-safe: its own lock is a
    leaf, and no shrinker runs under it)."""

    def __init__(self, shrinkers: list[Shrinker]) -> None:
        self._lock = threading.Lock()
        self._list = list(shrinkers)

    def snapshot(self) -> list[Shrinker]:
        with self._lock:
            return list(self._list)

    def register(self, shrinker: Shrinker, first: bool) -> None:
        if not isinstance(shrinker, Shrinker):
            raise TypeError(f"shrinker must have count() and scan(nbytes), got {type(shrinker).__name__}")
        with self._lock:
            self._list.insert(0 if first else len(self._list), shrinker)

    def unregister(self, shrinker: Shrinker) -> None:
        with self._lock:
            if shrinker in self._list:
                self._list.remove(shrinker)

    def run(self, want: int, may_block: bool) -> int:
        """Scan each shrinker with something to give until ``want`` bytes are
        freed; a shrinker that raises is logged and skipped. Bytes freed."""
        freed = 0
        for shrinker in self.snapshot():
            if freed >= want:
                break
            try:
                if shrinker.count() <= 0:  # nothing to give: no scan (as in the kernel)
                    continue
                if getattr(shrinker, "takes_may_block", False):
                    got = int(shrinker.scan(want - freed, may_block=may_block))  # type: ignore[call-arg]
                else:
                    got = int(shrinker.scan(want - freed))
            except Exception:
                log.exception("shrinker %r failed; the others still run", shrinker)
                continue
            freed += max(0, got)
        return freed


@dataclass(frozen=True)
class Pressure:
    """One reading: ``reclaim_bytes`` is how much should be given back now
    (0: no pressure); ``reason`` says which signal crossed its threshold."""

    reclaim_bytes: int
    reason: str = ""


class PressureSource(Protocol):
    """A source of memory-pressure readings for the monitor."""

    def read(self) -> Pressure | None:
        """The current pressure, or None when no signal is available."""
        ...


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


class LinuxPressure:
    """Pressure from Linux: PSI, ``MemAvailable`` and cgroup v2 limits.

    Args:
        min_available: reclaim when ``MemAvailable`` drops below this many
            bytes (default: 10% of ``MemTotal``); asks for the difference.
        psi_some_avg10: reclaim ``psi_reclaim_bytes`` when the share of time
            some task stalled on memory over the last 10 s exceeds this (%).
        cgroup_fraction: reclaim when the cgroup's ``memory.current`` exceeds
            this fraction of ``memory.high`` (or ``memory.max``).
        root: filesystem root, for tests (``/proc`` and ``/sys`` under it).

    Raises (constructor):
        TypeError, ValueError: a threshold of the wrong type or out of range.

    Notes:
        Each signal the machine lacks is logged once and skipped.
    """

    def __init__(
        self,
        *,
        min_available: int | str | None = None,
        psi_some_avg10: float = 10.0,
        psi_reclaim_bytes: int | str = 64 << 20,
        cgroup_fraction: float = 0.9,
        root: str = "/",
    ) -> None:
        if isinstance(psi_some_avg10, bool) or not isinstance(psi_some_avg10, (int, float)):
            raise TypeError(f"psi_some_avg10 must be a number, got {psi_some_avg10!r}")
        if not 0 <= psi_some_avg10 <= 100:
            raise ValueError(f"psi_some_avg10 is a percentage (0..100), got {psi_some_avg10}")
        if isinstance(cgroup_fraction, bool) or not isinstance(cgroup_fraction, (int, float)):
            raise TypeError(f"cgroup_fraction must be a number, got {cgroup_fraction!r}")
        if not 0 < cgroup_fraction <= 1:
            raise ValueError(f"cgroup_fraction must be in (0, 1], got {cgroup_fraction}")
        self._root = root
        self.psi_some_avg10 = float(psi_some_avg10)
        self.psi_reclaim_bytes = parse_bytes(psi_reclaim_bytes, "psi_reclaim_bytes")
        self.cgroup_fraction = float(cgroup_fraction)
        self._missing: set[str] = set()
        self.min_available = None if min_available is None else parse_bytes(min_available, "min_available")
        if min_available is None:
            total = self._meminfo().get("MemTotal")
            self.min_available = total // 10 if total else None
        self._cgroup_dir = self._find_cgroup()

    def _path(self, *parts: str) -> str:
        return os.path.join(self._root, *parts)

    def _note_missing(self, signal: str) -> None:
        if signal not in self._missing:
            self._missing.add(signal)
            log.info("memory pressure: %s is not available on this machine; using the other signals", signal)

    def _meminfo(self) -> dict[str, int]:
        text = _read(self._path("proc", "meminfo"))
        if text is None:
            return {}
        out = {}
        for line in text.splitlines():
            key, _, rest = line.partition(":")
            fields = rest.split()
            if fields and fields[0].isdigit():
                out[key] = int(fields[0]) * (1024 if len(fields) > 1 and fields[1] == "kB" else 1)
        return out

    def _find_cgroup(self) -> str | None:
        text = _read(self._path("proc", "self", "cgroup"))
        if text is None:
            return None
        for line in text.splitlines():
            if line.startswith("0::"):
                rel = line[3:].strip().lstrip("/")
                path = self._path("sys", "fs", "cgroup", rel)
                if os.path.exists(os.path.join(path, "memory.current")):
                    return path
        return None

    def read(self) -> Pressure | None:
        readings = []
        info = self._meminfo()
        available = info.get("MemAvailable")
        if available is None:
            self._note_missing("MemAvailable (/proc/meminfo)")
        elif self.min_available is not None and available < self.min_available:
            readings.append(Pressure(self.min_available - available, f"MemAvailable {available} bytes"))
        psi = _read(self._path("proc", "pressure", "memory"))
        if psi is None:
            self._note_missing("PSI (/proc/pressure/memory)")
        else:
            for line in psi.splitlines():
                if line.startswith("some"):
                    fields = dict(f.split("=") for f in line.split()[1:] if "=" in f)
                    avg10 = float(fields.get("avg10", 0.0))
                    if avg10 > self.psi_some_avg10:
                        readings.append(Pressure(self.psi_reclaim_bytes, f"PSI some avg10={avg10}"))
        cg = self._cgroup_reading()
        if cg is not None:
            readings.append(cg)
        if not readings:
            return None if available is None and psi is None and self._cgroup_dir is None else Pressure(0)
        return max(readings, key=lambda p: p.reclaim_bytes)

    def _cgroup_reading(self) -> Pressure | None:
        if self._cgroup_dir is None:
            self._note_missing("cgroup v2 memory.current")
            return None
        current = _read(os.path.join(self._cgroup_dir, "memory.current"))
        if current is None or not current.strip().isdigit():
            return None
        used = int(current)
        for limit_name in ("memory.high", "memory.max"):
            raw = (_read(os.path.join(self._cgroup_dir, limit_name)) or "max").strip()
            if raw.isdigit():
                threshold = int(int(raw) * self.cgroup_fraction)
                if used > threshold:
                    return Pressure(used - threshold, f"cgroup {limit_name}: {used} of {raw} bytes")
                return None
        return None


class PressureMonitor:
    """A background thread that shrinks a manager when its source reports pressure.

    Started by :meth:`Manager.watch_pressure` (or ``Manager(pressure=...)``)
    and stopped by :meth:`stop` or the manager's ``close()``.

    Notes:
        ``reclaimed_bytes`` and ``rounds`` are written by the monitor thread
        only. A source or shrinker that raises is logged and the monitor goes
        on.
    """

    def __init__(self, manager: Shrinkable, source: PressureSource, interval: float) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval}")
        self._manager = manager
        self.source = source
        self.interval = interval
        self.reclaimed_bytes = 0
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpubo-pressure", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self.interval)

    def poll(self) -> int:
        """Read the source once and shrink if needed; bytes reclaimed."""
        try:
            pressure = self.source.read()
        except Exception:
            log.exception("memory pressure source %r failed", self.source)
            return 0
        self.rounds += 1
        if pressure is None:
            return 0
        try:
            want = int(pressure.reclaim_bytes)
            if want <= 0:
                return 0
            freed = self._manager.shrink(want, may_block=False)
        except Exception:  # the monitor must outlive a bad reading or a failed shrink
            log.exception("shrinking for memory pressure %r failed", pressure)
            return 0
        self.reclaimed_bytes += freed
        log.info(
            "memory pressure (%s): reclaimed %d of %d bytes", pressure.reason, freed, pressure.reclaim_bytes
        )
        return freed

    def stop(self) -> None:
        """Stop the thread and wait for it. Idempotent."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()
