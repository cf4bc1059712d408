"""An LMDB swap-slot store.

Layout: one named database ``data`` whose keys are ``(entry id, chunk
index)`` packed big-endian and whose values are the entry's bytes cut into
chunks of :data:`CHUNK_BYTES`. Chunking keeps each value's overflow run the
same size (freed runs are reused whole, so the map does not fragment) and
lets the checksum of a chunk be computed while it is still in cache.

Space: the map is preallocated with ``posix_fallocate`` when the store is
opened, so writing through the ``writemap`` mapping can never hit a full disk
(which would kill the process with SIGBUS). The store accounts for the pages
each entry occupies and refuses a ``put`` that would not fit with
:class:`~gpubo.StoreFull` before any byte is copied.

Entries are anonymous and live as long as the process: opening an existing
store directory drops whatever an earlier process left in it. A lock file
(``flock``) keeps a second process from opening the same store.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import shutil
import struct
import tempfile
import threading
from dataclasses import dataclass

import lmdb
import numpy as np
import xxhash

from gpubo._errors import IntegrityError, StoreError, StoreFull

__all__ = ["CHUNK_BYTES", "Entry", "LmdbStore"]

log = logging.getLogger(__name__)

#: Entries are stored in chunks of this many bytes (the last one shorter).
CHUNK_BYTES = 1 << 20
#: LMDB puts an 16-byte header in front of an overflow value.
_OVERFLOW_HEADER = 16
_KEY = struct.Struct(">QI")
_LOCK_NAME = "gpubo.lock"
_DATA_NAME = "data.mdb"


@dataclass(frozen=True)
class Entry:
    """A committed run of bytes in the store.

    ``footprint`` is what the entry costs the store's capacity (whole pages);
    ``checksums`` holds one xxh3-64 per chunk, or None when checksums are off.
    """

    key: int
    nbytes: int
    footprint: int
    checksums: tuple[int, ...] | None

    @property
    def nchunks(self) -> int:
        return -(-self.nbytes // CHUNK_BYTES)


class LmdbStore:
    """Swap slots in one LMDB environment.

    Args:
        path: store directory (created, mode 0700, if missing); None for a
            private temporary directory deleted by :meth:`close`.
        size_bytes: size of the map and of the preallocated data file.
        checksums: keep an xxh3-64 per chunk and verify it on every read.

    Raises (constructor):
        StoreError: the directory cannot be created or opened, another
            process holds the store, or the space cannot be preallocated
            (full or read-only filesystem).
        ValueError: ``size_bytes`` is too small to hold any entry.

    Notes:
        Thread-safe. ``_lock`` serialises write transactions (LMDB allows one
        writer) and guards ``_used_bytes`` and ``_next_key``; reads run
        concurrently in their own read transactions.
    """

    def __init__(
        self, path: str | os.PathLike[str] | None, size_bytes: int, *, checksums: bool = True
    ) -> None:
        self.checksums = checksums
        self._temporary = path is None
        self.page_bytes = mmap.PAGESIZE  # LMDB's page size is the OS page size
        minimum = self._reserve_bytes(0) + self.footprint(1) + self.transit_bytes(1)
        if size_bytes < minimum:
            raise ValueError(f"store_size must be at least {minimum} bytes, got {size_bytes}")
        try:
            if path is None:
                self.path = tempfile.mkdtemp(prefix="gpubo-store-")
            else:
                self.path = os.fspath(path)
                os.makedirs(self.path, mode=0o700, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create store directory {path!r}: {e}") from e
        self._lock_fd = -1
        self._env: lmdb.Environment | None = None
        try:
            self._open(size_bytes)
        except BaseException:
            self.close()
            raise

    def _open(self, size_bytes: int) -> None:
        lock_path = os.path.join(self.path, _LOCK_NAME)
        try:
            self._lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StoreError(f"store {self.path!r} is already open (in this or another process)") from e
            raise StoreError(f"cannot lock store {self.path!r}: {e}") from e
        try:
            env = lmdb.open(
                self.path,
                map_size=size_bytes,
                subdir=True,
                writemap=True,
                sync=False,
                metasync=False,
                meminit=False,
                readahead=False,
                max_dbs=2,
                mode=0o600,
            )
        except lmdb.Error as e:
            raise StoreError(f"cannot open LMDB store at {self.path!r}: {e}") from e
        self._env = env
        if int(env.stat()["psize"]) != self.page_bytes:
            raise StoreError(f"LMDB page size {env.stat()['psize']} is not the OS page {self.page_bytes}")
        self.size_bytes = int(env.info()["map_size"])
        self._prealloc(os.path.join(self.path, _DATA_NAME), self.size_bytes)
        try:
            self._db = env.open_db(b"data")
            with env.begin(write=True) as txn:
                stale = txn.stat(self._db)["entries"]
                txn.drop(self._db, delete=False)
        except lmdb.Error as e:
            raise StoreError(f"cannot initialise LMDB store at {self.path!r}: {e}") from e
        if stale:
            log.info("store %s: dropped %d chunks left by an earlier process", self.path, stale)
        self.capacity_bytes = self.size_bytes - self._reserve_bytes(self.size_bytes)
        self._lock = threading.Lock()
        self._used_bytes = 0  # guarded by _lock
        self._next_key = 0  # guarded by _lock

    @staticmethod
    def _prealloc(path: str, nbytes: int) -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            try:
                os.posix_fallocate(fd, 0, nbytes)
            finally:
                os.close(fd)
        except OSError as e:
            raise StoreError(f"cannot preallocate {nbytes} bytes for the store at {path!r}: {e}") from e

    # -- accounting ---------------------------------------------------------

    def _reserve_bytes(self, size_bytes: int) -> int:
        """Room LMDB needs besides our values: meta, branch and leaf pages,
        the free list, and pages a concurrent reader keeps from reuse."""
        return max(64 * self.page_bytes, size_bytes // 32)

    def transit_bytes(self, largest_nbytes: int) -> int:
        """Capacity that must stay free, beyond the live entries, for any
        entry of up to ``largest_nbytes`` to be written.

        LMDB is copy-on-write: pages freed by the latest commit are not
        reusable by the next one, and saving its free list splits freed runs,
        so writing an entry needs about its own footprint plus one chunk of
        spare room (measured by cycling full stores of 64 KiB to 16 MiB BOs).
        """
        return self.footprint(largest_nbytes) + self.footprint(min(largest_nbytes, CHUNK_BYTES))

    def footprint(self, nbytes: int) -> int:
        """Bytes of capacity an entry of ``nbytes`` occupies (whole pages)."""
        full, tail = divmod(nbytes, CHUNK_BYTES)
        page = self.page_bytes

        def pages(n: int) -> int:
            return -(-(n + _OVERFLOW_HEADER) // page) * page

        return full * pages(CHUNK_BYTES) + (pages(tail) if tail else 0)

    @property
    def used_bytes(self) -> int:
        """Capacity taken by committed entries."""
        return self._used_bytes

    # -- data ---------------------------------------------------------------

    def put(self, view: memoryview) -> Entry:
        """Copy ``view`` into the store and commit it as a new entry.

        One copy: LMDB copies each chunk straight from ``view`` (a mapped
        device buffer) into the memory-mapped store.

        Raises:
            StoreFull: no room; nothing was written.
            StoreError: LMDB failed; nothing was committed.
        """
        env = self._require_env()
        nbytes = view.nbytes
        footprint = self.footprint(nbytes)
        want_sums = self.checksums
        sums: list[int] = []
        with self._lock:
            free = self.capacity_bytes - self._used_bytes
            if footprint > free:
                raise StoreFull(
                    f"store full: {nbytes} bytes need {footprint} bytes of store, {free} free",
                    nbytes=nbytes,
                    free_bytes=free,
                )
            key = self._next_key
            try:
                with env.begin(write=True, db=self._db) as txn:
                    for index, offset in enumerate(range(0, nbytes, CHUNK_BYTES)):
                        chunk = view[offset : offset + CHUNK_BYTES]
                        txn.put(_KEY.pack(key, index), chunk)
                        if want_sums:  # after the copy: the chunk is still in cache
                            sums.append(xxhash.xxh3_64_intdigest(chunk))
            except lmdb.MapFullError as e:
                raise StoreFull(
                    f"store full: LMDB map has no room for {nbytes} bytes", nbytes=nbytes, free_bytes=free
                ) from e
            except lmdb.Error as e:
                raise StoreError(f"writing {nbytes} bytes to the store failed: {e}") from e
            self._next_key = key + 1
            self._used_bytes += footprint
        return Entry(key, nbytes, footprint, tuple(sums) if want_sums else None)

    def get_into(self, entry: Entry, out: memoryview, label: str) -> None:
        """Copy ``entry``'s bytes into ``out``, verifying each chunk first.

        One copy, from a zero-copy view of the mapped store inside a read
        transaction. ``label`` names the owner in error messages.

        Raises:
            IntegrityError: a chunk is missing, has the wrong length or fails
                its checksum; ``offset`` is the chunk's first byte.
            StoreError: LMDB failed.
        """
        env = self._require_env()
        dst = np.frombuffer(out, np.uint8)
        try:
            with env.begin(db=self._db, buffers=True) as txn:
                for index, offset in enumerate(range(0, entry.nbytes, CHUNK_BYTES)):
                    want = min(CHUNK_BYTES, entry.nbytes - offset)
                    chunk = txn.get(_KEY.pack(entry.key, index))
                    if chunk is None or len(chunk) != want:
                        raise IntegrityError(
                            f"{label}: store chunk at byte {offset} is missing or truncated",
                            bo=label,
                            offset=offset,
                        )
                    np.copyto(dst[offset : offset + want], np.frombuffer(chunk, np.uint8))
                    # Verified after the copy, while the chunk is in cache; the
                    # caller discards the buffer if this fails.
                    if (
                        entry.checksums is not None
                        and xxhash.xxh3_64_intdigest(chunk) != entry.checksums[index]
                    ):
                        raise IntegrityError(
                            f"{label}: checksum mismatch in the store at byte {offset} "
                            f"(chunk {index}, {want} bytes)",
                            bo=label,
                            offset=offset,
                        )
        except lmdb.Error as e:
            raise StoreError(f"reading {label} from the store failed: {e}") from e

    def release(self, entry: Entry) -> None:
        """Delete ``entry`` and give its space back.

        Raises:
            StoreError: LMDB failed; the space stays accounted as used.
        """
        env = self._require_env()
        with self._lock:
            try:
                with env.begin(write=True, db=self._db) as txn:
                    for index in range(entry.nchunks):
                        txn.delete(_KEY.pack(entry.key, index))
            except lmdb.Error as e:
                raise StoreError(f"releasing a store entry failed: {e}") from e
            self._used_bytes -= entry.footprint

    def chunk_count(self) -> int:
        """Number of chunks stored (for leak checks)."""
        env = self._require_env()
        with env.begin() as txn:
            return int(txn.stat(self._db)["entries"])

    # -- lifetime -----------------------------------------------------------

    def _require_env(self) -> lmdb.Environment:
        if self._env is None:
            raise StoreError("the store is closed")
        return self._env

    def close(self) -> None:
        """Close the environment, unlock, and delete a temporary store. Idempotent."""
        if self._env is not None:
            self._env.close()
            self._env = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # also drops the flock
            self._lock_fd = -1
        if self._temporary and os.path.isdir(self.path):
            shutil.rmtree(self.path, ignore_errors=True)

    def __repr__(self) -> str:
        state = "closed" if self._env is None else f"used={self._used_bytes}/{self.capacity_bytes}"
        return f"<LmdbStore {self.path} {state}>"
