"""The ``gpubo`` command line: ``gpubo info``, ``stress``, ``selftest``, ``bench``,
the store tools and ``dask-worker``.

The CLI owns the terminal: everything here that talks to the user goes
through ``click.echo`` (live progress goes to stderr, and only on a
terminal); the engine in :mod:`gpubo.stress` and the library below it only
log. This module turns options into a :class:`gpubo.stress.StressConfig`
and reports (:class:`gpubo.stress.StressReport`) into lines, tables, JSON
and a plot.

Exit codes: 0 every check passed; 1 a check failed (a data mismatch, a
store checksum error, the budget exceeded, device or store bytes left after
freeing everything, a failed selftest check); 2 bad usage (click); 3 gpubo
or the device failed (no device, store error, out of memory); 130
interrupted.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import click
import pyopencl as cl

import gpubo
from gpubo import GpuboError, ShareError, ShareMemberStats, format_bytes, parse_bytes
from gpubo._share import list_shares, read_share, share_root
from gpubo.backends import OpenCLBackend, describe_platforms
from gpubo.store import FsckReport, SwapStore, detect_backend, open_existing
from gpubo.store.private import sweep as sweep_private_dirs
from gpubo.stress import (
    MAX_MULTI,
    SELFTEST_CHECKS,
    CheckResult,
    Sample,
    StressConfig,
    StressReport,
    run_selftest,
    run_stress,
)

__all__ = ["main"]

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_ERROR = 3
EXIT_INTERRUPTED = 130

KiB = 1 << 10
MiB = 1 << 20
_MIN_STORE_BYTES = 64 * MiB


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
    if not lines:
        return f"{indent}(none)"
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
    if threading.current_thread() is threading.main_thread():
        # SIGTERM unwinds like Ctrl-C, so managers close and private stores go.
        previous = signal.signal(signal.SIGTERM, _terminate)
        click.get_current_context().call_on_close(lambda: signal.signal(signal.SIGTERM, previous))


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


# -- gpubo info -------------------------------------------------------------------


def _default_device() -> dict[str, Any]:
    """What ``Manager(device=None)`` would open, as a plain dict.

    Raises:
        DeviceError: no device can be opened.
    """
    backend = OpenCLBackend(os.environ.get("GPUBO_DEVICE") or None)
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


# -- gpubo stress: options to a config ------------------------------------------------

_DEFAULT_SIZE = 4 * MiB
_DEFAULT_MIN_SIZE = 4 * KiB
_DEFAULT_MAX_SIZE = 16 * MiB
_OVERSUBSCRIBE = 1.5
_HEAVY_OVERSUBSCRIBE = 3.0


_store_backend_option = click.option(
    "--store-backend",
    type=click.Choice(["lmdb", "slotfile"]),
    default=None,
    help="Swap-slot store backend [default: lmdb, or the existing store's].",
)
_durability_option = click.option(
    "--durability",
    type=click.Choice(["lazy", "sync", "direct"]),
    default=None,
    help="When evicted bytes reach the disk [default: lazy; direct needs slotfile].",
)


def _manager_options(**options: Any) -> dict[str, Any]:
    """Manager keyword arguments chosen on the command line; unset (None) ones are dropped.

    This is the one place where ``gpubo stress`` and ``gpubo selftest`` turn
    options into Manager settings: a new Manager or store option (a store
    backend, a durability mode) is a click option plus one keyword here,
    e.g. ``_manager_options(store_backend=store_backend)``. The engine hands
    the result to every Manager it opens (:func:`gpubo.stress.manager_kwargs`).
    """
    return {name: value for name, value in options.items() if value is not None}


def _stress_config(
    *,
    budget: int,
    total: int | None,
    oversubscribe: float | None,
    heavy: bool,
    size: int | None,
    random_sizes: bool,
    min_size: int | None,
    max_size: int | None,
    count: int | None,
    seconds: float,
    loops: int | None,
    seed: int | None,
    store: str | None,
    store_size: int | None,
    verify: bool,
    multi: bool,
    kernel_every: int,
    parallel: int,
    processes: int,
    host_pressure: bool,
    host_pressure_fraction: float,
    manager_options: dict[str, Any],
    share: str | None = None,
) -> StressConfig:
    """Check the options against each other and build the config.

    Raises:
        click.BadParameter, click.UsageError: options that cannot work together.
    """
    working_set = [name for name, v in (("--total", total), ("--oversubscribe", oversubscribe)) if v]
    if heavy:
        working_set.append("--heavy")
    if count is not None:
        working_set.append("--count")
    if len(working_set) > 1:
        raise click.UsageError(
            f"{' and '.join(working_set)} all set how many BOs to make; give one of them "
            "(--heavy is --oversubscribe 3)"
        )
    if random_sizes:
        if size is not None:
            raise click.BadParameter(
                "--size gives every BO one size; --random draws sizes from --min-size..--max-size",
                param_hint="'--size'",
            )
        lo = _DEFAULT_MIN_SIZE if min_size is None else min_size
        hi = _DEFAULT_MAX_SIZE if max_size is None else max_size
        if lo > hi:
            raise click.BadParameter(
                f"{format_bytes(lo)} is more than --max-size {format_bytes(hi)}", param_hint="'--min-size'"
            )
    else:
        if min_size is not None or max_size is not None:
            raise click.UsageError("--min-size and --max-size go with --random")
        lo = hi = _DEFAULT_SIZE if size is None else size
    per_process = budget if share else budget // processes
    if hi > per_process:
        what = f"{format_bytes(hi)} BOs" if lo == hi else f"BOs of up to {format_bytes(hi)}"
        split = f" ({format_bytes(per_process)} per process)" if per_process < budget else ""
        raise click.BadParameter(
            f"{what} do not fit the budget of {format_bytes(budget)}{split}",
            param_hint="'--max-size'" if random_sizes else "'--size'",
        )
    if count is not None:
        total = count * (lo + hi) // 2
        most = count * hi
    else:
        if total is None:
            factor = oversubscribe or (_HEAVY_OVERSUBSCRIBE if heavy else _OVERSUBSCRIBE)
            total = int(budget * factor)
        if total < lo:
            raise click.BadParameter(
                f"{format_bytes(total)} is less than one BO of {format_bytes(lo)}", param_hint="'--total'"
            )
        most = total + hi * parallel * processes  # random sizes may overshoot by one BO per worker
    if store_size is None:
        store_size = processes * max(2 * most // processes + 2 * hi, _MIN_STORE_BYTES)
    config = StressConfig(
        budget_bytes=budget,
        total_bytes=total,
        min_nbytes=lo,
        max_nbytes=hi,
        count=count,
        seconds=seconds,
        loops=loops,
        seed=secrets.randbits(32) if seed is None else seed,
        store=store,
        store_size_bytes=store_size,
        verify=verify,
        multi=multi,
        kernel_every=kernel_every,
        threads=parallel,
        processes=processes,
        host_pressure=host_pressure_fraction if host_pressure else 0.0,
        manager_options=manager_options,
        share=share,
    )
    try:
        config.check()
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    return config


# -- gpubo stress: the terminal --------------------------------------------------------


def _sizes_text(config: StressConfig) -> str:
    if config.random_sizes:
        return f"{format_bytes(config.min_nbytes)}..{format_bytes(config.max_nbytes)}"
    return format_bytes(config.min_nbytes)


def _shape_text(config: StressConfig) -> str:
    parts = []
    if config.processes > 1:
        parts.append(f"{config.processes} processes" + (" on one shared budget" if config.share else ""))
    if config.threads > 1:
        parts.append(f"{config.threads} threads" + (" each" if config.processes > 1 else ""))
    return " x ".join(parts) or "1 thread"


def _stress_banner(config: StressConfig) -> str:
    c = config
    until = f"{c.loops} operations per thread" if c.loops is not None else f"{c.seconds:g} s"
    if c.count is not None:
        bos = f"{c.count} BOs of {_sizes_text(c)}"
    elif c.random_sizes:
        bos = f"about {format_bytes(c.total_bytes)} of BOs of {_sizes_text(c)}"
    else:
        n = c.total_bytes // c.min_nbytes
        bos = f"{n} BOs of {_sizes_text(c)} = {format_bytes(n * c.min_nbytes)}"
    lines = [
        f"gpubo stress: seed {c.seed} (replay with --seed {c.seed})",
        f"  {bos} on a budget of {format_bytes(c.budget_bytes)} ({c.total_bytes / c.budget_bytes:.1f}x), "
        f"{_shape_text(c)}, store {format_bytes(c.store_size_bytes)}",
        f"  {'verifying every BO on every use' if c.verify else 'no checks on use'}"
        f"{', kernel launches with several BOs' if c.multi else ''}, final sweep, until {until}",
    ]
    if c.host_pressure:
        lines.append(
            f"  host pressure: a child process holds up to {c.host_pressure:.0%} of available memory"
        )
    return "\n".join(lines)


def _progress_text(sample: Sample, window: Sequence[Sample], config: StressConfig) -> str:
    """One status line: a bar, resident/budget, swapped, evictions/s and GB/s.

    ``window`` holds earlier samples; rates are measured from the oldest.
    """
    if sample.phase == "setup":
        fraction = 0.0
    elif config.loops is not None:
        fraction = sample.operations / (config.loops * config.workers)
    else:
        fraction = sample.run_s / config.seconds
    fraction = min(max(fraction, 0.0), 1.0)
    filled = round(fraction * 10)
    bar = "[" + "#" * filled + "-" * (10 - filled) + "]"
    status = f"{fraction:4.0%}" if sample.phase == "run" else sample.phase
    first = window[0] if window else sample
    dt = sample.elapsed_s - first.elapsed_s
    evictions = (sample.evictions - first.evictions) / dt if dt > 0 else 0.0
    moved = sample.bytes_evicted + sample.bytes_restored - first.bytes_evicted - first.bytes_restored
    text = (
        f"{bar} {status} resident {format_bytes(sample.resident_bytes)}/{format_bytes(sample.budget_bytes)}"
        f" swapped {format_bytes(sample.swapped_bytes)} {evictions:.0f} evict/s"
        f" {_gbps(moved, dt):.2f} GB/s ops {sample.operations}"
    )
    if sample.mismatches:
        text = f"MISMATCHES {sample.mismatches} " + text
    return text


class _ProgressLine:
    """A live status line on stderr, redrawn in place with ``\\r``.

    Draws only when ``enabled`` (a terminal, not ``--json``), at most every
    0.2 s; rates cover about the last second.
    """

    def __init__(self, config: StressConfig, enabled: bool) -> None:
        self.config = config
        self.enabled = enabled
        self._window: collections.deque[Sample] = collections.deque()
        self._last_draw = 0.0
        self._drawn = 0

    def __call__(self, sample: Sample) -> None:
        self._window.append(sample)
        while len(self._window) > 1 and sample.elapsed_s - self._window[0].elapsed_s > 1.0:
            self._window.popleft()
        now = time.monotonic()
        if not self.enabled or now - self._last_draw < 0.2:
            return
        self._last_draw = now
        width = max(20, shutil.get_terminal_size().columns - 1)
        text = _progress_text(sample, self._window, self.config)[:width]
        click.echo("\r" + text.ljust(self._drawn), err=True, nl=False)
        self._drawn = len(text)

    def close(self) -> None:
        if self._drawn:
            click.echo("\r" + " " * self._drawn + "\r", err=True, nl=False)
            self._drawn = 0


def _check_results(report: StressReport) -> list[tuple[str, bool, str]]:
    """(check, passed, detail) for the summary and the exit code."""
    r = report
    checks = [
        ("data", not r.mismatch_count and not r.check_failed, f"{r.mismatch_count} mismatches"),
        ("final sweep", r.swept, f"{format_bytes(r.swept_bytes)} checked" if r.swept else "did not run"),
        (
            "budget",
            not r.budget_violations,
            f"exceeded in {r.budget_violations} of {len(r.timeline)} samples"
            if r.budget_violations
            else f"never exceeded ({len(r.timeline)} samples)",
        ),
        ("leaks", not r.leaks, "; ".join(r.leaks) or "none: device and store bytes back to zero"),
    ]
    if r.config.share is not None:
        checks.insert(
            3,
            (
                "share ledger",
                r.share_samples > 0 and not r.share_violations,
                f"its sum exceeded the budget in {r.share_violations} of {r.share_samples} samples"
                if r.share_violations or not r.share_samples
                else f"within the budget in all {r.share_samples} samples",
            ),
        )
    return checks


def _stress_summary(report: StressReport) -> str:
    r, c = report, report.config
    ratio = r.allocated_bytes / c.budget_bytes if c.budget_bytes else 0.0
    latency = (
        f"p50 {r.restore_latency_p50_ms:.2f} ms, p99 {r.restore_latency_p99_ms:.2f} ms "
        f"({r.restoring_uses} uses needed a restore)"
    )
    rows: list[list[object]] = [
        ["device", f"{r.device}, {_shape_text(c)}"],
        [
            "BOs",
            f"{r.bo_count} of {_sizes_text(c)} = {format_bytes(r.allocated_bytes)} "
            f"on a {format_bytes(c.budget_bytes)} budget ({ratio:.1f}x)",
        ],
        ["setup", f"{r.setup_s:.2f} s (BOs allocated and filled)"],
        ["run time", f"{r.run_s:.2f} s"],
        ["operations", f"{r.operations} ({r.uses} BO uses)"],
        ["kernel launches", f"{r.kernels} ({r.multi_launches} with several BOs)"],
        ["bytes rewritten", format_bytes(r.written_bytes)],
        ["evicted", f"{r.run_evictions} BOs, {format_bytes(r.run_bytes_evicted)}"],
        ["restored", f"{r.run_restores} BOs, {format_bytes(r.run_bytes_restored)}"],
        ["swap throughput", f"{r.swap_gbps:.2f} GB/s (evicted + restored)"],
        ["restore latency", latency],
        [
            "verified",
            f"{format_bytes(r.verified_bytes)} on use ({r.verify_gbps:.2f} GB/s), "
            f"{format_bytes(r.swept_bytes)} in the final sweep",
        ],
        ["mismatches", r.mismatch_count],
    ]
    if c.host_pressure:
        rows.append(["host pressure", f"a child process held up to {format_bytes(r.host_pressure_bytes)}"])
    checks = _check_results(r)
    for name, passed, detail in checks:
        rows.append([f"check: {name}", f"{'OK' if passed else 'FAILED'} ({detail})"])
    verdict = "PASS" if _exit_code(r) == EXIT_OK else "FAIL"
    rows.append(["verify result", verdict])
    stats = [[name, _stat_value(name, value)] for name, value in r.stats.items()]
    summary = _table(["", ""], rows)
    stats_title = (
        "Manager stats (summed over processes, each at its own end)" if c.processes > 1 else "Manager stats"
    )
    return f"\nSummary (timed phase):\n{summary}\n\n{stats_title}, before freeing:\n{_table(['', ''], stats)}"


def _stat_value(name: str, value: int | str) -> str:
    is_bytes = name == "budget" or name.endswith("_bytes") or name.startswith("bytes_")
    return format_bytes(value) if is_bytes and isinstance(value, int) else str(value)


def _stress_problems(report: StressReport) -> str:
    lines = []
    if report.mismatches:
        lines.append(f"MISMATCHES: {report.mismatch_count} (first {len(report.mismatches)} shown)")
        rows = [
            [
                "sweep" if m.operation < 0 else m.operation,
                m.bo,
                m.offset,
                f"0x{m.expected:08x}",
                f"0x{m.found:08x}",
                m.bad_words,
            ]
            for m in report.mismatches
        ]
        lines.append(_table(["op", "BO", "offset", "expected", "found", "bad words"], rows))
    if report.error:
        lines.append(f"ERROR: {report.error}")
    if report.budget_violations:
        lines.append(f"BUDGET EXCEEDED in {report.budget_violations} samples")
    if report.share_violations:
        lines.append(f"SHARE LEDGER ABOVE THE BUDGET in {report.share_violations} samples")
    for leak in report.leaks:
        lines.append(f"LEAK: {leak}")
    if report.interrupted:
        lines.append("INTERRUPTED")
    return "\n".join(lines)


def _exit_code(report: StressReport) -> int:
    if (
        report.mismatch_count
        or report.check_failed
        or report.budget_violations
        or report.share_violations
        or report.leaks
    ):
        return EXIT_CHECK_FAILED
    if report.error:
        return EXIT_ERROR
    if report.interrupted:
        return EXIT_INTERRUPTED
    if not report.ok:
        return EXIT_CHECK_FAILED
    return EXIT_OK


# -- gpubo stress: the plot ------------------------------------------------------------


def _require_matplotlib() -> None:
    """Raise a usage error now, before the run, if ``--plot`` cannot work."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise click.BadParameter(
            "needs matplotlib, which is not installed: pip install 'gpubo[plot]'", param_hint="'--plot'"
        ) from None


def _write_plot(report: StressReport, path: str) -> None:
    """Resident, pooled and swapped bytes, and evictions and restores per second, over time."""
    from matplotlib.figure import Figure  # the optional extra; checked before the run

    samples = report.timeline
    c = report.config
    t = [s.elapsed_s for s in samples]
    fig = Figure(figsize=(10, 6.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.stackplot(
        t,
        [s.resident_bytes / MiB for s in samples],
        [s.pooled_bytes / MiB for s in samples],
        labels=["resident", "pooled (kept for reuse)"],
        colors=["tab:blue", "tab:cyan"],
        alpha=0.8,
    )
    top.plot(t, [s.swapped_bytes / MiB for s in samples], color="tab:orange", label="swapped (in the store)")
    top.axhline(c.budget_bytes / MiB, color="black", linestyle="--", linewidth=1, label="budget")
    peak = max([c.budget_bytes] + [max(s.resident_bytes + s.pooled_bytes, s.swapped_bytes) for s in samples])
    top.set_ylim(0, peak / MiB * 1.3)  # headroom for the legend
    top.set_ylabel("MiB")
    top.legend(loc="upper left", fontsize="small", ncol=4)
    rates_t, evictions, restores = [], [], []
    for a, b in itertools.pairwise(samples):
        dt = b.elapsed_s - a.elapsed_s
        if dt > 0:
            rates_t.append(b.elapsed_s)
            evictions.append((b.evictions - a.evictions) / dt)
            restores.append((b.restores - a.restores) / dt)
    bottom.step(rates_t, evictions, where="post", color="tab:red", label="evictions/s")
    bottom.step(rates_t, restores, where="post", color="tab:green", label="restores/s")
    bottom.set_ylabel("per second")
    bottom.set_xlabel("seconds since start")
    bottom.set_ylim(bottom=0)
    bottom.legend(loc="lower right", fontsize="small", ncol=2)
    for phase, label in (("run", "timed phase"), ("sweep", "final sweep")):
        start = next((s.elapsed_s for s in samples if s.phase == phase), None)
        if start is not None:
            for ax in (top, bottom):
                ax.axvline(start, color="gray", linestyle=":", linewidth=1)
            bottom.annotate(
                f" {label}", (start, 0.02), xycoords=("data", "axes fraction"), fontsize="small", color="gray"
            )
    fig.suptitle(
        f"gpubo stress on {report.device}: {report.bo_count} BOs of {_sizes_text(c)} "
        f"({format_bytes(report.allocated_bytes)}) on a {format_bytes(c.budget_bytes)} budget, "
        f"{_shape_text(c)}, seed {c.seed}"
    )
    fig.savefig(path, dpi=100)


# -- gpubo stress: the command ---------------------------------------------------------


@contextlib.contextmanager
def _ctrl_c_stops() -> Iterator[threading.Event]:
    """While inside, the first Ctrl-C or SIGTERM sets the event (the run stops
    cleanly between operations, then sweeps, frees, reports and deletes its
    private stores); a second one raises KeyboardInterrupt.

    A KeyboardInterrupt raised in the middle of a gpubo call could leave that
    call half done; the event lets every call finish. Outside the main thread
    (where signal handlers cannot be set) Ctrl-C keeps its usual meaning.
    """
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def on_sigint(signum: int, frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        click.echo("\nstopping after the operations under way (Ctrl-C again to abort)", err=True)

    previous = signal.signal(signal.SIGINT, on_sigint)
    previous_term = signal.signal(signal.SIGTERM, on_sigint)  # a polite kill: the same clean stop
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, previous_term)


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
    default=None,
    help="Bytes of BOs to allocate [default: --oversubscribe x --budget].",
)
@click.option(
    "--oversubscribe",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="FACTOR",
    help=f"Allocate FACTOR x --budget of BOs [default: {_OVERSUBSCRIBE:g}].",
)
@click.option("--heavy", is_flag=True, help=f"Oversubscribe {_HEAVY_OVERSUBSCRIBE:g}x.")
@click.option(
    "--size",
    type=ByteSize(minimum=4, multiple_of=4),
    default=None,
    help=f"Size of every BO, a multiple of 4 bytes [default: {format_bytes(_DEFAULT_SIZE)}].",
)
@click.option(
    "--random", "random_sizes", is_flag=True, help="BOs of random sizes (see --min-size/--max-size)."
)
@click.option(
    "--min-size",
    type=ByteSize(minimum=4, multiple_of=4),
    default=None,
    help=f"Smallest BO with --random [default: {format_bytes(_DEFAULT_MIN_SIZE)}].",
)
@click.option(
    "--max-size",
    type=ByteSize(minimum=4, multiple_of=4),
    default=None,
    help=f"Largest BO with --random [default: {format_bytes(_DEFAULT_MAX_SIZE)}].",
)
@click.option("--count", type=click.IntRange(min=1), default=None, help="Number of BOs (instead of --total).")
@click.option(
    "--seconds",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="How long the timed phase runs.",
)
@click.option(
    "--loops",
    type=click.IntRange(min=1),
    default=None,
    help="Stop after this many operations per thread instead of after --seconds.",
)
@click.option(
    "--verify/--no-verify",
    default=True,
    show_default=True,
    help="Check every word of a BO (word i == seed + i) on every use; the final sweep checks every BO.",
)
@click.option("--multi", is_flag=True, help=f"Kernel launches use up to {MAX_MULTI} BOs at once.")
@click.option(
    "--kernel-every",
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    help="Every Nth operation uses its BOs in a kernel launch, the others rewrite them (0: never).",
)
@click.option(
    "--parallel",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    metavar="N",
    help="N worker threads sharing one manager, each with its own BOs.",
)
@click.option(
    "--processes",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    metavar="N",
    help="N processes, each with its own manager and store; budget, BOs and store are split between them.",
)
@click.option(
    "--share",
    "shared",
    is_flag=True,
    help="The processes share one budget (a device share) instead of splitting it, evicting for each other.",
)
@click.option(
    "--host-pressure", is_flag=True, help="A child process holds host memory while the run goes on."
)
@click.option(
    "--host-pressure-fraction",
    type=click.FloatRange(min=0, max=0.75, min_open=True),
    default=0.5,
    show_default=True,
    help="How much of the available host memory --host-pressure takes (it never lets it fall below 1/8).",
)
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=None,
    help="Seed of every random choice (printed at start; with --loops, replays a one-thread run).",
)
@click.option(
    "--store",
    type=click.Path(file_okay=False),
    default=None,
    help="Store directory (default: a private temporary one; with --processes, one subdirectory each).",
)
@click.option(
    "--store-size",
    type=ByteSize(minimum=1),
    default=None,
    help="Size of the store, split between processes [default: about 2 x the BOs, at least 64MiB].",
)
@_store_backend_option
@_durability_option
@click.option("--json", "as_json", is_flag=True, help="Print only a JSON report on stdout.")
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    metavar="FILE.png",
    help="Plot resident and swapped bytes and evictions over time (needs gpubo[plot]).",
)
def stress(
    budget: int,
    total: int | None,
    oversubscribe: float | None,
    heavy: bool,
    size: int | None,
    random_sizes: bool,
    min_size: int | None,
    max_size: int | None,
    count: int | None,
    seconds: float,
    loops: int | None,
    verify: bool,
    multi: bool,
    kernel_every: int,
    parallel: int,
    processes: int,
    shared: bool,
    host_pressure: bool,
    host_pressure_fraction: float,
    seed: int | None,
    store: str | None,
    store_size: int | None,
    store_backend: str | None,
    durability: str | None,
    as_json: bool,
    plot: str | None,
) -> None:
    """Oversubscribe the device and verify that every byte survives.

    Allocates BOs past the budget and fills BO i so that its 32-bit word j
    holds (seed_i + j) mod 2**32. Then, until --seconds or --loops, picks
    BOs at random and uses them: checks every word (--verify), then adds a
    constant with a kernel launch or rewrites them from the host with a new
    seed. A final sweep checks every BO once more; then every BO is freed
    and device and store bytes must be back to zero.

    Exit code 0 only if every check passed (1: a check failed, 3: gpubo or
    device error, 130: interrupted).
    """
    if plot is not None:
        _require_matplotlib()
    config = _stress_config(
        budget=budget,
        total=total,
        oversubscribe=oversubscribe,
        heavy=heavy,
        size=size,
        random_sizes=random_sizes,
        min_size=min_size,
        max_size=max_size,
        count=count,
        seconds=seconds,
        loops=loops,
        seed=seed,
        store=store,
        store_size=store_size,
        verify=verify,
        multi=multi,
        kernel_every=kernel_every,
        parallel=parallel,
        processes=processes,
        host_pressure=host_pressure,
        host_pressure_fraction=host_pressure_fraction,
        manager_options=_manager_options(store_backend=store_backend, durability=durability),
        share=f"stress-{os.getpid()}" if shared else None,
    )
    click.echo(_stress_banner(config), err=as_json)
    if config.total_bytes <= config.budget_bytes:
        click.echo("note: the BOs fit the budget, so nothing will be evicted", err=True)
    progress = _ProgressLine(config, enabled=not as_json and sys.stderr.isatty())
    try:
        with _ctrl_c_stops() as stop_requested:
            report = run_stress(config, progress, stop_requested.is_set)
    except ValueError as e:  # e.g. a store size the store refuses
        raise click.UsageError(str(e)) from None
    except OSError as e:  # --host-pressure could not start its child
        raise _Failure(f"{type(e).__name__}: {e}") from e
    finally:
        progress.close()
    if report.error and not report.stats:  # no manager could be built: nothing ran
        raise _Failure(report.error)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        click.echo(_stress_summary(report))
    problems = _stress_problems(report)
    if problems:
        click.echo(problems, err=True)
    if plot is not None:
        try:
            _write_plot(report, plot)
        except (OSError, ValueError) as e:
            raise _Failure(f"cannot write the plot {plot!r}: {e}") from e
        click.echo(f"plot written to {plot}", err=as_json)
    code = _exit_code(report)
    click.echo("PASS" if code == EXIT_OK else "FAIL", err=as_json)
    click.get_current_context().exit(code)


# -- gpubo selftest --------------------------------------------------------------------


#: How much bigger ``gpubo selftest --heavy`` makes the stress checks (as GPUBO_HEAVY=1 does for pytest).
_SELFTEST_HEAVY_SCALE = 8


def _check_line(result: CheckResult) -> str:
    return f"{'PASS' if result.ok else 'FAIL'}  {result.name:<23} {result.seconds:5.1f} s  {result.detail}"


@main.command()
@click.option(
    "--store-dir",
    type=click.Path(file_okay=False, exists=True),
    default=None,
    help="Directory to create the checks' stores in (default: private temporary ones).",
)
@click.option(
    "--check",
    "checks",
    multiple=True,
    type=click.Choice(list(SELFTEST_CHECKS)),
    help="Run only this check (repeatable).",
)
@click.option(
    "--heavy", is_flag=True, help=f"Stress checks {_SELFTEST_HEAVY_SCALE}x bigger and longer (minutes)."
)
@_store_backend_option
@_durability_option
@click.option("--json", "as_json", is_flag=True, help="Print only a JSON report on stdout.")
def selftest(
    store_dir: str | None,
    checks: tuple[str, ...],
    heavy: bool,
    store_backend: str | None,
    durability: str | None,
    as_json: bool,
) -> None:
    """Run the memory-pressure suite's fast checks on the default device.

    Short stress runs (basic, verify, random, heavy, multi, parallel
    threads, processes), the RFC's store-full scenario (back BOs up until the store
    is full, then recover and verify every one) and a BO larger than the
    budget. Prints PASS or FAIL per check; exit code 0 only if all passed.
    """
    try:
        device = _default_device()
    except GpuboError as e:
        raise _Failure(f"{type(e).__name__}: {e}") from e
    click.echo(f"gpubo selftest on {device['name']} ({device['device']}, {device['platform']})", err=as_json)
    on_result = None if as_json else (lambda result: click.echo(_check_line(result)))
    scale = _SELFTEST_HEAVY_SCALE if heavy else 1
    options = _manager_options(store_backend=store_backend, durability=durability)
    results = run_selftest(list(checks) or None, store_dir, options, on_result, scale)
    passed = sum(r.ok for r in results)
    if as_json:
        payload = {
            "device": device,
            "ok": passed == len(results),
            "checks": [
                {"name": r.name, "ok": r.ok, "detail": r.detail, "seconds": r.seconds} for r in results
            ],
        }
        click.echo(json.dumps(payload, indent=2))
    verdict = "PASS" if passed == len(results) else "FAIL"
    click.echo(f"selftest: {passed} of {len(results)} checks passed: {verdict}", err=as_json)
    click.get_current_context().exit(EXIT_OK if passed == len(results) else EXIT_CHECK_FAILED)


@main.command()
@click.option("--quick", is_flag=True, help="Small sizes and few reps (about 30 s).")
@click.option("--full", is_flag=True, help="Every backend x durability x checksums case.")
@click.option("--sizes", default=None, help="BO sizes, e.g. 4KiB,64KiB,1MiB,16MiB,64MiB.")
@click.option("--reps", type=click.IntRange(min=1), default=None, help="Timed repetitions (median).")
@click.option(
    "--runs",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Whole runs; each goal is judged on the median of its value over them, with their spread.",
)
@click.option(
    "--dir",
    "parent_dir",
    type=click.Path(file_okay=False, exists=True),
    default=None,
    help="Where stores go.",
)
@click.option(
    "--transfer",
    type=click.Choice(["auto", "map", "bounce"]),
    default=None,
    help="The managers' transfer strategy (default: $GPUBO_TRANSFER, else auto).",
)
@click.option(
    "--checksums",
    type=click.Choice(["auto", "host", "device"]),
    default="auto",
    show_default=True,
    help="Where the cases with checksums compute them (auto: device for bounce, host for map).",
)
@click.option("--json", "as_json", is_flag=True, help="Print only the JSON results on stdout.")
def bench(
    quick: bool,
    full: bool,
    sizes: str | None,
    reps: int | None,
    runs: int,
    parent_dir: str | None,
    transfer: str | None,
    checksums: str,
    as_json: bool,
) -> None:
    """Measure eviction and restore against raw copies, the staged path, zict,
    bookkeeping cost and an oversubscribed multiply (see gpubo.bench)."""
    from gpubo import bench as bench_mod

    if transfer is not None:  # every manager the run makes reads it (this process only)
        os.environ["GPUBO_TRANSFER"] = transfer

    try:
        size_list = bench_mod.parse_sizes(sizes) if sizes else None
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--sizes") from e
    where: bool | str = True if checksums == "auto" else checksums
    cfg = bench_mod.config(quick=quick, full=full, sizes=size_list, reps=reps, checksums=where)
    cfg.parent_dir = parent_dir
    say = None if as_json else lambda text: click.echo(f"... {text}", err=True)
    try:
        every = []
        for i in range(runs):
            if say is not None and runs > 1:
                say(f"run {i + 1} of {runs}")
            every.append(bench_mod.run(cfg, say))
    except GpuboError as e:
        raise _Failure(f"{type(e).__name__}: {e}") from e
    results = bench_mod.combine_runs(every)
    click.echo(json.dumps(results, indent=2) if as_json else bench_mod.tables(results))


# -- store commands -------------------------------------------------------------


#: Files of which any one makes a directory a gpubo store (damaged or not).
_STORE_FILES = ("gpubo.state", "gpubo.lock", "data.mdb", "slots.bin")


def _open_store_for_cli(path: str, reclaim: bool) -> SwapStore:
    try:
        return open_existing(path, reclaim=reclaim)
    except GpuboError as e:
        raise _Failure(f"{type(e).__name__}: {e}") from e


def _fsck_payload(report: FsckReport) -> dict[str, Any]:
    return {
        "path": report.path,
        "backend": report.backend,
        "ok": report.ok,
        "entries": report.entries,
        "names": report.names,
        "stored_bytes": report.stored_bytes,
        "used_bytes": report.used_bytes,
        "capacity_bytes": report.capacity_bytes,
        "problems": report.problems,
    }


@main.command()
@click.argument("store_path", metavar="STORE", required=False, type=click.Path(file_okay=False, exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print only a JSON report on stdout.")
@click.option(
    "--clean-tmp",
    is_flag=True,
    help="Delete the private stores that dead processes left in the temporary directory.",
)
def fsck(store_path: str | None, as_json: bool, clean_tmp: bool) -> None:
    """Check a store: every record's checksums, refcounts, space accounting, leaks.

    Opens the store without reclaiming anything, so bytes a killed process
    left behind are reported as leaks (the next normal open reclaims them).
    A store that cannot prove it is whole (a missing or truncated file,
    records rolled back, damaged records) is reported, never repaired.
    Exit code 0 only if no problem was found.
    """
    if clean_tmp:
        swept = sweep_private_dirs()
        if as_json and store_path is None:
            click.echo(json.dumps({"removed": swept}, indent=2))
        else:
            for path in swept:
                click.echo(f"removed {path} (left by a dead process)", err=as_json)
            click.echo(f"fsck --clean-tmp: {len(swept)} private director(y/ies) removed", err=as_json)
        if store_path is None:
            return
    if store_path is None:
        raise click.UsageError("give a STORE to check, or --clean-tmp")
    try:
        store = open_existing(store_path, reclaim=False)
    except GpuboError as e:  # damaged past opening: that is what fsck reports
        if not any(os.path.exists(os.path.join(store_path, f)) for f in _STORE_FILES):
            raise _Failure(f"{type(e).__name__}: {e}") from e
        try:
            backend = detect_backend(store_path) or "?"
        except GpuboError:
            backend = "?"
        report = FsckReport(store_path, backend, problems=[f"{type(e).__name__}: {e}"])
    else:
        try:
            report = store.fsck()
        finally:
            store.close()
    if as_json:
        click.echo(json.dumps(_fsck_payload(report), indent=2))
    else:
        click.echo(f"store {report.path} ({report.backend})")
        click.echo(
            f"  {len(report.names)} record(s), {report.entries} entr(y/ies), "
            f"{format_bytes(report.used_bytes)} of {format_bytes(report.capacity_bytes)} used"
        )
        for problem in report.problems:
            click.echo(f"  PROBLEM: {problem}")
        click.echo("fsck: clean" if report.ok else f"fsck: {len(report.problems)} problem(s)")
    click.get_current_context().exit(EXIT_OK if report.ok else EXIT_CHECK_FAILED)


@main.command()
@click.argument("store_path", metavar="STORE", type=click.Path(file_okay=False, exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print only JSON on stdout.")
def stats(store_path: str, as_json: bool) -> None:
    """Show a store's backend, size, use and named records."""
    store = _open_store_for_cli(store_path, reclaim=False)
    try:
        records: list[dict[str, Any]] = []
        damaged = store.damaged_records()
        for name in store.names():
            if name in damaged:
                records.append({"name": name, "damaged": damaged[name]})
                continue
            entry = store.lookup(name)
            assert entry is not None
            records.append(
                {
                    "name": name,
                    "nbytes": entry.nbytes,
                    "stored_bytes": entry.stored_bytes,
                    "footprint": entry.footprint,
                }
            )
            store.release(entry)
        payload: dict[str, Any] = {
            "path": store.path,
            "backend": store.backend_name,
            "size_bytes": store.size_bytes,
            "capacity_bytes": store.capacity_bytes,
            "used_bytes": store.used_bytes,
            "records": records,
            "problems": list(store.problems),
        }
    finally:
        store.close()
    if as_json:
        click.echo(json.dumps(payload, indent=2))
        return
    click.echo(f"store {payload['path']} ({payload['backend']})")
    click.echo(
        f"  size {format_bytes(store.size_bytes)}, capacity {format_bytes(store.capacity_bytes)}, "
        f"used {format_bytes(payload['used_bytes'])}"
    )
    for problem in payload["problems"]:
        click.echo(f"  PROBLEM: {problem} (see gpubo fsck)")
    if records:
        rows = [
            [r["name"], format_bytes(r["nbytes"]), format_bytes(r["stored_bytes"])]
            if "damaged" not in r
            else [r["name"], "DAMAGED", r["damaged"]]
            for r in records
        ]
        click.echo(_table(["record", "size", "stored"], rows))
    else:
        click.echo("  no named records")


# -- gpubo dask-worker ----------------------------------------------------------------


@main.command("dask-worker")
@click.argument("scheduler")
@click.option("--device-memory-limit", required=True, help="The worker's hard device budget, e.g. 4GiB.")
@click.option("--store-size", default="2GiB", show_default=True, help="Size of the worker's store.")
@click.option("--nthreads", type=click.IntRange(min=1), default=1, show_default=True, help="Task threads.")
@click.option(
    "--memory-limit", default="auto", show_default=True, help="Host memory limit, as for `dask worker`."
)
@click.option("--name", default=None, help="The worker's name (default: its address).")
@click.option("--local-directory", type=click.Path(file_okay=False), default=None, help="Worker directory.")
@click.option("--device", default=None, help="OpenCL device, as GPUBO_DEVICE (default: a GPU, else any).")
def dask_worker(
    scheduler: str,
    device_memory_limit: str,
    store_size: str,
    nthreads: int,
    memory_limit: str,
    name: str | None,
    local_directory: str | None,
    device: str | None,
) -> None:
    """Run a Dask worker whose data is gpubo's device tier (needs gpubo[dask]).

    The same as `dask worker SCHEDULER` with `data=gpubo.dask.device_data(...)`:
    DeviceArray values stay on the device under a hard budget, spilled to a
    store in the worker's directory; other values go to Dask's SpillBuffer.
    SIGTERM or Ctrl-C closes the worker gracefully.
    """
    try:
        import asyncio

        from distributed import Worker

        import gpubo.dask as gdask
    except ImportError as e:
        raise _Failure(f"gpubo dask-worker needs distributed: pip install 'gpubo[dask]' ({e})") from e
    from distributed.worker_memory import parse_memory_limit

    try:
        data = gdask.device_data(device_memory_limit, store_size=store_size, device=device)
    except (TypeError, ValueError) as e:
        raise click.BadParameter(str(e), param_hint="'--device-memory-limit' / '--store-size'") from e
    try:
        parse_memory_limit(memory_limit, nthreads, logger=logging.getLogger("gpubo.cli"))
    except (TypeError, ValueError) as e:
        raise click.BadParameter(str(e), param_hint="'--memory-limit'") from e

    async def run() -> None:
        worker = Worker(
            scheduler,
            data=data,
            nthreads=nthreads,
            memory_limit=memory_limit,
            name=name,
            local_directory=local_directory,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        stopped = asyncio.ensure_future(stop.wait())
        # Starting the worker waits for the scheduler for as long as it
        # takes; a signal ends that wait too.
        started = asyncio.ensure_future(worker.start())  # type: ignore[no-untyped-call]
        await asyncio.wait({started, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if started.done():
            started.result()  # a failed start raises here
            click.echo(f"gpubo dask-worker at {worker.address}, device limit {device_memory_limit}", err=True)
            finished = asyncio.ensure_future(worker.finished())  # type: ignore[no-untyped-call]
            await asyncio.wait({finished, stopped}, return_when=asyncio.FIRST_COMPLETED)
        else:
            started.cancel()
        stopped.cancel()
        await worker.close(reason="gpubo dask-worker stopped")

    try:
        asyncio.run(run())
    except (OSError, TimeoutError, ValueError, TypeError, GpuboError) as e:
        raise _Failure(f"{type(e).__name__}: {e}") from e


# -- gpubo top -------------------------------------------------------------------------


def _share_snapshot(name: str) -> tuple[dict[str, Any] | None, list[ShareMemberStats]]:
    try:
        return read_share(name)
    except ShareError as e:
        raise _Failure(str(e)) from None
    except ValueError as e:  # a bad share name
        raise click.BadParameter(str(e), param_hint="'NAME'") from None


def _rates(
    rows: Sequence[ShareMemberStats], before: dict[str, tuple[float, int]], now: float
) -> dict[str, float]:
    """Requests sent and served per second by each member since ``before``
    (updated in place); 0 for a member seen for the first time."""
    rates: dict[str, float] = {}
    for r in rows:
        total = r.requests_sent + r.requests_served
        then = before.get(r.member)
        rates[r.member] = (total - then[1]) / (now - then[0]) if then and now > then[0] else 0.0
        before[r.member] = (now, total)
    return rates


def _top_payload(
    name: str, state: dict[str, Any] | None, rows: Sequence[ShareMemberStats], rates: dict[str, float]
) -> dict[str, Any]:
    return {
        "share": name,
        "budget_bytes": None if state is None else state["budget"],
        "device": None if state is None else state["device"],
        "reserved_bytes": sum(r.reserved_bytes for r in rows),
        "members": [{**dataclasses.asdict(r), "requests_per_s": rates.get(r.member, 0.0)} for r in rows],
    }


def _top_text(
    name: str, state: dict[str, Any] | None, rows: Sequence[ShareMemberStats], rates: dict[str, float]
) -> str:
    if state is None:
        return f"share {name}: no ledger (no member has joined, or the last one left)"
    reserved = sum(r.reserved_bytes for r in rows)
    head = (
        f"share {name}: budget {format_bytes(state['budget'])}, {format_bytes(reserved)} reserved by "
        f"{len(rows)} member{'s' if len(rows) != 1 else ''}; device {state['device']}"
    )

    def limits(r: ShareMemberStats) -> str:
        cap = "-" if r.max_bytes is None else format_bytes(r.max_bytes)
        return f"{format_bytes(r.min_bytes)}/{format_bytes(r.low_bytes)}/{cap}"

    table = _table(
        [
            "PID",
            "COMMAND",
            "RESERVED",
            "RESIDENT",
            "PINNED",
            "EVICTABLE",
            "SWAPPED",
            "MIN/LOW/MAX",
            "SENT",
            "SERVED",
            "REQ/S",
        ],
        [
            [
                r.pid,
                r.command if len(r.command) <= 32 else r.command[:29] + "...",
                format_bytes(r.reserved_bytes),
                format_bytes(r.resident_bytes),
                format_bytes(r.pinned_bytes),
                format_bytes(r.evictable_bytes),
                format_bytes(r.swapped_bytes),
                limits(r),
                r.requests_sent,
                r.requests_served,
                f"{rates.get(r.member, 0.0):.1f}",
            ]
            for r in rows
        ],
        indent="",
    )
    return f"{head}\n{table}"


@main.command()
@click.argument("name", required=False)
@click.option("--once", is_flag=True, help="Print one table and exit (rates over --interval).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (one object per share; implies --once).")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1, max=3600),
    default=1.0,
    show_default=True,
    help="Seconds between refreshes.",
)
def top(name: str | None, once: bool, as_json: bool, interval: float) -> None:
    """A live table of a device share's members (NAME, else $GPUBO_SHARE,
    else every share of this user): pid, command, reserved, resident,
    pinned, evictable and swapped bytes, limits, eviction requests sent and
    served, and requests per second. Reads the ledger without its lock; it
    never changes the share."""
    names = (
        [name] if name else ([os.environ["GPUBO_SHARE"]] if os.environ.get("GPUBO_SHARE") else list_shares())
    )
    if not names:
        raise _Failure(f"no device shares under {share_root()}")
    before: dict[str, tuple[float, int]] = {}
    for n in names:  # the first reading of each, for the rates
        _rates(_share_snapshot(n)[1], before, time.monotonic())
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            time.sleep(interval)
            shown = []
            for n in names:
                state, rows = _share_snapshot(n)
                rates = _rates(rows, before, time.monotonic())
                shown.append((n, state, rows, rates))
            if as_json:
                payload = [_top_payload(*s) for s in shown]
                click.echo(json.dumps(payload[0] if name else payload, indent=2))
                return
            text = "\n\n".join(_top_text(*s) for s in shown)
            if once:
                click.echo(text)
                return
            click.echo("\x1b[H\x1b[2J" + time.strftime("%H:%M:%S ") + text, nl=True)
