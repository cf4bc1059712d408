"""The admission promise under a model-based fuzzer: a store filled to its
admission limit with mixed BO sizes keeps every admitted BO readable and
writable, and every eviction has room, on both backends and in every
durability mode.

Each case draws its backend, durability, checksums, a mix of BO sizes and
a store size from its seed, fills the store until ``alloc`` raises
``StoreFull``, then runs random operations (whole and partial rewrites,
reads, evictions, ``mgr.evict``, prefetches, syncs of named BOs, frees
followed by allocations back up to the limit) against a dict model of
every BO's bytes. No operation on an admitted BO may raise ``StoreFull``.

CI runs ``GPUBO_FUZZ_CASES`` cases (default 16) of ``GPUBO_FUZZ_OPS``
operations (default 300); ``GPUBO_FUZZ_CASES=200 GPUBO_FUZZ_OPS=3000
python -m pytest -m fuzz`` is the long run.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest

import gpubo

KiB, MiB = 1 << 10, 1 << 20
CASES = int(os.environ.get("GPUBO_FUZZ_CASES", "16"))
OPS = int(os.environ.get("GPUBO_FUZZ_OPS", "300"))

#: Size mixes that fragment a store: two sizes across the chunk boundary,
#: many small ones among large ones, and sizes drawn at random.
MIXES = [
    [2 * MiB, MiB + 4 * KiB],
    [4 * KiB, 3 * MiB, 64 * KiB],
    [1 * MiB - 4 * KiB, 1 * MiB + 4 * KiB, 2 * MiB + 8 * KiB],
    "random",
]

pytestmark = [pytest.mark.fuzz, pytest.mark.timeout(600)]


def _size(rng: random.Random, mix: list[int] | str) -> int:
    if mix == "random":
        return rng.choice([rng.randrange(1, 64 * KiB), rng.randrange(1, 3 * MiB)])
    assert isinstance(mix, list)
    return rng.choice(mix)


def _content(rng: random.Random, nbytes: int) -> np.ndarray:
    """Random bytes, sometimes with zero pages (stored apart) or all zeros."""
    kind = rng.random()
    if kind < 0.1:
        return np.zeros(nbytes, np.uint8)
    data = np.random.default_rng(rng.randrange(1 << 30)).integers(1, 256, nbytes, dtype=np.uint8)
    if kind < 0.4 and nbytes > 8 * KiB:
        for _ in range(rng.randrange(1, 4)):
            page = rng.randrange(nbytes // 4096)
            data[page * 4096 : (page + 1) * 4096] = 0
    return data


@pytest.mark.parametrize("seed", range(CASES))
def test_every_admitted_bo_stays_readable_and_writable(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    backend = rng.choice(["lmdb", "slotfile"])
    durability = rng.choice(["lazy", "sync"] + (["direct"] if backend == "slotfile" else []))
    checksums = rng.random() < 0.7
    mix = MIXES[seed % len(MIXES)]
    store_size = rng.randrange(12, 48) * MiB
    where = f"seed {seed}: {backend}, {durability}, checksums={checksums}, mix {mix}, {store_size >> 20} MiB"
    with gpubo.Manager(
        budget=rng.choice([4, 6, 8]) * MiB,
        store=tmp_path / "s",
        store_size=store_size,
        store_backend=backend,
        durability=durability,
        checksums=checksums,
    ) as m:
        model: dict[int, tuple[gpubo.BufferObject, np.ndarray]] = {}
        next_id = 0

        def fill() -> None:
            nonlocal next_id
            misses = 0
            while misses < 3:  # until the store admits no more of the mix
                n = _size(rng, mix)
                try:
                    bo = m.alloc(n, name=f"bo{next_id}" if rng.random() < 0.3 else None)
                except gpubo.StoreFull:
                    misses += 1
                    continue
                except gpubo.OutOfDeviceMemory:
                    continue  # larger than this budget: not a store question
                data = _content(rng, n)
                bo.write(data)
                model[next_id] = (bo, data)
                next_id += 1

        fill()
        assert model, where
        for step in range(OPS):
            key = rng.choice(list(model))
            bo, data = model[key]
            op = rng.random()
            at = f"{where}, step {step}"
            try:
                if op < 0.25:
                    data = _content(rng, bo.nbytes)
                    bo.write(data)
                elif op < 0.35:
                    off = rng.randrange(bo.nbytes)
                    patch = _content(rng, rng.randrange(1, bo.nbytes - off + 1))
                    bo.write(patch, off)
                    data = data.copy()
                    data[off : off + patch.nbytes] = patch
                elif op < 0.6:
                    assert np.array_equal(bo.read(), data), at
                elif op < 0.7:
                    bo.evict()
                elif op < 0.75:
                    m.evict(rng.randrange(1, 8) * MiB)
                elif op < 0.8:
                    m.prefetch([bo])[0].result(timeout=60)
                elif op < 0.87 and bo.name is not None:
                    bo.sync()
                elif op < 0.93:
                    bo.free()
                    del model[key]
                    fill()
                    continue
            except gpubo.StoreFull as e:
                # a durable record may be refused (it holds room beyond the
                # admission promise); nothing else may be
                if not (bo.name is not None and "durable copy" in str(e)):
                    pytest.fail(f"{at}: an admitted BO hit StoreFull: {e}")
            model[key] = (bo, data)
        for bo, data in model.values():
            assert np.array_equal(bo.read(), data), where
        m.evict(m.budget)  # every BO evicted at once: the store holds them all
        for bo, data in model.values():
            assert np.array_equal(bo.read(), data), where
