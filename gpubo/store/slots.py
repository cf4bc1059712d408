"""Slot allocation for a swap device: 4 KiB slots grouped in 2 MiB clusters.

Like the kernel's ``swap_map`` with clusters (mm/swapfile.c): an entry gets a
list of extents ``(first slot, slot count)``. Requests of a cluster or more
take whole free clusters, contiguous where the free list allows, so large
entries are sequential on disk; smaller requests (and the tail of large ones)
are packed into partly used clusters, so small entries do not scatter over
the device. An allocation never fails while enough slots are free: it takes
several extents instead.
"""

from __future__ import annotations

import bisect

import numpy as np

__all__ = ["CLUSTER_SLOTS", "SlotAllocator"]

#: Slots per cluster (2 MiB of 4 KiB slots).
CLUSTER_SLOTS = 512

Extent = tuple[int, int]

_FREE, _USED = b"\x00", b"\x01"


class SlotAllocator:
    """Free-space map of ``nslots`` slots.

    Notes:
        Not thread-safe; the store calls it under its lock.
    """

    def __init__(self, nslots: int) -> None:
        if nslots <= 0:
            raise ValueError(f"nslots must be positive, got {nslots}")
        self.nslots = nslots
        self.nclusters = -(-nslots // CLUSTER_SLOTS)
        # One byte per slot, 1 = used: a bytearray, whose slicing and find()
        # cost a fraction of numpy's per-call overhead on these small runs.
        self._used = bytearray(self.nclusters * CLUSTER_SLOTS)
        # Slots past nslots in the last cluster do not exist: mark them used.
        self._used[nslots:] = _USED * (len(self._used) - nslots)
        # Free slots per cluster: a list, not an array (read one at a time in
        # the hot path, where a numpy scalar costs several times an int).
        self._free_in = [CLUSTER_SLOTS] * self.nclusters
        if nslots % CLUSTER_SLOTS:
            self._free_in[-1] = nslots % CLUSTER_SLOTS
        # Wholly free clusters, sorted; partly used clusters with free slots.
        self._empty: list[int] = [c for c in range(self.nclusters) if self._free_in[c] == CLUSTER_SLOTS]
        self._partial: set[int] = {c for c in range(self.nclusters) if 0 < self._free_in[c] < CLUSTER_SLOTS}
        self.free_slots = nslots

    def alloc(self, count: int) -> list[Extent] | None:
        """Extents covering ``count`` slots, or None (nothing taken) if too few are free."""
        if count <= 0:
            return []
        if count > self.free_slots:
            return None
        extents: list[Extent] = []
        whole, rest = divmod(count, CLUSTER_SLOTS)
        if whole:
            whole_taken = self._take_clusters(whole, extents)
            rest += (whole - whole_taken) * CLUSTER_SLOTS
        if rest:
            self._take_slots(rest, extents)
        self.free_slots -= count
        return _merge(extents)

    def free(self, extents: list[Extent] | tuple[Extent, ...]) -> None:
        """Give ``extents`` back.

        Raises:
            ValueError: an extent is out of range or not allocated (a double
                free); nothing is changed then.
        """
        end = -1
        for start, n in sorted(extents):
            if start < 0 or n <= 0 or start + n > self.nslots or _FREE in self._used[start : start + n]:
                raise ValueError(f"extent ({start}, {n}) is not allocated")
            if start < end:
                raise ValueError(f"extent ({start}, {n}) overlaps another in the same call")
            end = start + n
        for start, n in extents:
            self._used[start : start + n] = bytes(n)
            self.free_slots += n
            for c in range(start // CLUSTER_SLOTS, (start + n - 1) // CLUSTER_SLOTS + 1):
                lo, hi = max(start, c * CLUSTER_SLOTS), min(start + n, (c + 1) * CLUSTER_SLOTS)
                self._free_in[c] += hi - lo
                self._refile(c)

    def mark_used(self, extents: list[Extent] | tuple[Extent, ...]) -> None:
        """Take exactly ``extents`` (rebuilding the map from saved entries).

        Raises:
            ValueError: an extent is out of range or already taken.
        """
        end = -1
        for start, n in sorted(extents):  # all checked before any is taken
            if start < 0 or n <= 0 or start + n > self.nslots or _USED in self._used[start : start + n]:
                raise ValueError(f"extent ({start}, {n}) is out of range or overlaps another")
            if start < end:
                raise ValueError(f"extent ({start}, {n}) overlaps another of the same entry")
            end = start + n
        for start, n in extents:
            self._used[start : start + n] = _USED * n
            self.free_slots -= n
            for c in range(start // CLUSTER_SLOTS, (start + n - 1) // CLUSTER_SLOTS + 1):
                lo, hi = max(start, c * CLUSTER_SLOTS), min(start + n, (c + 1) * CLUSTER_SLOTS)
                self._free_in[c] -= hi - lo
                self._refile(c)

    def used_mask(self) -> np.ndarray:
        """A copy of the per-slot used map (for consistency checks)."""
        return np.frombuffer(self._used, np.bool_, count=self.nslots).copy()

    # -- internals ----------------------------------------------------------

    def _refile(self, c: int) -> None:
        free = int(self._free_in[c])
        full_size = min(CLUSTER_SLOTS, self.nslots - c * CLUSTER_SLOTS)
        i = bisect.bisect_left(self._empty, c)
        is_empty = i < len(self._empty) and self._empty[i] == c
        if free == full_size:
            self._partial.discard(c)
            if not is_empty and full_size == CLUSTER_SLOTS:
                self._empty.insert(i, c)
            elif full_size < CLUSTER_SLOTS:
                self._partial.add(c)
        else:
            if is_empty:
                del self._empty[i]
            if free:
                self._partial.add(c)
            else:
                self._partial.discard(c)

    def _take_clusters(self, want: int, out: list[Extent]) -> int:
        """Take up to ``want`` empty clusters, longest contiguous runs first."""
        taken = 0
        while taken < want and self._empty:
            run_start, run_len = self._longest_run(want - taken)
            for c in range(run_start, run_start + run_len):
                self._used[c * CLUSTER_SLOTS : (c + 1) * CLUSTER_SLOTS] = _USED * CLUSTER_SLOTS
                self._free_in[c] = 0
            i = bisect.bisect_left(self._empty, run_start)
            del self._empty[i : i + run_len]
            out.append((run_start * CLUSTER_SLOTS, run_len * CLUSTER_SLOTS))
            taken += run_len
        return taken

    def _longest_run(self, cap: int) -> tuple[int, int]:
        """The first run of consecutive empty clusters of length ``cap``, else the longest."""
        best_start, best_len = self._empty[0], 0
        start, length, prev = self._empty[0], 0, None
        for c in self._empty:
            if prev is not None and c == prev + 1:
                length += 1
            else:
                start, length = c, 1
            if length > best_len:
                best_start, best_len = start, length
                if best_len >= cap:
                    return best_start, cap
            prev = c
        return best_start, best_len

    def _take_slots(self, want: int, out: list[Extent]) -> None:
        """Take ``want`` (< cluster or leftover) slots from the fullest partial
        clusters first, then from empty clusters; in each, the lowest free runs."""
        free_in = self._free_in
        while want:
            c = min(self._partial, key=lambda k: (free_in[k], k)) if self._partial else self._empty[0]
            base = c * CLUSTER_SLOTS
            if free_in[c] == CLUSTER_SLOTS:  # an empty cluster: its first slots
                runs: list[Extent] = [(base, min(want, CLUSTER_SLOTS))]
            else:
                runs = _free_runs(self._used, base, base + CLUSTER_SLOTS, want)
            taken = 0
            for start, n in runs:
                self._used[start : start + n] = _USED * n
                out.append((start, n))
                taken += n
            free_in[c] -= taken
            self._refile(c)
            want -= taken


def _free_runs(used: bytearray, start: int, end: int, want: int) -> list[Extent]:
    """The first runs of free slots in ``used[start:end]`` that together hold
    up to ``want`` slots, as ``(first slot, count)``."""
    runs: list[Extent] = []
    pos = start
    while want:
        lo = used.find(_FREE, pos, end)
        if lo < 0:
            break
        hi = used.find(_USED, lo, end)
        pos = end if hi < 0 else hi
        n = min(pos - lo, want)
        runs.append((lo, n))
        want -= n
    return runs


def _merge(extents: list[Extent]) -> list[Extent]:
    """Sort and join touching extents."""
    merged: list[Extent] = []
    for start, n in sorted(extents):
        if merged and merged[-1][0] + merged[-1][1] == start:
            merged[-1] = (merged[-1][0], merged[-1][1] + n)
        else:
            merged.append((start, n))
    return merged
