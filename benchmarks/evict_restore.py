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
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import gpubo
from gpubo import StoreError
from gpubo.backends import OpenCLBackend

# The measuring machinery is shared with ``gpubo bench`` and lives in gpubo.bench.
from gpubo.bench import (
    BACKENDS,
    DURABILITIES,
    bench_directory,
    bench_size,
    case_keys,
    direct_ok,
    machine,
    render_table,
)

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


# -- reporting -----------------------------------------------------------------


def _fmt_ratio(row: dict[str, Any], name: str) -> str:
    return f"{row[name]['of_medians']:.2f}x" if name in row else "-"


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
    return render_table(headers, rows)


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
    return render_table(headers, rows)


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
    return render_table(headers, rows)


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
    return render_table(headers, rows)


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
                            "backend": backend,
                            "durability": durability,
                            "checksums": checksums,
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
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 MiB only, lazy and sync, 2 reps after 1 warm-up (what the test runs; a few seconds)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.reps, args.warmup = [1 << 20], 2, 1
        args.durability = [d for d in args.durability if d != "direct"]
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
        if "direct" in durabilities and not direct_ok(directory):
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
    print("restore, fresh buf: a restore with no pooled device buffer (allocates one, fills its first page).")
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
