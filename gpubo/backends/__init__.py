"""Device backends: the seam between gpubo and a compute API.

A backend owns a context and a queue and knows how to allocate, zero, map,
copy and release device buffers and how to wait for events. It translates the
compute API's errors into gpubo errors; nothing above it sees them. The protocol
is :class:`~gpubo.backends.base.Backend`; OpenCL (pyopencl) is the one
backend today, and a CUDA backend would be one more module beside it.
"""

from gpubo.backends.base import Backend
from gpubo.backends.opencl import OpenCLBackend, describe_platforms, readonly_args

__all__ = ["Backend", "OpenCLBackend", "describe_platforms", "readonly_args"]
