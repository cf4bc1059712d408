"""Where a buffer object's bytes are, the moves allowed between those
places, and what each move does to the counters: one table, applied by one
function (:func:`move`), so that no code path keeps its own arithmetic.

Owns: :class:`State`, :data:`ALLOWED_MOVES`, :class:`Counters` (the bytes
held in each state and the event counts that :meth:`Manager.stats` reports).
Every :class:`Counters` field is protected by the resource lock
(:attr:`gpubo._resource.Resource.lock`); :func:`move` and :func:`enter` are
called with it held (and, for ``move``, the BO's lock too, so that either
lock is enough to read ``bo.state``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

__all__ = ["ALLOWED_MOVES", "Counters", "State", "Stats", "enter", "move", "needs_copy"]


class State(enum.Enum):
    """Where a buffer object's bytes are."""

    RESIDENT = "resident"  #: in a device buffer
    SWAPPED = "swapped"  #: in a store entry, no device buffer
    PURGED = "purged"  #: a purgeable BO whose content was dropped; reads raise Purged
    FREED = "freed"  #: gone; every use raises BufferFreed

    # Members are singletons: hash them by identity, in C (Enum's own
    # __hash__ is a Python call, paid on every table lookup of a move).
    __hash__ = object.__hash__


#: The state machine: which moves are allowed from each state.
ALLOWED_MOVES: dict[State, frozenset[State]] = {
    State.RESIDENT: frozenset({State.SWAPPED, State.PURGED, State.FREED}),
    State.SWAPPED: frozenset({State.RESIDENT, State.PURGED, State.FREED}),
    State.PURGED: frozenset({State.RESIDENT, State.FREED}),  # a write revives it, zeroed
    State.FREED: frozenset(),
}


@dataclass
class Counters:
    """The manager's counters (see the module docstring for the lock)."""

    resident_bytes: int = 0
    swapped_bytes: int = 0
    purged_bytes: int = 0
    evictions: int = 0
    eviction_batches: int = 0  # several small BOs in one transfer
    restores: int = 0
    restore_batches: int = 0  # restores of several small BOs whose copies went together
    bytes_evicted: int = 0
    bytes_restored: int = 0
    purges: int = 0


@dataclass(frozen=True)
class Stats:
    """A snapshot of a manager's counters; every field is an int but
    ``transfer``, the copy strategy in use (``"map"`` or ``"bounce"``), and
    ``checksums``, where they are computed (``"host"``, ``"device"`` or
    ``"off"``).

    ``resident_bytes`` counts BOs on the device; ``pooled_bytes`` counts freed
    or evicted device buffers kept for reuse (they count against the budget
    too, and are released before any BO is evicted).
    """

    budget: int
    resident_bytes: int
    swapped_bytes: int
    pinned_bytes: int
    bo_count: int
    evictions: int
    restores: int
    bytes_evicted: int
    bytes_restored: int
    pooled_bytes: int
    store_capacity_bytes: int
    store_used_bytes: int
    purged_bytes: int
    purges: int
    eviction_batches: int
    restore_batches: int
    transfer: str
    checksums: str


class _Charged(Protocol):
    charged_bytes: int


class _Moving(Protocol):
    """What :func:`move` needs of a buffer object."""

    state: State
    nbytes: int

    @property
    def group(self) -> _Charged | None: ...


#: The counter that holds a BO's bytes while it is in each state. A BO
#: leaving RESIDENT also gives back its group's charge (its device buffer
#: goes to the pool, uncharged from the group, or is released by the caller).
_HELD_IN: dict[State, str | None] = {
    State.RESIDENT: "resident_bytes",
    State.SWAPPED: "swapped_bytes",
    State.PURGED: "purged_bytes",
    State.FREED: None,
}


def enter(bo: _Moving, counters: Counters) -> None:
    """Count a new BO in the state it was created in."""
    field = _HELD_IN[bo.state]
    if field is not None:
        counters.__dict__[field] += bo.nbytes


def move(bo: _Moving, new: State, counters: Counters) -> None:
    """Move ``bo`` to ``new`` and apply the table: its bytes leave the old
    state's counter and join the new one's.

    Raises:
        AssertionError: the move is not in :data:`ALLOWED_MOVES` (a bug).
    """
    old = bo.state
    if new not in ALLOWED_MOVES[old]:
        raise AssertionError(f"illegal state move {old.name} -> {new.name} for {bo!r}")
    held = counters.__dict__  # a plain dataclass: its fields live in __dict__
    leaving, joining = _HELD_IN[old], _HELD_IN[new]
    if leaving is not None:
        held[leaving] -= bo.nbytes
    if joining is not None:
        held[joining] += bo.nbytes
    if old is State.RESIDENT and bo.group is not None:
        bo.group.charged_bytes -= bo.nbytes
    bo.state = new


class _Copyable(Protocol):
    @property
    def entry(self) -> object: ...

    @property
    def known_zero(self) -> bool: ...


def needs_copy(bo: _Copyable) -> bool:
    """Evicting ``bo`` copies its bytes: it has no clean store copy and is
    not known to be all zeros. (The one definition; a purgeable BO is
    dropped instead, which the eviction walk decides before asking.)"""
    return bo.entry is None and not bo.known_zero
