"""What every swap-slot store shares: entries, zero pages, checksums,
refcounts, named records, durability, the store directory and its lock.

A store holds *entries*: the bytes of one BO at one moment. An entry is
written once and never changed; it is reference-counted (the BO whose
content it is, a swap-cache copy of a resident BO, a named record each hold
one reference) and its space is given back when the last one goes.

The bytes of an entry are cut into chunks of :data:`CHUNK_BYTES` (1 MiB).
Pages that are all zeros are not stored (a zero map per entry, as in Linux
6.12's swap zeromap); a chunk's *stored bytes* are its non-zero pages in
order, and its xxh3-64 checksum covers them. Checksums are computed right
after each chunk is copied, while it is in cache, and verified on every read.
An entry may instead carry checksums computed elsewhere (on the device,
before its bytes left it: :data:`~gpubo.store.entry.PAGE_DIGESTS`, which
cover the chunk's bytes as the BO holds them); a read verifies those too,
on the host, unless its caller verifies them where the bytes land
(``verify=False``). Each entry records which kind it has, so a store
written with either kind is read with either setting.

Backends decide where stored bytes live (:mod:`gpubo.store.lmdb_store`,
:mod:`gpubo.store.slotfile`); metadata (the format version and the named
records) always lives in an LMDB environment in the store directory.

Directory: ``gpubo.lock`` (an ``flock`` held while the store is open, so a
second opener gets a clear error), ``gpubo.state`` (what the store is and
the generation of its records, kept outside LMDB: see
:mod:`gpubo.store.integrity`), LMDB's ``data.mdb``/``lock.mdb``, and the
backend's own files; all created readable by the owner only.

A store that cannot prove it is whole is never trusted: a missing or
truncated file, or records rolled back, is a StoreError at open (``fsck``
opens it anyway, read-only, and reports why); a damaged record makes the
store read-only, with the good records readable and the damaged ones
raising IntegrityError; and nothing is reclaimed from such a store.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import logging
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence

import lmdb
import numpy as np
import xxhash

from gpubo._errors import IntegrityError, StoreError
from gpubo.store.entry import (
    CHUNK_BYTES,
    FORMAT_KEY,
    FORMAT_VERSION,
    PAGE_BYTES,
    PAGE_DIGESTS,
    XXH3,
    ChunkPlan,
    Chunks,
    Durability,
    Entry,
    FsckReport,
    Hasher,
    KnownDigest,
    ViewChunks,
    batch_zero_flags,
    page_digest,
    plan_chunks,
    scan_zero_pages,
    steps,
)
from gpubo.store.hashing import PARALLEL_HASH_MIN_BYTES, copy_hashing_aside, read_hashing_aside
from gpubo.store.integrity import STATE_NAME, MappedFiles, StoreState, check_store_files, read_state
from gpubo.store.private import PrivateDir
from gpubo.store.records import RecordTable

__all__ = [
    "CHUNK_BYTES",
    "FORMAT_VERSION",
    "LEND_MAX_BYTES",
    "PAGE_BYTES",
    "ChunkPlan",
    "Chunks",
    "Durability",
    "Entry",
    "FsckReport",
    "LentChunks",
    "SwapStore",
    "ViewChunks",
    "hashes_aside",
    "hashes_stream",
    "plan_chunks",
    "read_verified_aside",
    "scan_zero_pages",
    "steps",
    "verify_chunk",
    "zero_fill_plan",
]

log = logging.getLogger(__name__)

_LOCK_NAME = "gpubo.lock"
#: The files a failed open of a new store removes if it made them (not the
#: lock file: removing it could split the next two openers' locks).
_STORE_FILES = frozenset({STATE_NAME, "data.mdb", "lock.mdb", "slots.bin", "slots.bin.tmp"})

#: What :meth:`SwapStore.lent_chunks` lends of one entry: per chunk, its
#: stored bytes as one or more read-only segments, in order.
LentChunks = list[list[memoryview]]


#: Entries at least this big are lent (:meth:`SwapStore.lent_chunks`) only
#: when the host hashes them: the hashing then overlaps the device's copy
#: from the lent view. Without it, :meth:`SwapStore.read_into` (``preadv``
#: or a numpy copy into a mapping of the device buffer) copies faster. On
#: PoCL at 64 MiB (medians of 3 runs): without checksums, reading took 0.94x
#: (LMDB) and 0.84x (slot file) the time of lending; with them, lending took
#: 0.84x and 0.95x the time of reading (``python benchmarks/evict_steps.py
#: --sizes 33554432,67108864 --reps 30 --warmup 3 --lend-max 1099511627776``;
#: BENCHMARKS.md, "Issue 16, fourth round").
LEND_MAX_BYTES = 32 << 20


def verify_chunk(
    entry: Entry,
    index: int,
    hasher: Hasher | KnownDigest,
    label: str,
    filled: memoryview | np.ndarray | None,
) -> None:
    """Check chunk ``index`` of ``entry``: ``hasher`` fed its stored bytes
    (:data:`~gpubo.store.entry.XXH3`), or ``filled``, the chunk as the BO
    holds it (:data:`~gpubo.store.entry.PAGE_DIGESTS`).

    Raises:
        IntegrityError: it fails its checksum.
    """
    if entry.checksums is None:
        return
    want = entry.checksums[index]
    if entry.hashing == XXH3:
        got = hasher.digest()
    elif want is None:
        return
    else:
        assert filled is not None
        got = page_digest(filled)
    if got != want:
        offset = index * CHUNK_BYTES
        raise IntegrityError(
            f"{label}: checksum mismatch in the store at byte {offset} (chunk {index})",
            bo=label,
            offset=offset,
        )


def zero_fill_plan(plan: ChunkPlan, out: np.ndarray) -> None:
    """Zero the zero pages of ``plan`` in ``out``, its chunk's bytes."""
    base = plan.index * CHUNK_BYTES
    for start, end in plan.zeros:
        out[start - base : end - base] = 0


def hashes_stream(entry: Entry, verify: bool) -> bool:
    """Whether a read of ``entry`` hashes its stored bytes as it copies them."""
    return verify and entry.checksums is not None and entry.hashing == XXH3


def hashes_aside(entry: Entry, dst: Chunks, hashed: bool) -> ViewChunks | None:
    """``dst`` where a read of ``entry`` into it hashes on the worker
    (:func:`read_verified_aside`), else None: a large entry that is hashed,
    read into one view that stays valid for the whole read (not a sink
    whose chunks are refilled under the store)."""
    if hashed and isinstance(dst, ViewChunks) and entry.nbytes >= PARALLEL_HASH_MIN_BYTES:
        return dst
    return None


def read_verified_aside(
    entry: Entry,
    dst: ViewChunks,
    plans: Sequence[ChunkPlan],
    label: str,
    read: Callable[[ChunkPlan, np.ndarray], object],
) -> None:
    """A store's ``_read_chunks`` where :func:`hashes_aside`: ``read(plan,
    out)`` copies the plan's stored bytes into ``out`` (its chunk of
    ``dst``) without hashing them, and releases the GIL while it copies;
    the worker hashes the chunks already read meanwhile. Each chunk is
    verified once all are read, then marked filled, in order.

    Raises:
        IntegrityError: a chunk fails its checksum (the first, in order).
        what ``read`` raises.
    """

    def fill(plan: ChunkPlan) -> None:
        out = np.frombuffer(dst.chunk(plan.index), np.uint8)
        zero_fill_plan(plan, out)
        if plan.stored_bytes:
            read(plan, out)

    digests = read_hashing_aside(fill, dst.view, plans)
    for plan, digest in zip(plans, digests, strict=True):
        if plan.stored_bytes:
            verify_chunk(entry, plan.index, KnownDigest(digest), label, None)
        dst.filled(plan.index)


class SwapStore(RecordTable, ABC):
    """A swap-slot store; subclasses place the stored bytes.

    Args:
        path: store directory (created, mode 0700, if missing); None for a
            private temporary directory deleted by :meth:`close`.
        size_bytes: the store's size (its data file is preallocated).
        checksums: keep a checksum per chunk (an xxh3-64 computed here as
            the bytes are copied, or the digests a writer computed on the
            device: :meth:`write_chunks`). Reads verify what each entry
            holds, whatever this says.
        durability: a :class:`Durability` or its value.
        reclaim: drop what a dead process left (anonymous entries) at open;
            ``False`` keeps it, for :meth:`fsck` to report.

    Raises (constructor):
        ValueError: ``size_bytes`` too small, or a durability the backend
            cannot do.
        StoreError: the directory cannot be created, the store is open
            elsewhere, its format version or backend differs, or the space
            cannot be preallocated (full or read-only filesystem).

    Notes:
        Thread-safe. ``_lock`` guards the refcounts, the live entries, the
        space accounting and every write transaction; reads run concurrently.
        Data copies of different entries may run concurrently too: space is
        reserved under the lock, bytes are copied outside it.
    """

    backend_name = "?"

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        size_bytes: int,
        *,
        checksums: bool = True,
        durability: Durability | str = Durability.LAZY,
        reclaim: bool = True,
    ) -> None:
        self.checksums = checksums
        self._reclaim_at_open = reclaim
        try:
            self.durability = Durability(durability)
        except ValueError:
            raise ValueError(
                f"durability must be one of {[d.value for d in Durability]}, got {durability!r}"
            ) from None
        self._check_durability()
        minimum = self._minimum_size()
        if size_bytes < minimum:
            raise ValueError(f"store_size must be at least {minimum} bytes, got {size_bytes}")
        self._temporary = path is None
        self._private: PrivateDir | None = None
        try:
            if path is None:
                self._private = PrivateDir("gpubo-store-")
                self.path = self._private.path
            else:
                self.path = os.fspath(path)
                os.makedirs(self.path, mode=0o700, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create store directory {path!r}: {e}") from e
        self._lock = threading.Lock()
        # Serialises LMDB write transactions (one writer at a time); taken
        # after _lock when both are needed.
        self._write_lock = threading.Lock()
        self._lock_fd = -1
        self._env: lmdb.Environment | None = None
        self._mapped = MappedFiles()  # checked before each access through a mapping
        self._refs: dict[int, int] = {}  # entry key -> references; guarded by _lock
        self._entries: dict[int, Entry] = {}  # live entries; guarded by _lock
        self._names: dict[str, Entry] = {}  # committed named records; guarded by _lock
        self._used_bytes = 0  # guarded by _lock
        self._next_key = 1  # guarded by _lock
        self._cached_bytes = 0  # written through the page cache since the last drop; guarded by _lock
        # What makes this store unable to prove it is whole (fsck reports it),
        # damaged records by name, and why writes are refused (None: they are
        # not); set at open, constant after.
        self.problems: list[str] = []
        self._damaged: dict[str, str] = {}
        self._read_only: str | None = None
        self._generation = 0  # of the records; guarded by _lock
        # What was here before: a failed open removes only what it made.
        before = set(os.listdir(self.path))
        try:
            self._take_lock()
            state = read_state(self.path)
            self._check_files(state)
            self._env = self._open_env(size_bytes)
            self._names_db = self._env.open_db(b"names")
            self._meta_db = self._env.open_db(b"meta")
            self._check_format()
            self._open_data(size_bytes)
            self._mapped.watch(os.path.join(self.path, "data.mdb"), "store's LMDB file")
            self._load_names(state)
        except lmdb.Error as e:
            self._close_failed_open(before)
            raise StoreError(f"cannot open the store at {self.path!r}: {e}") from e
        except BaseException:
            self._close_failed_open(before)
            raise

    # -- backend hooks ------------------------------------------------------

    @abstractmethod
    def _data_file(self) -> str:
        """The name of the file, in the store directory, that holds the data
        (its size is written in the state file at creation)."""

    def _check_files(self, state: StoreState | None) -> None:
        """Before LMDB maps anything: the files the state file says exist
        are there, and no LMDB file is shorter than its meta page says.

        Raises:
            StoreError: a file is missing, truncated or not an LMDB file.
        """
        check_store_files(self.path, state, self.backend_name, self._data_file(), PAGE_BYTES)

    def _admit_record(self, name: str, entry: Entry) -> str | None:
        """Backend check of a record read at open (and claim of its space);
        what is wrong with it, or None."""
        return None

    def _max_stored_key(self) -> int:
        """The largest entry key with bytes in the store (0: none known)."""
        return 0

    def _check_durability(self) -> None:
        """Raise ValueError if this backend cannot honour ``self.durability``."""

    @abstractmethod
    def _minimum_size(self) -> int: ...

    @abstractmethod
    def _open_env(self, size_bytes: int) -> lmdb.Environment:
        """Open the LMDB environment that holds the metadata."""

    @abstractmethod
    def _open_data(self, size_bytes: int) -> None:
        """Open or create the data space; sets ``size_bytes`` and ``capacity_bytes``."""

    @abstractmethod
    def _reclaim(self, keep: dict[int, Entry]) -> int:
        """Drop stored data not referenced by ``keep`` (records); return bytes reclaimed."""

    @abstractmethod
    def _place(
        self, key: int, nbytes: int, plans: list[ChunkPlan]
    ) -> tuple[tuple[tuple[int, int], ...], int]:
        """Reserve room for the planned stored bytes: ``(extents, footprint)``.

        Raises StoreFull with nothing reserved. Holds ``_lock``.
        """

    @abstractmethod
    def _write_chunks(
        self,
        key: int,
        extents: tuple[tuple[int, int], ...],
        src: Chunks,
        plans: list[ChunkPlan],
        hashed: bool,
    ) -> list[int | None]:
        """Copy the planned pieces of ``src`` into place, chunk ``plan.index``
        of ``src`` for each plan; the xxh3-64 of each chunk's stored bytes
        when ``hashed`` (else Nones)."""

    @abstractmethod
    def _read_chunks(
        self, entry: Entry, dst: Chunks, plans: list[ChunkPlan], label: str, verify: bool
    ) -> None:
        """For each plan in order: fill chunk ``plan.index`` of ``dst`` with
        its stored bytes and zero pages (:func:`zero_fill_plan`), verify it
        (:func:`verify_chunk`; :func:`hashes_stream` says whether to feed its
        stored bytes to a :class:`Hasher` as they are copied) unless not
        ``verify``, then ``dst.filled(plan.index)``. Where
        :func:`hashes_aside`, every chunk is filled first, then each is
        verified and marked filled, in order (:func:`read_verified_aside`)."""

    @abstractmethod
    def _unplace(self, entry: Entry) -> None:
        """Give back ``entry``'s space. Holds ``_lock``."""

    @abstractmethod
    def _flush(self, entry: Entry) -> None:
        """Make ``entry``'s bytes durable."""

    @abstractmethod
    def footprint(self, nbytes: int) -> int:
        """Capacity an entry of ``nbytes`` may take at most."""

    def transit_bytes(self, largest_nbytes: int) -> int:
        """Capacity that must stay free, beyond the live entries, so that an
        entry of up to ``largest_nbytes`` can always be written."""
        return 0

    # -- opening ------------------------------------------------------------

    def _take_lock(self) -> None:
        lock_path = os.path.join(self.path, _LOCK_NAME)
        try:
            self._lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StoreError(f"store {self.path!r} is already open (in this or another process)") from e
            raise StoreError(f"cannot lock store {self.path!r}: {e}") from e

    def _check_format(self) -> None:
        env = self._require_env()
        want = f"gpubo-store {FORMAT_VERSION} {self.backend_name}".encode()
        with env.begin(write=True, db=self._meta_db) as txn:
            have = txn.get(FORMAT_KEY)
            if have is None:
                txn.put(FORMAT_KEY, want)
                return
        if have == want:
            return
        parts = bytes(have).decode(errors="replace").split()
        if len(parts) == 3 and parts[0] == "gpubo-store" and parts[1] == str(FORMAT_VERSION):
            raise StoreError(
                f"store {self.path!r} is a {parts[2]!r} store; open it with store_backend={parts[2]!r}"
            )
        version = parts[1] if len(parts) > 1 else "unknown"
        raise StoreError(
            f"store {self.path!r} has format version {version}; this gpubo reads version {FORMAT_VERSION}"
        )

    def _close_failed_open(self, before: set[str]) -> None:
        """Close after a failed open; a store that did not exist before
        (no state file, no data) leaves none of the files it made behind;
        only while it held the store's lock (another opener's files are not
        its to remove)."""
        locked = self._lock_fd >= 0
        self.close()
        if not locked or self._private is not None or STATE_NAME in before or "data.mdb" in before:
            return
        for name in sorted(set(os.listdir(self.path)) - before):
            if name in _STORE_FILES:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.path, name))

    def _check_writable(self) -> None:
        if self._read_only is not None:
            raise StoreError(f"store {self.path!r} is open for reading only: {self._read_only}")

    # -- entries ------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        """Capacity taken by live entries."""
        return self._used_bytes

    def write(self, src: memoryview) -> Entry:
        """Store the bytes of ``src`` as a new entry with one reference.

        Zero pages are found and skipped; each chunk is hashed after it is
        copied. With ``sync`` durability the bytes are flushed before the
        entry is returned.

        Raises:
            StoreFull: not enough room; nothing was written.
            StoreError: the copy or the flush failed, or the store is open
                for reading only; nothing was committed.
        """
        self._check_writable()
        return self._write(ViewChunks(src, src.nbytes), src.nbytes, scan_zero_pages(src, src.nbytes))

    def write_chunks(
        self, source: Chunks, zero_pages: np.ndarray | None, digests: Sequence[int] | None = None
    ) -> Entry:
        """Store ``source``'s bytes, pulled one chunk at a time, as a new
        entry with one reference: for bytes that never sit whole in host
        memory (a bounce buffer's worth at a time). ``zero_pages``: the
        per-page "all zeros" flags, found beforehand (on the device), or None;
        those pages are skipped. ``digests``: the chunks'
        :data:`~gpubo.store.entry.PAGE_DIGESTS`, computed beforehand (on the
        device), kept as the entry's checksums instead of hashing here
        (ignored when the store keeps no checksums). The entry is committed
        only after its last chunk.

        Raises:
            ValueError: ``digests`` is not one per chunk.
            StoreFull, StoreError: as :meth:`write`.
        """
        self._check_writable()
        nchunks = -(-source.nbytes // CHUNK_BYTES)
        if digests is not None and len(digests) != nchunks:
            raise ValueError(f"{len(digests)} digests for {nchunks} chunks of {source.nbytes} bytes")
        return self._write(source, source.nbytes, zero_pages, digests)

    def write_batch(self, src: memoryview, layout: Sequence[tuple[int, int]]) -> list[Entry]:
        """Store several entries at once: entry ``i`` holds the ``n`` bytes of
        ``src`` at offset ``off`` for ``layout[i] == (off, n)``.

        All or nothing: on any error no entry of the batch is left. The fast
        path (page-aligned offsets, entries of at most one chunk, no zero
        page, not ``direct``) reserves room for the whole batch at once and
        writes it in one transaction (lmdb) or one ``pwrite`` per slot run
        (slotfile), with one flush for ``sync``; otherwise each entry is
        written as by :meth:`write`.

        Raises:
            ValueError: a layout entry lies outside ``src`` or is empty.
            StoreFull: not enough room for the whole batch; nothing was written.
            StoreError: the copy or the flush failed; nothing was committed.
        """
        self._check_writable()
        for off, n in layout:
            if n <= 0 or off < 0 or off + n > src.nbytes:
                raise ValueError(f"batch entry ({off}, {n}) is outside the {src.nbytes}-byte source")
        flags = batch_zero_flags(src, layout)
        fast = (
            self.durability is not Durability.DIRECT
            and all(f is None for f in flags)
            and all(off % PAGE_BYTES == 0 and n <= CHUNK_BYTES for off, n in layout)
        )
        if fast:
            entries = self._write_batch(src, layout)
            if entries is not None:
                return entries
        done: list[Entry] = []
        try:
            for (off, n), zero in zip(layout, flags, strict=True):
                done.append(self._write(ViewChunks(src[off : off + n], n), n, zero))
        except BaseException:
            for entry in done:
                self._release_entry_quietly(entry)
            raise
        return done

    def _write_batch(self, src: memoryview, layout: Sequence[tuple[int, int]]) -> list[Entry] | None:
        """Backend fast path of :meth:`write_batch`; None when it has none."""
        return None

    def _checksum(self, piece: memoryview) -> tuple[int | None, ...] | None:
        """The checksums of a one-chunk entry whose stored bytes are ``piece``."""
        return (int(xxhash.xxh3_64_intdigest(piece)),) if self.checksums else None

    def _commit_batch(self, entries: list[Entry]) -> list[Entry]:
        """Flush (``sync``) and register freshly written one-reference entries.

        Raises:
            StoreError: the flush failed (the caller gives the room back).
        """
        if self.durability is Durability.SYNC and entries:
            self._flush(entries[0])  # one flush covers the whole batch
        with self._lock:
            for entry in entries:
                self._entries[entry.key] = entry
                self._refs[entry.key] = 1
                self._cached_bytes += entry.stored_bytes
        return entries

    def _release_entry_quietly(self, entry: Entry) -> None:
        try:
            self.release(entry)
        except StoreError as e:  # only its space stays accounted as used
            log.error("could not give back a store entry after a failed batch: %s", e)

    def write_zeros(self, nbytes: int) -> Entry:
        """A new entry of ``nbytes`` zeros: no byte is read, written or planned."""
        npages = -(-nbytes // PAGE_BYTES)
        nchunks = -(-nbytes // CHUNK_BYTES)
        with self._lock:
            key = self._next_key
            self._next_key += 1
            entry = Entry(
                key=key,
                nbytes=nbytes,
                footprint=0,
                stored_bytes=0,
                checksums=(None,) * nchunks if self.checksums else None,
                zeromap=np.packbits(np.ones(npages, np.bool_)).tobytes(),
            )
            self._entries[key] = entry
            self._refs[key] = 1
        return entry

    def _write(
        self,
        src: Chunks | None,
        nbytes: int,
        zero_flags: np.ndarray | None,
        digests: Sequence[int] | None = None,
    ) -> Entry:
        plans = plan_chunks(nbytes, zero_flags)
        hashing = XXH3 if digests is None else PAGE_DIGESTS
        stored = sum(p.stored_bytes for p in plans)
        with self._lock:
            key = self._next_key
            self._next_key += 1
            extents, footprint = self._place(key, nbytes, plans)
            self._used_bytes += footprint
        try:
            if stored:
                assert src is not None
                hashed = self.checksums and digests is None
                if hashed and stored >= PARALLEL_HASH_MIN_BYTES and isinstance(src, ViewChunks):
                    copy = functools.partial(self._write_chunks, key, extents, src, plans, False)
                    sums = copy_hashing_aside(copy, src.view, plans)  # hashed on a second core
                else:
                    sums = self._write_chunks(key, extents, src, plans, hashed)
            else:
                sums = [None] * len(plans)
            if digests is not None:  # a chunk with nothing stored is zeros: nothing to verify
                sums = [None if not p.stored_bytes else int(d) for p, d in zip(plans, digests, strict=True)]
            entry = Entry(
                key=key,
                nbytes=nbytes,
                footprint=footprint,
                stored_bytes=stored,
                checksums=tuple(sums) if self.checksums else None,
                zeromap=None if zero_flags is None else np.packbits(zero_flags).tobytes(),
                extents=extents,
                hashing=hashing,
            )
            if self.durability is Durability.SYNC:
                self._flush(entry)
        except BaseException:
            with self._lock:
                self._used_bytes -= footprint
                self._unplace(Entry(key, nbytes, footprint, stored, None, None, extents))
            raise
        with self._lock:
            self._entries[key] = entry
            self._refs[key] = 1
            if self.durability is not Durability.DIRECT:
                self._cached_bytes += stored
        return entry

    def read_into(self, entry: Entry, dst: memoryview, label: str, *, verify: bool = True) -> None:
        """Copy ``entry``'s bytes into ``dst`` (zero pages zero-filled) and
        verify them (``verify=False``: the caller verifies ``entry``'s
        :data:`~gpubo.store.entry.PAGE_DIGESTS` itself, where the bytes
        land; an entry of the other kind is verified here anyway).

        Raises:
            IntegrityError: stored bytes are missing or fail their checksum;
                ``offset`` names the chunk's first byte, ``label`` the owner.
            StoreError: the store failed.
        """
        self.read_chunks(entry, ViewChunks(dst, entry.nbytes), label, verify=verify)

    def read_chunks(self, entry: Entry, sink: Chunks, label: str, *, verify: bool = True) -> None:
        """:meth:`read_into`, one chunk at a time: each chunk of ``sink`` is
        filled (zero pages zero-filled), verified (as :meth:`read_into`
        says for ``verify``), then ``sink.filled(i)`` is called, in order.
        Raises as :meth:`read_into`; chunks before the failing one were
        filled."""
        plans = plan_chunks(entry.nbytes, entry.zero_pages())
        self._read_chunks(entry, sink, plans, label, verify or entry.hashing != PAGE_DIGESTS)

    @contextlib.contextmanager
    def verified_view(self, entry: Entry, label: str) -> Iterator[memoryview | None]:
        """Context manager: a zero-copy, read-only view of a one-chunk entry's
        bytes, verified before it is lent, for one copy straight to the
        device; None when the entry has zero pages, is larger than a chunk,
        or its bytes are not one run in the store (then use
        :meth:`read_into`). The view is valid only inside the ``with`` block.

        Raises:
            IntegrityError: the stored bytes are missing or fail their checksum.
            StoreError: the store failed.
        """
        with self.verified_views([entry], [label]) as views:
            yield views[0]

    @contextlib.contextmanager
    def verified_views(
        self, entries: Sequence[Entry], labels: Sequence[str], *, verify: bool = True
    ) -> Iterator[list[memoryview | None]]:
        """:meth:`verified_view` of several entries at once (one LMDB read
        transaction for all): every view is verified before any is lent, and
        all stay valid until the ``with`` block ends. ``verify=False``: as
        for :meth:`read_into`.

        Raises:
            IntegrityError: an entry's bytes are missing or fail their
                checksum (``bo`` names its label); nothing is lent.
            StoreError: the store failed.
        """
        with self.lent_chunks(entries, labels, max_chunks=1) as lent:
            views: list[memoryview | None] = []
            for entry, label, chunks in zip(entries, labels, lent, strict=True):
                if chunks is None or len(chunks[0]) != 1:
                    views.append(None)
                    continue
                self.check_lent(entry, 0, chunks[0], label, verify=verify)
                views.append(chunks[0][0])
            yield views

    @contextlib.contextmanager
    def lent_chunks(
        self, entries: Sequence[Entry], labels: Sequence[str], *, max_chunks: int | None = None
    ) -> Iterator[list[LentChunks | None]]:
        """Context manager: zero-copy, read-only views of the stored bytes of
        each entry, *not yet verified*, for copies straight to the device:
        per entry, one list of segments per chunk (the chunk's bytes in
        order, in one piece unless the store holds them in several runs),
        or None where the store cannot lend the entry (zero pages in it,
        more than ``max_chunks`` chunks, ``direct`` durability, an LMDB chunk
        written in pages, an unhashed entry of :data:`LEND_MAX_BYTES` or
        more): read it with :meth:`read_into`. All views stay valid until
        the ``with`` block ends (one LMDB read transaction).

        The caller checks each chunk with :meth:`check_lent`, typically
        right after enqueueing its copy, so that hashing runs while the
        device copies; a chunk that fails must not be handed out.

        Raises:
            IntegrityError: a stored chunk is truncated.
            StoreError: the store failed.
        """
        lendable = [
            i
            for i, e in enumerate(entries)
            if e.zeromap is None
            and e.stored_bytes == e.nbytes
            and (max_chunks is None or e.nbytes <= max_chunks * CHUNK_BYTES)
            and (e.nbytes < LEND_MAX_BYTES or hashes_stream(e, True))
        ]
        out: list[LentChunks | None] = [None] * len(entries)
        with self._lend([entries[i] for i in lendable], [labels[i] for i in lendable]) as lent:
            for i, chunks in zip(lendable, lent, strict=True):
                out[i] = chunks
            yield out

    def check_lent(
        self, entry: Entry, index: int, segments: Sequence[memoryview], label: str, *, verify: bool = True
    ) -> None:
        """Verify chunk ``index`` of ``entry`` from its lent ``segments``
        (:meth:`lent_chunks`). ``verify=False``: as for :meth:`read_into`.

        Raises:
            IntegrityError: the chunk fails its checksum.
        """
        if entry.checksums is None or (not verify and entry.hashing == PAGE_DIGESTS):
            return
        if entry.hashing == XXH3:
            hasher = Hasher()
            for segment in segments:
                hasher.add(segment)
            verify_chunk(entry, index, hasher, label, None)
        else:
            whole = segments[0] if len(segments) == 1 else memoryview(np.concatenate(segments).data)
            verify_chunk(entry, index, Hasher(False), label, whole)

    @contextlib.contextmanager
    def _lend(self, entries: list[Entry], labels: list[str]) -> Iterator[list[LentChunks | None]]:
        """Backend part of :meth:`lent_chunks` (entries without zero pages):
        unverified segments per chunk, or None each; by default none."""
        yield [None] * len(entries)

    def retain(self, entry: Entry) -> None:
        """Add a reference to a live entry."""
        with self._lock:
            self._refs[entry.key] += 1

    def release(self, entry: Entry) -> None:
        """Drop a reference; the last one gives the space back.

        Raises:
            StoreError: the store failed; the space stays accounted as used.
        """
        with self._lock:
            self._release_locked(entry)

    def _release_locked(self, entry: Entry) -> None:
        left = self._refs[entry.key] - 1
        if left:
            self._refs[entry.key] = left
            return
        self._unplace(entry)
        del self._refs[entry.key]
        del self._entries[entry.key]
        self._used_bytes -= entry.footprint

    def flush(self, entry: Entry) -> None:
        """Make ``entry``'s bytes durable now (for a named record).

        Raises:
            StoreError: the flush failed.
        """
        if entry.stored_bytes:
            self._flush(entry)

    # -- host page cache ----------------------------------------------------

    def cached_bytes(self) -> int:
        """Bytes written through the host page cache since the last
        :meth:`drop_cache` (an upper bound of what it can give back)."""
        return self._cached_bytes

    def drop_cache(self, nbytes: int) -> int:
        """Write back the store's dirty pages and let the host drop them;
        bytes given back (a shrinker's ``scan``).

        Raises:
            StoreError: the write-back failed.
        """
        with self._lock:
            cached, self._cached_bytes = self._cached_bytes, 0
        if not cached:
            return 0
        return cached if self._drop_cache() else 0

    def _drop_cache(self) -> bool:
        """Backend: write back and drop the data pages; False if it cannot drop them."""
        return False

    # -- checking -----------------------------------------------------------

    def fsck(self) -> FsckReport:
        """Check every record: checksums, extents, refcounts, space accounting.

        Meant for a store with no live anonymous entries (as opened by
        ``gpubo fsck``): every stored byte must then belong to a record.
        """
        report = FsckReport(self.path, self.backend_name, capacity_bytes=self.capacity_bytes)
        with self._lock:
            names = dict(self._names)
            entries = dict(self._entries)
            refs = dict(self._refs)
            report.used_bytes = self._used_bytes
        report.names = self.names()
        report.entries = len(entries)
        report.problems.extend(self.problems)
        report.problems.extend(f"record {n!r} is damaged: {why}" for n, why in sorted(self._damaged.items()))
        for key in entries:
            holders = sum(1 for e in names.values() if e.key == key)
            if refs.get(key) != holders:
                report.problems.append(f"entry {key}: refcount {refs.get(key)} but {holders} record(s)")
        accounted = sum(e.footprint for e in entries.values())
        if accounted != report.used_bytes:
            report.problems.append(f"space accounting: {report.used_bytes} used, entries hold {accounted}")
        for name, entry in sorted(names.items()):
            report.stored_bytes += entry.stored_bytes
            scratch = np.empty(entry.nbytes, np.uint8)
            try:
                self.read_into(entry, memoryview(scratch.data), repr(name))
            except IntegrityError as e:
                report.problems.append(str(e))
            except StoreError as e:
                report.problems.append(f"record {name!r}: {e}")
        report.problems.extend(self._fsck_space(entries))
        return report

    def _fsck_space(self, entries: dict[int, Entry]) -> list[str]:
        """Backend check: stored data not owned by any entry (leaks), overlaps."""
        return []

    # -- lifetime -----------------------------------------------------------

    def _require_env(self) -> lmdb.Environment:
        if self._env is None:
            raise StoreError("the store is closed")
        self._mapped.check()
        return self._env

    def _close_data(self) -> None:
        """Backend: close data files."""

    def close(self) -> None:
        """Close the store, unlock it, and delete it if temporary. Idempotent."""
        self._close_data()
        self._mapped.close()
        if self._env is not None:
            self._env.close()
            self._env = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # also drops the flock
            self._lock_fd = -1
        if self._private is not None:
            self._private.remove()

    def __repr__(self) -> str:
        if self._env is None:
            return f"<{type(self).__name__} {self.path} closed>"
        return (
            f"<{type(self).__name__} {self.path} {self.durability.value} used={self._used_bytes}"
            f"/{self.capacity_bytes} entries={len(self._entries)} names={len(self._names)}>"
        )

    size_bytes: int
    capacity_bytes: int
