"""The one place where bytes move between a device buffer and the store.

Both directions copy exactly once: eviction maps the device buffer and the
store copies from that mapping into its memory-mapped storage; restore maps
the device buffer for writing (its old content discarded) and the store
copies into it from a zero-copy view of its storage, verifying as it goes.
No host array the size of the buffer is ever allocated here.
"""

from __future__ import annotations

import pyopencl as cl

from gpubo.backends.opencl import OpenCLBackend
from gpubo.store.base import Entry, SwapStore

__all__ = ["swap_in", "swap_out"]


def swap_out(backend: OpenCLBackend, store: SwapStore, buf: cl.Buffer, nbytes: int) -> Entry:
    """Copy ``nbytes`` of ``buf`` into a new committed store entry.

    Raises:
        StoreFull: the store has no room; nothing was written.
        StoreError, DeviceError, OutOfDeviceMemory: the copy failed; nothing
            was committed.
    """
    with backend.map_read(buf, nbytes) as view:
        return store.write(view)


def swap_in(backend: OpenCLBackend, store: SwapStore, entry: Entry, buf: cl.Buffer, label: str) -> None:
    """Overwrite ``buf`` with ``entry``'s verified bytes.

    Raises:
        IntegrityError: the stored bytes fail verification; ``buf``'s content
            is then undefined and the entry is left as it was.
        StoreError, DeviceError, OutOfDeviceMemory: the copy failed.
    """
    with backend.map_write(buf, entry.nbytes) as view:
        store.read_into(entry, view, label)
