"""A Hypothesis state machine drives a manager and a plain dict model side by side."""

from __future__ import annotations

import numpy as np
import pyopencl as cl
import pytest
from conftest import INC_SRC, check_budget
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

sizes = st.one_of(st.integers(1, 64), st.integers(1, MAX_BO), st.sampled_from([4095, 4096, 4097, MAX_BO]))


class ManagerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.m = gpubo.Manager(budget=BUDGET, store_size="8MiB")
        self.inc = cl.Kernel(cl.Program(self.m.context, INC_SRC).build(), "inc")
        self.model: dict[int, tuple[gpubo.BufferObject, np.ndarray]] = {}
        self.freed: list[gpubo.BufferObject] = []

    def _pick(self, data: st.DataObject) -> tuple[gpubo.BufferObject, np.ndarray]:
        key = data.draw(st.sampled_from(sorted(self.model)), label="bo")
        return self.model[key]

    @precondition(lambda self: len(self.model) < MAX_BOS)
    @rule(nbytes=sizes, priority=st.integers(0, 3), seed=st.integers(0, 2**32 - 1))
    def alloc(self, nbytes: int, priority: int, seed: int) -> None:
        bo = self.m.alloc(nbytes, priority=priority)
        assert bo.state is gpubo.State.RESIDENT and bo.nbytes == nbytes
        model = np.zeros(nbytes, np.uint8)
        if seed % 3:  # sometimes keep it zero, to check zero fill later
            model[:] = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)
            bo.write(model)
        self.model[bo.id] = (bo, model)

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
        bo, _ = self._pick(data)
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

    @precondition(lambda self: self.model)
    @rule(data=st.data(), seed=st.integers(0, 2**32 - 1))
    def write(self, data: st.DataObject, seed: int) -> None:
        bo, model = self._pick(data)
        offset = data.draw(st.integers(0, bo.nbytes), label="offset")
        length = data.draw(st.integers(0, bo.nbytes - offset), label="length")
        chunk = np.random.default_rng(seed).integers(0, 256, length, dtype=np.uint8)
        bo.write(chunk, offset=offset)
        model[offset : offset + length] = chunk

    @precondition(lambda self: self.model)
    @rule(data=st.data(), dtype=st.sampled_from([np.uint8, np.int16, np.float32, np.uint64]))
    def read(self, data: st.DataObject, dtype: type) -> None:
        bo, model = self._pick(data)
        item = np.dtype(dtype).itemsize
        offset = data.draw(st.integers(0, bo.nbytes), label="offset")
        count = data.draw(st.integers(0, (bo.nbytes - offset) // item), label="count")
        got = bo.read(dtype, count=count, offset=offset)
        assert got.dtype == np.dtype(dtype) and got.shape == (count,)
        assert got.tobytes() == model[offset : offset + count * item].tobytes()
        assert bo.state is gpubo.State.RESIDENT

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def pin_and_read(self, data: st.DataObject) -> None:
        bo, model = self._pick(data)
        with bo.pin() as buf:
            assert bo.pinned and bo.state is gpubo.State.RESIDENT
            host = np.empty(bo.nbytes, np.uint8)
            cl.enqueue_copy(self.m.queue, host, buf, is_blocking=True)
            assert np.array_equal(host, model)
            with pytest.raises(gpubo.BufferBusy):
                bo.evict()
            self.m.evict(BUDGET)
            assert bo.state is gpubo.State.RESIDENT
        assert not bo.pinned

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def evict(self, data: st.DataObject) -> None:
        bo, _ = self._pick(data)
        bo.evict()
        assert bo.state is gpubo.State.SWAPPED

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def restore(self, data: st.DataObject) -> None:
        bo, _ = self._pick(data)
        bo.restore()
        assert bo.state is gpubo.State.RESIDENT

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

    @precondition(lambda self: self.model)
    @rule(data=st.data(), wait=st.booleans())
    def launch_inc(self, data: st.DataObject, wait: bool) -> None:
        bo, model = self._pick(data)
        ev = self.m.launch(self.inc, (bo.nbytes,), None, bo)
        assert bo.state is gpubo.State.RESIDENT
        model += 1
        if wait:
            ev.wait()

    @invariant()
    def budget_and_counts(self) -> None:
        s = check_budget(self.m)
        assert s.bo_count == len(self.model)
        assert s.resident_bytes + s.swapped_bytes == sum(bo.nbytes for bo, _ in self.model.values())
        assert s.pinned_bytes == 0

    @invariant()
    def bytes_match_model(self) -> None:
        for bo, model in self.model.values():
            assert np.array_equal(bo.read(), model), repr(bo)

    def teardown(self) -> None:
        try:
            for bo, _ in list(self.model.values()):
                bo.free()
            s = self.m.stats()
            assert s.store_used_bytes == 0 and self.m.store.chunk_count() == 0
        finally:
            self.m.close()


@pytest.mark.pressure
@pytest.mark.timeout(300)
def test_manager_state_machine(leak_check: None) -> None:
    run_state_machine_as_test(
        ManagerMachine,
        settings=settings(
            max_examples=30,
            stateful_step_count=30,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        ),
    )
