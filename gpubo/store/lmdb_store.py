"""The LMDB backend: data and metadata in one LMDB environment.

Stored bytes live in the named database ``data`` under ``(entry key, chunk
index)`` keys, one value per chunk (its non-zero pages). Chunks keep each
value's overflow run about the same size, so freed runs are reused whole.

Space: the map is preallocated with ``posix_fallocate`` when the store is
opened, so writing through the ``writemap`` mapping can never hit a full
disk (which would kill the process with SIGBUS). LMDB is copy-on-write:
:meth:`LmdbStore.transit_bytes` is the room an eviction needs beyond the live
entries, and the manager keeps it free.

Durability: ``lazy`` commits without syncing; ``sync`` flushes the
environment (msync and fsync) after an entry's data is committed and before
the entry is used. ``direct`` needs the slot-file backend.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
from collections.abc import Iterator, Sequence

import lmdb
import numpy as np
import xxhash

from gpubo._errors import IntegrityError, StoreError, StoreFull
from gpubo.store.base import (
    CHUNK_BYTES,
    PAGE_BYTES,
    ChunkPlan,
    Chunks,
    Durability,
    Entry,
    LentChunks,
    SwapStore,
    hashes_aside,
    hashes_stream,
    plan_chunks,
    read_verified_aside,
    steps,
    verify_chunk,
    zero_fill_plan,
)
from gpubo.store.entry import Hasher
from gpubo.store.integrity import StoreState

__all__ = ["LmdbStore"]

log = logging.getLogger(__name__)

#: LMDB puts a 16-byte header in front of an overflow value.
_OVERFLOW_HEADER = 16
#: A chunk is one value under ``(entry key, chunk index)``; a chunk written
#: when no free run of its size was left is page values under ``(entry key,
#: chunk index, piece index)``, each filling exactly one page.
_KEY = struct.Struct(">QI")
_PIECE_KEY = struct.Struct(">QII")
_ENTRY_PREFIX = struct.Struct(">Q")
_PIECE_BYTES = PAGE_BYTES - _OVERFLOW_HEADER
_DATA_NAME = "data.mdb"


def _pages(nbytes: int) -> int:
    return -(-(nbytes + _OVERFLOW_HEADER) // PAGE_BYTES) * PAGE_BYTES


class LmdbStore(SwapStore):
    """Swap entries as chunk values in one LMDB environment (see the module docstring)."""

    backend_name = "lmdb"

    def _check_durability(self) -> None:
        if self.durability is Durability.DIRECT:
            raise ValueError("durability='direct' needs store_backend='slotfile'")

    @staticmethod
    def _reserve_bytes(size_bytes: int) -> int:
        """Room LMDB needs besides our values: meta, branch and leaf pages,
        the free list, and pages a concurrent reader keeps from reuse."""
        return max(64 * PAGE_BYTES, size_bytes // 32)

    def _data_file(self) -> str:
        return _DATA_NAME

    def _check_files(self, state: StoreState | None) -> None:
        super()._check_files(state)
        if state is None:
            return
        size = os.path.getsize(os.path.join(self.path, _DATA_NAME))
        if size != state.data_bytes:
            raise StoreError(
                f"store {self.path!r} is damaged: {_DATA_NAME} holds {size} of its {state.data_bytes} "
                f"bytes; its {state.records} record(s) cannot be trusted"
            )

    def _max_stored_key(self) -> int:
        env = self._require_env()
        with env.begin(db=self._data_db) as txn:
            cursor = txn.cursor()
            return _ENTRY_PREFIX.unpack_from(cursor.key())[0] if cursor.last() else 0

    def _minimum_size(self) -> int:
        return self._reserve_bytes(0) + self.footprint(1) + self.transit_bytes(1)

    def footprint(self, nbytes: int) -> int:
        full, tail = divmod(nbytes, CHUNK_BYTES)
        return full * _pages(CHUNK_BYTES) + (_pages(tail) if tail else 0)

    def transit_bytes(self, largest_nbytes: int) -> int:
        """LMDB is copy-on-write: pages freed by the latest commit are not
        reusable by the next one, and saving its free list splits freed runs,
        so writing an entry needs about its own footprint plus one chunk of
        spare room (measured by cycling full stores of 64 KiB to 16 MiB BOs)."""
        return self.footprint(largest_nbytes) + self.footprint(min(largest_nbytes, CHUNK_BYTES))

    def _open_env(self, size_bytes: int) -> lmdb.Environment:
        existing = os.path.join(self.path, _DATA_NAME)
        if os.path.exists(existing):  # a store keeps the size it was created with
            size = os.path.getsize(existing)
            if size != size_bytes:
                log.info("store %s keeps its size %d (asked %d)", self.path, size, size_bytes)
            size_bytes = size
        return lmdb.open(
            self.path,
            map_size=size_bytes,
            subdir=True,
            writemap=True,
            # Commits are not synced: dropping an anonymous entry need not be
            # durable (the next open reclaims it). Data and records that must
            # be are flushed explicitly (_flush, _sync_meta).
            sync=False,
            metasync=False,
            meminit=False,
            readahead=False,
            max_dbs=4,
            mode=0o600,
        )

    def _open_data(self, size_bytes: int) -> None:
        env = self._require_env()
        if int(env.stat()["psize"]) != PAGE_BYTES:
            raise StoreError(f"LMDB page size {env.stat()['psize']} is not {PAGE_BYTES}")
        self.size_bytes = int(env.info()["map_size"])
        path = os.path.join(self.path, _DATA_NAME)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            try:
                os.posix_fallocate(fd, 0, self.size_bytes)
            finally:
                os.close(fd)
        except OSError as e:
            raise StoreError(
                f"cannot preallocate {self.size_bytes} bytes for the store at {path!r}: {e}"
            ) from e
        self._data_db = env.open_db(b"data")
        self.capacity_bytes = self.size_bytes - self._reserve_bytes(self.size_bytes)

    def _reclaim(self, keep: dict[int, Entry]) -> int:
        env = self._require_env()
        with env.begin(write=True, db=self._data_db) as txn:
            orphans = [
                (bytes(key), len(value))
                for key, value in txn.cursor()
                if _ENTRY_PREFIX.unpack_from(key)[0] not in keep
            ]
            for key, _ in orphans:
                txn.delete(key)
        return sum(n for _, n in orphans)

    def _place(
        self, key: int, nbytes: int, plans: list[ChunkPlan]
    ) -> tuple[tuple[tuple[int, int], ...], int]:
        footprint = sum(_pages(p.stored_bytes) for p in plans if p.stored_bytes)
        free = self.capacity_bytes - self._used_bytes
        if footprint > free:
            raise StoreFull(
                f"store full: {nbytes} bytes need {footprint} bytes of store, {free} free",
                nbytes=nbytes,
                free_bytes=free,
            )
        return (), footprint

    def _write_chunks(
        self,
        key: int,
        extents: tuple[tuple[int, int], ...],
        src: Chunks,
        plans: list[ChunkPlan],
        hashed: bool,
    ) -> list[int | None]:
        try:
            return self._put_chunks(key, src, plans, hashed, paged=False)
        except lmdb.MapFullError:
            # The space accounting said it fits, but no free run of pages is
            # long enough: copy-on-write and mixed sizes fragment LMDB's free
            # list. One-page values fit in any free page.
            log.info("store %s: no free run for a %d-byte entry; writing it in pages", self.path, src.nbytes)
        try:
            return self._put_chunks(key, src, plans, hashed, paged=True)
        except lmdb.MapFullError as e:
            raise StoreFull(
                f"store full: the LMDB map has no room for {src.nbytes} bytes", nbytes=src.nbytes
            ) from e

    def _put_chunks(
        self, key: int, src: Chunks, plans: list[ChunkPlan], hashed: bool, *, paged: bool
    ) -> list[int | None]:
        """One write transaction putting every planned chunk; per-chunk
        xxh3-64s when ``hashed``.

        Raises:
            lmdb.MapFullError: no room (nothing was committed).
            StoreError: any other LMDB failure.
        """
        env = self._require_env()
        sums: list[int | None] = []
        scratch: np.ndarray | None = None
        try:
            with self._write_lock, env.begin(write=True, db=self._data_db) as txn:
                for plan in plans:
                    if not plan.stored_bytes:
                        sums.append(None)
                        continue
                    chunk = src.chunk(plan.index)
                    base = plan.index * CHUNK_BYTES
                    if len(plan.pieces) == 1:
                        start, end = plan.pieces[0]
                        value = chunk[start - base : end - base]  # LMDB copies straight from it
                    else:  # zero pages inside the chunk: gather the rest (at most a chunk)
                        if scratch is None:
                            scratch = np.empty(CHUNK_BYTES, np.uint8)
                        chunk_arr = np.frombuffer(chunk, np.uint8)
                        pos = 0
                        for start, end in plan.pieces:
                            scratch[pos : pos + end - start] = chunk_arr[start - base : end - base]
                            pos += end - start
                        value = memoryview(scratch.data)[:pos]
                    if paged:
                        for piece, at in enumerate(range(0, len(value), _PIECE_BYTES)):
                            txn.put(_PIECE_KEY.pack(key, plan.index, piece), value[at : at + _PIECE_BYTES])
                    else:
                        txn.put(_KEY.pack(key, plan.index), value)
                    # After the copy, while the chunk is still in cache.
                    sums.append(xxhash.xxh3_64_intdigest(value) if hashed else None)
        except lmdb.MapFullError:
            raise
        except lmdb.Error as e:
            raise StoreError(f"writing {src.nbytes} bytes to the store failed: {e}") from e
        return sums

    def _write_batch(self, src: memoryview, layout: Sequence[tuple[int, int]]) -> list[Entry] | None:
        env = self._require_env()  # before the space is taken: it raises on a cut file
        footprints = [_pages(n) for _, n in layout]
        total = sum(footprints)
        with self._lock:
            free = self.capacity_bytes - self._used_bytes
            if total > free:
                raise StoreFull(
                    f"store full: a batch of {len(layout)} entries needs {total} bytes of store, {free} free",
                    nbytes=sum(n for _, n in layout),
                    free_bytes=free,
                )
            first_key = self._next_key
            self._next_key += len(layout)
            self._used_bytes += total
        entries: list[Entry] = []
        committed = False
        try:
            with self._write_lock, env.begin(write=True, db=self._data_db) as txn:
                for i, ((off, n), footprint) in enumerate(zip(layout, footprints, strict=True)):
                    value = src[off : off + n]
                    txn.put(_KEY.pack(first_key + i, 0), value)  # one transaction for the batch
                    entries.append(Entry(first_key + i, n, footprint, n, self._checksum(value), None))
            committed = True
            return self._commit_batch(entries)
        except BaseException as e:
            with self._lock:
                self._used_bytes -= total
                if committed:  # the flush failed: take the chunks out again
                    for entry in entries:
                        self._unplace(entry)
            if isinstance(e, lmdb.MapFullError):
                return None  # fragmented free space: one by one, each paged if need be
            if isinstance(e, lmdb.Error):
                raise StoreError(f"writing a batch of {len(layout)} entries to the store failed: {e}") from e
            raise

    def _read_chunks(
        self, entry: Entry, dst: Chunks, plans: list[ChunkPlan], label: str, verify: bool
    ) -> None:
        hashed = hashes_stream(entry, verify)
        env = self._require_env()
        try:
            with env.begin(db=self._data_db, buffers=True) as txn:
                aside = hashes_aside(entry, dst, hashed)
                if aside is not None:
                    read_verified_aside(
                        entry,
                        aside,
                        plans,
                        label,
                        lambda plan, out: self._copy_plan(txn, entry, plan, out, label, None),
                    )
                    return
                for plan in plans:
                    out = np.frombuffer(dst.chunk(plan.index), np.uint8)
                    zero_fill_plan(plan, out)
                    if not plan.stored_bytes:
                        dst.filled(plan.index)
                        continue
                    hasher = Hasher(hashed)
                    self._copy_plan(txn, entry, plan, out, label, hasher if hashed else None)
                    if verify:
                        verify_chunk(entry, plan.index, hasher, label, out)
                    dst.filled(plan.index)
        except lmdb.Error as e:
            raise StoreError(f"reading {label} from the store failed: {e}") from e

    def _copy_plan(
        self,
        txn: lmdb.Transaction,
        entry: Entry,
        plan: ChunkPlan,
        out: np.ndarray,
        label: str,
        hasher: Hasher | None,
    ) -> None:
        """Copy ``plan``'s stored bytes into ``out``, its chunk; with a
        ``hasher``, each step is hashed right after its copy."""
        value = txn.get(_KEY.pack(entry.key, plan.index))
        if value is None:
            value = self._paged_chunk(txn, entry.key, plan)
        if value is None or len(value) != plan.stored_bytes:
            offset = plan.index * CHUNK_BYTES
            raise IntegrityError(
                f"{label}: store chunk at byte {offset} is missing or truncated",
                bo=label,
                offset=offset,
            )
        stored = np.frombuffer(value, np.uint8)
        raw = memoryview(value)
        base = plan.index * CHUNK_BYTES
        pos = 0
        for start, end in plan.pieces:
            for done, step in steps(end - start, hasher is not None):
                at = pos + done
                to = start - base + done
                np.copyto(out[to : to + step], stored[at : at + step])
                if hasher is not None:
                    hasher.add(raw[at : at + step])
            pos += end - start

    @staticmethod
    def _paged_chunk(txn: lmdb.Transaction, key: int, plan: ChunkPlan) -> memoryview | None:
        """A chunk written in page values, gathered (at most a chunk), or None."""
        prefix = _KEY.pack(key, plan.index)
        cursor = txn.cursor()
        if not cursor.set_range(_PIECE_KEY.pack(key, plan.index, 0)):
            return None
        out = np.empty(plan.stored_bytes, np.uint8)
        pos = 0
        for raw_key, value in cursor:
            if bytes(raw_key[: _KEY.size]) != prefix or len(raw_key) != _PIECE_KEY.size:
                break
            if pos + len(value) > plan.stored_bytes:
                return None  # more than the chunk holds: damaged
            out[pos : pos + len(value)] = np.frombuffer(value, np.uint8)
            pos += len(value)
        return memoryview(out.data) if pos == plan.stored_bytes and pos else None

    @contextlib.contextmanager
    def _lend(self, entries: list[Entry], labels: list[str]) -> Iterator[list[LentChunks | None]]:
        # Each chunk is one value, lent from the map inside one read
        # transaction (a thread may hold only one), which keeps their pages
        # from reuse until the block ends.
        env = self._require_env()
        try:
            txn = env.begin(db=self._data_db, buffers=True)
        except lmdb.Error as e:
            raise StoreError(f"reading from the store failed: {e}") from e
        try:
            lent: list[LentChunks | None] = []
            for entry, label in zip(entries, labels, strict=True):
                chunks: LentChunks = []
                for plan in plan_chunks(entry.nbytes, None):
                    value = txn.get(_KEY.pack(entry.key, plan.index))
                    if value is None:
                        break  # written in pages, or missing: read_into says which
                    if len(value) != plan.stored_bytes:
                        offset = plan.index * CHUNK_BYTES
                        raise IntegrityError(
                            f"{label}: store chunk at byte {offset} is truncated", bo=label, offset=offset
                        )
                    chunks.append([memoryview(value)])
                lent.append(chunks if len(chunks) == -(-entry.nbytes // CHUNK_BYTES) else None)
            yield lent
        except lmdb.Error as e:
            raise StoreError(f"reading from the store failed: {e}") from e
        finally:
            txn.abort()

    def _unplace(self, entry: Entry) -> None:
        env = self._require_env()
        prefix = _ENTRY_PREFIX.pack(entry.key)
        try:
            with self._write_lock, env.begin(write=True, db=self._data_db) as txn:
                cursor = txn.cursor()
                found = cursor.set_range(prefix)
                while found and bytes(cursor.key()[: _ENTRY_PREFIX.size]) == prefix:
                    found = cursor.delete()  # moves to the next value
        except lmdb.Error as e:
            raise StoreError(f"releasing a store entry failed: {e}") from e

    def _flush(self, entry: Entry) -> None:
        self._sync_meta()

    def _drop_cache(self) -> bool:
        # Written back, so the host can reclaim the pages under pressure; but
        # LMDB keeps the whole map mapped, so nothing is dropped here.
        self._sync_meta()
        return False

    def _sync_meta(self) -> None:
        try:
            self._require_env().sync(True)
        except lmdb.Error as e:
            raise StoreError(f"flushing the store failed: {e}") from e

    def _fsck_space(self, entries: dict[int, Entry]) -> list[str]:
        env = self._require_env()
        orphans: dict[int, int] = {}
        with env.begin(db=self._data_db) as txn:
            for raw_key, value in txn.cursor():
                (key,) = _ENTRY_PREFIX.unpack_from(raw_key)
                if key not in entries:
                    orphans[key] = orphans.get(key, 0) + len(value)
        return [
            f"leak: entry {key} holds {nbytes} bytes but no record owns it "
            "(left by a process that died; the next open reclaims it)"
            for key, nbytes in sorted(orphans.items())
        ]

    def chunk_count(self) -> int:
        """Number of stored chunks, whole or in pages (for leak checks)."""
        env = self._require_env()
        with env.begin(db=self._data_db) as txn:
            return len({bytes(key[: _KEY.size]) for key in txn.cursor().iternext(values=False)})
