"""Hypothesis stateful test: the manager against a dict model of every BO's bytes.

Every public operation is a rule (allocation in and out of a group, reads
and writes, pins and arrays written through, evictions, restores,
prefetches, launches of one BO, of two with a ``const`` argument, and with
``readonly``, purgeable BOs and shrinks, durable records synced, opened and
removed); the invariants check the budget against the device buffers that
really exist and every byte against the model without changing what they
check: swapped BOs are read from the store, not restored, and one resident
BO is read per step. The machine runs on both backends, with checksums on
and off, ``lazy`` and ``sync``. ``GPUBO_HEAVY=1`` runs 10x the steps.
"""

from __future__ import annotations

import os

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array
import pytest
from conftest import INC_SRC, check_budget, check_counted, count_device_bytes
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import gpubo

KiB = 1 << 10
BUDGET = 512 * KiB
MAX_BO = 256 * KiB
MAX_BOS = 8
GROUP_MAX = 256 * KiB
HEAVY = os.environ.get("GPUBO_HEAVY") == "1"
STEPS = 300 if HEAVY else 30
EXAMPLES = int(os.environ.get("GPUBO_STATEFUL_EXAMPLES", "25"))

#: dst[i] += src[i] for i < n; src is const (its BO keeps its clean copy).
ADD_SRC = """
__kernel void add(__global const uchar *src, __global uchar *dst) {
    size_t i = get_global_id(0);
    dst[i] += src[i];
}
"""

sizes = st.one_of(st.integers(1, 64), st.integers(1, MAX_BO), st.sampled_from([4095, 4096, 4097, MAX_BO]))
R, S, P = gpubo.State.RESIDENT, gpubo.State.SWAPPED, gpubo.State.PURGED


class ManagerMachine(RuleBasedStateMachine):
    BACKEND = "lmdb"
    CHECKSUMS = True
    DURABILITY = "lazy"

    def __init__(self) -> None:
        super().__init__()
        self.m = gpubo.Manager(
            budget=BUDGET,
            store_size="16MiB",
            store_backend=self.BACKEND,
            checksums=self.CHECKSUMS,
            durability=self.DURABILITY,
        )
        self.counter = count_device_bytes(self.m)
        self.inc = cl.Kernel(cl.Program(self.m.context, INC_SRC).build(), "inc")
        self.add = cl.Kernel(cl.Program(self.m.context, ADD_SRC).build(), "add")
        self.group = self.m.group("g", max=GROUP_MAX)
        # id -> (BO, its bytes, or None once purged)
        self.model: dict[int, tuple[gpubo.BufferObject, np.ndarray | None]] = {}
        self.records: dict[str, np.ndarray] = {}
        self.freed: list[gpubo.BufferObject] = []
        self.steps = 0
        self.purgeable_ever: set[int] = set()

    def _pick(self, data: st.DataObject, live: bool = True) -> tuple[gpubo.BufferObject, np.ndarray]:
        """A BO with content (not purged) when ``live``, else any."""
        keys = sorted(k for k, (_, mdl) in self.model.items() if mdl is not None or not live)
        key = data.draw(st.sampled_from(keys), label="bo")
        return self.model[key]  # type: ignore[return-value]

    def _has_live(self) -> bool:
        return any(mdl is not None for _, mdl in self.model.values())

    def _add(self, bo: gpubo.BufferObject, content: np.ndarray) -> None:
        self.model[bo.id] = (bo, content)

    # -- allocation -----------------------------------------------------------

    @precondition(lambda self: len(self.model) < MAX_BOS)
    @rule(
        nbytes=sizes,
        priority=st.integers(0, 3),
        seed=st.integers(0, 2**32 - 1),
        grouped=st.booleans(),
        named=st.booleans(),
    )
    def alloc(self, nbytes: int, priority: int, seed: int, grouped: bool, named: bool) -> None:
        name = f"n{len(self.model)}-{seed % 1000}" if named else None
        group = self.group if grouped else None
        bo = self.m.alloc(nbytes, name=name, priority=priority, group=group)
        assert bo.state is R and bo.nbytes == nbytes
        model = np.zeros(nbytes, np.uint8)
        if seed % 3:  # sometimes keep it zero, to check zero fill later
            model[:] = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)
            bo.write(model)
        self._add(bo, model)

    @precondition(lambda self: self.steps % 13 == 0)  # rare: it changes nothing
    @rule(extra=st.integers(1, KiB))
    def alloc_too_big(self, extra: int) -> None:
        before = self.m.stats()
        states = {k: bo.state for k, (bo, _) in self.model.items()}
        with pytest.raises(gpubo.OutOfDeviceMemory):
            self.m.alloc(BUDGET + extra)
        assert self.m.stats().evictions == before.evictions
        assert {k: bo.state for k, (bo, _) in self.model.items()} == states

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        bo, _ = self._pick(data, live=False)
        bo.free()
        del self.model[bo.id]
        self.freed.append(bo)

    @precondition(lambda self: self.freed)
    @rule(data=st.data())
    def use_freed(self, data: st.DataObject) -> None:
        bo = data.draw(st.sampled_from(self.freed))
        with pytest.raises(gpubo.BufferFreed):
            bo.read(count=0)
        bo.free()

    # -- bytes in and out -----------------------------------------------------

    @precondition(lambda self: self.model)
    @rule(data=st.data(), seed=st.integers(0, 2**32 - 1))
    def write(self, data: st.DataObject, seed: int) -> None:
        bo, model = self._pick(data, live=False)
        if model is None:  # purged: a write revives it, zero-filled
            model = np.zeros(bo.nbytes, np.uint8)
        offset = data.draw(st.integers(0, bo.nbytes), label="offset")
        length = data.draw(st.integers(0, bo.nbytes - offset), label="length")
        chunk = np.random.default_rng(seed).integers(0, 256, length, dtype=np.uint8)
        bo.write(chunk, offset=offset)
        model[offset : offset + length] = chunk
        self._add(bo, model)

    @precondition(lambda self: self._has_live())
    @rule(data=st.data(), dtype=st.sampled_from([np.uint8, np.int16, np.float32, np.uint64]))
    def read(self, data: st.DataObject, dtype: type) -> None:
        bo, model = self._pick(data)
        item = np.dtype(dtype).itemsize
        offset = data.draw(st.integers(0, bo.nbytes), label="offset")
        count = data.draw(st.integers(0, (bo.nbytes - offset) // item), label="count")
        got = bo.read(dtype, count=count, offset=offset)
        assert got.dtype == np.dtype(dtype) and got.shape == (count,)
        assert got.tobytes() == model[offset : offset + count * item].tobytes()
        assert bo.state is R

    @precondition(lambda self: any(m is None for _, m in self.model.values()))
    @rule(data=st.data())
    def read_purged(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(k for k, (_, m) in self.model.items() if m is None)))
        bo, _ = self.model[key]
        with pytest.raises(gpubo.Purged):
            bo.read()
        assert bo.state is P

    @precondition(lambda self: self._has_live())
    @rule(data=st.data())
    def pin_and_read(self, data: st.DataObject) -> None:
        bo, model = self._pick(data)
        with bo.pin() as buf:
            assert bo.pinned and bo.state is R
            host = np.empty(bo.nbytes, np.uint8)
            cl.enqueue_copy(self.m.queue, host, buf, is_blocking=True)
            assert np.array_equal(host, model)
            with pytest.raises(gpubo.BufferBusy):
                bo.evict()
            self.m.evict(BUDGET)
            assert bo.state is R
        assert not bo.pinned

    @precondition(lambda self: self._has_live())
    @rule(data=st.data(), value=st.integers(0, 255), sync_inside=st.booleans())
    def write_through_pin(self, data: st.DataObject, value: int, sync_inside: bool) -> None:
        bo, model = self._pick(data)
        with bo.pin() as buf:
            if sync_inside and bo.name is not None:
                bo.sync()  # the record takes what was there; later writes are the BO's
                self.records[bo.name] = model.copy()
            cl.enqueue_fill_buffer(self.m.queue, buf, np.uint8(value), 0, bo.nbytes)  # left queued
        model[:] = value

    @precondition(lambda self: self._has_live())
    @rule(data=st.data(), readonly=st.booleans())
    def array_block(self, data: st.DataObject, readonly: bool) -> None:
        bo, model = self._pick(data)
        with bo.array(bo.nbytes, np.uint8, readonly=readonly) as arr:
            if readonly:
                assert int(cl_array.sum(arr, dtype=np.uint64).get()) == int(model.sum(dtype=np.uint64))
            else:
                arr += np.uint8(3)
        if not readonly:
            model += 3

    # -- moving ---------------------------------------------------------------

    @precondition(lambda self: self._has_live())
    @rule(data=st.data())
    def evict(self, data: st.DataObject) -> None:
        bo, _ = self._pick(data)
        bo.evict()
        assert bo.state is S

    @precondition(lambda self: self._has_live())
    @rule(data=st.data())
    def restore(self, data: st.DataObject) -> None:
        bo, _ = self._pick(data)
        bo.restore()
        assert bo.state is R

    @precondition(lambda self: self._has_live())
    @rule(data=st.data())
    def prefetch(self, data: st.DataObject) -> None:
        live = sorted(k for k, (_, m) in self.model.items() if m is not None)
        keys = data.draw(st.lists(st.sampled_from(live), min_size=1, max_size=4, unique=True), label="bos")
        bos = [self.model[k][0] for k in keys]
        for bo, future in zip(bos, self.m.prefetch(bos), strict=True):
            future.result(timeout=60)
            # Resident when its future ended; a later one may evict it, or drop
            # it if it is purgeable (the invariant then updates the model).
            assert bo.state in ((R, S, P) if bo.purgeable else (R, S)), repr(bo)

    @rule(nbytes=st.integers(0, BUDGET + KiB))
    def mgr_evict(self, nbytes: int) -> None:
        before = self.m.stats()
        freed = self.m.evict(nbytes)
        after = self.m.stats()
        assert freed == (before.resident_bytes + before.pooled_bytes) - (
            after.resident_bytes + after.pooled_bytes
        )
        if freed < nbytes:  # could not free enough: nothing evictable is left
            assert after.resident_bytes == after.pinned_bytes and after.pooled_bytes == 0

    @rule(nbytes=st.integers(1, BUDGET))
    def shrink(self, nbytes: int) -> None:
        self.m.shrink(nbytes)  # purgeable BOs go first; the invariant updates the model

    @precondition(lambda self: self.model)
    @rule(data=st.data(), value=st.booleans())
    def set_purgeable(self, data: st.DataObject, value: bool) -> None:
        bo, model = self._pick(data, live=False)
        assert bo.set_purgeable(value) is (model is not None)
        if value:
            self.purgeable_ever.add(bo.id)

    # -- launches ---------------------------------------------------------------

    @precondition(lambda self: self._has_live())
    @rule(data=st.data(), wait=st.booleans())
    def launch_inc(self, data: st.DataObject, wait: bool) -> None:
        bo, model = self._pick(data)
        ev = self.m.launch(self.inc, (bo.nbytes,), None, bo)
        assert bo.state is R
        model += 1
        if wait:
            ev.wait()

    @precondition(lambda self: sum(m is not None for _, m in self.model.values()) >= 2)
    @rule(data=st.data(), wrap=st.booleans())
    def launch_add(self, data: st.DataObject, wrap: bool) -> None:
        src, src_model = self._pick(data)
        dst, dst_model = self._pick(data)
        if src is dst or src.nbytes + dst.nbytes > BUDGET:
            return
        n = min(src.nbytes, dst.nbytes)
        args = (gpubo.readonly(src) if wrap else src, dst)
        if src.group is dst.group is self.group and src.nbytes + dst.nbytes > GROUP_MAX:
            with pytest.raises(gpubo.OutOfDeviceMemory):  # they cannot be resident together
                self.m.launch(self.add, (n,), None, *args)
            return  # and nothing ran
        self.m.launch(self.add, (n,), None, *args)
        dst_model[:n] += src_model[:n]

    # -- durable records ----------------------------------------------------------

    @precondition(lambda self: any(bo.name for bo, m in self.model.values() if m is not None))
    @rule(data=st.data())
    def sync(self, data: st.DataObject) -> None:
        named = sorted(k for k, (bo, m) in self.model.items() if bo.name and m is not None)
        bo, model = self.model[data.draw(st.sampled_from(named), label="bo")]
        assert model is not None and bo.name is not None
        try:
            bo.sync()
        except gpubo.StoreFull:
            return  # a record needs room beyond the admission promise; the old one stands
        self.records[bo.name] = model.copy()

    @precondition(lambda self: self.records and len(self.model) < MAX_BOS)
    @rule(data=st.data())
    def open_record(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.records)), label="name")
        bo = self.m.open(name)
        assert bo.state is S
        self._add(bo, self.records[name].copy())

    @precondition(lambda self: self.records)
    @rule(data=st.data(), missing=st.booleans())
    def remove_record(self, data: st.DataObject, missing: bool) -> None:
        if missing:
            assert self.m.remove("no such record") is False
            return
        name = data.draw(st.sampled_from(sorted(self.records)), label="name")
        assert self.m.remove(name) is True
        del self.records[name]

    # -- invariants -------------------------------------------------------------------

    @invariant()
    def budget_and_counts(self) -> None:
        self.steps += 1
        for key, (bo, _) in list(self.model.items()):
            if bo.state is P:  # any eviction may drop a purgeable BO instead of swapping it
                assert key in self.purgeable_ever, repr(bo)
                self.model[key] = (bo, None)
        s = check_budget(self.m)
        check_counted(self.counter, closed=False)
        assert s.bo_count == len(self.model)
        live = sum(bo.nbytes for bo, m in self.model.values() if m is not None)
        assert s.resident_bytes + s.swapped_bytes == live
        assert s.pinned_bytes == 0
        assert self.group.stats().resident_bytes <= GROUP_MAX
        assert self.m.names() == sorted(self.records)

    @invariant()
    def bytes_match_model(self) -> None:
        """Swapped BOs are checked in the store (no restore); one resident BO a step."""
        resident = []
        for bo, model in self.model.values():
            if model is None:
                continue
            if bo.state is S:
                assert bo.entry is not None
                out = np.empty(bo.nbytes, np.uint8)
                self.m.store.read_into(bo.entry, memoryview(out), bo.label())
                assert np.array_equal(out, model), repr(bo)
            else:
                resident.append((bo, model))
        if resident:
            bo, model = resident[self.steps % len(resident)]
            assert np.array_equal(bo.read(), model), repr(bo)

    def teardown(self) -> None:
        try:
            for bo, model in list(self.model.values()):
                if model is not None:
                    assert np.array_equal(bo.read(), model), repr(bo)
                bo.free()
            for name in list(self.records):
                self.m.remove(name)
            s = self.m.stats()
            assert s.store_used_bytes == 0 and self.m.store.chunk_count() == 0
        finally:
            self.m.close()
            check_counted(self.counter, closed=True)


COMBOS = [
    ("lmdb", True, "lazy"),
    ("slotfile", True, "sync"),
    ("slotfile", False, "lazy"),
    ("lmdb", False, "sync"),
]


@pytest.mark.pressure
@pytest.mark.timeout(900)
@pytest.mark.parametrize(("backend", "checksums", "durability"), COMBOS)
def test_manager_state_machine(leak_check: None, backend: str, checksums: bool, durability: str) -> None:
    machine = type(
        f"Machine_{backend}_{durability}",
        (ManagerMachine,),
        {"BACKEND": backend, "CHECKSUMS": checksums, "DURABILITY": durability},
    )
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            database=None,
            derandomize=not HEAVY,  # CI runs the same examples every time; the long profile explores
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        ),
    )
