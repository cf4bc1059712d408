"""Every byte copy: between a device buffer and the store, between a
device buffer and host memory (``BufferObject.read``/``write``), and zero
fills. Callers hold the BO's lock (see :mod:`gpubo._move`); nothing here
takes a lock or changes bookkeeping.

Both directions copy exactly once: eviction maps the device buffer and the
store copies from that mapping into its memory-mapped storage; restore
copies from zero-copy views of the store's storage into the device buffer
(one copy command per stored chunk, each chunk hashed while the device
copies it, so verification costs no time of its own where the copy runs on
another core), or, for an entry with zero pages (or one the store does not
lend: the slot file reads its largest entries with ``preadv``), maps the
device buffer for writing (its old content discarded) and the store copies
into it, verifying as it goes (with host checksums; device
checksums are verified after the last copy, below). No host array the size
of the buffer is ever allocated here.

Checksums are computed on the host by the store as it copies (``host``), or
on the device (``device``): a kernel hashes the BO's pages where they are,
before an eviction copies them and again after a restore's last copy, so
the check covers the whole way back onto the device and the CPU never reads
the bytes to hash them. BOs smaller than :data:`DEVICE_CHECKSUM_MIN_BYTES`
are hashed on the host either way: their bytes cross in batches, and a
kernel launch per BO costs more than hashing them.

Small buffers are evicted in batches (``swap_out_batch``): the device first
gathers them into one staging buffer, and that one buffer crosses to the
host and into the store, so the fixed cost of a transfer (a map, an unmap,
a store transaction) is paid once per batch instead of once per buffer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from gpubo._errors import DeviceError, GpuboError, IntegrityError
from gpubo.backends.base import Backend
from gpubo.store.base import CHUNK_BYTES, PAGE_BYTES, Entry, SwapStore, ViewChunks
from gpubo.store.entry import PAGE_DIGESTS

log = logging.getLogger(__name__)

#: BOs at least this big get device checksums when those are on.
DEVICE_CHECKSUM_MIN_BYTES = CHUNK_BYTES

__all__ = [
    "CHECKSUMS",
    "DEVICE_CHECKSUM_MIN_BYTES",
    "OVERLAP_MIN_BYTES",
    "TRANSFERS",
    "BounceTransfer",
    "MapTransfer",
    "check_checksums",
    "make_transfer",
    "read_bytes",
    "replace_bytes",
    "swap_in_batch",
    "swap_out",
    "swap_out_batch",
    "upload_lent",
    "write_bytes",
    "zero_fill",
]


def read_bytes(backend: Backend, buf: Any, dest: np.ndarray, offset: int) -> None:
    """Copy ``dest.nbytes`` bytes of ``buf`` from byte ``offset`` into ``dest``."""
    if dest.nbytes:
        backend.download(buf, dest, offset)


def write_bytes(backend: Backend, buf: Any, src: np.ndarray, offset: int) -> None:
    """Copy ``src`` into ``buf`` at byte ``offset`` (a resident BO's buffer,
    ordered after its kernels on the queue)."""
    if src.nbytes:
        backend.upload(buf, src, offset)


def replace_bytes(backend: Backend, buf: Any, src: np.ndarray) -> None:
    """Fill ``buf``, a buffer nothing else uses yet, with ``src`` (a BO's
    whole new content: its old bytes are never read back)."""
    backend.upload(buf, src, 0, fresh=True)


def zero_fill(backend: Backend, buf: Any, nbytes: int) -> None:
    """Zero the first ``nbytes`` of ``buf`` (a fresh or reused buffer)."""
    backend.zero(buf, nbytes)


def swap_out(backend: Backend, store: SwapStore, buf: Any, nbytes: int) -> Entry:
    """Copy ``nbytes`` of ``buf`` into a new committed store entry.

    Raises:
        StoreFull: the store has no room; nothing was written.
        StoreError, DeviceError, OutOfDeviceMemory: the copy failed; nothing
            was committed.
    """
    with backend.map_read(buf, nbytes) as view:
        return store.write(view)


def swap_out_batch(
    backend: Backend,
    store: SwapStore,
    staging: Any,
    parts: Sequence[tuple[Any, int]],
    layout: Sequence[tuple[int, int]],
) -> list[Entry]:
    """Copy each ``(buf, nbytes)`` of ``parts`` into one new entry each, via
    ``staging`` (a device buffer of whole pages holding ``layout``: entry ``i`` at
    ``layout[i] == (offset, nbytes)``). All or nothing, as
    :meth:`SwapStore.write_batch`.

    Raises:
        StoreFull: the store has no room for the whole batch; nothing was written.
        StoreError, DeviceError, OutOfDeviceMemory: a copy failed; nothing
            was committed.
    """
    backend.gather(staging, [(buf, n, off) for (buf, n), (off, _) in zip(parts, layout, strict=True)])
    end = max(off + n for off, n in layout)
    with backend.map_read(staging, -(-end // PAGE_BYTES) * PAGE_BYTES) as view:
        return store.write_batch(view, layout)


def swap_in_batch(
    backend: Backend, store: SwapStore, parts: Sequence[tuple[Entry, Any, str]], verify: bool = True
) -> None:
    """Overwrite each ``buf`` of ``parts`` (``(entry, buf, label)``) with its
    entry's verified bytes (``verify=False``: entries with
    :data:`~gpubo.store.entry.PAGE_DIGESTS` are left for the caller to
    verify on the device). Every entry the store can lend (no zero page) is
    copied straight from the store (:func:`upload_lent`); the others are
    copied into a mapping of their buffer, verified chunk by chunk.

    Raises:
        IntegrityError: stored bytes fail verification; the buffers'
            content is undefined.
        StoreError, DeviceError, OutOfDeviceMemory: a copy failed; the
            buffers' content is undefined.
    """
    done = upload_lent(backend, store, parts, verify, None)
    for (entry, buf, label), copied in zip(parts, done, strict=True):
        if not copied:
            with backend.map_write(buf, entry.nbytes) as view:
                store.read_into(entry, view, label, verify=verify)


#: Lent chunks at least this big are hashed while the device copies them;
#: smaller ones are hashed first (a copy left in flight and waited for costs
#: more, on PoCL, than a blocking one: see BENCHMARKS.md).
OVERLAP_MIN_BYTES = 256 << 10


def upload_lent(
    backend: Backend,
    store: SwapStore,
    parts: Sequence[tuple[Entry, Any, str]],
    verify: bool,
    max_chunks: int | None,
) -> list[bool]:
    """Copy every entry of ``parts`` that the store lends
    (:meth:`SwapStore.lent_chunks`, at most ``max_chunks`` chunks) into its
    buffer, one copy command per stored run, all waited for together (each
    blocking copy would pay a round trip to the device). A chunk of at least
    :data:`OVERLAP_MIN_BYTES` is verified right after its copy is enqueued,
    so the host hashes it while the device copies it; a smaller one is
    verified before, and a last copy that small blocks (the queue is in
    order: the others are done by then). Returns, per part, whether it was
    copied.

    Raises:
        IntegrityError: a chunk fails verification; every copy enqueued was
            waited for, and the buffers' content is undefined.
        StoreError, DeviceError, OutOfDeviceMemory: as :func:`swap_in_batch`.
    """
    entries = [e for e, _, _ in parts]
    with store.lent_chunks(entries, [label for _, _, label in parts], max_chunks=max_chunks) as lent:
        copies = [
            (entry, buf, label, index, segments)
            for (entry, buf, label), chunks in zip(parts, lent, strict=True)
            if chunks is not None
            for index, segments in enumerate(chunks)
        ]
        events: list[Any] = []
        try:
            for k, (entry, buf, label, index, segments) in enumerate(copies):
                small = sum(seg.nbytes for seg in segments) < OVERLAP_MIN_BYTES
                if small:
                    store.check_lent(entry, index, segments, label, verify=verify)
                offset = index * CHUNK_BYTES
                for j, segment in enumerate(segments):
                    data = np.frombuffer(segment, np.uint8)
                    if small and k == len(copies) - 1 and j == len(segments) - 1:
                        backend.upload(buf, data, offset, fresh=True)
                    else:
                        events.append(backend.upload_at_nowait(buf, data, offset))
                    offset += segment.nbytes
                if not small:
                    store.check_lent(entry, index, segments, label, verify=verify)
        except BaseException:
            with contextlib.suppress(GpuboError):
                backend.wait_copies(events)  # the views must outlive every copy from them
            raise
        backend.wait_copies(events)  # a failed copy shows here
        return [chunks is not None for chunks in lent]


# -- transfer strategies --------------------------------------------------------------
#
# A strategy moves one BO between a device buffer and the store. ``map``
# (the functions above) maps the device buffer: zero-copy where the device's
# memory is the host's. ``bounce`` never maps a device buffer: on a discrete
# GPU a map is a hidden host staging copy the size of the buffer. It streams
# the bytes through a few pinned host buffers allocated once, each copy of
# the next range in flight while the store takes the current one. Both keep
# the batch paths (a staging buffer of at most 2 MiB, and lent store views
# copied straight to the device) for small BOs.


class MapTransfer:
    """The ``map`` strategy; ``checksums`` says where they are computed:
    ``"off"`` (the store keeps none), ``"host"`` or ``"device"``."""

    name = "map"

    def __init__(self, backend: Backend, store: SwapStore, checksums: str = "host") -> None:
        self.backend = backend
        self.store = store
        self.checksums = checksums
        self.on_device = checksums == "device"

    def swap_out(self, buf: Any, nbytes: int) -> Entry:
        if not self._digests_for(nbytes):
            return swap_out(self.backend, self.store, buf, nbytes)
        zero, digests = self.backend.chunk_digests(buf, nbytes)
        if zero is not None and zero.all():
            return self.store.write_zeros(nbytes)
        with self.backend.map_read(buf, nbytes) as view:
            return self.store.write_chunks(ViewChunks(view, nbytes), zero, list(map(int, digests)))

    def swap_in(self, entry: Entry, buf: Any, label: str) -> None:
        self.swap_in_batch([(entry, buf, label)])

    def swap_in_batch(self, parts: Sequence[tuple[Entry, Any, str]]) -> None:
        """Copy each entry into its buffer (:func:`swap_in_batch`), then,
        with device checksums, verify on the device what the store did not."""
        self._copy_in(parts, verify=not self.on_device)
        self._check_on_device(parts)

    def _copy_in(self, parts: Sequence[tuple[Entry, Any, str]], verify: bool) -> None:
        swap_in_batch(self.backend, self.store, parts, verify)

    def _digests_for(self, nbytes: int) -> bool:
        """Whether an eviction of ``nbytes`` computes its checksums on the device."""
        return self.on_device and self.store.checksums and nbytes >= DEVICE_CHECKSUM_MIN_BYTES

    def _check_on_device(self, parts: Sequence[tuple[Entry, Any, str]]) -> None:
        """With device checksums: hash each restored buffer whose entry has
        :data:`~gpubo.store.entry.PAGE_DIGESTS` on the device and compare.

        Raises:
            IntegrityError: a chunk differs (``offset`` names its first byte);
                the buffer must not be handed out.
            DeviceError, OutOfDeviceMemory: the kernel failed.
        """
        if not self.on_device:
            return
        for entry, buf, label in parts:
            if entry.checksums is None or entry.hashing != PAGE_DIGESTS:
                continue
            _, got = self.backend.chunk_digests(buf, entry.nbytes, fresh=True)
            for index, want in enumerate(entry.checksums):
                if want is not None and int(got[index]) != want:
                    offset = index * CHUNK_BYTES
                    raise IntegrityError(
                        f"{label}: checksum mismatch on the device at byte {offset} (chunk {index}): "
                        "the bytes restored are not those evicted",
                        bo=label,
                        offset=offset,
                    )

    def swap_out_batch(
        self, staging: Any, parts: Sequence[tuple[Any, int]], layout: Sequence[tuple[int, int]]
    ) -> list[Entry]:
        return swap_out_batch(self.backend, self.store, staging, parts, layout)

    def close(self) -> None:
        pass


class BounceTransfer(MapTransfer):
    """The ``bounce`` strategy: ``count`` pinned host buffers of ``size``
    bytes each (whole chunks), allocated here, once.

    Notes:
        One stream uses the buffers at a time (``_lock``, a leaf lock taken
        under a BO's lock); a stream waits for every copy it enqueued before
        it returns or raises, so no copy outlives the call that made it.

    Raises (constructor):
        ValueError: fewer than 2 buffers, or a size that is not a positive
            multiple of the store's chunk (1 MiB).
        OutOfDeviceMemory, DeviceError: the buffers could not be allocated.
    """

    name = "bounce"

    def __init__(
        self, backend: Backend, store: SwapStore, count: int, size: int, checksums: str = "host"
    ) -> None:
        super().__init__(backend, store, checksums)
        if count < 2:
            raise ValueError(f"bounce buffers: at least 2 are needed to overlap copies, got {count}")
        if size <= 0 or size % CHUNK_BYTES:
            raise ValueError(f"bounce buffer size must be a positive multiple of 1 MiB, got {size}")
        self.count = count
        self.size = size
        self._lock = threading.Lock()
        self._pinned: list[tuple[Any, np.ndarray]] = []
        try:
            for _ in range(count):
                self._pinned.append(backend.pinned_host(size))
        except BaseException:
            self.close()
            raise

    @property
    def host_bytes(self) -> int:
        """Host memory the bounce buffers hold (all of it, from the start)."""
        return self.count * self.size

    def swap_out(self, buf: Any, nbytes: int) -> Entry:
        # Zero pages never cross to the host; device checksums find them in
        # the same pass.
        digests: list[int] | None = None
        if self._digests_for(nbytes):
            zero, sums = self.backend.chunk_digests(buf, nbytes)
            digests = list(map(int, sums))
        else:
            zero = self.backend.zero_pages(buf, nbytes)
        if zero is not None and zero.all():
            return self.store.write_zeros(nbytes)
        with self._lock:
            stream = _Downloads(self, buf, nbytes)
            try:
                return self.store.write_chunks(stream, zero, digests)
            finally:
                stream.finish()

    def _copy_in(self, parts: Sequence[tuple[Entry, Any, str]], verify: bool) -> None:
        """Entries the store can lend go straight to the device (no map);
        the others stream through the bounce buffers."""
        done = upload_lent(self.backend, self.store, parts, verify, 1)
        for (entry, buf, label), copied in zip(parts, done, strict=True):
            if not copied:
                with self._lock:
                    stream = _Uploads(self, buf, entry.nbytes)
                    try:
                        self.store.read_chunks(entry, stream, label, verify=verify)
                    except BaseException:
                        stream.abandon()  # the store's error is the one to raise
                        raise
                    stream.finish()

    def close(self) -> None:
        pinned, self._pinned = self._pinned, []
        for p in pinned:
            self.backend.release_pinned(p)


class _Stream:
    """Ranges of ``size`` bytes of one device buffer, each in bounce buffer
    ``range % count``; the store's chunks are served from inside them."""

    def __init__(self, bounce: BounceTransfer, buf: Any, nbytes: int) -> None:
        self.bounce = bounce
        self.buf = buf
        self.nbytes = nbytes
        self.per = bounce.size // CHUNK_BYTES  # chunks per range
        self.ranges = -(-nbytes // bounce.size)
        self.events: dict[int, Any] = {}  # range -> its copy in flight

    def _range_bytes(self, r: int) -> int:
        return min(self.bounce.size, self.nbytes - r * self.bounce.size)

    def _array(self, r: int) -> np.ndarray:
        return self.bounce._pinned[r % self.bounce.count][1]

    def _view(self, index: int) -> memoryview:
        r, k = divmod(index, self.per)
        start = k * CHUNK_BYTES
        end = min(start + CHUNK_BYTES, self._range_bytes(r))
        return memoryview(self._array(r).data)[start:end]

    def abandon(self) -> None:
        """Wait for every copy still in flight, after a failure (their own
        errors are not the one to report)."""
        events, self.events = list(self.events.values()), {}
        with contextlib.suppress(GpuboError):
            self.bounce.backend.wait_copies(events)

    def finish(self) -> None:
        """Wait for every copy still in flight (a failed one raised where it was used)."""
        self.abandon()


class _Downloads(_Stream):
    """:class:`Chunks` of a device buffer for the store to write: range r+1
    (and on, one per free buffer) is copying while the store takes range r."""

    def __init__(self, bounce: BounceTransfer, buf: Any, nbytes: int) -> None:
        super().__init__(bounce, buf, nbytes)
        self.current = -1

    def chunk(self, index: int) -> memoryview:
        r = index // self.per
        if r < self.current:  # the store starts again (a retried write)
            self.finish()
        for old in [q for q in self.events if q < r]:
            self.bounce.backend.wait_copies([self.events.pop(old)])
        self.current = r
        for q in range(r, min(r + self.bounce.count, self.ranges)):
            if q not in self.events:
                out = self._array(q)[: self._range_bytes(q)]
                self.events[q] = self.bounce.backend.download_nowait(self.buf, out, q * self.bounce.size)
        self.bounce.backend.wait_copies([self.events[r]])
        return self._view(index)

    def filled(self, index: int) -> None:
        pass


class _Uploads(_Stream):
    """:class:`Chunks` of a device buffer for the store to fill: once a
    range is filled and verified its upload is enqueued, and the store goes
    on filling the next buffer meanwhile."""

    def chunk(self, index: int) -> memoryview:
        r = index // self.per
        reuse = r - self.bounce.count  # the range that used this buffer before
        if reuse in self.events:
            self.bounce.backend.wait_copies([self.events.pop(reuse)])
        return self._view(index)

    def filled(self, index: int) -> None:
        r, k = divmod(index, self.per)
        last_of_range = k == self.per - 1 or (index + 1) * CHUNK_BYTES >= self.nbytes
        if last_of_range:
            data = self._array(r)[: self._range_bytes(r)]
            self.events[r] = self.bounce.backend.upload_at_nowait(self.buf, data, r * self.bounce.size)

    def finish(self) -> None:
        events, self.events = list(self.events.values()), {}
        self.bounce.backend.wait_copies(events)  # a failed upload shows here


#: The strategies by name; ``auto`` picks ``map`` where the device's memory is
#: the host's and ``bounce`` elsewhere.
TRANSFERS = ("auto", "map", "bounce")
#: Where checksums are computed, as ``Manager(checksums=...)`` takes it:
#: ``True`` picks ``device`` for ``bounce`` and ``host`` for ``map``.
CHECKSUMS = (True, False, "host", "device")


def check_checksums(value: object) -> bool | str:
    """``value`` if it is one of :data:`CHECKSUMS`.

    Raises:
        TypeError: not a bool or a str.
        ValueError: another string.
    """
    if isinstance(value, bool):
        return value
    if not isinstance(value, str):
        raise TypeError(f"checksums must be a bool, 'host' or 'device', got {type(value).__name__}")
    if value not in ("host", "device"):
        raise ValueError(f"checksums must be True, False, 'host' or 'device', got {value!r}")
    return value


def make_transfer(
    choice: object,
    backend: Backend,
    store: SwapStore,
    count: int,
    size: int,
    checksums: bool | str = True,
) -> MapTransfer:
    """The strategy ``choice`` (None: ``$GPUBO_TRANSFER``, else ``auto``),
    computing checksums where ``checksums`` says (see :data:`CHECKSUMS`;
    none at all when the store keeps none).

    Raises:
        TypeError, ValueError: an unknown strategy or bad bounce buffers.
        DeviceError: ``checksums="device"`` where the checksum kernel does
            not build (``True`` falls back to the host, with a warning).
        OutOfDeviceMemory, DeviceError: the bounce buffers could not be allocated.
    """
    if choice is None:
        choice = os.environ.get("GPUBO_TRANSFER") or "auto"
    if not isinstance(choice, str):
        raise TypeError(f"transfer must be a str, got {type(choice).__name__}")
    if choice not in TRANSFERS:
        raise ValueError(f"transfer must be one of {', '.join(TRANSFERS)}, got {choice!r}")
    if choice == "auto":
        choice = "map" if backend.host_unified_memory else "bounce"
    where = _checksums_where(checksums, choice, backend, store)
    if choice == "map":
        return MapTransfer(backend, store, where)
    return BounceTransfer(backend, store, count, size, where)


def _checksums_where(checksums: bool | str, strategy: str, backend: Backend, store: SwapStore) -> str:
    if not store.checksums:
        return "off"
    # False with a store that keeps checksums (one the caller opened): its own setting.
    if checksums is False or checksums == "host" or (checksums is True and strategy == "map"):
        return "host"
    why = backend.digests_available()
    if why is None:
        return "device"
    if checksums == "device":
        raise DeviceError(f"checksums='device' is not possible on {backend.name}: {why}")
    log.warning("checksums on the host: %s", why)
    return "host"
