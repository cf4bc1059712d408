"""Hibernate a computation in one process and resume it in another.

The computation: ``--boards`` independent Game of Life boards (``--size`` x
``--size`` cells, wrapping at the edges), advanced by an OpenCL kernel, on a
budget smaller than the boards. Every board is two named buffer objects,
``life/<i>/a`` and ``life/<i>/b``: a step reads one and writes the other,
so after an even number of steps the board is in ``a``. A small named
buffer, ``life/meta``, holds the parameters and how many steps are done.

The first process creates the boards from ``--seed``, runs the first
``--steps-first`` steps, calls ``mgr.hibernate()`` (every named buffer
becomes a durable record in the store at ``--store``) and exits. A second
process, the same script with ``--resume``, opens the records by name, runs
the remaining steps and compares the boards with numpy running every step
from the start. Game of Life is integer arithmetic, so the comparison is
exact; the exit code is 1 on a mismatch.

    python demos/hibernate_resume.py                 # both processes, in a temporary store
    python demos/hibernate_resume.py --store /tmp/life --no-resume   # first process only
    python demos/hibernate_resume.py --store /tmp/life --resume      # the second one
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyopencl as cl

import gpubo

LIFE = """
__kernel void life_step(const int n, __global const uchar *src, __global uchar *dst)
{
    const int x = get_global_id(0), y = get_global_id(1);
    const int xl = (x + n - 1) % n, xr = (x + 1) % n;
    const int yu = (y + n - 1) % n, yd = (y + 1) % n;
    const int alive = src[y * n + x];
    const int around = src[yu * n + xl] + src[yu * n + x] + src[yu * n + xr]
                     + src[y * n + xl] + src[y * n + xr]
                     + src[yd * n + xl] + src[yd * n + x] + src[yd * n + xr];
    dst[y * n + x] = (around == 3 || (alive && around == 2)) ? 1 : 0;
}
"""
META = "life/meta"
META_FIELDS = ("boards", "size", "steps_done", "steps_total", "seed")


def board_names(i: int) -> tuple[str, str]:
    return f"life/{i}/a", f"life/{i}/b"


def initial_boards(boards: int, size: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.random((size, size)) < 0.3).astype(np.uint8) for _ in range(boards)]


def numpy_life(board: np.ndarray, steps: int) -> np.ndarray:
    b = board
    for _ in range(steps):
        around = sum(np.roll(np.roll(b, dy, 0), dx, 1) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx)
        b = ((around == 3) | ((b == 1) & (around == 2))).astype(np.uint8)
    return b


def advance(
    mgr: gpubo.Manager,
    kernel: cl.Kernel,
    pairs: list[tuple[gpubo.BufferObject, gpubo.BufferObject]],
    size: int,
    first: int,
    last: int,
) -> None:
    """Run steps ``first`` to ``last - 1`` on every board; the next board's
    buffers are prefetched while the current board's kernels run."""
    event = None
    for i, (a, b) in enumerate(pairs):
        if i + 1 < len(pairs):
            mgr.prefetch(list(pairs[i + 1]))
        for step in range(first, last):
            src, dst = (a, b) if step % 2 == 0 else (b, a)
            event = mgr.launch(kernel, (size, size), None, np.int32(size), src, dst)
    if event is not None:
        event.wait()


def build(args: argparse.Namespace) -> None:
    """The first process: create the boards, run the first steps, hibernate."""
    fmt = gpubo.format_bytes
    size, boards = args.size, args.boards
    with gpubo.Manager(budget=args.budget, store=args.store, store_size=args.store_size) as mgr:
        for name in mgr.names():  # a store left by an earlier run: start afresh
            mgr.remove(name)
        kernel = cl.Kernel(cl.Program(mgr.context, LIFE).build(options=["-cl-kernel-arg-info"]), "life_step")
        start = time.perf_counter()
        pairs = []
        for i, board in enumerate(initial_boards(boards, size, args.seed)):
            a, b = (mgr.alloc(size * size, name=name) for name in board_names(i))
            a.write(board)
            pairs.append((a, b))
        advance(mgr, kernel, pairs, size, 0, args.steps_first)
        meta = mgr.alloc(8 * len(META_FIELDS), name=META)
        meta.write(np.array([boards, size, args.steps_first, args.steps, args.seed], np.int64))
        compute_s = time.perf_counter() - start
        total = 2 * boards * size * size
        print(
            f"process 1 (pid {os.getpid()}): {boards} boards of {size} x {size} "
            f"({fmt(total)} in {2 * boards} named buffers) on a {fmt(mgr.budget)} budget; "
            f"{args.steps_first} of {args.steps} steps in {compute_s:.2f} s"
        )
        start = time.perf_counter()
        swapped = mgr.hibernate()
        print(
            f"  hibernate: {swapped} buffers swapped out, {len(mgr.names())} records committed "
            f"in {time.perf_counter() - start:.2f} s, store {mgr.store.path}"
        )
        print(f"  {mgr.stats()}")
        if args.exit_without_close:
            # The records are durable once hibernate() returns: leave without
            # closing anything, as a killed process would.
            sys.stdout.flush()
            os._exit(0)


def resume(args: argparse.Namespace) -> bool:
    """The second process: open the records, finish the steps, check with numpy."""
    with gpubo.Manager(budget=args.budget, store=args.store) as mgr:
        names = mgr.names()
        if META not in names:
            raise SystemExit(f"{args.store} holds no hibernated computation (records: {names})")
        meta = mgr.open(META)
        boards, size, done, total, seed = (int(v) for v in meta.read(np.int64))
        kernel = cl.Kernel(cl.Program(mgr.context, LIFE).build(options=["-cl-kernel-arg-info"]), "life_step")
        start = time.perf_counter()
        pairs = [(mgr.open(a), mgr.open(b)) for a, b in map(board_names, range(boards))]
        print(
            f"process 2 (pid {os.getpid()}): opened {len(names)} records ({boards} boards, {done} of "
            f"{total} steps done), {mgr!r}"
        )
        advance(mgr, kernel, pairs, size, done, total)
        meta.write(np.array([boards, size, total, total, seed], np.int64))
        compute_s = time.perf_counter() - start
        result = [pair[total % 2].read().reshape(size, size) for pair in pairs]
        print(f"  {total - done} more steps in {compute_s:.2f} s; {mgr.stats()}")

        start = time.perf_counter()
        expected = [numpy_life(board, total) for board in initial_boards(boards, size, seed)]
        print(f"  numpy, all {total} steps at once: {time.perf_counter() - start:.2f} s")
        wrong = [
            i
            for i, (got, want) in enumerate(zip(result, expected, strict=True))
            if not np.array_equal(got, want)
        ]
        alive = sum(int(b.sum()) for b in result)
        if wrong:
            print(f"  boards {wrong} differ from numpy")
        else:
            print(f"  every board equals numpy's ({alive} cells alive)")
    return not wrong


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", help="store directory (default: a temporary one, removed at the end)")
    p.add_argument("--resume", action="store_true", help="be the second process: resume from --store")
    p.add_argument("--no-resume", action="store_true", help="be the first process only: hibernate and exit")
    p.add_argument(
        "--exit-without-close",
        action="store_true",
        help="with --no-resume: leave with os._exit right after hibernate(), closing nothing",
    )
    p.add_argument("--boards", type=int, default=8, help="number of boards (default 8)")
    p.add_argument("--size", type=int, default=1024, help="cells per side (default 1024)")
    p.add_argument("--steps", type=int, default=60, help="steps in all (default 60)")
    p.add_argument("--steps-first", type=int, help="steps run by the first process (default half)")
    p.add_argument("--budget", default="4MiB", help="device budget (default 4MiB)")
    p.add_argument("--store-size", default="64MiB", help="store size (default 64MiB)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial boards (default 0)")
    args = p.parse_args(argv)
    if args.resume and args.no_resume:
        p.error("--resume and --no-resume exclude each other")
    if (args.resume or args.no_resume) and not args.store:
        p.error("--resume and --no-resume need --store (the processes share it)")
    if args.exit_without_close and not args.no_resume:
        p.error("--exit-without-close needs --no-resume")
    if args.boards < 1 or args.size < 3 or args.steps < 0:
        p.error("--boards must be >= 1, --size >= 3, --steps >= 0")
    if args.steps_first is None:
        args.steps_first = args.steps // 2
    if not 0 <= args.steps_first <= args.steps:
        p.error("--steps-first must be between 0 and --steps")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.resume:
        ok = resume(args)
        print("result: OK" if ok else "result: MISMATCH")
        return 0 if ok else 1
    temp = None
    if args.store is None:
        temp = tempfile.mkdtemp(prefix="gpubo-life-")
        args.store = os.path.join(temp, "store")
    try:
        build(args)
        if args.no_resume:
            return 0
        # The first process's manager is closed: its buffers are gone, only
        # the store's records remain. A new process picks them up.
        sys.stdout.flush()
        child = [sys.executable, os.path.abspath(__file__), "--resume", "--store", args.store,
                 "--budget", args.budget]  # fmt: skip
        return subprocess.run(child, check=False).returncode
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
