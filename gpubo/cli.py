"""The ``gpubo`` command line: ``gpubo info`` and ``gpubo stress``.

The CLI owns the terminal: everything here that talks to the user goes
through ``click.echo``; the library below it only logs.

``gpubo stress`` is split in two so it can grow (more workloads, threads,
processes, plots) without touching the terminal code:

* the engine (:class:`StressConfig`, :class:`PatternSet`, :class:`StressRun`)
  drives a :class:`gpubo.Manager`, keeps a model of what every BO must hold and
  returns a :class:`StressReport`; it never prints, it calls ``on_progress``;
* the presentation (``_stress_*`` functions) turns reports into lines, tables
  and JSON.

Exit codes: 0 every check passed; 1 a data check failed (a mismatch or a
store checksum error); 2 bad usage (click); 3 gpubo or the device failed
(no device, store error, out of memory); 130 interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import click
import numpy as np
import numpy.typing as npt
import pyopencl as cl

import gpubo
from gpubo import BufferObject, GpuboError, IntegrityError, Manager, State, format_bytes, parse_bytes
from gpubo.backends import OpenCLBackend, describe_platforms

__all__ = ["main"]

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_ERROR = 3
EXIT_INTERRUPTED = 130

#: How many mismatches are reported in detail (all are counted).
_MAX_REPORTED_MISMATCHES = 10
_MIN_STORE_BYTES = 64 << 20


# -- shared helpers -------------------------------------------------------------


class _Failure(click.ClickException):
    """A gpubo or device failure, reported as ``Error: ...`` with exit code 3."""

    exit_code = EXIT_ERROR


class ByteSize(click.ParamType):  # type: ignore[type-arg]  # generic only in click >= 8.2
    """A click type for byte sizes such as ``64MiB``, parsed with :func:`gpubo.parse_bytes`.

    ``minimum`` and ``multiple_of`` reject values the command cannot use,
    with a message that says why.
    """

    name = "size"

    def __init__(self, minimum: int = 0, multiple_of: int = 1) -> None:
        self.minimum = minimum
        self.multiple_of = multiple_of

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        try:
            nbytes = parse_bytes(value, "size")
        except (TypeError, ValueError) as e:
            self.fail(_strip_prefix(str(e), "size: "), param, ctx)
        if nbytes < self.minimum:
            self.fail(f"must be at least {format_bytes(self.minimum)}, got {value!r}", param, ctx)
        if nbytes % self.multiple_of:
            self.fail(f"{value!r} is not a multiple of {self.multiple_of} bytes", param, ctx)
        return nbytes


def _strip_prefix(text: str, prefix: str) -> str:
    return text[len(prefix) :] if text.startswith(prefix) else text


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], indent: str = "  ") -> str:
    """Rows as left-aligned columns under ``headers`` (empty headers: no header line)."""
    cells = [[str(c) for c in row] for row in rows]
    lines = [list(headers)] if any(headers) else []
    lines += cells
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = [
        indent + "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    ]
    if any(headers):
        out.insert(1, indent + "  ".join("-" * w for w in widths))
    return "\n".join(out)


def _bytes_exact(nbytes: int) -> str:
    return f"{format_bytes(nbytes)} ({nbytes} bytes)"


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else 0.0


# -- the group --------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(gpubo.__version__, prog_name="gpubo")
@click.option("-v", "--verbose", count=True, help="Log more (-v: info, -vv: debug).")
def main(verbose: int) -> None:
    """gpubo: budgeted GPU buffer objects that spill straight into a swap-slot store."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


# -- gpubo info -------------------------------------------------------------------


def _default_device() -> dict[str, Any]:
    """What ``Manager(device=None)`` would open, as a plain dict.

    Raises:
        DeviceError: no device can be opened.
    """
    backend = OpenCLBackend(None)
    return {
        "name": backend.name,
        "platform": backend.device.platform.name,
        "device": backend.device.name.strip(),
        "global_mem_bytes": backend.global_mem_bytes,
        "max_alloc_bytes": backend.max_alloc_bytes,
    }


def _mark_default(devices: list[dict[str, Any]], default: dict[str, Any] | None) -> None:
    """Add ``"default": bool`` to each device dict (the first one that matches)."""
    found = False
    for dev in devices:
        match = (
            default is not None
            and not found
            and (dev["platform"], dev["device"]) == (default["platform"], default["device"])
        )
        dev["default"] = match
        found = found or match


def _info_text(devices: list[dict[str, Any]], default: dict[str, Any] | None, error: str | None) -> str:
    rows = [
        [
            "*" if dev["default"] else "",
            dev["platform"],
            dev["device"],
            dev["type"],
            format_bytes(dev["global_mem_bytes"]),
            format_bytes(dev["max_alloc_bytes"]),
            dev["version"],
        ]
        for dev in devices
    ]
    parts = [f"gpubo {gpubo.__version__}, pyopencl {cl.VERSION_TEXT}", "", "OpenCL devices:"]
    parts.append(_table(["", "platform", "device", "type", "memory", "max alloc", "version"], rows))
    parts.append("")
    if default is None:
        parts.append(f"gpubo cannot open a default device: {error}")
        return "\n".join(parts)
    parts.append("gpubo's default device (marked *), used by Manager(device=None):")
    summary = [
        ["name", default["name"]],
        ["device", default["device"]],
        ["platform", default["platform"]],
        ["global memory", _bytes_exact(default["global_mem_bytes"])],
        ["max allocation", _bytes_exact(default["max_alloc_bytes"])],
    ]
    parts.append(_table(["", ""], summary))
    return "\n".join(parts)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def info(as_json: bool) -> None:
    """Show OpenCL platforms and devices, and which one gpubo uses by default."""
    try:
        devices = describe_platforms()
    except GpuboError as e:
        raise _Failure(str(e)) from e
    default: dict[str, Any] | None
    error: str | None = None
    try:
        default = _default_device()
    except GpuboError as e:
        default, error = None, str(e)
    _mark_default(devices, default)
    if as_json:
        payload = {"gpubo_version": gpubo.__version__, "devices": devices, "default": default, "error": error}
        click.echo(json.dumps(payload, indent=2))
    else:
        click.echo(_info_text(devices, default, error))
    if default is None:
        click.get_current_context().exit(EXIT_ERROR)


# -- gpubo stress: the engine (no terminal output) -----------------------------------

_ADD_KERNEL_SOURCE = """
__kernel void add_const(__global uint *words, const uint value)
{
    words[get_global_id(0)] += value;
}
"""


@dataclass(frozen=True)
class StressConfig:
    """What a stress run does; sizes are int bytes.

    The run stops after ``loops`` operations if given, else after ``seconds``.
    Every ``kernel_every``-th operation (0: never) also adds a constant to a
    random BO with an OpenCL kernel launched through :meth:`Manager.launch`.
    """

    budget_bytes: int
    total_bytes: int
    bo_nbytes: int
    seconds: float
    loops: int | None
    seed: int
    store: str | None
    store_size_bytes: int
    kernel_every: int = 16
    progress_s: float = 1.0

    @property
    def bo_count(self) -> int:
        return self.total_bytes // self.bo_nbytes


@dataclass(frozen=True)
class Mismatch:
    """A BO whose bytes differ from the model: the first bad 32-bit word."""

    bo: str
    offset: int  #: byte offset of the first bad word
    expected: int
    found: int
    bad_words: int  #: how many words of the BO were wrong
    operation: int


@dataclass
class StressReport:
    """What a stress run did and found. ``stats`` is ``Manager.stats()`` at the end."""

    config: StressConfig
    device: str = ""
    setup_s: float = 0.0
    run_s: float = 0.0
    operations: int = 0
    verified_bytes: int = 0
    written_bytes: int = 0
    kernels: int = 0
    restoring_reads: int = 0
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
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.mismatch_count or self.error or self.check_failed or self.interrupted)

    @property
    def swap_gbps(self) -> float:
        """Bytes evicted plus restored per second during the timed phase."""
        return _gbps(self.run_bytes_evicted + self.run_bytes_restored, self.run_s)

    @property
    def verify_gbps(self) -> float:
        return _gbps(self.verified_bytes, self.run_s)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(ok=self.ok, swap_gbps=self.swap_gbps, verify_gbps=self.verify_gbps)
        return out


@dataclass(frozen=True)
class Progress:
    """A live snapshot handed to ``on_progress``."""

    elapsed_s: float
    operations: int
    mismatch_count: int
    stats: gpubo.Stats


class PatternSet:
    """The BOs of a run and the model of what each must hold.

    BO ``i`` holds its seed pattern: 32-bit word ``j`` is ``(seeds[i] + j) mod
    2**32``. Writing a new seed or adding a constant with a kernel changes the
    model and the BO together; :meth:`verify` compares every byte.

    Notes:
        Not thread-safe: one thread drives a PatternSet (a parallel run would
        give each thread its own set of BOs).
    """

    def __init__(self, mgr: Manager, bo_nbytes: int) -> None:
        self.mgr = mgr
        self.bo_nbytes = bo_nbytes
        self.bos: list[BufferObject] = []
        self.seeds: list[int] = []
        words = bo_nbytes // 4
        self._ramp = np.arange(words, dtype=np.uint32)
        self._scratch = np.empty(words, dtype=np.uint32)
        self._kernel = cl.Program(mgr.context, _ADD_KERNEL_SOURCE).build().add_const

    def pattern(self, seed: int) -> npt.NDArray[np.uint32]:
        """The expected words for ``seed`` (a scratch array, overwritten by the next call)."""
        return np.add(self._ramp, np.uint32(seed), out=self._scratch)

    def add(self, seed: int) -> None:
        """Allocate one more BO and fill it with ``seed``'s pattern."""
        bo = self.mgr.alloc(self.bo_nbytes, name=f"stress{len(self.bos)}")
        self.bos.append(bo)
        self.seeds.append(seed)
        bo.write(self.pattern(seed))

    def rewrite(self, index: int, seed: int) -> None:
        """Overwrite BO ``index`` with ``seed``'s pattern (no restore needed)."""
        self.bos[index].write(self.pattern(seed))
        self.seeds[index] = seed

    def add_with_kernel(self, index: int, value: int) -> None:
        """Add ``value`` to every word of BO ``index`` on the device (asynchronous)."""
        words = self.bo_nbytes // 4
        self.mgr.launch(self._kernel, (words,), None, self.bos[index], np.uint32(value))
        self.seeds[index] = (self.seeds[index] + value) % 2**32

    def verify(self, index: int, operation: int) -> Mismatch | None:
        """Read BO ``index`` (restoring it if needed) and compare every byte with the model."""
        found = self.bos[index].read(np.uint32)
        expected = self.pattern(self.seeds[index])
        if np.array_equal(found, expected):
            return None
        bad = np.flatnonzero(found != expected)
        first = int(bad[0])
        return Mismatch(
            bo=self.bos[index].label(),
            offset=first * 4,
            expected=int(expected[first]),
            found=int(found[first]),
            bad_words=len(bad),
            operation=operation,
        )

    def resync(self, index: int) -> None:
        """Rewrite BO ``index`` with its model pattern, so one corruption is reported once."""
        self.bos[index].write(self.pattern(self.seeds[index]))


class StressRun:
    """Drives one stress run: set up the BOs, then random operations until done.

    One operation: verify a random BO (every byte), rewrite a random BO with a
    new seed, and every ``kernel_every``-th time add a random constant to a
    random BO with a kernel. All random choices come from ``config.seed``, so
    the same seed replays the same sequence.
    """

    def __init__(self, mgr: Manager, config: StressConfig, on_progress: Callable[[Progress], None]) -> None:
        self.mgr = mgr
        self.config = config
        self.on_progress = on_progress
        self.rng = random.Random(config.seed)
        self.report = StressReport(config=config, device=mgr.backend.name)
        self.patterns = PatternSet(mgr, config.bo_nbytes)
        self._restore_ms: list[float] = []

    def setup(self) -> None:
        """Allocate and fill every BO (more than the budget: this already evicts)."""
        start = time.perf_counter()
        for _ in range(self.config.bo_count):
            self.patterns.add(self._new_seed())
        self.report.setup_s = time.perf_counter() - start

    def run(self) -> StressReport:
        """Run operations until the loop or time limit; return the report.

        GpuboErrors stop the run and are recorded in the report (an
        IntegrityError counts as a failed check); KeyboardInterrupt stops it
        early.
        """
        before = self.mgr.stats()
        start = time.monotonic()
        deadline = start + self.config.seconds
        next_progress = start + self.config.progress_s
        try:
            while not self._done(deadline):
                self.step()
                now = time.monotonic()
                if now >= next_progress:
                    next_progress = now + self.config.progress_s
                    self.on_progress(self._progress(now - start))
        except IntegrityError as e:
            self.report.error, self.report.check_failed = f"{type(e).__name__}: {e}", True
        except GpuboError as e:
            self.report.error = f"{type(e).__name__}: {e}"
        except KeyboardInterrupt:
            self.report.interrupted = True
        self.report.run_s = time.monotonic() - start
        self._finish(before)
        return self.report

    def step(self) -> None:
        """One operation (see the class docstring)."""
        rng, patterns, n = self.rng, self.patterns, self.config.bo_count
        op = self.report.operations
        self._verify(rng.randrange(n), op)
        every = self.config.kernel_every
        if every and op % every == every - 1:
            patterns.add_with_kernel(rng.randrange(n), rng.randrange(1, 2**32))
            self.report.kernels += 1
        else:
            patterns.rewrite(rng.randrange(n), self._new_seed())
            self.report.written_bytes += self.config.bo_nbytes
        self.report.operations += 1

    def _verify(self, index: int, op: int) -> None:
        needs_restore = self.patterns.bos[index].state is State.SWAPPED
        start = time.perf_counter()
        mismatch = self.patterns.verify(index, op)
        if needs_restore:
            self._restore_ms.append((time.perf_counter() - start) * 1e3)
        self.report.verified_bytes += self.config.bo_nbytes
        if mismatch is not None:
            self.report.mismatch_count += 1
            if len(self.report.mismatches) < _MAX_REPORTED_MISMATCHES:
                self.report.mismatches.append(mismatch)
            self.patterns.resync(index)

    def _done(self, deadline: float) -> bool:
        if self.config.loops is not None:
            return self.report.operations >= self.config.loops
        return time.monotonic() >= deadline

    def _new_seed(self) -> int:
        return self.rng.randrange(2**32)

    def _progress(self, elapsed_s: float) -> Progress:
        return Progress(elapsed_s, self.report.operations, self.report.mismatch_count, self.mgr.stats())

    def _finish(self, before: gpubo.Stats) -> None:
        after = self.mgr.stats()
        r = self.report
        r.run_evictions = after.evictions - before.evictions
        r.run_restores = after.restores - before.restores
        r.run_bytes_evicted = after.bytes_evicted - before.bytes_evicted
        r.run_bytes_restored = after.bytes_restored - before.bytes_restored
        r.stats = dataclasses.asdict(after)
        r.restoring_reads = len(self._restore_ms)
        if self._restore_ms:
            r.restore_latency_p50_ms = float(np.percentile(self._restore_ms, 50))
            r.restore_latency_p99_ms = float(np.percentile(self._restore_ms, 99))


def run_stress(config: StressConfig, on_progress: Callable[[Progress], None]) -> StressReport:
    """Open a manager for ``config``, run the stress workload, close it.

    Raises:
        GpuboError: the manager could not be opened or the setup failed
            (errors during the timed phase are recorded in the report).
    """
    with Manager(config.budget_bytes, store=config.store, store_size=config.store_size_bytes) as mgr:
        run = StressRun(mgr, config, on_progress)
        run.setup()
        return run.run()


# -- gpubo stress: the terminal ----------------------------------------------------


def _stress_config(
    budget: int,
    total: int,
    size: int,
    seconds: float,
    loops: int | None,
    seed: int | None,
    store: str | None,
    store_size: int | None,
    kernel_every: int,
) -> StressConfig:
    """Check the options against each other and build the config.

    Raises:
        click.BadParameter: options that cannot work together.
    """
    if size > budget:
        raise click.BadParameter(
            f"{format_bytes(size)} BOs do not fit the budget of {format_bytes(budget)}", param_hint="'--size'"
        )
    if total < size:
        raise click.BadParameter(
            f"{format_bytes(total)} is less than one BO of {format_bytes(size)}", param_hint="'--total'"
        )
    if store_size is None:
        store_size = max(2 * total, _MIN_STORE_BYTES)
    return StressConfig(
        budget_bytes=budget,
        total_bytes=total,
        bo_nbytes=size,
        seconds=seconds,
        loops=loops,
        seed=secrets.randbits(32) if seed is None else seed,
        store=store,
        store_size_bytes=store_size,
        kernel_every=kernel_every,
    )


def _stress_banner(config: StressConfig) -> str:
    until = f"{config.loops} operations" if config.loops is not None else f"{config.seconds:g} s"
    allocated = config.bo_count * config.bo_nbytes
    return (
        f"gpubo stress: seed {config.seed} (replay with --seed {config.seed})\n"
        f"  {config.bo_count} BOs of {format_bytes(config.bo_nbytes)} = {format_bytes(allocated)} "
        f"on a budget of {format_bytes(config.budget_bytes)} ({allocated / config.budget_bytes:.1f}x), "
        f"store {format_bytes(config.store_size_bytes)}, until {until}"
    )


def _progress_line(p: Progress) -> str:
    s = p.stats
    return (
        f"[{p.elapsed_s:6.1f}s] ops {p.operations:>7}  resident {format_bytes(s.resident_bytes)}"
        f"/{format_bytes(s.budget)}  swapped {format_bytes(s.swapped_bytes)}  evictions {s.evictions}"
        f"  restores {s.restores}  mismatches {p.mismatch_count}"
    )


def _stress_summary(report: StressReport) -> str:
    r = report
    latency = f"p50 {r.restore_latency_p50_ms:.2f} ms, p99 {r.restore_latency_p99_ms:.2f} ms"
    rows: list[list[object]] = [
        ["device", r.device],
        ["setup", f"{r.setup_s:.2f} s ({r.config.bo_count} BOs allocated and filled)"],
        ["run time", f"{r.run_s:.2f} s"],
        ["operations", r.operations],
        ["bytes verified", format_bytes(r.verified_bytes)],
        ["bytes rewritten", format_bytes(r.written_bytes)],
        ["kernel launches", r.kernels],
        ["evictions", f"{r.run_evictions} ({format_bytes(r.run_bytes_evicted)})"],
        ["restores", f"{r.run_restores} ({format_bytes(r.run_bytes_restored)})"],
        ["swap throughput", f"{r.swap_gbps:.2f} GB/s (evicted + restored)"],
        ["verify throughput", f"{r.verify_gbps:.2f} GB/s"],
        ["reads needing restore", f"{r.restoring_reads} ({latency})"],
        ["mismatches", r.mismatch_count],
    ]
    stats = [[name, _stat_value(name, value)] for name, value in r.stats.items()]
    summary = _table(["", ""], rows)
    return f"\nSummary (timed phase):\n{summary}\n\nManager stats (whole run):\n{_table(['', ''], stats)}"


def _stat_value(name: str, value: int) -> str:
    is_bytes = name == "budget" or name.endswith("_bytes") or name.startswith("bytes_")
    return format_bytes(value) if is_bytes else str(value)


def _stress_problems(report: StressReport) -> str:
    lines = []
    if report.mismatches:
        lines.append(f"MISMATCHES: {report.mismatch_count} (first {len(report.mismatches)} shown)")
        rows = [
            [m.operation, m.bo, m.offset, f"0x{m.expected:08x}", f"0x{m.found:08x}", m.bad_words]
            for m in report.mismatches
        ]
        lines.append(_table(["op", "BO", "offset", "expected", "found", "bad words"], rows))
    if report.error:
        lines.append(f"ERROR: {report.error}")
    if report.interrupted:
        lines.append("INTERRUPTED")
    return "\n".join(lines)


def _exit_code(report: StressReport) -> int:
    if report.mismatch_count or report.check_failed:
        return EXIT_CHECK_FAILED
    if report.error:
        return EXIT_ERROR
    if report.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK


@main.command()
@click.option(
    "--budget",
    type=ByteSize(minimum=1),
    default="64MiB",
    show_default=True,
    help="Device memory gpubo may use.",
)
@click.option(
    "--total",
    type=ByteSize(minimum=1),
    default="256MiB",
    show_default=True,
    help="Bytes of BOs to allocate (more than --budget to oversubscribe).",
)
@click.option(
    "--size",
    type=ByteSize(minimum=4, multiple_of=4),
    default="4MiB",
    show_default=True,
    help="Size of each BO (a multiple of 4 bytes).",
)
@click.option(
    "--seconds",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="How long to run the random operations.",
)
@click.option(
    "--loops",
    type=click.IntRange(min=1),
    default=None,
    help="Stop after this many operations instead of after --seconds.",
)
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=None,
    help="Seed of every random choice (printed at start; the same seed replays the run).",
)
@click.option(
    "--store",
    type=click.Path(file_okay=False),
    default=None,
    help="Store directory (default: a private temporary one).",
)
@click.option(
    "--store-size",
    type=ByteSize(minimum=1),
    default=None,
    help="Size of the store [default: max(2 x total, 64MiB)].",
)
@click.option(
    "--kernel-every",
    type=click.IntRange(min=0),
    default=16,
    show_default=True,
    help="Every Nth operation adds a constant to a BO with an OpenCL kernel (0: never).",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print only a JSON summary on stdout (progress goes to stderr)."
)
def stress(
    budget: int,
    total: int,
    size: int,
    seconds: float,
    loops: int | None,
    seed: int | None,
    store: str | None,
    store_size: int | None,
    kernel_every: int,
    as_json: bool,
) -> None:
    """Oversubscribe the device and verify that every byte survives.

    Allocates BOs of --size up to --total, fills BO i so that its 32-bit word
    j holds (seed_i + j) mod 2**32, then repeatedly reads a random BO and
    checks every byte, rewrites a random BO with a new seed, and now and then
    adds a constant to a BO with a kernel. Exit code 0 only if every check
    passed (1: data mismatch, 3: gpubo or device error).
    """
    config = _stress_config(budget, total, size, seconds, loops, seed, store, store_size, kernel_every)
    click.echo(_stress_banner(config), err=as_json)
    if total <= budget:
        click.echo("note: --total fits the budget, so nothing will be evicted", err=True)
    try:
        report = run_stress(config, lambda p: click.echo(_progress_line(p), err=as_json))
    except GpuboError as e:
        raise _Failure(f"{type(e).__name__}: {e}") from e
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        click.echo(_stress_summary(report))
    problems = _stress_problems(report)
    if problems:
        click.echo(problems, err=True)
    code = _exit_code(report)
    click.echo("PASS" if code == EXIT_OK else "FAIL", err=as_json)
    click.get_current_context().exit(code)
