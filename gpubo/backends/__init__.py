"""Device backends: the seam between gpubo and a compute API.

A backend owns a context and a queue and knows how to allocate, zero, map,
copy and release device buffers and how to wait for events. It translates the
compute API's errors into gpubo errors; nothing above it sees them. OpenCL
(pyopencl) is the one backend today; a CUDA backend would sit beside it with
the same methods.
"""

from gpubo.backends.opencl import OpenCLBackend, describe_platforms, readonly_args

__all__ = ["OpenCLBackend", "describe_platforms", "readonly_args"]
