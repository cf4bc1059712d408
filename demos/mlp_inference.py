"""MLP inference with weights four times the device budget, streamed by gpubo.

A multilayer perceptron of ``--layers`` dense layers (``--width`` x
``--width`` float32 weights, a bias, ReLU between layers) runs a batch
through an OpenCL kernel layer by layer. The weights do not fit the budget:
each layer's weights are restored when its kernel is launched, and the next
layer's weights are prefetched on gpubo's worker thread meanwhile. The two
activation buffers have the highest priority, so the weights are always the
ones evicted.

The weights are read-only kernel arguments: the kernel declares them
``const __global``, so a launch leaves a restored weight's clean store copy valid, and evicting
it again copies nothing. Once every weight has been in the store, a whole
inference pass evicts and restores every layer and ``bytes_evicted`` stays
flat. (``--writable-weights`` drops the ``const`` from the weights' parameter:
then every launch dirties its weights and every eviction copies them.)

Every pass's output is compared with a numpy forward pass; the exit code is
1 on a mismatch, or if bytes were copied on eviction in a pass after the
first with read-only weights.

    python demos/mlp_inference.py                         # 16 layers of 1024 x 1024, 16 MiB budget
    python demos/mlp_inference.py --layers 4 --width 512 --budget 2MiB
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import Future

import numpy as np
import pyopencl as cl

import gpubo

#: Y = X @ W^T + bias (ReLU if relu): X is batch x n_in, W is n_out x n_in,
#: Y is batch x n_out, all row-major; 16 x 16 work-groups, global (n_out, batch).
DENSE = """
#define TS 16
__kernel void dense(const int n_in, const int n_out, const int relu,
                    __global const float *X, __global const float *W, __global const float *bias,
                    __global float *Y)
{
    const int lr = get_local_id(1), lc = get_local_id(0);
    const int b = get_group_id(1) * TS + lr;   /* row of X and Y */
    const int o = get_group_id(0) * TS + lc;   /* column of Y, row of W */
    const int wo = get_group_id(0) * TS + lr;  /* the row of W this item loads */
    __local float Xs[TS][TS];
    __local float Ws[TS][TS];
    float acc = 0.0f;
    for (int t = 0; t < n_in; t += TS) {
        Xs[lr][lc] = X[b * n_in + t + lc];
        Ws[lr][lc] = W[wo * n_in + t + lc];
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int k = 0; k < TS; k++)
            acc += Xs[lr][k] * Ws[lc][k];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    acc += bias[o];
    Y[b * n_out + o] = relu ? fmax(acc, 0.0f) : acc;
}
"""
GROUP = 16
ACTIVATION_PRIORITY = 3  # the highest: evicted last


def numpy_forward(x: np.ndarray, weights: list[np.ndarray], biases: list[np.ndarray]) -> np.ndarray:
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        x = x @ w.T + b
        if i < len(weights) - 1:
            x = np.maximum(x, 0)
    return x


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=16, help="dense layers (default 16)")
    p.add_argument("--width", type=int, default=1024, help="inputs and outputs of every layer (default 1024)")
    p.add_argument("--batch", type=int, default=128, help="inputs per pass, a multiple of 16 (default 128)")
    p.add_argument("--budget", help="device budget (default: a quarter of the weights)")
    p.add_argument("--passes", type=int, default=2, help="inference passes, a new batch each (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs (default 0)")
    p.add_argument(
        "--writable-weights",
        action="store_true",
        help="declare the weights without const: launches dirty them (for comparison)",
    )
    args = p.parse_args(argv)
    for name in ("width", "batch"):
        value = getattr(args, name)
        if value <= 0 or value % GROUP:
            p.error(f"--{name} must be a positive multiple of {GROUP}")
    if args.layers < 1 or args.passes < 1:
        p.error("--layers and --passes must be >= 1")
    weight_bytes = args.width * args.width * 4
    try:
        args.budget = gpubo.parse_bytes(args.budget) if args.budget else args.layers * weight_bytes // 4
    except (TypeError, ValueError) as e:
        p.error(f"--budget: {e}")
    need = 2 * weight_bytes + 2 * args.batch * args.width * 4 + 2 * args.width * 4
    if args.budget < need:
        p.error(
            f"--budget must hold two layers and the activations ({gpubo.format_bytes(need)}): one layer "
            "runs while the next one is prefetched"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    fmt = gpubo.format_bytes
    rng = np.random.default_rng(args.seed)
    width, batch, layers = args.width, args.batch, args.layers
    scale = np.float32(np.sqrt(2.0 / width))  # He initialisation keeps activations about 1
    weights = [rng.standard_normal((width, width), dtype=np.float32) * scale for _ in range(layers)]
    biases = [rng.standard_normal(width, dtype=np.float32) * np.float32(0.1) for _ in range(layers)]
    weight_total = sum(w.nbytes for w in weights)
    print(
        f"MLP: {layers} layers of {width} x {width} float32 ({fmt(weights[0].nbytes)} each, "
        f"{fmt(weight_total)} in all) on a {fmt(args.budget)} budget ({weight_total / args.budget:.1f}x), "
        f"batch {batch}, weights {'writable' if args.writable_weights else 'const __global (read-only)'}"
    )
    store_size = max(64 << 20, 2 * weight_total)
    ok = True
    with gpubo.Manager(budget=args.budget, store_size=store_size) as mgr:
        source = (
            DENSE.replace("__global const float *W", "__global float *W") if args.writable_weights else DENSE
        )
        dense = cl.Kernel(cl.Program(mgr.context, source).build(), "dense")

        start = time.perf_counter()
        w_bo, b_bo = [], []
        for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
            w_bo.append(mgr.alloc(w.nbytes, name=f"layer{i}.weight"))
            w_bo[-1].write(w)
            b_bo.append(mgr.alloc(b.nbytes, name=f"layer{i}.bias"))
            b_bo[-1].write(b)
        act_bytes = batch * width * 4
        acts = [mgr.alloc(act_bytes, name=f"act{i}", priority=ACTIVATION_PRIORITY) for i in range(2)]
        print(f"upload: {time.perf_counter() - start:.2f} s, {mgr!r}")

        for p in range(args.passes):
            x = rng.standard_normal((batch, width), dtype=np.float32)
            before = mgr.stats()
            start = time.perf_counter()
            acts[0].write(x)
            futures: list[Future[None]] = mgr.prefetch([w_bo[0], b_bo[0]])
            for i in range(layers):
                if i + 1 < layers:  # the next layer comes in while this one runs
                    futures += mgr.prefetch([w_bo[i + 1], b_bo[i + 1]])
                src, dst = acts[i % 2], acts[(i + 1) % 2]
                relu = np.int32(i < layers - 1)
                mgr.launch(
                    dense,
                    (width, batch),
                    (GROUP, GROUP),
                    np.int32(width),
                    np.int32(width),
                    relu,
                    src,
                    w_bo[i],
                    b_bo[i],
                    dst,
                )
            y = acts[layers % 2].read(out=np.empty((batch, width), np.float32))
            for f in futures:
                f.result()  # re-raise a prefetch's error (the launch already retried it)
            elapsed = time.perf_counter() - start
            after = mgr.stats()

            expected = numpy_forward(x, weights, biases)
            error = float(np.abs(y - expected).max())
            good = bool(np.allclose(y, expected, rtol=1e-3, atol=1e-3))
            ok &= good
            copied = after.bytes_evicted - before.bytes_evicted
            print(
                f"pass {p + 1}: {elapsed:.2f} s, {after.evictions - before.evictions} evictions copying "
                f"{fmt(copied)} (bytes_evicted {fmt(before.bytes_evicted)} -> {fmt(after.bytes_evicted)}), "
                f"{after.restores - before.restores} restores of "
                f"{fmt(after.bytes_restored - before.bytes_restored)}; "
                f"output {'OK' if good else 'MISMATCH'} (max abs error {error:.1e})"
            )
            if p > 0 and not args.writable_weights:
                flat = copied == 0 and after.evictions > before.evictions
                ok &= flat
                print(
                    f"check: bytes_evicted flat in pass {p + 1}: "
                    + ("OK (weights evicted again without a copy)" if flat else "FAIL")
                )
        print(mgr.stats())
    print("result: OK" if ok else "result: MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
