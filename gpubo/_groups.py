"""Groups: sets of buffer objects with device-memory limits.

The semantics are those of the Linux dmem cgroup controller (6.14):

* ``max``: the group never holds more than this on the device; a group at
  its limit evicts its own BOs first, and a BO that cannot fit is refused
  with OutOfDeviceMemory.
* ``min``: while the group holds no more than this, its BOs are never
  evicted to make room for anyone else (a hard protection).
* ``low``: while the group holds no more than this, its BOs are evicted for
  others only when nothing unprotected is left (a best-effort protection).

Usage is the group's resident bytes plus buffers being brought in for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from gpubo._bo import BufferObject
from gpubo._units import format_bytes, parse_bytes

__all__ = ["Group", "GroupOps", "GroupStats", "check_limits"]

_KEEP: Any = object()


@dataclass(frozen=True)
class GroupStats:
    """A snapshot of one group; sizes in bytes, ``max_bytes`` None if unlimited."""

    name: str
    max_bytes: int | None
    low_bytes: int
    min_bytes: int
    resident_bytes: int
    swapped_bytes: int
    bo_count: int
    evictions: int


def check_limits(max_: object, low: object, min_: object, prefix: str = "") -> tuple[int | None, int, int]:
    """Parse and check a group's limits: ``min <= low <= max`` (``low``
    defaults to ``min``, ``max`` None means unlimited).

    Raises:
        TypeError, ValueError: a limit is unparsable or negative, or the
            limits contradict each other (the message names them).
    """
    mx, lo, mn = f"{prefix}max", f"{prefix}low", f"{prefix}min"
    max_bytes = None if max_ is None else parse_bytes(max_, mx)
    min_bytes = 0 if min_ is None else parse_bytes(min_, mn)
    low_bytes = min_bytes if low is None else parse_bytes(low, lo)  # default: low = min
    if max_bytes is not None and min_bytes > max_bytes:
        raise ValueError(f"{mn} ({format_bytes(min_bytes)}) must not exceed {mx} ({format_bytes(max_bytes)})")
    if min_bytes > low_bytes:
        raise ValueError(
            f"{mn} ({format_bytes(min_bytes)}) must not exceed {lo} ({format_bytes(low_bytes)})"
            + ("; set both with set_limits(low=..., min=...)" if not prefix else "")
        )
    if max_bytes is not None and low_bytes > max_bytes:
        raise ValueError(
            f"{lo} ({format_bytes(low_bytes)}) and {mn} ({format_bytes(min_bytes)}) must not exceed "
            f"{mx} ({format_bytes(max_bytes)})"
        )
    return max_bytes, low_bytes, min_bytes


class GroupOps(Protocol):
    """The operations behind a group's methods (:class:`gpubo._ops.GroupOps`)."""

    def alloc(self, nbytes: int, name: str | None, priority: int, group: Group) -> BufferObject: ...
    def set_limits(self, group: Group, max_: object, low: object, min_: object) -> None: ...
    def stats(self, group: Group) -> GroupStats: ...


class Group:
    """A named set of BOs sharing limits; made by :meth:`Manager.group`.

    Notes:
        Thread-safe. Constant after init: ``manager`` (the :class:`Manager`
        it belongs to), ``ops``, ``name``. Every other field is protected by
        the resource lock (:class:`gpubo._resource.Resource`); usage
        (resident, swapped, BO count) is summed from the BOs by :meth:`stats`.
    """

    def __init__(
        self, manager: Any, ops: GroupOps, name: str, max_bytes: int | None, low_bytes: int, min_bytes: int
    ) -> None:
        self.manager = manager
        self.ops = ops
        self.name = name
        self.max_bytes = max_bytes
        self.low_bytes = low_bytes
        self.min_bytes = min_bytes
        self.charged_bytes = 0  # resident + being brought in
        self.evictions = 0

    def alloc(self, nbytes: int, name: str | None = None, priority: int = 0) -> BufferObject:
        """:meth:`Manager.alloc` of a BO in this group (evicting the group's own
        BOs first when the group is at its ``max``)."""
        return self.ops.alloc(nbytes, name, priority, self)

    def set_limits(self, *, max: object = _KEEP, low: object = _KEEP, min: object = _KEEP) -> None:
        """Change some limits at once; they take effect now (a lower ``max``
        evicts the group's BOs down to it).

        Raises:
            TypeError, ValueError: see :func:`check_limits`.
            OutOfDeviceMemory: the group's pinned (or in use) BOs exceed the
                new ``max``; the old limits stay.
        """
        self.ops.set_limits(
            self,
            self.max_bytes if max is _KEEP else max,
            self.low_bytes if low is _KEEP else low,
            self.min_bytes if min is _KEEP else min,
        )

    @property
    def resident_bytes(self) -> int:
        """Bytes of the group's BOs on the device (see :meth:`stats`)."""
        return self.stats().resident_bytes

    @property
    def swapped_bytes(self) -> int:
        """Bytes of the group's BOs in the store (see :meth:`stats`)."""
        return self.stats().swapped_bytes

    @property
    def bo_count(self) -> int:
        """Live BOs in the group (see :meth:`stats`)."""
        return self.stats().bo_count

    @property
    def max(self) -> int | None:
        return self.max_bytes

    @max.setter
    def max(self, value: object) -> None:
        self.set_limits(max=value)

    @property
    def low(self) -> int:
        return self.low_bytes

    @low.setter
    def low(self, value: object) -> None:
        self.set_limits(low=value)

    @property
    def min(self) -> int:
        return self.min_bytes

    @min.setter
    def min(self, value: object) -> None:
        self.set_limits(min=value)

    def stats(self) -> GroupStats:
        """A consistent snapshot of the group's limits and usage."""
        return self.ops.stats(self)

    def __repr__(self) -> str:
        limit = "unlimited" if self.max_bytes is None else format_bytes(self.max_bytes)
        return (
            f"<Group {self.name!r} charged={format_bytes(self.charged_bytes)}/{limit}"
            f" low={format_bytes(self.low_bytes)} min={format_bytes(self.min_bytes)}>"
        )
