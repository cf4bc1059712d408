"""SlotAllocator (gpubo.store.slots) against a plain model: the set of used slots.

Every operation is checked against the model: extents never overlap what is
taken, counts are exact, an allocation fails only when too few slots are
free, and a bad free changes nothing. Layout tests pin down the cluster
policy: large requests take whole clusters (contiguous when they can), small
ones pack into the fullest partly used cluster.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpubo.store.slots import CLUSTER_SLOTS, SlotAllocator

C = CLUSTER_SLOTS


class Model:
    """An allocator under test plus the slots the model says are used."""

    def __init__(self, nslots: int) -> None:
        self.a = SlotAllocator(nslots)
        self.nslots = nslots
        self.used: set[int] = set()
        self.live: list[list[tuple[int, int]]] = []  # extents handed out, not yet freed

    def check(self) -> None:
        a = self.a
        assert a.free_slots == self.nslots - len(self.used)
        mask = a.used_mask()
        assert mask.shape == (self.nslots,)
        assert set(np.flatnonzero(mask).tolist()) == self.used

    def alloc(self, count: int) -> list[tuple[int, int]] | None:
        free_before = self.nslots - len(self.used)
        mask_before = self.a.used_mask()
        got = self.a.alloc(count)
        if got is None:
            assert count > free_before, f"alloc({count}) failed with {free_before} slots free"
            assert np.array_equal(self.a.used_mask(), mask_before), "a failed alloc took slots"
            assert self.a.free_slots == free_before
            return None
        assert count <= free_before
        slots: list[int] = []
        prev_end = -1
        for start, n in got:
            assert n > 0 and start >= 0 and start + n <= self.nslots, (start, n)
            assert start > prev_end, f"extents not sorted and merged: {got}"  # touching ones are merged
            prev_end = start + n
            slots.extend(range(start, start + n))
        assert len(slots) == max(count, 0), f"alloc({count}) gave {len(slots)} slots: {got}"
        taken = set(slots)
        assert len(taken) == len(slots), f"extents overlap each other: {got}"
        assert not taken & self.used, f"alloc({count}) handed out used slots: {sorted(taken & self.used)[:8]}"
        self.used |= taken
        if got:
            self.live.append(got)
        return got

    def free(self, index: int) -> None:
        extents = self.live.pop(index)
        self.a.free(extents)
        for start, n in extents:
            self.used -= set(range(start, start + n))

    def bad_free(self, extents: list[tuple[int, int]]) -> None:
        mask, free = self.a.used_mask(), self.a.free_slots
        with pytest.raises(ValueError):
            self.a.free(extents)
        assert np.array_equal(self.a.used_mask(), mask), "a refused free changed the map"
        assert self.a.free_slots == free, "a refused free changed the count"


def _not_allocated_extent(m: Model, rng: random.Random) -> list[tuple[int, int]]:
    """An extent that is out of range, empty, or touches at least one free slot."""
    kind = rng.randrange(5)
    if kind == 0:
        return [(-1, 1)]
    if kind == 1:
        return [(rng.randrange(m.nslots), 0)]
    if kind == 2:
        return [(m.nslots - 1, 2)]
    free = sorted(set(range(m.nslots)) - m.used)
    if not free:
        return [(m.nslots, 1)]
    slot = rng.choice(free)
    lo = max(0, slot - rng.randrange(4))
    extent = (lo, slot - lo + 1 + rng.randrange(3))
    if extent[0] + extent[1] > m.nslots:
        extent = (lo, m.nslots - lo)
    if kind == 3 and m.live:  # a good extent first, then the bad one: still nothing may change
        return [*rng.choice(m.live), extent]
    return [extent]


def _run_random(nslots: int, steps: int, seed: int, max_request: int) -> Model:
    rng = random.Random(seed)
    m = Model(nslots)
    for _ in range(steps):
        op = rng.random()
        if op < 0.5:
            size = rng.choice([1, rng.randrange(1, 64), rng.randrange(1, max_request + 1), C, 2 * C, C + 1])
            m.alloc(size)
        elif op < 0.9 and m.live:
            m.free(rng.randrange(len(m.live)))
        else:
            m.bad_free(_not_allocated_extent(m, rng))
        m.check()
    while m.live:
        m.free(rng.randrange(len(m.live)))
        m.check()
    assert m.a.free_slots == nslots
    # Everything is free again: one request for all of it succeeds, and not one slot more.
    assert m.alloc(nslots + 1) is None
    assert m.alloc(nslots) is not None
    m.check()
    return m


@pytest.mark.parametrize(
    "nslots",
    [1, 7, C - 1, C, C + 1, 3 * C + 100, 16 * C],
    ids=lambda n: f"{n}slots",
)
def test_random_alloc_free_matches_model(nslots: int) -> None:
    _run_random(nslots, steps=800, seed=nslots, max_request=min(nslots, 3 * C))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    nslots=st.one_of(st.integers(1, 3 * C), st.sampled_from([C, 2 * C, 4 * C + 3])),
    ops=st.lists(
        st.tuples(st.sampled_from(["alloc", "free", "bad"]), st.integers(0, 10_000), st.integers(0, 2**16)),
        max_size=60,
    ),
)
def test_hypothesis_alloc_free_matches_model(nslots: int, ops: list[tuple[str, int, int]]) -> None:
    m = Model(nslots)
    rng = random.Random(0)
    for op, a, b in ops:
        if op == "alloc":
            m.alloc(a % (nslots + 8) if b % 3 else a % 40)
        elif op == "free" and m.live:
            m.free(a % len(m.live))
        else:
            rng.seed(b)
            m.bad_free(_not_allocated_extent(m, rng))
        m.check()
    for extents in list(m.live):
        m.a.free(extents)
    assert m.a.free_slots == nslots and not m.a.used_mask().any()


def test_alloc_returns_none_only_when_too_few_slots_are_free() -> None:
    m = Model(8 * C)
    # Fragment every cluster: take it all in small pieces, free every other one.
    for _ in range(8 * C // 64):
        m.alloc(64)
    for i in range(len(m.live) - 1, -1, -2):
        m.free(i)
    m.check()
    free = m.a.free_slots
    assert free == 4 * C
    got = m.alloc(free)  # no whole cluster is free, but enough slots are: it succeeds in pieces
    assert got is not None and len(got) == 4 * C // 64
    m.check()
    assert m.a.free_slots == 0
    assert m.alloc(1) is None
    m.free(0)
    assert m.alloc(65) is None
    assert m.alloc(64) is not None
    m.check()


def test_zero_and_negative_requests_take_nothing() -> None:
    a = SlotAllocator(C)
    assert a.alloc(0) == [] and a.alloc(-3) == []
    assert a.free_slots == C and not a.used_mask().any()


def test_constructor_rejects_empty() -> None:
    with pytest.raises(ValueError):
        SlotAllocator(0)


def test_large_requests_take_contiguous_whole_clusters() -> None:
    a = SlotAllocator(16 * C)
    assert a.alloc(5 * C) == [(0, 5 * C)]
    # A cluster and a bit: one whole cluster, the tail packed right after it
    # in the next (fresh) cluster, merged into one extent.
    assert a.alloc(C + 10) == [(5 * C, C + 10)]
    # Free cluster 1 and the run 3..4. A 3-cluster request skips them (no
    # run of three) and takes the first free run of three, 7..9, contiguous.
    a.free([(C, C)])
    a.free([(3 * C, 2 * C)])
    assert a.alloc(3 * C) == [(7 * C, 3 * C)]
    # A 2-cluster request takes the first run of two, not the lone cluster 1.
    assert a.alloc(2 * C) == [(3 * C, 2 * C)]
    assert a.alloc(C) == [(C, C)]


def test_large_request_uses_the_longest_run_when_no_run_is_long_enough() -> None:
    a = SlotAllocator(10 * C)
    assert a.alloc(10 * C) == [(0, 10 * C)]
    a.free([(1 * C, C)])  # run of 1 at cluster 1
    a.free([(4 * C, 3 * C)])  # run of 3 at clusters 4..6
    a.free([(8 * C, 2 * C)])  # run of 2 at clusters 8..9
    got = a.alloc(6 * C)
    assert got == [(1 * C, C), (4 * C, 3 * C), (8 * C, 2 * C)]
    assert a.free_slots == 0


def test_small_requests_pack_into_partial_clusters() -> None:
    a = SlotAllocator(8 * C)
    assert a.alloc(10) == [(0, 10)]
    assert a.alloc(20) == [(10, 20)]  # same cluster, right after
    big = a.alloc(2 * C)
    assert big == [(C, 2 * C)]  # whole fresh clusters for a large request
    assert a.alloc(5) == [(30, 5)]  # small again: back into the partly used cluster 0
    mask = a.used_mask()
    assert mask[:35].all() and not mask[35:C].any()


def test_small_requests_go_to_the_fullest_partial_cluster_first() -> None:
    a = SlotAllocator(8 * C)
    a.mark_used([(0, 500)])  # cluster 0: 12 free
    a.mark_used([(C, 100)])  # cluster 1: 412 free
    a.mark_used([(3 * C + 200, 10)])  # cluster 3: 502 free
    assert a.alloc(5) == [(500, 5)]
    # 7 left in cluster 0, the rest from the next fullest (cluster 1).
    assert a.alloc(20) == [(505, 7), (C + 100, 13)]
    # Cluster 0 is full now; a small request does not open a fresh cluster
    # while cluster 1 has room.
    assert a.alloc(300) == [(C + 113, 300)]
    assert a.free_slots == 8 * C - 500 - 100 - 10 - 5 - 20 - 300


def test_last_partial_cluster_never_hands_out_slots_past_the_end() -> None:
    n = 2 * C + 100
    m = Model(n)
    assert m.alloc(2 * C) == [(0, 2 * C)]
    got = m.alloc(100)
    assert got == [(2 * C, 100)]
    assert m.alloc(1) is None
    m.free(0)
    assert m.alloc(2 * C) == [(0, 2 * C)]
    m.check()


def test_free_of_unallocated_extents_raises_and_changes_nothing() -> None:
    m = Model(4 * C)
    e1 = m.alloc(100)
    e2 = m.alloc(C)
    assert e1 == [(0, 100)] and e2 is not None
    m.check()
    for bad in (
        [(100, 1)],  # free slot right after an allocation
        [(50, 60)],  # half allocated, half free
        [(-1, 2)],
        [(4 * C - 1, 2)],  # past the end
        [(0, 0)],
        [(0, -5)],
        [(0, 100), (200, 1)],  # a good one, then a bad one
    ):
        m.bad_free(bad)
        m.check()
    m.free(0)
    m.check()
    m.bad_free([(0, 100)])  # a double free
    m.check()


@pytest.mark.parametrize("extents", [[(0, 8), (0, 8)], [(0, 6), (2, 6)]], ids=["repeated", "overlapping"])
def test_free_with_overlapping_extents_in_one_call_is_refused(extents: list[tuple[int, int]]) -> None:
    m = Model(2 * C)
    assert m.alloc(8) == [(0, 8)]
    m.bad_free(extents)
    m.check()
    assert m.alloc(2 * C) is None  # slots 0..7 are still taken


def test_mark_used_rebuilds_an_equivalent_allocator() -> None:
    """Rebuilding from the saved extents (as a store does at open) gives an
    allocator that behaves exactly like the one that handed them out."""
    rng = random.Random(11)
    n = 12 * C + 77
    original = Model(n)
    for _ in range(300):
        if rng.random() < 0.6:
            original.alloc(rng.choice([rng.randrange(1, 40), rng.randrange(1, 2 * C), C, 3 * C]))
        elif original.live:
            original.free(rng.randrange(len(original.live)))
    original.check()
    rebuilt = SlotAllocator(n)
    for extents in rng.sample(original.live, len(original.live)):  # any order
        rebuilt.mark_used(extents)
    assert rebuilt.free_slots == original.a.free_slots
    assert np.array_equal(rebuilt.used_mask(), original.a.used_mask())
    # Same decisions from here on.
    for _ in range(200):
        if rng.random() < 0.6:
            size = rng.choice([rng.randrange(1, 40), rng.randrange(1, 2 * C), C, 3 * C])
            assert rebuilt.alloc(size) == original.a.alloc(size)
        else:
            ext = [(s, 1) for s in np.flatnonzero(original.a.used_mask())[:3].tolist()]
            if ext:
                original.a.free(ext)
                rebuilt.free(ext)
        assert rebuilt.free_slots == original.a.free_slots
        assert np.array_equal(rebuilt.used_mask(), original.a.used_mask())


def test_mark_used_rejects_overlap_and_out_of_range() -> None:
    a = SlotAllocator(2 * C)
    a.mark_used([(10, 10)])
    for bad in ([(15, 10)], [(2 * C - 1, 2)], [(-1, 1)], [(0, 0)]):
        with pytest.raises(ValueError):
            a.mark_used(bad)
    assert a.free_slots == 2 * C - 10
    assert a.used_mask().sum() == 10
    # The map is consistent: everything else can still be allocated, exactly.
    got = a.alloc(2 * C - 10)
    assert got == [(0, 10), (20, 2 * C - 20)]
    assert a.alloc(1) is None
