"""The OpenCL backend: every pyopencl call that touches device memory.

Notes on threads: OpenCL API calls are thread-safe (OpenCL >= 1.1), except
that setting a kernel's arguments and enqueueing it must not interleave with
another thread doing the same on the same kernel object; :meth:`launch`
serialises that pair with ``_launch_lock``. pyopencl releases the GIL in
blocking calls, so copies from several threads overlap.

Notes on waits: a copy's caller waits in :meth:`OpenCLBackend._await`,
which flushes the queues and spins on the events' status for up to
``SPIN_S`` before it blocks in ``clWaitForEvents``. On PoCL a blocking wait
puts the host thread to sleep and its wake-up costs more than a small copy
(``benchmarks/wait_latency.py`` measures both; figures in BENCHMARKS.md),
and that round trip is most of the fixed cost of an eviction and a restore. The
spin holds the GIL and one core, so it is short: a longer copy pays the
blocking wait after it, once. Waits for kernels (:meth:`OpenCLBackend.wait`)
do not spin: a kernel's length is unknown, and on a CPU device a spinning
host thread takes a core from it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import pyopencl as cl
import pyopencl.array as cl_array

from gpubo._errors import DeviceError, GpuboError, OutOfDeviceMemory
from gpubo.backends._pages import HUGE_PAGES_MIN_BYTES, advise_huge_pages, huge_pages_possible

__all__ = ["OpenCLBackend", "describe_platforms", "readonly_args"]

log = logging.getLogger(__name__)

_status = cl.status_code
# pyopencl raises cl.MemoryError only for MEM_OBJECT_ALLOCATION_FAILURE; the
# other two arrive as plain cl.Error and are just as much "out of memory".
_OOM_CODES = frozenset(
    {
        _status.MEM_OBJECT_ALLOCATION_FAILURE,
        _status.OUT_OF_RESOURCES,
        _status.OUT_OF_HOST_MEMORY,
    }
)
_POCL_PLATFORM = "Portable Computing Language"
_ZERO_BYTE = np.zeros(1, np.uint8)
_COMPLETE = int(cl.command_execution_status.COMPLETE)
#: How long a wait spins on its events' status before it blocks (seconds):
#: longer than a round trip of a small copy on PoCL (30 to 80 us), short
#: enough that a thread waiting for the GIL (the hashing worker's result)
#: is not held back by much.
SPIN_S = 250e-6
#: What an allocation that need not be zeroed fills, to force the allocation.
_TOUCH_BYTES = 4096
_CONST = int(cl.kernel_arg_type_qualifier.CONST)
#: Kernels whose const arguments are remembered (each holds its program alive).
_CONST_ARGS_CACHED = 256

#: Source buffers per launch of the gather kernel.
GATHER_WIDTH = 16
#: Work items per source buffer in the gather kernel.
_GATHER_ITEMS = 64
#: Buffers up to this size go through the gather kernel; larger ones are one
#: copy command each. On PoCL the kernel costs 4.3 us per 4 KiB buffer against
#: 8.7 us for a copy command, breaks even at 16 KiB and loses beyond (43.6
#: against 11.6 us at 64 KiB): its loop copies slower than the driver's memcpy.
GATHER_KERNEL_MAX_BYTES = 8 << 10


#: OpenCL C of ``gpubo_zero_pages``: work item ``k`` sets ``flags[k]`` to 1
#: when page ``k`` (4 KiB) of the buffer holds a non-zero byte; words of 8
#: bytes, then the bytes of a partial last page.
_ZERO_PAGES_SOURCE = """
__kernel void gpubo_zero_pages(__global const ulong *words, __global const uchar *bytes,
                               ulong nbytes, __global uchar *flags)
{
    const ulong page = get_global_id(0);
    const ulong start = page * 4096;
    ulong end = start + 4096;
    if (end > nbytes) end = nbytes;
    uchar nonzero = 0;
    ulong i = start;
    for (; i + 8 <= end && !nonzero; i += 8)
        nonzero = words[i / 8] != 0;
    for (; i < end && !nonzero; i++)
        nonzero = bytes[i] != 0;
    flags[page] = nonzero;
}
"""


#: Work items per chunk in ``gpubo_chunk_digests`` (at most; fewer where
#: the device's work groups are smaller).
_DIGEST_ITEMS = 64
_PAGE = 4096
_CHUNK = 1 << 20

#: OpenCL C of ``gpubo_chunk_digests``: work group ``c`` hashes chunk ``c``
#: (1 MiB) of the buffer. Its work items take its pages (4 KiB, the last
#: one possibly short) in turn, each computing the page's XXH64 (seed 0; as
#: in the xxHash specification, XXH64 section) into local memory and
#: whether it holds a non-zero byte; then work item 0 computes the chunk's
#: digest, the XXH64 of the page XXH64s in order as little-endian 8-byte
#: words. What ``gpubo.store.entry.page_digest`` computes on the host.
#: Little-endian devices only (the words are read as the device's ulong).
_DIGEST_SOURCE = """
#define P1 0x9E3779B185EBCA87UL
#define P2 0xC2B2AE3D27D4EB4FUL
#define P3 0x165667B19E3779F9UL
#define P4 0x85EBCA77C2B2AE63UL
#define P5 0x27D4EB2F165667C5UL
#define PAGE 4096UL
#define CHUNK_PAGES 256U

static inline ulong xx_round(ulong acc, ulong in)
{
    acc += in * P2;
    return rotate(acc, 31UL) * P1;
}

static inline ulong xx_merge(ulong h, ulong v)
{
    h ^= xx_round(0UL, v);
    return h * P1 + P4;
}

static inline ulong xx_avalanche(ulong h)
{
    h ^= h >> 33;
    h *= P2;
    h ^= h >> 29;
    h *= P3;
    h ^= h >> 32;
    return h;
}

static inline ulong xx_lanes(ulong v1, ulong v2, ulong v3, ulong v4)
{
    ulong h = rotate(v1, 1UL) + rotate(v2, 7UL) + rotate(v3, 12UL) + rotate(v4, 18UL);
    h = xx_merge(h, v1);
    h = xx_merge(h, v2);
    h = xx_merge(h, v3);
    return xx_merge(h, v4);
}

/* XXH64 of len bytes at p (8-byte aligned); *nonzero |= any byte != 0. */
static ulong xx_page(__global const uchar *p, ulong len, ulong *nonzero)
{
    __global const ulong *w = (__global const ulong *)p;
    ulong h, i = 0, any = 0;
    if (len >= 32) {
        ulong v1 = P1 + P2, v2 = P2, v3 = 0, v4 = 0UL - P1;
        for (; i + 32 <= len; i += 32) {
            const ulong4 s = vload4(0, w + i / 8);
            any |= s.x | s.y | s.z | s.w;
            v1 = xx_round(v1, s.x);
            v2 = xx_round(v2, s.y);
            v3 = xx_round(v3, s.z);
            v4 = xx_round(v4, s.w);
        }
        h = xx_lanes(v1, v2, v3, v4);
    } else {
        h = P5;
    }
    h += len;
    for (; i + 8 <= len; i += 8) {
        const ulong k = w[i / 8];
        any |= k;
        h ^= xx_round(0UL, k);
        h = rotate(h, 27UL) * P1 + P4;
    }
    if (i + 4 <= len) {
        const ulong k = ((__global const uint *)p)[i / 4];
        any |= k;
        h ^= k * P1;
        h = rotate(h, 23UL) * P2 + P3;
        i += 4;
    }
    for (; i < len; i++) {
        any |= p[i];
        h ^= p[i] * P5;
        h = rotate(h, 11UL) * P1;
    }
    *nonzero |= any;
    return xx_avalanche(h);
}

/* XXH64 of n little-endian 8-byte words in local memory. */
static ulong xx_words(__local const ulong *w, uint n)
{
    const ulong len = 8UL * n;
    ulong h;
    uint i = 0;
    if (n >= 4) {
        ulong v1 = P1 + P2, v2 = P2, v3 = 0, v4 = 0UL - P1;
        for (; i + 4 <= n; i += 4) {
            v1 = xx_round(v1, w[i]);
            v2 = xx_round(v2, w[i + 1]);
            v3 = xx_round(v3, w[i + 2]);
            v4 = xx_round(v4, w[i + 3]);
        }
        h = xx_lanes(v1, v2, v3, v4);
    } else {
        h = P5;
    }
    h += len;
    for (; i < n; i++) {
        h ^= xx_round(0UL, w[i]);
        h = rotate(h, 27UL) * P1 + P4;
    }
    return xx_avalanche(h);
}

__kernel void gpubo_chunk_digests(__global const uchar *bytes, ulong nbytes,
                                  __global ulong *digests, __global uchar *nonzero,
                                  __local ulong *sums)
{
    const ulong chunk = get_group_id(0);
    const ulong first = chunk * CHUNK_PAGES;
    const ulong start = first * PAGE;
    ulong span = nbytes - start;
    if (span > CHUNK_PAGES * PAGE) span = CHUNK_PAGES * PAGE;
    const uint pages = (uint)((span + PAGE - 1) / PAGE);
    for (uint k = get_local_id(0); k < pages; k += get_local_size(0)) {
        const ulong at = start + k * PAGE;
        ulong len = nbytes - at;
        if (len > PAGE) len = PAGE;
        ulong any = 0;
        sums[k] = xx_page(bytes + at, len, &any);
        nonzero[first + k] = any != 0;
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    if (get_local_id(0) == 0)
        digests[chunk] = xx_words(sums, pages);
}
"""


def _gather_source(width: int) -> str:
    """OpenCL C of ``gpubo_gather``: work group ``k`` (dimension 1) copies
    source ``k`` to ``dst`` at the byte offset and length ``meta`` gives for
    entry ``first + k``; word by word (offsets are page-aligned, buffers start
    aligned), then the last bytes."""
    params = ", ".join(f"__global const uchar *s{i}" for i in range(width))
    cases = " ".join(f"case {i}: src = s{i}; break;" for i in range(width))
    return f"""
__kernel void gpubo_gather(__global uchar *dst, __global const uint *meta, uint first, {params})
{{
    __global const uchar *src;
    switch (get_group_id(1)) {{ {cases} default: return; }}
    const uint off = meta[2 * (first + get_group_id(1))];
    const uint n = meta[2 * (first + get_group_id(1)) + 1];
    const uint words = n / 4;
    __global uint *dw = (__global uint *)(dst + off);
    __global const uint *sw = (__global const uint *)src;
    for (uint i = get_global_id(0); i < words; i += get_global_size(0))
        dw[i] = sw[i];
    for (uint i = words * 4 + get_global_id(0); i < n; i += get_global_size(0))
        dst[off + i] = src[i];
}}
"""


def is_oom(error: cl.Error) -> bool:
    """True if ``error`` is one of OpenCL's out-of-memory codes."""
    return getattr(error, "code", None) in _OOM_CODES


def _translate(error: cl.Error, what: str, nbytes: int = 0) -> GpuboError:
    if is_oom(error):
        return OutOfDeviceMemory(f"device out of memory while {what}: {error}", nbytes=nbytes)
    return DeviceError(f"OpenCL error while {what}: {error}")


def _devices(platform: cl.Platform, device_type: int) -> list[cl.Device]:
    try:
        return list(platform.get_devices(device_type=device_type))
    except cl.Error:  # DEVICE_NOT_FOUND for a platform without that type
        return []


def _platforms() -> list[cl.Platform]:
    try:
        return list(cl.get_platforms())
    except cl.Error as e:
        raise DeviceError(
            "no OpenCL platform found; on a machine without a GPU install the "
            "PoCL CPU device with `pip install 'gpubo[pocl]'`"
        ) from e


def _pick_device(spec: str | None = None) -> cl.Device:
    """A GPU if there is one (the one with most memory), else any device.

    ``spec`` (from ``GPUBO_DEVICE``) narrows the choice: ``"gpu"``, ``"cpu"``
    or ``"accelerator"``; ``"P:D"`` (platform and device indices, as ``gpubo
    info`` lists them); ``"pocl"``; or a case-insensitive part of the device
    or platform name.
    """
    platforms = _platforms()
    if spec:
        return _match_device(platforms, spec.strip())
    gpus = [d for p in platforms for d in _devices(p, cl.device_type.GPU)]
    if gpus:
        return max(gpus, key=lambda d: d.global_mem_size)
    others = [d for p in platforms for d in _devices(p, cl.device_type.ALL)]
    if not others:
        raise DeviceError("OpenCL platforms exist but expose no device")
    return others[0]


def _type_name(device_type: int) -> str:
    names = [n for n in ("CPU", "GPU", "ACCELERATOR", "CUSTOM") if device_type & getattr(cl.device_type, n)]
    return " | ".join(names) or str(device_type)


def _match_device(platforms: list[cl.Platform], spec: str) -> cl.Device:
    kinds = {"gpu": cl.device_type.GPU, "cpu": cl.device_type.CPU, "accelerator": cl.device_type.ACCELERATOR}
    everything = [(p, d) for p in platforms for d in _devices(p, cl.device_type.ALL)]
    found: list[cl.Device] = []
    if spec.lower() in kinds:
        found = [d for p in platforms for d in _devices(p, kinds[spec.lower()])]
    elif ":" in spec and all(part.strip().isdigit() for part in spec.split(":", 1)):
        pi, di = (int(part) for part in spec.split(":", 1))
        devices = _devices(platforms[pi], cl.device_type.ALL) if pi < len(platforms) else []
        found = devices[di : di + 1]
    else:
        needle = spec.lower()
        found = [
            d
            for p, d in everything
            if needle in d.name.lower()
            or needle in p.name.lower()
            or (needle == "pocl" and p.name == _POCL_PLATFORM)
        ]
    if not found:
        names = ", ".join(f"{p.name}: {d.name.strip()}" for p, d in everything) or "none"
        raise DeviceError(f"device {spec!r} matches no OpenCL device (devices: {names})")
    return max(found, key=lambda d: d.global_mem_size)


def _device_id(dev: cl.Device) -> str:
    """Platform, device name and where the device is: its PCI bus address
    when the driver reports one (cl_khr_pci_bus_info), else its index on the
    platform."""
    where = None
    try:
        info = dev.pci_bus_info_khr  # type: ignore[attr-defined]
        where = f"pci {info.pci_domain:04x}:{info.pci_bus:02x}:{info.pci_device:02x}.{info.pci_function}"
    except (AttributeError, cl.Error, cl.LogicError):
        pass
    if where is None:
        try:
            where = f"#{dev.platform.get_devices().index(dev)}"
        except (ValueError, cl.Error):
            where = "#?"
    return f"{dev.platform.name}: {dev.name.strip()} ({where})"


def readonly_args(kernel: cl.Kernel) -> frozenset[int] | None:
    """Indices of ``kernel``'s ``const __global`` arguments (the kernel cannot
    write through them), or None when the driver keeps no argument info (the
    program was built without ``-cl-kernel-arg-info``)."""
    out = set()
    try:
        for index in range(kernel.num_args):
            address = kernel.get_arg_info(index, cl.kernel_arg_info.ADDRESS_QUALIFIER)
            qualifier: Any = kernel.get_arg_info(index, cl.kernel_arg_info.TYPE_QUALIFIER)
            if address == cl.kernel_arg_address_qualifier.GLOBAL and int(qualifier) & _CONST:
                out.add(index)
    except cl.Error:
        return None
    return frozenset(out)


def describe_platforms() -> list[dict[str, Any]]:
    """Every OpenCL device, as plain dicts, for ``gpubo info``.

    Raises:
        DeviceError: no OpenCL platform is installed.
    """
    out = []
    for p in _platforms():
        for d in _devices(p, cl.device_type.ALL):
            out.append(
                {
                    "platform": p.name,
                    "device": d.name.strip(),
                    "type": _type_name(int(d.type)),
                    "global_mem_bytes": int(d.global_mem_size),
                    "max_alloc_bytes": int(d.max_mem_alloc_size),
                    "version": d.version,
                }
            )
    return out


class OpenCLBackend:
    """One OpenCL device and context, with two in-order queues.

    ``queue`` carries everything that touches a resident BO's buffer: the
    kernels, reads and writes of BOs, and the copies out of them for an
    eviction; their order on it is what keeps them consistent.
    ``transfer_queue`` carries the copies into buffers that nothing else
    uses yet (restores and the device checksum check after them, zero
    fills of new or reused buffers), so that a
    restore or a prefetch does not wait behind the kernels queued on
    ``queue``. Every command on it is waited for before its buffer is handed
    on, and a buffer reaches it only once its last use on ``queue`` is over:
    its BO's kernels are waited for (with a marker after each ``pin`` or
    ``array`` block; see :meth:`fence`), and its first command on
    ``transfer_queue`` waits for the unmap that ended its eviction (left
    unwaited on ``queue``, where the next command is ordered after it anyway).

    Raises (constructor):
        TypeError: ``device`` is not None, a pyopencl.Device or a Context.
        DeviceError: no device, or the context or a queue cannot be created.

    Notes:
        Constant after init: ``context``, ``device``, ``queue``,
        ``transfer_queue``, ``name``, ``max_alloc_bytes``,
        ``global_mem_bytes``, ``host_unified_memory``, ``huge_pages``.
        Thread-safe; see the module docstring.
    """

    def __init__(self, device: cl.Device | cl.Context | str | None = None) -> None:
        try:
            if device is None or isinstance(device, str):
                dev = _pick_device(device)
                ctx = cl.Context([dev])
            elif isinstance(device, cl.Context):
                ctx = device
                dev = ctx.devices[0]
            elif isinstance(device, cl.Device):
                dev = device
                ctx = cl.Context([dev])
            else:
                raise TypeError(
                    f"device must be None, a pyopencl.Device, a pyopencl.Context or a str, "
                    f"got {type(device).__name__}"
                )
            queue = cl.CommandQueue(ctx, dev)
            transfer_queue = cl.CommandQueue(ctx, dev)
        except cl.Error as e:
            raise DeviceError(f"cannot open OpenCL device: {e}") from e
        self.context: cl.Context = ctx
        self.device: cl.Device = dev
        self.queue: cl.CommandQueue = queue
        self.transfer_queue: cl.CommandQueue = transfer_queue
        platform = dev.platform.name
        self.name = "pocl" if platform == _POCL_PLATFORM else dev.name.strip()
        self.device_id = _device_id(dev)
        self.max_alloc_bytes = int(dev.max_mem_alloc_size)
        self.global_mem_bytes = int(dev.global_mem_size)
        try:  # deprecated in OpenCL 2.0, still reported by PoCL and the GPU drivers
            self.host_unified_memory = bool(dev.host_unified_memory)
        except cl.Error:
            self.host_unified_memory = False
        # A CPU device's buffers are host memory: advise huge pages for the
        # large ones (see gpubo.backends._pages).
        self.huge_pages = (
            self.host_unified_memory and bool(dev.type & cl.device_type.CPU) and huge_pages_possible()
        )
        self._launch_lock = threading.Lock()
        self._gather_lock = threading.Lock()
        self._gather_kernel: cl.Kernel | None = None
        self._gather_failed = False
        self._zero_kernel: cl.Kernel | None = None
        self._zero_failed = False
        self._digest_kernel: cl.Kernel | None = None
        self._digest_error: str | None = None
        self._digest_items = _DIGEST_ITEMS
        # Unmaps left in flight on ``queue``, by buffer: the next command on
        # ``transfer_queue`` for that buffer waits for its unmap.
        self._unmaps: dict[int, cl.Event] = {}
        self._unmaps_lock = threading.Lock()
        # (program handle, kernel name) -> (the program, kept so that its
        # handle is not reused while cached; its const arguments), LRU order.
        self._const_args: OrderedDict[tuple[int, str], tuple[Any, frozenset[int]]] = OrderedDict()
        self._const_args_lock = threading.Lock()

    def const_args(self, kernel: cl.Kernel) -> frozenset[int]:
        """Indices of ``kernel``'s ``const __global`` arguments.

        When the program was built without ``-cl-kernel-arg-info`` (the
        driver then keeps no qualifiers), a shadow copy of it is built from
        its source with that option, once per program, only to read them.
        Empty (every argument may be written) when that is impossible: a
        program built from binaries, or a shadow build that fails.
        """
        program: Any = kernel.program  # a pyopencl Program or its _cl._Program
        key = (program.int_ptr, kernel.function_name)
        with self._const_args_lock:
            hit = self._const_args.get(key)
            if hit is not None:
                self._const_args.move_to_end(key)
                return hit[1]
        found = readonly_args(kernel)
        if found is None:
            found = self._shadow_const_args(program, kernel.function_name)
        with self._const_args_lock:
            self._const_args[key] = (program, found)
            while len(self._const_args) > _CONST_ARGS_CACHED:
                self._const_args.popitem(last=False)
        return found

    def _shadow_const_args(self, program: Any, name: str) -> frozenset[int]:
        try:
            source: str = program.get_info(cl.program_info.SOURCE)
            if not source:
                log.info("kernel %r: program built from binaries, its const arguments are unknown", name)
                return frozenset()
            options = program.get_build_info(self.device, cl.program_build_info.OPTIONS) or ""
            shadow = cl.Program(self.context, source).build(options=f"{options} -cl-kernel-arg-info")
            found = readonly_args(cl.Kernel(shadow, name))
        except cl.Error as e:
            log.info("kernel %r: cannot rebuild its program to read its const arguments: %s", name, e)
            return frozenset()
        return frozenset() if found is None else found

    def allocate(self, nbytes: int, *, kernel_queue: bool = False, zero: bool = True) -> cl.Buffer:
        """A new device buffer of ``nbytes``, allocated for real, and zeroed
        unless ``zero`` is false (its content is then undefined: for a buffer
        that is about to be overwritten whole, such as a restore's).

        OpenCL allocates lazily; a fill forces the allocation so that
        out-of-memory shows here, where the manager can still evict (without
        ``zero``, a fill of its first page). It goes on ``transfer_queue``,
        or on ``queue`` with ``kernel_queue`` (a buffer used there first, such
        as a batch's staging buffer: a fill on the other queue costs more
        there, measured with PoCL). Before it, on a CPU device
        (:attr:`huge_pages`), a buffer of at least
        :data:`~gpubo.backends._pages.HUGE_PAGES_MIN_BYTES` is mapped once
        so that its memory gets the huge-page advice while no page of it is
        touched yet (a zero-copy map there; never on a GPU, where a map is a
        staging copy).

        Raises:
            OutOfDeviceMemory: the device could not allocate it.
            DeviceError: any other OpenCL failure.
        """
        buf = None
        try:
            buf = cl.Buffer(self.context, cl.mem_flags.READ_WRITE, nbytes)
            if self.huge_pages and nbytes >= HUGE_PAGES_MIN_BYTES:
                queue = self.queue if kernel_queue else self.transfer_queue
                with self._map(queue, buf, nbytes, cl.map_flags.WRITE_INVALIDATE_REGION) as view:
                    advise_huge_pages(np.frombuffer(view, np.uint8).ctypes.data, nbytes)
            self.zero(buf, nbytes if zero else min(nbytes, _TOUCH_BYTES), kernel_queue=kernel_queue)
        except cl.Error as e:
            if buf is not None:
                buf.release()
            raise _translate(e, f"allocating {nbytes} bytes", nbytes) from e
        except GpuboError:
            if buf is not None:
                buf.release()
            raise
        return buf

    def zero(self, buf: cl.Buffer, nbytes: int, *, kernel_queue: bool = False) -> None:
        """Fill the first ``nbytes`` of ``buf``, a buffer nothing else uses
        yet, with zeros and wait (on ``transfer_queue``, or ``queue`` with
        ``kernel_queue``).

        Raises:
            OutOfDeviceMemory, DeviceError: the fill failed.
        """
        try:
            if kernel_queue:
                self._await([cl.enqueue_fill_buffer(self.queue, buf, _ZERO_BYTE, 0, nbytes)], self.queue)
            else:
                fill = cl.enqueue_fill_buffer(
                    self.transfer_queue, buf, _ZERO_BYTE, 0, nbytes, wait_for=self._after_unmap(buf)
                )
                self._await([fill], self.transfer_queue)
        except cl.Error as e:
            raise _translate(e, "zero-filling a buffer", nbytes) from e

    def release(self, buf: cl.Buffer) -> None:
        """Give ``buf``'s device memory back now (not when Python collects it)."""
        with self._unmaps_lock:
            self._unmaps.pop(buf.int_ptr, None)
        try:
            buf.release()
        except cl.Error as e:  # an already-released buffer; nothing to give back
            log.debug("release of a buffer failed: %s", e)

    @contextmanager
    def _map(
        self, queue: cl.CommandQueue, buf: cl.Buffer, nbytes: int, flags: cl.map_flags
    ) -> Iterator[memoryview]:
        transfer = queue is self.transfer_queue
        try:
            arr, mapped = cl.enqueue_map_buffer(
                queue,
                buf,
                flags,
                0,
                (nbytes,),
                np.dtype(np.uint8),
                wait_for=self._after_unmap(buf) if transfer else None,
                is_blocking=False,
            )
        except cl.Error as e:
            raise _translate(e, "mapping a buffer", nbytes) from e
        try:
            self._await([mapped], queue)
        except cl.Error as e:
            try:
                arr.base.release(queue)
            except cl.Error as again:
                log.debug("unmapping a buffer whose map failed: %s", again)
            raise _translate(e, "mapping a buffer", nbytes) from e
        try:
            yield memoryview(arr)
        finally:
            try:
                unmap = arr.base.release(queue)
                if transfer:
                    self._await([unmap], queue)  # the restored buffer goes on to ``queue``
                else:
                    with self._unmaps_lock:
                        self._unmaps[buf.int_ptr] = unmap
            except cl.Error as e:
                raise _translate(e, "unmapping a buffer", nbytes) from e

    def _after_unmap(self, buf: cl.Buffer) -> list[cl.Event] | None:
        """What a first command on ``transfer_queue`` for ``buf`` must wait for."""
        with self._unmaps_lock:
            unmap = self._unmaps.pop(buf.int_ptr, None)
        return None if unmap is None else [unmap]

    def map_read(self, buf: cl.Buffer, nbytes: int) -> Any:
        """Context manager: a host view of the device buffer's bytes, to read.

        On a CPU device this is the buffer itself (zero-copy); on a GPU the
        driver stages it. The view is valid only inside the ``with`` block.
        """
        return self._map(self.queue, buf, nbytes, cl.map_flags.READ)

    def map_write(self, buf: cl.Buffer, nbytes: int) -> Any:
        """Context manager: a writable host view that replaces the whole of
        ``buf``, a buffer nothing else uses yet (on ``transfer_queue``).

        The old content is not read back (WRITE_INVALIDATE_REGION); whatever is
        written into the view is on the device when the block ends.
        """
        return self._map(self.transfer_queue, buf, nbytes, cl.map_flags.WRITE_INVALIDATE_REGION)

    def gather(self, dst: cl.Buffer, parts: Sequence[tuple[cl.Buffer, int, int]]) -> None:
        """Enqueue device-side copies of ``(src, nbytes, dst_offset)`` into ``dst``.

        Does not wait: the queue is in order, so a later map of ``dst`` sees
        every copy. ``dst_offset`` must be a multiple of 4. A kernel copies
        buffers of up to :data:`GATHER_KERNEL_MAX_BYTES`,
        :data:`GATHER_WIDTH` per launch (one launch costs about what two copy
        commands do); larger buffers, or every buffer when the kernel failed
        to build, are one copy command each. Either way a small device copy
        costs a fraction of a transfer to the host, so many small buffers
        travel as one.

        Raises:
            OutOfDeviceMemory, DeviceError: a copy could not be enqueued.
        """
        try:
            small = [p for p in parts if p[1] <= GATHER_KERNEL_MAX_BYTES]
            kernel = self._gather_program() if len(small) > 2 else None
            for src, nbytes, offset in parts:
                if kernel is None or nbytes > GATHER_KERNEL_MAX_BYTES:
                    cl.enqueue_copy(self.queue, dst, src, byte_count=nbytes, dst_offset=offset)
            if kernel is not None:
                self._launch_gather(kernel, dst, small)
        except cl.Error as e:
            raise _translate(e, "gathering buffers on the device", sum(n for _, n, _ in parts)) from e

    def _launch_gather(
        self, kernel: cl.Kernel, dst: cl.Buffer, parts: list[tuple[cl.Buffer, int, int]]
    ) -> None:
        """Enqueue the gather kernel over ``parts``, :data:`GATHER_WIDTH` per launch."""
        meta = cl.Buffer(
            self.context,
            cl.mem_flags.READ_ONLY | cl.mem_flags.COPY_HOST_PTR,
            hostbuf=np.array([(off, n) for _, n, off in parts], np.uint32),
        )
        try:
            with self._gather_lock:
                for first in range(0, len(parts), GATHER_WIDTH):
                    group = [src for src, _, _ in parts[first : first + GATHER_WIDTH]]
                    pad = [dst] * (GATHER_WIDTH - len(group))  # never read: no work group for them
                    kernel.set_args(dst, meta, np.uint32(first), *group, *pad)
                    cl.enqueue_nd_range_kernel(
                        self.queue, kernel, (_GATHER_ITEMS, len(group)), (_GATHER_ITEMS, 1)
                    )
        finally:
            meta.release()  # the enqueued launches keep it alive until they ran

    def _gather_program(self) -> cl.Kernel | None:
        """The gather kernel, built on first use; None if it cannot be built."""
        with self._gather_lock:
            if self._gather_kernel is None and not self._gather_failed:
                try:
                    program = cl.Program(self.context, _gather_source(GATHER_WIDTH)).build()
                    self._gather_kernel = cl.Kernel(program, "gpubo_gather")
                except (cl.Error, RuntimeError) as e:
                    self._gather_failed = True
                    log.warning("the gather kernel did not build (%s): batches copy one buffer at a time", e)
            return self._gather_kernel

    def zero_pages(self, buf: cl.Buffer, nbytes: int) -> np.ndarray | None:
        """Per-page (4 KiB) "all zeros" flags of the first ``nbytes`` of
        ``buf``, computed on the device (only one byte per page crosses to
        the host), after the commands before it on ``queue``; None when no
        page is zero, or when the kernel cannot be built (then every page
        counts as data).

        Raises:
            OutOfDeviceMemory, DeviceError: the kernel or its copy failed.
        """
        with self._gather_lock:
            if self._zero_kernel is None and not self._zero_failed:
                try:
                    program = cl.Program(self.context, _ZERO_PAGES_SOURCE).build()
                    self._zero_kernel = cl.Kernel(program, "gpubo_zero_pages")
                except (cl.Error, RuntimeError) as e:
                    self._zero_failed = True
                    log.warning(
                        "the zero-page kernel did not build (%s): bounce evictions store every page", e
                    )
            kernel = self._zero_kernel
        if kernel is None:
            return None
        npages = -(-nbytes // 4096)
        flags = np.empty(npages, np.uint8)
        try:
            out = cl.Buffer(self.context, cl.mem_flags.WRITE_ONLY, npages)
            try:
                with self._launch_lock:
                    kernel.set_args(buf, buf, np.uint64(nbytes), out)
                    cl.enqueue_nd_range_kernel(self.queue, kernel, (npages,), None)
                cl.enqueue_copy(self.queue, flags, out, is_blocking=True)
            finally:
                out.release()
        except cl.Error as e:
            raise _translate(e, "finding zero pages", nbytes) from e
        zero = flags == 0
        return zero if zero.any() else None

    def digests_available(self) -> str | None:
        """Build the checksum kernel (once); None when it runs here, else why not."""
        if self._digest_kernel is not None:  # built: no lock needed to read it
            return None
        with self._gather_lock:
            if self._digest_kernel is None and self._digest_error is None and not self.device.endian_little:
                # The digests are defined on little-endian words; a big-endian
                # device would write digests that no host reader could verify.
                self._digest_error = (
                    "the device is big-endian (the checksum kernel reads little-endian words)"
                )
            if self._digest_kernel is None and self._digest_error is None:
                try:
                    program = cl.Program(self.context, _DIGEST_SOURCE).build()
                    kernel = cl.Kernel(program, "gpubo_chunk_digests")
                    wg = int(
                        kernel.get_work_group_info(cl.kernel_work_group_info.WORK_GROUP_SIZE, self.device)
                    )
                    self._digest_items = max(1, min(_DIGEST_ITEMS, wg))
                    self._digest_kernel = kernel
                except (cl.Error, RuntimeError) as e:
                    self._digest_error = f"the checksum kernel did not build: {e}"
                    log.warning("%s", self._digest_error)
            return self._digest_error

    def chunk_digests(
        self, buf: cl.Buffer, nbytes: int, *, fresh: bool = False
    ) -> tuple[np.ndarray | None, np.ndarray]:
        """The checksums of the first ``nbytes`` of ``buf`` computed on the
        device, after the commands before it on ``queue`` (``fresh``: a
        buffer only restores use yet, on ``transfer_queue``, so that the
        check of a restore does not wait behind queued kernels):
        ``(zero, digests)``, the per-page (4 KiB) "all zeros" flags (None
        when no page is zero) and one ``gpubo.store.entry.PAGE_DIGESTS``
        value per 1 MiB chunk (uint64), found in one pass. Only one byte per
        page and 8 per chunk cross to the host.

        Raises:
            DeviceError: the kernel does not build here
                (:meth:`digests_available` says why), or it failed.
            OutOfDeviceMemory: no room for its small outputs.
        """
        why = self.digests_available()
        if why is not None:
            raise DeviceError(why)
        kernel = self._digest_kernel
        assert kernel is not None
        npages = -(-nbytes // _PAGE)
        nchunks = -(-nbytes // _CHUNK)
        flags = np.empty(npages, np.uint8)
        digests = np.empty(nchunks, np.uint64)
        items = self._digest_items
        try:
            sums_out = cl.Buffer(self.context, cl.mem_flags.WRITE_ONLY, 8 * nchunks)
            try:
                flags_out = cl.Buffer(self.context, cl.mem_flags.WRITE_ONLY, npages)
                try:
                    queue = self.transfer_queue if fresh else self.queue
                    after = self._after_unmap(buf) if fresh else None
                    with self._launch_lock:
                        kernel.set_args(
                            buf,
                            np.uint64(nbytes),
                            sums_out,
                            flags_out,
                            cl.LocalMemory(8 * (_CHUNK // _PAGE)),  # type: ignore[arg-type]
                        )
                        cl.enqueue_nd_range_kernel(
                            queue, kernel, (nchunks * items,), (items,), wait_for=after
                        )
                    cl.enqueue_copy(queue, flags, flags_out, is_blocking=False)
                    cl.enqueue_copy(queue, digests, sums_out, is_blocking=True)
                finally:
                    flags_out.release()
            finally:
                sums_out.release()
        except cl.Error as e:
            raise _translate(e, "computing checksums on the device", nbytes) from e
        zero = flags == 0
        return (zero if zero.any() else None), digests

    def download(self, buf: cl.Buffer, out: np.ndarray, offset: int) -> None:
        """Copy ``out.nbytes`` bytes from ``buf`` at byte ``offset`` into ``out``."""
        try:
            copy = cl.enqueue_copy(self.queue, out, buf, src_offset=offset, is_blocking=False)
            self._await([copy], self.queue)
        except cl.Error as e:
            raise _translate(e, "reading a buffer", out.nbytes) from e

    def upload(self, buf: cl.Buffer, data: np.ndarray, offset: int, *, fresh: bool = False) -> None:
        """Copy the bytes of ``data`` into ``buf`` at byte ``offset``; ``fresh``:
        ``buf`` is one nothing else uses yet (the copy goes on ``transfer_queue``)."""
        try:
            queue = self.transfer_queue if fresh else self.queue
            if fresh:
                copy = cl.enqueue_copy(
                    self.transfer_queue,
                    buf,
                    data,
                    dst_offset=offset,
                    wait_for=self._after_unmap(buf),
                    is_blocking=False,
                )
            else:
                copy = cl.enqueue_copy(self.queue, buf, data, dst_offset=offset, is_blocking=False)
            self._await([copy], queue)
        except cl.Error as e:
            raise _translate(e, "writing a buffer", data.nbytes) from e

    def upload_nowait(self, buf: cl.Buffer, data: np.ndarray) -> cl.Event:
        """Enqueue a copy of ``data``'s bytes into ``buf``, a buffer nothing
        else uses yet (on ``transfer_queue``), and return its event without
        waiting: ``data`` must stay valid until the event completes.
        Copies enqueued together stream through the device one after the
        other, where each blocking copy pays a full round trip.

        Raises:
            OutOfDeviceMemory, DeviceError: the copy could not be enqueued.
        """
        try:
            return cl.enqueue_copy(
                self.transfer_queue, buf, data, wait_for=self._after_unmap(buf), is_blocking=False
            )
        except cl.Error as e:
            raise _translate(e, "writing a buffer", data.nbytes) from e

    @staticmethod
    def wait(events: Sequence[cl.Event]) -> None:
        """Block until every event completed (kernels, mostly: this wait
        sleeps at once, leaving the cores to them).

        Raises:
            DeviceError: a command failed (the event's status is an error).
        """
        if not events:
            return
        try:
            cl.wait_for_events(list(events))
        except cl.Error as e:
            raise DeviceError(f"waiting for a kernel that used the buffer failed: {e}") from e

    def wait_copies(self, events: Sequence[cl.Event]) -> None:
        """Wait until every copy of ``events`` completed: spins for up to
        ``SPIN_S`` first (see the module docstring), for copies, whose
        length the caller knows is short; a kernel waits in :meth:`wait`.

        Raises:
            DeviceError: a copy failed (the event's status is an error).
        """
        if not events:
            return
        try:
            self._await(events)
        except cl.Error as e:
            raise DeviceError(f"waiting for a copy failed: {e}") from e

    def _await(self, events: Sequence[cl.Event], queue: cl.CommandQueue | None = None) -> None:
        """Wait until every event completed: flush ``queue`` (the one the
        events are on; None: either queue), spin on the events' status for
        up to ``SPIN_S``, then block (see the module docstring for why).

        Raises:
            cl.Error: a command failed, or the wait did.
        """
        if queue is None:
            self.queue.flush()
            self.transfer_queue.flush()
        else:
            queue.flush()
        deadline = time.perf_counter() + SPIN_S
        pending = list(events)
        while pending:
            status = pending[-1].command_execution_status
            if status == _COMPLETE:
                pending.pop()
            elif status < _COMPLETE:
                cl.wait_for_events(pending)  # a failed command: its error is raised
                return
            elif time.perf_counter() > deadline:
                # A long copy: sleep through it. One event at a time, from the
                # last: on an in-order queue the others are done with it, and
                # clWaitForEvents of many on PoCL sleeps and wakes for each.
                cl.wait_for_events([pending.pop()])

    @staticmethod
    def is_complete(event: cl.Event) -> bool:
        """True when ``event`` finished (or failed: it no longer runs)."""
        status = event.command_execution_status
        return bool(status <= cl.command_execution_status.COMPLETE)

    def launch(
        self,
        kernel: cl.Kernel,
        global_size: Sequence[int],
        local_size: Sequence[int] | None,
        args: Sequence[object],
        wait_for: Sequence[cl.Event] | None,
    ) -> cl.Event:
        """Set ``kernel``'s arguments and enqueue it; returns its event.

        Raises:
            OutOfDeviceMemory: the launch ran out of device resources.
            DeviceError: OpenCL refused the launch (bad arguments, sizes...).
        """
        try:
            with self._launch_lock:
                kernel.set_args(*args)  # type: ignore[arg-type]
                return cl.enqueue_nd_range_kernel(
                    self.queue,
                    kernel,
                    tuple(global_size),
                    None if local_size is None else tuple(local_size),
                    wait_for=wait_for,
                )
        except cl.Error as e:
            raise _translate(e, f"launching kernel {kernel.function_name!r}") from e

    def fence(self) -> cl.Event:
        """An event that completes once everything enqueued on ``queue`` so far
        has (a marker): a BO's buffer handed out raw (``pin``, ``array``) may
        have commands of its holder still queued when the block ends.

        Raises:
            DeviceError: the marker could not be enqueued.
        """
        try:
            return cl.enqueue_marker(self.queue)
        except cl.Error as e:
            raise _translate(e, "enqueueing a marker") from e

    def pinned_host(self, nbytes: int) -> tuple[cl.Buffer, np.ndarray]:
        """A host buffer of ``nbytes`` the device can copy to and from directly
        (``CL_MEM_ALLOC_HOST_PTR``: pinned memory on a discrete GPU), mapped
        once and every page touched: the buffer and its host array, until
        :meth:`release_pinned`.

        Raises:
            OutOfDeviceMemory, DeviceError: it could not be allocated or mapped.
        """
        flags = cl.mem_flags.READ_WRITE | cl.mem_flags.ALLOC_HOST_PTR
        access: Any = cl.map_flags.READ | cl.map_flags.WRITE
        try:
            buf = cl.Buffer(self.context, flags, nbytes)
            array, _ = cl.enqueue_map_buffer(
                self.queue, buf, access, 0, (nbytes,), np.dtype(np.uint8), is_blocking=True
            )
        except cl.Error as e:
            raise _translate(e, "allocating a pinned host buffer", nbytes) from e
        # Fault every page in now: where the driver does not lock them at once
        # (PoCL), the host memory would otherwise be taken at the first
        # eviction, under the very pressure eviction relieves.
        array[::_PAGE] = 0
        return buf, array

    def release_pinned(self, pinned: tuple[cl.Buffer, np.ndarray]) -> None:
        buf, array = pinned
        mapping: Any = array.base
        try:
            mapping.release(self.queue).wait()  # the mapping, then the buffer
            buf.release()
        except (cl.Error, AttributeError) as e:
            log.warning("releasing a pinned host buffer failed: %s", e)

    def download_nowait(self, buf: cl.Buffer, out: np.ndarray, offset: int) -> cl.Event:
        """Enqueue a copy of ``out.nbytes`` bytes of ``buf`` from byte ``offset``
        into ``out`` (pinned host memory) on ``queue``, after the commands
        before it, and return its event without waiting.

        Raises:
            OutOfDeviceMemory, DeviceError: the copy could not be enqueued.
        """
        try:
            return cl.enqueue_copy(self.queue, out, buf, src_offset=offset, is_blocking=False)
        except cl.Error as e:
            raise _translate(e, "reading a buffer", out.nbytes) from e

    def upload_at_nowait(self, buf: cl.Buffer, data: np.ndarray, offset: int) -> cl.Event:
        """Enqueue a copy of ``data`` into ``buf`` at byte ``offset``, a buffer
        nothing else uses yet (on ``transfer_queue``), and return its event
        without waiting: ``data`` must stay valid until it completes.

        Raises:
            OutOfDeviceMemory, DeviceError: the copy could not be enqueued.
        """
        try:
            return cl.enqueue_copy(
                self.transfer_queue,
                buf,
                data,
                dst_offset=offset,
                wait_for=self._after_unmap(buf),
                is_blocking=False,
            )
        except cl.Error as e:
            raise _translate(e, "writing a buffer", data.nbytes) from e

    @staticmethod
    def handle(buf: cl.Buffer) -> int:
        return int(buf.int_ptr)

    @staticmethod
    def is_kernel(obj: object) -> bool:
        return isinstance(obj, cl.Kernel)

    @staticmethod
    def is_event(obj: object) -> bool:
        return isinstance(obj, cl.Event)

    def array(self, buf: cl.Buffer, shape: tuple[int, ...], dtype: np.dtype[Any]) -> cl_array.Array:
        """A ``pyopencl.array.Array`` over ``buf`` on :attr:`queue`."""
        return cl_array.Array(self.queue, shape, dtype, data=buf)

    @staticmethod
    def buffer_of(arg: object) -> tuple[Any, bool] | None:
        if isinstance(arg, cl_array.Array):
            return arg.base_data, bool(arg.offset)
        if isinstance(arg, cl.MemoryObjectHolder):
            return arg, False
        return None

    def finish(self) -> None:
        """Wait for everything queued on the device."""
        try:
            self.queue.finish()
            self.transfer_queue.finish()
        except cl.Error as e:
            raise DeviceError(f"finishing the queue failed: {e}") from e
