"""Huge pages for a CPU device's buffers (``gpubo.backends._pages``): the
advice reaches the kernel, read back from ``/proc/self/smaps``, and the
bytes of advised buffers are whole."""

from __future__ import annotations

import ctypes
import mmap
import sys

import numpy as np
import pytest
from conftest import pattern

from gpubo.backends._pages import HUGE_PAGE_BYTES, HUGE_PAGES_MIN_BYTES, advise_huge_pages
from gpubo.backends.opencl import OpenCLBackend

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and smaps are Linux's")

MiB = 1 << 20


def _vm_flags(address: int) -> set[str]:
    """The VmFlags of the mapping of this process that holds ``address``."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {address:#x}")


def _address(buffer: object) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))  # type: ignore[arg-type]


def test_advice_covers_the_whole_huge_pages_inside_the_range_only() -> None:
    region = mmap.mmap(-1, 8 * MiB)
    try:
        base = _address(region)
        first = -(-base // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
        assert not advise_huge_pages(first + 1, HUGE_PAGE_BYTES)  # no whole huge page in it
        assert "hg" not in _vm_flags(first)
        assert advise_huge_pages(base, 8 * MiB)
        assert "hg" in _vm_flags(first)
    finally:
        region.close()


def test_a_large_buffer_of_the_cpu_device_is_advised_and_keeps_its_bytes() -> None:
    backend = OpenCLBackend()
    assert backend.host_unified_memory and backend.huge_pages  # PoCL's CPU device on Linux
    n = HUGE_PAGES_MIN_BYTES + 4097
    for kernel_queue in (False, True):
        buf = backend.allocate(n, kernel_queue=kernel_queue)
        data = pattern(n, 3)
        try:
            got = np.empty(n, np.uint8)
            backend.download(buf, got, 0)
            assert not got.any()  # zeroed, as every allocation
            backend.upload(buf, data, 0)
            with backend.map_read(buf, n) as view:
                address = np.frombuffer(view, np.uint8).ctypes.data
                first = -(-address // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
                assert "hg" in _vm_flags(first)
                assert np.array_equal(np.frombuffer(view, np.uint8), data)
        finally:
            backend.release(buf)
