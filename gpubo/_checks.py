"""Argument checks at the edge: every public call validates here, before
anything changes, and raises a TypeError or ValueError naming the argument.
(Pure functions; nothing here holds state.)"""

from __future__ import annotations

import os
from typing import Any, Protocol, TypeGuard

import numpy as np
import numpy.typing as npt

from gpubo._errors import OutOfDeviceMemory
from gpubo._lru import NUM_PRIORITIES
from gpubo._units import format_bytes

__all__ = [
    "as_byte_array",
    "as_out_array",
    "check_alloc_size",
    "check_dtype",
    "check_int",
    "check_name",
    "check_priority",
    "check_shape",
    "check_work_size",
    "from_environment",
    "is_int",
]


def from_environment(budget: Any, store: Any, device: Any) -> tuple[Any, Any, Any]:
    """Fill what the caller left None from GPUBO_BUDGET, GPUBO_STORE and
    GPUBO_DEVICE (the constructor's arguments win)."""
    if budget is None:
        budget = os.environ.get("GPUBO_BUDGET") or "256MiB"
    if store is False:  # explicitly private, whatever the environment says
        store = None
    elif store is None:
        store = os.environ.get("GPUBO_STORE") or None
    if device is None:
        device = os.environ.get("GPUBO_DEVICE") or None
    return budget, store, device


#: LMDB's largest key: a BO's name is its record's key in the store.
_MAX_NAME_BYTES = 511


def check_name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"name must be a str or None, got {type(name).__name__}")
    try:
        size = len(name.encode())
    except UnicodeEncodeError as e:
        raise ValueError(f"name must be encodable as UTF-8: {e}") from None
    if not 0 < size <= _MAX_NAME_BYTES:
        raise ValueError(f"name must be 1 to {_MAX_NAME_BYTES} bytes of UTF-8, got {size}")
    return name


def is_int(value: object) -> TypeGuard[int | np.integer[Any]]:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_int(value: object, name: str, minimum: int) -> int:
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_shape(
    shape: object, name: str, minimum: int = 0, small: type[Exception] = ValueError
) -> tuple[int, ...]:
    """``shape`` (an int or a sequence of ints, each >= ``minimum``, else
    ``small`` is raised) as a tuple of Python ints."""
    if is_int(shape):
        dims: tuple[object, ...] = (shape,)
    elif isinstance(shape, (tuple, list)):
        dims = tuple(shape)
    else:
        raise TypeError(f"{name} must be an int or a tuple of ints, got {shape!r}")
    if not all(is_int(d) for d in dims):
        raise TypeError(f"{name} must be an int or a tuple of ints, got {shape!r}")
    out = tuple(int(d) for d in dims)  # type: ignore[call-overload]
    if any(d < minimum for d in out):
        raise small(f"{name}: every dimension must be >= {minimum}, got {shape!r}")
    return out


def check_work_size(size: object, name: str) -> tuple[int, ...]:
    """A launch's global or local size: 1 to 3 positive ints (a bare int is 1-D)."""
    dims = check_shape(size, name, minimum=1)
    if not 1 <= len(dims) <= 3:
        raise ValueError(f"{name} must have 1 to 3 dimensions, got {size!r}")
    if any(d >= 1 << 63 for d in dims):
        raise ValueError(f"{name}: a dimension does not fit the device's size_t, got {size!r}")
    return dims


def check_dtype(dtype: npt.DTypeLike) -> np.dtype[Any]:
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise TypeError(f"dtype: {e}") from None
    if dt.hasobject or dt.itemsize == 0:
        raise TypeError(f"dtype must be a fixed-size numeric dtype, got {dt}")
    return dt


def as_out_array(out: Any) -> np.ndarray:
    """A flat uint8 view of a writable, C-contiguous numpy array."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy array, got {type(out).__name__}")
    if out.dtype.hasobject:
        raise TypeError("out: arrays of Python objects cannot be read into")
    if not out.flags.c_contiguous:
        raise ValueError("out must be C-contiguous")
    if not out.flags.writeable:
        raise ValueError("out must be writable")
    return out.reshape(-1).view(np.uint8)


def as_byte_array(data: Any) -> np.ndarray:
    """A flat uint8 view of ``data`` without copying it."""
    if isinstance(data, np.ndarray):
        if data.dtype.hasobject:
            raise TypeError("data: arrays of Python objects cannot be written")
        if not data.flags.c_contiguous:
            raise ValueError("data must be C-contiguous (use numpy.ascontiguousarray)")
        return data.reshape(-1).view(np.uint8)
    if isinstance(data, str):
        raise TypeError("data must be a numpy array or bytes-like, not str (encode it first)")
    try:
        view = memoryview(data)
    except TypeError:
        raise TypeError(f"data must be a numpy array or bytes-like, got {type(data).__name__}") from None
    if not view.c_contiguous:
        raise ValueError("data must be C-contiguous")
    if view.nbytes == 0:
        return np.empty(0, np.uint8)
    return np.frombuffer(view, np.uint8)


def check_priority(priority: object) -> int:
    value = check_int(priority, "priority", 0)
    if value >= NUM_PRIORITIES:
        raise ValueError(f"priority must be in 0..{NUM_PRIORITIES - 1}, got {value}")
    return value


class _Limited(Protocol):
    name: str
    max_bytes: int | None


def check_alloc_size(nbytes: int, budget: int, max_alloc: int, group: _Limited | None) -> None:
    """Refuse a BO that could never be resident: larger than its group's
    ``max``, the budget or the device's largest allocation (nothing is
    evicted for it).

    Raises:
        OutOfDeviceMemory: it is.
    """
    if group is not None and group.max_bytes is not None and nbytes > group.max_bytes:
        raise OutOfDeviceMemory(
            f"cannot allocate {format_bytes(nbytes)}: larger than group {group.name!r}'s max "
            f"({format_bytes(group.max_bytes)})",
            nbytes=nbytes,
            budget=budget,
        )
    limit = min(budget, max_alloc)
    if nbytes > limit:
        what = "budget" if nbytes > budget else "device's largest allocation"
        raise OutOfDeviceMemory(
            f"cannot allocate {format_bytes(nbytes)}: larger than the {what} ({format_bytes(limit)})",
            nbytes=nbytes,
            budget=budget,
        )
