"""The device backend protocol: everything gpubo asks of a compute API.

Nothing above :mod:`gpubo.backends` touches device memory through anything
else. Buffers, events and kernels are the backend's own objects, opaque to
the code above (typed ``Any`` there); the backend translates its API's
errors into gpubo's (:class:`~gpubo.DeviceError`,
:class:`~gpubo.OutOfDeviceMemory`).

:class:`~gpubo.backends.opencl.OpenCLBackend` implements it on pyopencl. A
CUDA backend (cuda-python or CuPy) would be one more module with these
methods: ``allocate``/``release`` on ``cuMemAlloc``/``cuMemFree``, the map
calls on pinned host staging (CUDA has no map of device memory), copies on
two streams (``queue`` and a transfer stream), events on ``cuEvent*``,
``fence`` as an event recorded on the stream, ``gather`` as a small kernel
or a run of device-to-device copies, and ``const_args`` from the kernel's
signature as its caller declares it (CUDA keeps no argument qualifiers).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["Backend"]


@runtime_checkable
class Backend(Protocol):
    """One device, its context and its in-order queues (see
    :class:`~gpubo.backends.opencl.OpenCLBackend` for the queue rules)."""

    name: str
    #: Which device this is, the same string in every process that opens it
    #: (members of a device share must agree on it).
    device_id: str
    max_alloc_bytes: int
    global_mem_bytes: int
    #: The device's memory is the host's (integrated GPU, CPU device): a map
    #: of a device buffer is zero-copy.
    host_unified_memory: bool

    @property
    def context(self) -> Any: ...
    @property
    def queue(self) -> Any: ...

    # -- memory -------------------------------------------------------------
    def allocate(self, nbytes: int, *, kernel_queue: bool = False, zero: bool = True) -> Any: ...
    def zero(self, buf: Any, nbytes: int, *, kernel_queue: bool = False) -> None: ...
    def release(self, buf: Any) -> None: ...
    def handle(self, buf: Any) -> int:
        """A number naming the device allocation of ``buf`` (stable while it lives)."""
        ...

    # -- copies ---------------------------------------------------------------
    def map_read(self, buf: Any, nbytes: int) -> AbstractContextManager[memoryview]: ...
    def map_write(self, buf: Any, nbytes: int) -> AbstractContextManager[memoryview]: ...
    def gather(self, dst: Any, parts: Sequence[tuple[Any, int, int]]) -> None: ...
    def download(self, buf: Any, out: np.ndarray, offset: int) -> None: ...
    def upload(self, buf: Any, data: np.ndarray, offset: int, *, fresh: bool = False) -> None: ...
    def upload_nowait(self, buf: Any, data: np.ndarray) -> Any: ...
    def pinned_host(self, nbytes: int) -> tuple[Any, np.ndarray]: ...
    def release_pinned(self, pinned: tuple[Any, np.ndarray]) -> None: ...
    def download_nowait(self, buf: Any, out: np.ndarray, offset: int) -> Any: ...
    def zero_pages(self, buf: Any, nbytes: int) -> np.ndarray | None: ...
    def digests_available(self) -> str | None:
        """None when :meth:`chunk_digests` runs on this device, else why not."""
        ...

    def chunk_digests(
        self, buf: Any, nbytes: int, *, fresh: bool = False
    ) -> tuple[np.ndarray | None, np.ndarray]:
        """``(zero, digests)``: the per-page zero flags of ``buf`` (or None)
        and, per 1 MiB chunk, its ``PAGE_DIGESTS`` checksum (uint64), both
        computed on the device; ``fresh``: ``buf`` is being restored (off
        the kernels' queue)."""
        ...

    def upload_at_nowait(self, buf: Any, data: np.ndarray, offset: int) -> Any: ...

    # -- kernels, events, fences ------------------------------------------------
    def is_kernel(self, obj: object) -> bool: ...
    def is_event(self, obj: object) -> bool: ...
    def const_args(self, kernel: Any) -> frozenset[int]: ...
    def launch(
        self,
        kernel: Any,
        global_size: Sequence[int],
        local_size: Sequence[int] | None,
        args: Sequence[object],
        wait_for: Sequence[Any] | None,
    ) -> Any: ...
    def wait(self, events: Sequence[Any]) -> None: ...
    def wait_copies(self, events: Sequence[Any]) -> None:
        """As :meth:`wait`, for copies (short: a backend may spin on them)."""
        ...

    def is_complete(self, event: Any) -> bool: ...
    def fence(self) -> Any: ...
    def finish(self) -> None: ...

    # -- arrays over buffers (``BufferObject.array`` and launch arguments) ----------
    def array(self, buf: Any, shape: tuple[int, ...], dtype: np.dtype[Any]) -> Any: ...
    def buffer_of(self, arg: object) -> tuple[Any, bool] | None:
        """For a launch argument that is a raw device buffer or an array over
        one: ``(buffer, is_array_view_with_offset)``; None for anything else."""
        ...
