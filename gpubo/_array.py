"""Managed n-dimensional arrays: a BO plus a shape and a dtype (C order).

:class:`DeviceArray` adds no state of its own to the BO beyond its shape and
dtype: every byte lives in the BO, so it is evicted, restored, prefetched,
pinned and freed exactly like one (``a.bo`` is that BO). A launch takes a
DeviceArray where it takes a BO (:func:`unwrap`), and :func:`readonly`
accepts either.

A DeviceArray pickles by value (its bytes, shape and dtype) and unpickles
into the process's *default manager*: the one named by
:func:`set_default_manager` (``gpubo.dask`` names each worker's), else the
most recently opened Manager that is still open. ``copy.copy`` and
``copy.deepcopy`` copy into the source array's own manager.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import numpy.typing as npt

from gpubo._bo import BufferObject, ReadOnly, State
from gpubo._checks import check_dtype, check_shape
from gpubo._errors import BufferBusy, BufferFreed, GpuboError

__all__ = ["DeviceArray", "default_manager", "readonly", "set_default_manager"]

log = logging.getLogger(__name__)


class DeviceArray:
    """A C-ordered array of ``shape`` and ``dtype`` held in a managed BO.

    Made by :meth:`Manager.asarray`, :meth:`Manager.empty` and
    :meth:`Manager.zeros`. ``a.bo`` is its :class:`BufferObject` (state,
    ``evict``, ``prefetch``, ``pin``...); an array with no elements still
    holds a BO of one byte, since a device buffer cannot be empty. An array
    that is no longer referenced frees its BO, as a numpy array gives its
    memory back: keep the array, not only ``a.bo``, for as long as you use
    the BO.

    Notes:
        Thread-safe as far as its BO is: the shape and dtype never change.
    """

    __slots__ = ("__weakref__", "_finalizer", "bo", "dtype", "shape")

    def __init__(self, bo: BufferObject, shape: tuple[int, ...], dtype: np.dtype[Any]) -> None:
        self.bo = bo
        self.shape = shape
        self.dtype = dtype
        # Like a numpy array, an array nobody references any more gives its
        # memory back. The finalizer only queues its BO: it may run inside
        # the cyclic garbage collector, in any thread, even one that holds a
        # manager's lock, so the BO is freed later, by free_collected()
        # (not at interpreter exit: the manager's close frees what is left).
        self._finalizer = weakref.finalize(self, _collected.append, bo)
        self._finalizer.atexit = False

    # -- what it is -------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        """Bytes of the elements (the BO holds at least one)."""
        return self.size * self.dtype.itemsize

    @property
    def size(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def manager(self) -> Any:
        """The :class:`Manager` whose budget holds it."""
        return self.bo.manager

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d DeviceArray")
        return self.shape[0]

    def __repr__(self) -> str:
        return f"<DeviceArray shape={self.shape} dtype={self.dtype} {self.bo.state.value}>"

    # -- bytes in and out ---------------------------------------------------------

    def get(self, out: np.ndarray | None = None, *, restore: bool = True) -> np.ndarray:
        """The array's values as a new numpy array (or in ``out``, which must
        have the same shape and dtype); restores the BO if it is swapped
        (``restore=False``: a swapped BO's bytes are read, verified, straight
        from its store entry, and it stays swapped).

        Raises:
            TypeError, ValueError: ``out`` is not a numpy array, or its shape
                or dtype differ.
            BufferFreed, Purged, OutOfDeviceMemory, StoreFull, IntegrityError:
                as :meth:`BufferObject.read`.
        """
        if out is None:
            out = np.empty(self.shape, self.dtype)
        else:
            self._check_same(out, "out")
        if self.size:
            self.bo.read(out=out, restore=restore)
        else:
            self._check_alive()
        return out

    def set(self, value: Any) -> None:
        """Overwrite the array with ``value``, a numpy array of the same shape
        and dtype (any memory layout).

        Raises:
            TypeError: ``value`` is not a numpy array.
            ValueError: its shape or dtype differ from the array's.
            BufferFreed, OutOfDeviceMemory, StoreFull, IntegrityError: as
                :meth:`BufferObject.write`.
        """
        self._check_same(value, "value")
        if self.size:
            self.bo.write(np.ascontiguousarray(value))
        else:
            self._check_alive()

    def _check_alive(self) -> None:
        """For arrays with no elements, whose calls touch no byte of the BO."""
        if self.bo.state is State.FREED:
            raise BufferFreed(f"the DeviceArray's buffer object {self.bo.label()} was freed")

    def _check_same(self, value: Any, name: str) -> None:
        if not isinstance(value, np.ndarray):
            raise TypeError(f"{name} must be a numpy array, got {type(value).__name__}")
        if value.shape != self.shape:
            raise ValueError(f"{name} has shape {value.shape}; the DeviceArray has shape {self.shape}")
        if value.dtype != self.dtype:
            raise ValueError(f"{name} has dtype {value.dtype}; the DeviceArray has dtype {self.dtype}")

    @contextmanager
    def view(self, *, readonly: bool = False) -> Iterator[Any]:
        """A ``pyopencl.array.Array`` of the array's shape and dtype on its
        pinned buffer, for the ``with`` block (see :meth:`BufferObject.array`;
        ``readonly=True`` keeps the BO's clean store copy)."""
        with self.bo.array(self.shape, self.dtype, readonly=readonly) as arr:
            yield arr

    def __array__(self, dtype: npt.DTypeLike | None = None, copy: bool | None = None) -> np.ndarray:
        if copy is False:
            raise ValueError("a DeviceArray's values live on the device: numpy must copy them")
        out = self.get()
        return out if dtype is None else out.astype(dtype, copy=False)

    # -- lifetime -------------------------------------------------------------------

    def free(self) -> None:
        """Free the BO now (idempotent; an array that is no longer referenced
        is freed anyway); the array is unusable afterwards."""
        self.bo.free()  # raises (BufferBusy) with the finalizer still armed
        self._finalizer.detach()
        free_collected()

    def __enter__(self) -> DeviceArray:
        return self

    def __exit__(self, *exc: object) -> None:
        self.free()

    # -- copies and pickling ----------------------------------------------------------

    def __copy__(self) -> DeviceArray:
        return new_array(self.bo.manager, self.get())

    def __deepcopy__(self, memo: dict[int, Any]) -> DeviceArray:
        return self.__copy__()

    def __reduce__(self) -> tuple[Any, tuple[np.ndarray]]:
        # By value: numpy's own pickling (out-of-band buffers with protocol 5).
        return (_unpickle, (self.get(),))


#: BOs of collected arrays, to be freed outside any lock (deque appends
#: and pops are atomic).
_collected: collections.deque[BufferObject] = collections.deque()


def free_collected() -> int:
    """Free the BOs of arrays collected since the last call; return how many.
    Called before every new array is made (and by ``gpubo.dask``'s mapping),
    from a thread that holds no gpubo lock."""
    freed = 0
    busy: list[BufferObject] = []
    while True:
        try:
            bo = _collected.popleft()
        except IndexError:
            break
        try:
            bo.free()
            freed += 1
        except BufferBusy:
            busy.append(bo)  # pinned: try again at the next call
        except GpuboError as e:
            log.warning("freeing %s of a collected DeviceArray failed: %s", bo.label(), e)
    _collected.extend(busy)
    return freed


def _unpickle(values: np.ndarray) -> DeviceArray:
    return new_array(default_manager(), values)


def new_array(
    manager: Any,
    values: np.ndarray | None,
    shape: tuple[int, ...] | None = None,
    dtype: np.dtype[Any] | None = None,
    **alloc: Any,
) -> DeviceArray:
    """A DeviceArray in ``manager``: a copy of ``values``, or zero-filled of
    ``shape`` and ``dtype`` (BOs are always zero-filled when allocated)."""
    free_collected()
    if values is not None:
        shape, dtype = values.shape, values.dtype
    assert shape is not None and dtype is not None
    nbytes = math.prod(shape) * dtype.itemsize
    bo = manager.alloc(max(nbytes, 1), **alloc)
    try:
        if values is not None and nbytes:
            bo.write(np.ascontiguousarray(values))
    except BaseException:
        bo.free()
        raise
    return DeviceArray(bo, shape, dtype)


def as_host_array(value: Any) -> np.ndarray:
    """``value`` as a numpy array that can be stored (``Manager.asarray``)."""
    if isinstance(value, DeviceArray):
        return value.get()
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"array: cannot be made a numpy array: {e}") from None
    if arr.dtype.hasobject or arr.dtype.itemsize == 0:
        raise TypeError(f"array: dtype must be a fixed-size numeric dtype, got {arr.dtype}")
    return arr


def check_array_spec(shape: object, dtype: npt.DTypeLike) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """``Manager.empty``'s and ``zeros``' arguments, checked (a shape numpy
    could not make an array of is a ValueError)."""
    dims, dt = check_shape(shape, "shape"), check_dtype(dtype)
    if len(dims) > 64:  # numpy's NPY_MAXDIMS
        raise ValueError(f"shape has {len(dims)} dimensions; numpy allows at most 64")
    if 0 in dims:
        try:
            np.empty(dims, dt)  # no bytes, but numpy still checks the sizes
        except ValueError as e:
            raise ValueError(f"shape {dims}: {e}") from None
    return dims, dt


def unwrap(args: Sequence[Any]) -> Sequence[Any]:
    """Launch arguments with each DeviceArray replaced by its BO."""
    if not any(isinstance(a, DeviceArray) for a in args):
        return args
    return [a.bo if isinstance(a, DeviceArray) else a for a in args]


def readonly(bo: BufferObject | DeviceArray) -> ReadOnly:
    """Mark a kernel argument (a BO or a DeviceArray) as read-only, so
    launching does not dirty it (its clean store copy stays valid and a later
    eviction copies nothing).

    Arguments declared ``const __global`` are found without it (except in a
    program built from binaries, whose qualifiers cannot be read).

    Raises:
        TypeError: ``bo`` is neither a BufferObject nor a DeviceArray.
    """
    if isinstance(bo, DeviceArray):
        return ReadOnly(bo.bo)
    if not isinstance(bo, BufferObject):
        raise TypeError(f"readonly() takes a BufferObject or a DeviceArray, got {type(bo).__name__}")
    return ReadOnly(bo)


# -- the default manager ------------------------------------------------------------

_lock = threading.Lock()
_named: weakref.ref[Any] | None = None
_opened: list[weakref.ref[Any]] = []


def opened(manager: Any) -> None:
    """Called by each new Manager: the latest open one is the default when
    none was named."""
    with _lock:
        _opened[:] = [r for r in _opened if (m := r()) is not None and not m.closed]
        _opened.append(weakref.ref(manager))


def set_default_manager(manager: Any | None) -> None:
    """Name the Manager that unpickled DeviceArrays go to (None: forget it,
    so the most recently opened open Manager is used).

    Raises:
        TypeError: ``manager`` is not a Manager (or None).
    """
    global _named
    if manager is not None and not callable(getattr(manager, "asarray", None)):
        raise TypeError(f"set_default_manager takes a gpubo.Manager or None, got {type(manager).__name__}")
    with _lock:
        _named = None if manager is None else weakref.ref(manager)


def default_manager() -> Any:
    """The Manager unpickled DeviceArrays go to (see the module docstring).

    Raises:
        GpuboError: no Manager is open in this process (or the named one
            was closed).
    """
    with _lock:
        if _named is not None:
            named = _named()
            if named is None or named.closed:
                raise GpuboError("the default manager (gpubo.set_default_manager) was closed")
            return named
        for ref in reversed(_opened):
            m = ref()
            if m is not None and not m.closed:
                return m
    raise GpuboError(
        "no open gpubo.Manager in this process to hold the DeviceArray: open one, "
        "or name it with gpubo.set_default_manager()"
    )
