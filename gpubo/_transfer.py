"""Every byte copy: between a device buffer and the store, between a
device buffer and host memory (``BufferObject.read``/``write``), and zero
fills. Callers hold the BO's lock (see :mod:`gpubo._move`); nothing here
takes a lock or changes bookkeeping.

Both directions copy exactly once: eviction maps the device buffer and the
store copies from that mapping into its memory-mapped storage; restore
copies from a zero-copy, verified view of the store's storage into the
device buffer (one copy command), or, for an entry larger than a chunk or
with zero pages, maps the device buffer for writing (its old content
discarded) and the store copies into it, verifying as it goes.
No host array the size of the buffer is ever allocated here.

Small buffers are evicted in batches (``swap_out_batch``): the device first
gathers them into one staging buffer, and that one buffer crosses to the
host and into the store, so the fixed cost of a transfer (a map, an unmap,
a store transaction) is paid once per batch instead of once per buffer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from gpubo._errors import GpuboError
from gpubo.backends.base import Backend
from gpubo.store.base import PAGE_BYTES, Entry, SwapStore

__all__ = [
    "read_bytes",
    "replace_bytes",
    "swap_in",
    "swap_in_batch",
    "swap_out",
    "swap_out_batch",
    "write_bytes",
    "zero_fill",
]


def read_bytes(backend: Backend, buf: Any, dest: np.ndarray, offset: int) -> None:
    """Copy ``dest.nbytes`` bytes of ``buf`` from byte ``offset`` into ``dest``."""
    if dest.nbytes:
        backend.download(buf, dest, offset)


def write_bytes(backend: Backend, buf: Any, src: np.ndarray, offset: int) -> None:
    """Copy ``src`` into ``buf`` at byte ``offset`` (a resident BO's buffer,
    ordered after its kernels on the queue)."""
    if src.nbytes:
        backend.upload(buf, src, offset)


def replace_bytes(backend: Backend, buf: Any, src: np.ndarray) -> None:
    """Fill ``buf``, a buffer nothing else uses yet, with ``src`` (a BO's
    whole new content: its old bytes are never read back)."""
    backend.upload(buf, src, 0, fresh=True)


def zero_fill(backend: Backend, buf: Any, nbytes: int) -> None:
    """Zero the first ``nbytes`` of ``buf`` (a fresh or reused buffer)."""
    backend.zero(buf, nbytes)


def swap_out(backend: Backend, store: SwapStore, buf: Any, nbytes: int) -> Entry:
    """Copy ``nbytes`` of ``buf`` into a new committed store entry.

    Raises:
        StoreFull: the store has no room; nothing was written.
        StoreError, DeviceError, OutOfDeviceMemory: the copy failed; nothing
            was committed.
    """
    with backend.map_read(buf, nbytes) as view:
        return store.write(view)


def swap_out_batch(
    backend: Backend,
    store: SwapStore,
    staging: Any,
    parts: Sequence[tuple[Any, int]],
    layout: Sequence[tuple[int, int]],
) -> list[Entry]:
    """Copy each ``(buf, nbytes)`` of ``parts`` into one new entry each, via
    ``staging`` (a device buffer of whole pages holding ``layout``: entry ``i`` at
    ``layout[i] == (offset, nbytes)``). All or nothing, as
    :meth:`SwapStore.write_batch`.

    Raises:
        StoreFull: the store has no room for the whole batch; nothing was written.
        StoreError, DeviceError, OutOfDeviceMemory: a copy failed; nothing
            was committed.
    """
    backend.gather(staging, [(buf, n, off) for (buf, n), (off, _) in zip(parts, layout, strict=True)])
    end = max(off + n for off, n in layout)
    with backend.map_read(staging, -(-end // PAGE_BYTES) * PAGE_BYTES) as view:
        return store.write_batch(view, layout)


def swap_in(backend: Backend, store: SwapStore, entry: Entry, buf: Any, label: str) -> None:
    """Overwrite ``buf`` with ``entry``'s verified bytes.

    Raises:
        IntegrityError: the stored bytes fail verification; ``buf``'s content
            is then undefined and the entry is left as it was.
        StoreError, DeviceError, OutOfDeviceMemory: the copy failed.
    """
    swap_in_batch(backend, store, [(entry, buf, label)])


def swap_in_batch(backend: Backend, store: SwapStore, parts: Sequence[tuple[Entry, Any, str]]) -> None:
    """Overwrite each ``buf`` of ``parts`` (``(entry, buf, label)``) with its
    entry's verified bytes. Every entry the store can lend as one run (one
    chunk at most, no zero page) is verified first, then one copy command
    each is enqueued straight from the store and all are waited for together
    (a blocking copy would pay a round trip to the device each). The others
    are copied into a mapping of their buffer, verified chunk by chunk.

    Raises:
        IntegrityError: stored bytes fail verification; nothing was copied
            from the lent entries, and the buffers' content is undefined.
        StoreError, DeviceError, OutOfDeviceMemory: a copy failed; the
            buffers' content is undefined.
    """
    with store.verified_views([e for e, _, _ in parts], [label for _, _, label in parts]) as views:
        lent = [
            (buf, np.frombuffer(view, np.uint8))
            for (_, buf, _), view in zip(parts, views, strict=True)
            if view
        ]
        events: list[Any] = []
        try:
            for buf, data in lent[:-1]:
                events.append(backend.upload_nowait(buf, data))
            if lent:
                # The last copy blocks: the queue is in order, so the others
                # are done by then (see BENCHMARKS.md for what a lone copy costs).
                backend.upload(*lent[-1], 0, fresh=True)
        except BaseException:
            with contextlib.suppress(GpuboError):
                backend.wait(events)  # the views must outlive every copy from them
            raise
        backend.wait(events)  # done already; a failed copy shows here
        done = [view is not None for view in views]
    for (entry, buf, label), copied in zip(parts, done, strict=True):
        if not copied:
            with backend.map_write(buf, entry.nbytes) as view:
                store.read_into(entry, view, label)
