"""gpubo: budgeted GPU buffer objects that spill straight into a swap-slot store.

The public API is what this module exports; everything else is private.
"""

from gpubo._array import DeviceArray, default_manager, readonly, set_default_manager
from gpubo._bo import BufferObject, ReadOnly, State
from gpubo._errors import (
    BufferBusy,
    BufferFreed,
    DeviceError,
    GpuboError,
    IntegrityError,
    ManagerClosed,
    NameNotFound,
    OutOfDeviceMemory,
    Purged,
    ShareError,
    StoreError,
    StoreFull,
)
from gpubo._groups import Group, GroupStats
from gpubo._manager import BATCH_BYTES, BATCH_MAX_BO_BYTES, Manager, Stats
from gpubo._share import ShareMemberStats
from gpubo._units import format_bytes, parse_bytes

__version__ = "0.1.0"

__all__ = [
    "BATCH_BYTES",
    "BATCH_MAX_BO_BYTES",
    "BufferBusy",
    "BufferFreed",
    "BufferObject",
    "DeviceArray",
    "DeviceError",
    "GpuboError",
    "Group",
    "GroupStats",
    "IntegrityError",
    "Manager",
    "ManagerClosed",
    "NameNotFound",
    "OutOfDeviceMemory",
    "Purged",
    "ReadOnly",
    "ShareError",
    "ShareMemberStats",
    "State",
    "Stats",
    "StoreError",
    "StoreFull",
    "__version__",
    "default_manager",
    "format_bytes",
    "parse_bytes",
    "readonly",
    "set_default_manager",
]
