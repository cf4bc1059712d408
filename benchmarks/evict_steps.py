"""Where the time of one eviction and one restore goes: each step of the
``map`` transfer's path timed on its own, beside the raw copies that make
its limit.

Per store backend (lmdb, slotfile), checksums off and on, and size, on one
device buffer of non-zero bytes, each rep times, in this order:

* eviction (``gpubo._transfer.swap_out`` taken apart): ``map`` (entering
  ``backend.map_read``: the map enqueued, flushed and waited for), ``zero
  scan`` (``scan_zero_pages`` of the mapping), ``store write``
  (``store.write_chunks``: room placed, bytes copied into the store,
  hashed with checksums on), ``unmap`` (leaving the ``with`` block: the
  unmap enqueued; its completion is waited for untimed);
* restore (``upload_lent`` taken apart, its overlap of hashing and copy
  undone), where the store lends the entry: ``lend`` (entering
  ``store.lent_chunks``), ``verify`` (``store.check_lent`` of every chunk;
  nothing with checksums off), ``H2D copy`` (one ``upload_at_nowait`` per
  segment and ``wait_copies``);
* the restores whole: ``upload_lent`` (the lent path as restores take
  it, hashing each chunk while the device copies it), and ``read_into`` (``backend.map_write`` of the
  device buffer and ``store.read_into`` it, verifying: the path of entries
  the store does not lend; the slot file reads with ``preadv``);
* the raw copies, in an order that rotates with the eviction and the
  restore every rep: a blocking D2H into a touched host array, a plain
  ``pwrite`` of those bytes into a scratch file (the page cache), and a
  blocking H2D.

Reported per case: each step's p50 in microseconds over ``--reps`` reps
after ``--warmup``, the sum of the step p50s, the eviction's limit (the
slower of the raw D2H and the ``pwrite``, as in ``gpubo bench``) and
limit / sum, raw H2D / the lent restore's sum and / ``upload_lent``
(absent where the store does not lend the entry), and raw H2D /
``read_into``. The entry written by each
rep is read back and compared once per case, so that a broken path fails
instead of being timed. ``--json`` prints only the table, with every
sample.

    python benchmarks/evict_steps.py [--reps 200] [--sizes 1048576]
    python benchmarks/evict_steps.py --sizes 16777216,67108864 --reps 30 --lend-max 1099511627776

(the second: lent restores against ``read_into`` at sizes where the stores
lend only entries they hash, the measurement behind ``LEND_MAX_BYTES``).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import click
import numpy as np
import pyopencl as cl

from gpubo._transfer import upload_lent
from gpubo.backends.opencl import OpenCLBackend
from gpubo.store import base as store_base
from gpubo.store import open_store
from gpubo.store.base import SwapStore, ViewChunks
from gpubo.store.entry import scan_zero_pages

EVICT_STEPS = ("map", "zero scan", "store write", "unmap")
RESTORE_STEPS = ("lend", "verify", "H2D copy")
LENT = "upload_lent"
READ = "read_into"
RAW = ("raw D2H", "pwrite", "raw H2D")
SHOWN = (*EVICT_STEPS, "eviction sum", *RESTORE_STEPS, "restore sum", LENT, READ, *RAW)
RATIOS = ("limit / eviction", "raw H2D / restore", "raw H2D / upload_lent", "raw H2D / read_into")


class _Case:
    """One store and one device buffer of ``nbytes`` patterned bytes."""

    def __init__(self, backend: OpenCLBackend, directory: str, name: str, checksums: bool, nbytes: int):
        self.backend = backend
        self.nbytes = nbytes
        self.store: SwapStore = open_store(
            os.path.join(directory, f"{name}-{int(checksums)}-{nbytes}"),
            4 * nbytes + (64 << 20),
            backend=name,
            checksums=checksums,
        )
        self.expected = (np.arange(nbytes, dtype=np.uint64) * 2654435761 % 251 + 1).astype(np.uint8)
        self.buf = backend.allocate(nbytes, kernel_queue=True)
        self.dst = backend.allocate(nbytes)
        backend.upload(self.buf, self.expected, 0)
        self.host = np.full(nbytes, 0x5A, np.uint8)
        self.fd, _ = tempfile.mkstemp(dir=directory, prefix="pwrite-")  # removed with the directory
        self.times: dict[str, list[float]] = {s: [] for s in EVICT_STEPS + RESTORE_STEPS + (LENT, READ) + RAW}

    def evict(self, keep: bool) -> Any:
        """One eviction, step by step; the new entry."""
        pc = time.perf_counter
        t0 = pc()
        mapping = self.backend.map_read(self.buf, self.nbytes)
        view = mapping.__enter__()
        try:
            t1 = pc()
            zero = scan_zero_pages(view, self.nbytes)
            t2 = pc()
            entry = self.store.write_chunks(ViewChunks(view, self.nbytes), zero)
            t3 = pc()
        except BaseException as e:
            mapping.__exit__(type(e), e, e.__traceback__)
            raise
        mapping.__exit__(None, None, None)
        t4 = pc()
        self.backend.finish()  # the unmap done, untimed
        if keep:
            for step, took in zip(EVICT_STEPS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                self.times[step].append(took)
        return entry

    def read_into(self, entry: Any, keep: bool) -> bool:
        """The other restore, whole (every entry can be read); True."""
        t = time.perf_counter()
        with self.backend.map_write(self.dst, self.nbytes) as view:
            self.store.read_into(entry, view, "steps")
        if keep:
            self.times[READ].append(time.perf_counter() - t)
        return True

    def upload_lent(self, entry: Any, keep: bool) -> bool:
        """The lent restore whole; whether the store lent the entry."""
        t = time.perf_counter()
        lent = upload_lent(self.backend, self.store, [(entry, self.dst, "steps")], True, None)[0]
        if keep and lent:
            self.times[LENT].append(time.perf_counter() - t)
        return lent

    def restore(self, entry: Any, keep: bool) -> bool:
        """The lent restore step by step; whether the store lent the entry."""
        pc = time.perf_counter
        t0 = pc()
        with self.store.lent_chunks([entry], ["steps"]) as lent:
            t1 = pc()
            chunks = lent[0]
            if chunks is None:  # not lent (LEND_MAX_BYTES): read_into is its restore
                return False
            for index, segments in enumerate(chunks):
                self.store.check_lent(entry, index, segments, "steps")
            t2 = pc()
            events = []
            offset = 0
            for segments in chunks:
                for segment in segments:
                    data = np.frombuffer(segment, np.uint8)
                    events.append(self.backend.upload_at_nowait(self.dst, data, offset))
                    offset += segment.nbytes
            self.backend.wait_copies(events)
            t3 = pc()
        if keep:
            for step, took in zip(RESTORE_STEPS, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                self.times[step].append(took)
        return True

    def raw(self, name: str) -> float:
        q = self.backend.queue
        t = time.perf_counter()
        if name == "raw D2H":
            cl.enqueue_copy(q, self.host, self.buf, is_blocking=True)
        elif name == "raw H2D":
            cl.enqueue_copy(q, self.buf, self.host, is_blocking=True)
        else:
            view = memoryview(self.host)
            done = 0
            while done < self.nbytes:
                done += os.pwrite(self.fd, view[done:], done)
        return time.perf_counter() - t

    def rep(self, rep: int, keep: bool) -> None:
        order: list[str] = ["cycle", *RAW]
        shift = rep % len(order)
        for what in order[shift:] + order[:shift]:
            if what == "cycle":
                entry = self.evict(keep)
                restores = [self.restore, self.upload_lent, self.read_into]
                for restore in restores[rep % 3 :] + restores[: rep % 3]:
                    restore(entry, keep)
                self.store.release(entry)
            else:
                took = self.raw(what)
                if keep:
                    self.times[what].append(took)
            if what == "raw H2D":  # the raw copy overwrote the BO's bytes with the host array's
                self.backend.upload(self.buf, self.expected, 0)

    def check(self) -> None:
        entry = self.evict(False)
        got = np.empty(self.nbytes, np.uint8)
        for restore in (self.restore, self.upload_lent, self.read_into):
            self.backend.zero(self.dst, self.nbytes)
            if not restore(entry, False):
                continue  # not lent: nothing was copied
            self.backend.download(self.dst, got, 0)
            if not np.array_equal(got, self.expected):
                raise SystemExit(f"{self.store!r}: the restored bytes differ: benchmark invalid")
        self.store.release(entry)

    def close(self) -> None:
        os.close(self.fd)
        self.backend.release(self.buf)
        self.backend.release(self.dst)
        self.store.close()

    def row(self) -> dict[str, Any]:
        row: dict[str, Any] = {}
        for step, samples in self.times.items():
            if samples:
                row[step] = {"p50_us": statistics.median(samples) * 1e6, "samples_s": samples}
        p50 = {step: row[step]["p50_us"] for step in row}
        evict = sum(p50[s] for s in EVICT_STEPS)
        limit = max(p50["raw D2H"], p50["pwrite"])
        row["eviction sum"] = {"p50_us": evict}
        row["eviction limit"] = {"p50_us": limit}
        row["limit / eviction"] = {"p50_ratio": limit / evict}
        row["raw H2D / read_into"] = {"p50_ratio": p50["raw H2D"] / p50[READ]}
        if LENT in p50:
            row["raw H2D / upload_lent"] = {"p50_ratio": p50["raw H2D"] / p50[LENT]}
        row["lent"] = bool(self.times["lend"])
        if row["lent"]:
            restore = sum(p50[s] for s in RESTORE_STEPS)
            row["restore sum"] = {"p50_us": restore}
            row["raw H2D / restore"] = {"p50_ratio": p50["raw H2D"] / restore}
        return row


def _sizes(_ctx: object, _param: object, value: str) -> list[int]:
    parts = value.split(",")
    if not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise click.BadParameter(f"{value!r}: give positive byte counts, comma-separated")
    return [int(p) for p in parts]


@click.command()
@click.option("--reps", default=200, show_default=True, type=click.IntRange(min=3))
@click.option("--warmup", default=20, show_default=True, type=click.IntRange(min=0))
@click.option("--sizes", default="1048576", show_default=True, help="bytes, comma-separated", callback=_sizes)
@click.option("--dir", "directory", default=None, type=click.Path(file_okay=False), help="where stores go")
@click.option(
    "--lend-max",
    type=click.IntRange(min=1),
    default=None,
    help=f"the stores lend unhashed entries below this many bytes [default: {store_base.LEND_MAX_BYTES}]",
)
@click.option("--json", "as_json", is_flag=True, help="print only the table, as JSON")
def main(
    reps: int, warmup: int, sizes: list[int], directory: str | None, lend_max: int | None, as_json: bool
) -> None:
    if lend_max is not None:
        store_base.LEND_MAX_BYTES = lend_max  # read at each lend: lent_chunks against read_into at any size
    backend = OpenCLBackend()
    say: Callable[[str], None] = (lambda _: None) if as_json else click.echo
    say(f"device: {backend.name}; {reps} reps after {warmup}; p50 in microseconds")
    out: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(dir=directory, prefix="gpubo-steps-") as tmp:
        for nbytes in sizes:
            for name in ("lmdb", "slotfile"):
                for checksums in (False, True):
                    case = _Case(backend, tmp, name, checksums, nbytes)
                    try:
                        case.check()
                        for rep in range(warmup + reps):
                            case.rep(rep, rep >= warmup)
                        case.check()
                        row = case.row()
                    finally:
                        case.close()
                    label = f"{nbytes} {name} checksums {'on' if checksums else 'off'}"
                    out[label] = row
                    say(f"\n{label}")
                    for step in SHOWN:
                        shown = f"{row[step]['p50_us']:10.1f}" if step in row else "  not lent"
                        say(f"  {step:14s} {shown}")
                    say(f"  eviction limit {row['eviction limit']['p50_us']:10.1f}")
                    for ratio in RATIOS:
                        if ratio in row:
                            say(f"  {ratio}: {row[ratio]['p50_ratio']:.2f}x")
    if as_json:
        doc = {"reps": reps, "warmup": warmup, "lend_max_bytes": store_base.LEND_MAX_BYTES, "cases": out}
        click.echo(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
