"""Least-recently-used lists of resident buffer objects, one per priority."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar

__all__ = ["LRU", "NUM_PRIORITIES"]

#: Priorities are 0 (evicted first) to NUM_PRIORITIES - 1, as in TTM.
NUM_PRIORITIES = 4


class _Item(Protocol):
    @property
    def id(self) -> int: ...

    @property
    def priority(self) -> int: ...


T = TypeVar("T", bound=_Item)


class LRU(Generic[T]):
    """Per-priority LRU order: O(1) add, touch and remove.

    Iteration yields the lowest priority first and, within a priority, the
    least recently used first: the order in which to pick victims.

    Notes:
        Not thread-safe; :class:`gpubo._resource.Resource` calls it with its lock held.
    """

    def __init__(self) -> None:
        self._lists: list[OrderedDict[int, T]] = [OrderedDict() for _ in range(NUM_PRIORITIES)]

    def add(self, item: T) -> None:
        """Insert ``item`` as the most recently used (or move it there)."""
        lst = self._lists[item.priority]
        lst[item.id] = item
        lst.move_to_end(item.id)

    def touch(self, item: T) -> None:
        """Mark ``item`` most recently used, if it is listed."""
        lst = self._lists[item.priority]
        if item.id in lst:
            lst.move_to_end(item.id)

    def remove(self, item: T) -> None:
        """Take ``item`` off its list; no-op if it is not listed."""
        self._lists[item.priority].pop(item.id, None)

    def __contains__(self, item: T) -> bool:
        return item.id in self._lists[item.priority]

    def __iter__(self) -> Iterator[T]:
        for lst in self._lists:
            yield from lst.values()
