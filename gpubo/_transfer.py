"""The one place where bytes move between a device buffer and the store.

Both directions copy exactly once: eviction maps the device buffer and the
store copies from that mapping into its memory-mapped storage; restore maps
the device buffer for writing (its old content discarded) and the store
copies into it from a zero-copy view of its storage, verifying as it goes.
No host array the size of the buffer is ever allocated here.

Small buffers are evicted in batches (``swap_out_batch``): the device first
gathers them into one staging buffer, and that one buffer crosses to the
host and into the store, so the fixed cost of a transfer (a map, an unmap,
a store transaction) is paid once per batch instead of once per buffer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyopencl as cl

from gpubo.backends.opencl import OpenCLBackend
from gpubo.store.base import PAGE_BYTES, Entry, SwapStore

__all__ = ["swap_in", "swap_out", "swap_out_batch"]


def swap_out(backend: OpenCLBackend, store: SwapStore, buf: cl.Buffer, nbytes: int) -> Entry:
    """Copy ``nbytes`` of ``buf`` into a new committed store entry.

    Raises:
        StoreFull: the store has no room; nothing was written.
        StoreError, DeviceError, OutOfDeviceMemory: the copy failed; nothing
            was committed.
    """
    with backend.map_read(buf, nbytes) as view:
        return store.write(view)


def swap_out_batch(
    backend: OpenCLBackend,
    store: SwapStore,
    staging: cl.Buffer,
    parts: Sequence[tuple[cl.Buffer, int]],
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


def swap_in(backend: OpenCLBackend, store: SwapStore, entry: Entry, buf: cl.Buffer, label: str) -> None:
    """Overwrite ``buf`` with ``entry``'s verified bytes.

    Raises:
        IntegrityError: the stored bytes fail verification; ``buf``'s content
            is then undefined and the entry is left as it was.
        StoreError, DeviceError, OutOfDeviceMemory: the copy failed.
    """
    with store.verified_view(entry, label) as stored:
        if stored is not None:  # one copy command straight from the store's mapping
            backend.upload(buf, np.frombuffer(stored, np.uint8), 0)
            return
    with backend.map_write(buf, entry.nbytes) as view:
        store.read_into(entry, view, label)
