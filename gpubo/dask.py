"""gpubo as a Dask worker's device tier (needs ``distributed``: ``gpubo[dask]``).

``device_data(limit)`` is what a worker takes as ``data=``: each worker
builds a :class:`~gpubo.Manager` with a hard device budget of ``limit`` and
its store inside the worker's local directory, and a mapping
(:class:`DeviceData`) that keeps :class:`~gpubo.DeviceArray` values as BOs
in that manager (spilled by gpubo's own eviction, never pickled) and every
other value in Dask's own :class:`distributed.spill.SpillBuffer`, so host
memory behaves as Dask users expect (the memory monitor, ``.fast``,
``evict()``, ``spilled_total``).

Inside a task on such a worker, :func:`manager` is the worker's Manager:
allocate outputs there (``manager().empty(...)``) and an allocation evicts
other keys' idle arrays instead of failing.

Importing this module registers, for :class:`~gpubo.DeviceArray`:

* Dask serialization: a header (shape, dtype) and the bytes as one frame. A
  swapped array is sent straight from its store entry, verified, without a
  restore; the receiver builds the array in its own default manager (on a
  gpubo worker, the worker's).
* ``dask.sizeof``: the Python object's own size only, so device bytes are
  not counted as host memory.

Lifetime: the worker's directory (and the store in it) is removed by Dask
when the worker closes, and by the next worker of the same workspace when a
worker died without closing; the Manager is closed by the worker's
``gpubo`` plugin at close, else when the mapping is collected.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import os
import pickle
import sys
import threading
import weakref
from collections.abc import Iterator, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dask
import distributed
import numpy as np
from dask.sizeof import sizeof
from distributed.protocol.serialize import dask_deserialize, dask_serialize
from distributed.spill import SpillBuffer, SpilledSize

from gpubo._array import DeviceArray, default_manager, free_collected, set_default_manager
from gpubo._bo import State
from gpubo._errors import GpuboError
from gpubo._manager import Manager
from gpubo._units import parse_bytes

__all__ = ["DeviceData", "device_data", "manager", "worker_stats"]

log = logging.getLogger(__name__)

#: Where each worker's store goes, inside its local directory.
STORE_DIRNAME = "gpubo-store"
#: The name of the worker plugin that closes a worker's Manager.
PLUGIN_NAME = "gpubo-device-data"

#: How long a closing worker waits for its running tasks before it closes
#: the Manager (else the Manager closes when the mapping is collected).
CLOSE_WAIT_S = 30.0

_counters_lock = threading.Lock()
#: Frees of collected arrays, off the worker's event loop (a free may wait
#: for a kernel or for an eviction's copy).
_freer = ThreadPoolExecutor(1, thread_name_prefix="gpubo-dask-free")
#: Arrays this process sent to other workers, and how many of them went
#: straight from the store (swapped, not restored to be sent).
_sent = {"arrays": 0, "from_store": 0}


def device_data(device_memory_limit: int | str, **manager_kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """The ``data=`` of a ``distributed.Worker``, ``Nanny`` or ``LocalCluster``:
    every worker gets a :class:`DeviceData` whose Manager has a hard budget of
    ``device_memory_limit`` (bytes or ``"4GiB"``) and its store inside the
    worker's local directory. ``manager_kwargs`` go to the Manager
    (``store_size``, ``store_backend``, ``checksums``, ``device``...; not
    ``budget`` or ``store``). ``host_target=`` (bytes) sets the host
    SpillBuffer's target; by default it is the worker's ``memory_limit`` times
    ``distributed.worker.memory.target``, as for Dask's own SpillBuffer.

    Raises:
        TypeError, ValueError: a bad limit, or ``budget``/``store`` given.
    """
    limit = parse_bytes(device_memory_limit, "device_memory_limit")
    if limit <= 0:
        raise ValueError(f"device_memory_limit must be positive, got {device_memory_limit!r}")
    for name in ("budget", "store"):
        if name in manager_kwargs:
            raise ValueError(f"device_data sets {name} itself; got {name}={manager_kwargs[name]!r}")
    # Refused here, at the call, rather than later in every worker:
    kwargs = dict(manager_kwargs)
    host_target = kwargs.pop("host_target", None)
    if host_target is not None:
        manager_kwargs["host_target"] = parse_bytes(host_target, "host_target")
    try:
        inspect.signature(Manager).bind(limit, **kwargs)
    except TypeError as e:
        raise TypeError(f"device_data: {e} (the keyword arguments go to gpubo.Manager)") from None
    for name in ("store_size", "bounce_size"):
        if name in kwargs:
            parse_bytes(kwargs[name], name)
    return (DeviceData, {"device_memory_limit": limit, **manager_kwargs})


class DeviceData(MutableMapping[Any, Any]):
    """A worker's data: DeviceArrays in a gpubo Manager, the rest in a
    ``SpillBuffer`` (see the module docstring). Built by the worker from
    :func:`device_data`; not thread-safe beyond what the worker needs (the
    worker changes its data from its event loop only)."""

    def __init__(
        self,
        worker_local_directory: str,
        device_memory_limit: int,
        host_target: int | None = None,
        **manager_kwargs: Any,
    ) -> None:
        self.local_directory = worker_local_directory
        store = os.path.join(worker_local_directory, STORE_DIRNAME)
        self.manager = Manager(budget=device_memory_limit, store=store, **manager_kwargs)
        self._close = weakref.finalize(self, self.manager.close)
        max_spill = dask.config.get("distributed.worker.memory.max-spill")
        self.host = SpillBuffer(
            os.path.join(worker_local_directory, "storage"),
            target=sys.maxsize if host_target is None else host_target,
            max_spill=False if max_spill is False else dask.utils.parse_bytes(max_spill),
        )
        self._host_target_set = host_target is not None
        self.device: dict[Any, DeviceArray] = {}
        set_default_manager(self.manager)  # unpickled and received arrays land here
        self._worker: Any = None
        log.info("gpubo device tier in %s: %s", worker_local_directory, self.manager)

    # -- the worker it belongs to (found once it has registered itself) ----------

    def attach(self) -> None:
        """Find the worker this mapping belongs to (it registers itself only
        after building its data): set the host target from its memory limit
        and add the plugin that closes the Manager with it."""
        if self._worker is not None:
            return
        for w in list(distributed.Worker._instances):
            if getattr(w, "local_directory", None) == self.local_directory:
                self._worker = w
                break
        else:
            return
        if not self._host_target_set:
            mm = self._worker.memory_manager
            # As the worker does for its own SpillBuffer.
            if mm.memory_limit and mm.memory_target_fraction:
                self.host.n = int(mm.memory_limit * mm.memory_target_fraction)
            self._host_target_set = True
        self._worker.plugins.setdefault(PLUGIN_NAME, _ClosePlugin(self))

    # -- MutableMapping -----------------------------------------------------------

    def __setitem__(self, key: Any, value: Any) -> None:
        self.attach()
        if isinstance(value, DeviceArray):
            if value.manager is not self.manager:
                # From another worker of this process (in-process clusters
                # hand values over by reference) or a Manager of the task's
                # own: a copy, under this worker's budget.
                value = self.manager.asarray(value)
            if key in self.host:
                del self.host[key]
            self.device[key] = value
        else:
            self.device.pop(key, None)
            self.host[key] = value
        _free_later()  # what a replaced or earlier dropped array held

    def __getitem__(self, key: Any) -> Any:
        if key in self.device:
            return self.device[key]
        return self.host[key]

    def __delitem__(self, key: Any) -> None:
        if key in self.device:
            # The array frees its BO once nothing references it (another key
            # may hold the same array: then it stays).
            del self.device[key]
        else:
            del self.host[key]
        _free_later()

    def __contains__(self, key: object) -> bool:
        return key in self.device or key in self.host

    def __iter__(self) -> Iterator[Any]:
        yield from self.device
        yield from self.host

    def __len__(self) -> int:
        return len(self.device) + len(self.host)

    # -- what Dask's memory manager and metrics use ---------------------------------

    @property
    def fast(self) -> Any:
        """Host values in memory (what the memory monitor may spill)."""
        return self.host.fast

    def evict(self) -> int:
        """Spill the oldest host value to disk (the memory monitor's call)."""
        return self.host.evict()

    @property
    def spilled_total(self) -> SpilledSize:
        """What is spilled to disk: the host SpillBuffer's, plus this worker's
        arrays that gpubo has swapped out to its store. ``memory`` is, as
        Dask means it, the ``sizeof`` of the spilled values (for an array,
        the Python object only, as Dask counted it), ``disk`` their bytes."""
        swapped = [a for a in self.device.values() if a.bo.state is State.SWAPPED]
        in_store = SpilledSize(sum(_sizeof(a) for a in swapped), self.manager.stats().swapped_bytes)
        return self.host.spilled_total + in_store

    @property
    def slow(self) -> Any:
        """Host values spilled to disk (Dask's metrics read it)."""
        return self.host.slow

    @property
    def cumulative_metrics(self) -> Any:
        return self.host.cumulative_metrics

    def close(self) -> None:
        """Close the Manager (its BOs are freed; the store goes with the
        worker's directory). Idempotent."""
        self.device.clear()
        self._close()


def _free_later() -> None:
    _freer.submit(free_collected)


class _ClosePlugin(distributed.WorkerPlugin):
    """Closes a worker's Manager when the worker closes."""

    def __init__(self, data: DeviceData) -> None:
        self._data = weakref.ref(data)

    async def teardown(self, worker: Any) -> None:
        # The worker removes its plugins before it stops its executors:
        # let the tasks still running finish with the Manager first.
        deadline = asyncio.get_running_loop().time() + CLOSE_WAIT_S
        while worker.state.executing and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        data = self._data()
        if data is None:
            return
        if worker.state.executing:
            log.warning("tasks still running after %.0f s: the Manager closes later", CLOSE_WAIT_S)
            return  # the mapping's finalizer closes it
        data.close()


# -- inside tasks ---------------------------------------------------------------------


def manager() -> Manager:
    """The Manager of the worker running the current task.

    Raises:
        GpuboError: not inside a task on a worker started with
            :func:`device_data`.
    """
    try:
        worker = distributed.get_worker()
    except ValueError:
        raise GpuboError("gpubo.dask.manager() is for tasks running on a Dask worker") from None
    data = worker.data
    if not isinstance(data, DeviceData):
        raise GpuboError(
            f"worker {worker.address} was not started with data=gpubo.dask.device_data(...); "
            f"its data is a {type(data).__name__}"
        )
    data.attach()
    return data.manager


def worker_stats(dask_worker: Any = None) -> dict[str, Any]:
    """For ``client.run(gpubo.dask.worker_stats)``: this worker's gpubo
    stats, its ``spilled_total`` and its keys on the device and on the host.
    Works on a worker without gpubo too (``gpubo`` is then None)."""
    worker = dask_worker if dask_worker is not None else distributed.get_worker()
    data = worker.data
    spilled = getattr(data, "spilled_total", None)
    with _counters_lock:
        sent = dict(_sent)
    out: dict[str, Any] = {
        "pid": os.getpid(),
        "spilled_total": None if spilled is None else {"memory": spilled.memory, "disk": spilled.disk},
        "sent": sent,
        "gpubo": None,
    }
    if isinstance(data, DeviceData):
        out["gpubo"] = data.manager.stats().__dict__
        out["device_keys"] = len(data.device)
        out["host_keys"] = len(data.host)
        out["store_dir"] = os.path.join(data.local_directory, STORE_DIRNAME)
    return out


# -- serialization and sizeof ----------------------------------------------------------


def _serialize(a: DeviceArray) -> tuple[dict[str, Any], list[Any]]:
    from_store = a.bo.state is State.SWAPPED
    values = a.get(restore=False)  # verified; a swapped one stays swapped
    with _counters_lock:
        _sent["arrays"] += 1
        _sent["from_store"] += from_store
    # The dtype pickled: its str form drops a structured dtype's fields
    # (Dask already unpickles the header's type the same way).
    header = {"shape": list(a.shape), "dtype": pickle.dumps(a.dtype)}
    return header, [values.reshape(-1).view(np.uint8).data]


def _deserialize(header: dict[str, Any], frames: list[Any]) -> DeviceArray:
    shape = tuple(header["shape"])
    dtype = pickle.loads(header["dtype"])
    if not isinstance(dtype, np.dtype):
        raise TypeError(f"a DeviceArray header's dtype is a {type(dtype).__name__}")
    raw = b"".join(bytes(f) for f in frames) if len(frames) != 1 else frames[0]
    values = np.frombuffer(raw, np.uint8, count=math.prod(shape) * dtype.itemsize).view(dtype)
    mgr: Manager = default_manager()
    return mgr.asarray(values.reshape(shape))


def _sizeof(a: DeviceArray) -> int:
    return object.__sizeof__(a)


dask_serialize.register(DeviceArray)(_serialize)  # type: ignore[no-untyped-call]
dask_deserialize.register(DeviceArray)(_deserialize)  # type: ignore[no-untyped-call]
sizeof.register(DeviceArray)(_sizeof)  # type: ignore[no-untyped-call]
