"""The slot-file backend: stored bytes in a preallocated file of 4 KiB slots.

``slots.bin`` is created at its full size with ``posix_fallocate`` and
memory-mapped; an entry's stored bytes are laid out, in order, over its
extents (see :mod:`gpubo.store.slots`). Eviction writes from the mapped
device buffer straight into the slots with ``pwrite`` (one copy, into the
page cache; copying into the mapping instead takes a page fault per 4 KiB
once the file has been written back). Restore copies from the mapping
straight to the device (entries the store lends: no zero page, and below
:data:`~gpubo.store.base.LEND_MAX_BYTES` unless hashed), or reads with
``preadv`` into the destination (a mapped device buffer or a bounce
buffer), which is faster for large entries without checksums. A slot file
cut short under the store is a StoreError, not a SIGBUS: ``preadv`` reports
the short read, and each lend first checks the file's size
(:class:`~gpubo.store.integrity.MappedFiles`; a cut during the device's copy
from a lent view can still fault).
Only named records touch LMDB (a small metadata environment beside the slot
file); the slot map itself is not saved: it is rebuilt from the records when
the store is opened, so anonymous entries of a dead process are free again
by construction and a crash can never leak a slot.

Durability: ``lazy`` leaves the bytes in the page cache; ``sync`` flushes
the file (fdatasync) before the entry is committed; ``direct`` writes
and reads with ``O_DIRECT`` through one chunk-sized, page-aligned bounce
buffer (allocated once), so eviction does not fill the page cache. A
filesystem that refuses ``O_DIRECT`` is a clear StoreError when the store is
opened.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import threading
from collections.abc import Iterator, Sequence

import lmdb
import numpy as np

from gpubo._errors import StoreError, StoreFull
from gpubo.store.base import (
    CHUNK_BYTES,
    LEND_MAX_BYTES,
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
from gpubo.store.slots import SlotAllocator

__all__ = ["LEND_MAX_BYTES", "SlotFileStore"]

log = logging.getLogger(__name__)

_SLOTS_NAME = "slots.bin"

Extents = tuple[tuple[int, int], ...]


def _segments(extents: Extents, start: int, length: int) -> Iterator[tuple[int, int]]:
    """File ``(offset, length)`` runs holding stream bytes ``[start, start+length)``."""
    pos = 0
    for slot, count in extents:
        ext_bytes = count * PAGE_BYTES
        if start < pos + ext_bytes and length > 0:
            skip = max(0, start - pos)
            n = min(ext_bytes - skip, length)
            yield slot * PAGE_BYTES + skip, n
            start += n
            length -= n
        pos += ext_bytes
        if length <= 0:
            return


def _zip(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> Iterator[tuple[int, int, int]]:
    """Pair two lists of ``(offset, length)`` runs of equal total length:
    yields ``(offset in a, offset in b, length)``."""
    i = j = 0
    ai, ao = a[0] if a else (0, 0)
    bi, bo = b[0] if b else (0, 0)
    while i < len(a) and j < len(b):
        n = min(ao, bo)
        yield ai, bi, n
        ai, ao, bi, bo = ai + n, ao - n, bi + n, bo - n
        if not ao:
            i += 1
            if i < len(a):
                ai, ao = a[i]
        if not bo:
            j += 1
            if j < len(b):
                bi, bo = b[j]


def _starts(counts: list[int]) -> Iterator[int]:
    """Running sums of ``counts``, from 0."""
    done = 0
    for count in counts:
        yield done
        done += count


def _split_extents(extents: list[tuple[int, int]], counts: list[int]) -> list[Extents]:
    """Cut ``extents`` (covering ``sum(counts)`` slots, in order) into
    consecutive runs of ``counts[i]`` slots each."""
    runs: list[Extents] = []
    i, slot, left = 0, extents[0][0] if extents else 0, extents[0][1] if extents else 0
    for want in counts:
        run: list[tuple[int, int]] = []
        while want:
            if not left:
                i += 1
                slot, left = extents[i]
            take = min(want, left)
            run.append((slot, take))
            slot, left, want = slot + take, left - take, want - take
        runs.append(tuple(run))
    return runs


def _meta_bytes(size_bytes: int) -> int:
    """Room for the records' LMDB environment: 1 MiB and 1/64 of the slot
    file (how many records that holds is measured in the README)."""
    return (1 << 20) + size_bytes // 64 // PAGE_BYTES * PAGE_BYTES


class SlotFileStore(SwapStore):
    """Swap entries in a preallocated slot file (see the module docstring)."""

    backend_name = "slotfile"

    def _minimum_size(self) -> int:
        return PAGE_BYTES

    def _data_file(self) -> str:
        return _SLOTS_NAME

    def _check_files(self, state: StoreState | None) -> None:
        super()._check_files(state)
        if state is None:
            return
        size = os.path.getsize(os.path.join(self.path, _SLOTS_NAME)) // PAGE_BYTES * PAGE_BYTES
        if size < PAGE_BYTES:
            raise StoreError(
                f"store {self.path!r} is damaged: its slot file {_SLOTS_NAME} is empty; "
                f"its {state.records} record(s) are lost"
            )
        if size < state.data_bytes:
            # Open for reading: records inside what is left are good, the
            # others are damaged (and say so when read).
            problem = f"the slot file is truncated: {size} of its {state.data_bytes} bytes are left"
            self.problems.append(f"store {self.path!r}: {problem}")
            self._read_only = problem

    def footprint(self, nbytes: int) -> int:
        return -(-nbytes // PAGE_BYTES) * PAGE_BYTES

    def _open_env(self, size_bytes: int) -> lmdb.Environment:
        # The slot file comes first, so that a store directory with metadata
        # always has one (and is recognised as a slot-file store).
        self._create_slot_file(size_bytes)
        # Metadata only: records are small (a checksum per MiB, a few extents).
        # Its file is preallocated like the slot file, so that a full disk
        # shows up here and never at a commit (see _meta_bytes).
        meta_bytes = _meta_bytes(size_bytes)
        path = os.path.join(self.path, "data.mdb")
        new = not os.path.exists(path)  # an existing one is never touched before it is checked
        env = lmdb.open(
            self.path,
            map_size=meta_bytes,
            subdir=True,
            sync=True,
            metasync=True,
            max_dbs=4,
            mode=0o600,
        )
        if not new:
            return env
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            try:
                os.posix_fallocate(fd, 0, meta_bytes)
            finally:
                os.close(fd)
        except OSError as e:
            env.close()
            raise StoreError(
                f"cannot preallocate {meta_bytes} bytes for the store's records at {path!r}: {e}"
            ) from e
        return env

    def _create_slot_file(self, size_bytes: int) -> None:
        """Create ``slots.bin`` at its full size, atomically: it is preallocated
        under a temporary name and renamed, so a crash never leaves a short one."""
        path = os.path.join(self.path, _SLOTS_NAME)
        if os.path.exists(path) or os.path.exists(os.path.join(self.path, "data.mdb")):
            return  # an existing store: the format check says what it is
        tmp = path + ".tmp"
        nbytes = size_bytes // PAGE_BYTES * PAGE_BYTES
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.posix_fallocate(fd, 0, nbytes)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)  # never leave a half-made slot file behind
            raise StoreError(f"cannot create the slot file {path!r} ({nbytes} bytes): {e}") from e

    def _open_data(self, size_bytes: int) -> None:
        path = os.path.join(self.path, _SLOTS_NAME)
        self._fd = -1
        self._direct_fd = -1
        self._mmap: mmap.mmap | None = None
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            self.size_bytes = os.fstat(self._fd).st_size // PAGE_BYTES * PAGE_BYTES
            if self.size_bytes != size_bytes // PAGE_BYTES * PAGE_BYTES:
                log.info("store %s keeps its size %d (asked %d)", self.path, self.size_bytes, size_bytes)
            if self.size_bytes < PAGE_BYTES:
                raise StoreError(f"the slot file {path!r} is empty or truncated ({self.size_bytes} bytes)")
            self._mmap = mmap.mmap(self._fd, self.size_bytes)
        except OSError as e:
            raise StoreError(f"cannot open or map the slot file {path!r}: {e}") from e
        self._view = memoryview(self._mmap)
        self._mapped.watch(path, "slot file")
        self._alloc = SlotAllocator(self.size_bytes // PAGE_BYTES)
        self.capacity_bytes = self.size_bytes
        if self.durability is Durability.DIRECT:
            try:
                self._direct_fd = os.open(path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
            except OSError as e:
                if e.errno == errno.EINVAL:
                    raise StoreError(
                        f"the filesystem of {path!r} refuses O_DIRECT; use durability='sync' or 'lazy'"
                    ) from e
                raise StoreError(f"cannot open {path!r} with O_DIRECT: {e}") from e
            self._bounce = mmap.mmap(-1, CHUNK_BYTES + PAGE_BYTES)  # page-aligned, once
            self._bounce_arr = np.frombuffer(self._bounce, np.uint8)
            self._bounce_lock = threading.Lock()  # one chunk through the bounce at a time

    def _admit_record(self, name: str, entry: Entry) -> str | None:
        # The slot map is rebuilt from the records, so the slots of anonymous
        # entries of a dead process are free by construction.
        slots = sum(count for _, count in entry.extents)
        if slots * PAGE_BYTES != entry.footprint or entry.stored_bytes > entry.footprint:
            return f"its {slots} slot(s) do not hold its footprint of {entry.footprint} bytes"
        try:
            self._alloc.mark_used(entry.extents)
        except ValueError as e:
            past = any(start + count > self._alloc.nslots for start, count in entry.extents)
            return "its slots lie past the end of the slot file" if past else str(e)
        return None

    def _reclaim(self, keep: dict[int, Entry]) -> int:
        return 0  # slots of anonymous entries were never recorded: free already

    def _place(self, key: int, nbytes: int, plans: list[ChunkPlan]) -> tuple[Extents, int]:
        stored = sum(p.stored_bytes for p in plans)
        nslots = -(-stored // PAGE_BYTES)
        extents = self._alloc.alloc(nslots)
        if extents is None:
            free = self._alloc.free_slots * PAGE_BYTES
            raise StoreFull(
                f"store full: {nbytes} bytes need {nslots * PAGE_BYTES} bytes of slots, {free} free",
                nbytes=nbytes,
                free_bytes=free,
            )
        return tuple(extents), nslots * PAGE_BYTES

    def _write_chunks(
        self, key: int, extents: Extents, src: Chunks, plans: list[ChunkPlan], hashed: bool
    ) -> list[int | None]:
        self._mapped.check()  # a write past a cut would leave a hole the size check misses
        sums: list[int | None] = []
        for plan in plans:
            n = plan.stored_bytes
            if not n:
                sums.append(None)
                continue
            chunk = src.chunk(plan.index)
            base = plan.index * CHUNK_BYTES
            hasher = Hasher(hashed)
            if self.durability is Durability.DIRECT:
                with self._bounce_lock:
                    self._write_direct(extents, plan, np.frombuffer(chunk, np.uint8))
                    hasher.add(memoryview(self._bounce)[:n])
                    sums.append(hasher.digest())
                continue
            segs = list(_segments(extents, plan.stream_offset, n))
            pieces = [(s - base, e - s) for s, e in plan.pieces]
            for src_off, file_off, length in _zip(pieces, segs):
                # pwrite, not a copy into the mapping: writing through the map
                # takes a page fault per 4 KiB page once the file was written back.
                for done, step in steps(length, hashed):
                    piece = chunk[src_off + done : src_off + done + step]
                    self._pwrite_all(piece, file_off + done)
                    hasher.add(piece)
            sums.append(hasher.digest())
        return sums

    def _write_batch(self, src: memoryview, layout: Sequence[tuple[int, int]]) -> list[Entry] | None:
        self._mapped.check()
        counts = [-(-n // PAGE_BYTES) for _, n in layout]
        total = sum(counts)
        with self._lock:
            first_key = self._next_key
            self._next_key += len(layout)
            extents = self._alloc.alloc(total)
            if extents is None:
                free = self._alloc.free_slots * PAGE_BYTES
                raise StoreFull(
                    f"store full: a batch of {len(layout)} entries needs {total * PAGE_BYTES} bytes "
                    f"of slots, {free} free",
                    nbytes=sum(n for _, n in layout),
                    free_bytes=free,
                )
            self._used_bytes += total * PAGE_BYTES
        try:
            runs = _split_extents(extents, counts)
            base = layout[0][0]
            packed = all(
                off == base + PAGE_BYTES * done
                for (off, _), done in zip(layout, _starts(counts), strict=True)
            )
            if packed:
                # The slots continue each other as the entries do in src: one
                # pwrite per extent (the last may stop short of its slot's end).
                pos = base
                for slot, count in extents:
                    length = min(count * PAGE_BYTES, src.nbytes - pos)
                    self._pwrite_all(src[pos : pos + length], slot * PAGE_BYTES)
                    pos += count * PAGE_BYTES
            else:
                for (off, n), run in zip(layout, runs, strict=True):
                    for file_off, length in _segments(run, 0, n):
                        self._pwrite_all(src[off : off + length], file_off)
                        off += length
            entries = [
                Entry(
                    key=first_key + i,
                    nbytes=n,
                    footprint=count * PAGE_BYTES,
                    stored_bytes=n,
                    checksums=self._checksum(src[off : off + n]),
                    zeromap=None,
                    extents=run,
                )
                for i, ((off, n), count, run) in enumerate(zip(layout, counts, runs, strict=True))
            ]
            return self._commit_batch(entries)
        except BaseException:
            with self._lock:
                self._used_bytes -= total * PAGE_BYTES
                self._alloc.free(extents)
            raise

    def _pwrite_all(self, view: memoryview, offset: int) -> None:
        try:
            while view.nbytes:
                written = os.pwrite(self._fd, view, offset)
                view, offset = view[written:], offset + written
        except OSError as e:
            raise StoreError(f"writing to the slot file failed: {e}") from e

    def _pread_all(self, view: memoryview, offset: int) -> None:
        try:
            while view.nbytes:
                got = os.preadv(self._fd, [view], offset)
                if not got:
                    raise OSError(errno.EIO, f"the slot file ends at byte {offset}")
                view, offset = view[got:], offset + got
        except OSError as e:
            raise StoreError(f"reading the slot file failed: {e}") from e

    def _write_direct(self, extents: Extents, plan: ChunkPlan, chunk: np.ndarray) -> None:
        """Write ``plan``'s stored bytes (``chunk`` holds its chunk) with O_DIRECT."""
        base = plan.index * CHUNK_BYTES
        pos = 0
        for start, end in plan.pieces:
            self._bounce_arr[pos : pos + end - start] = chunk[start - base : end - base]
            pos += end - start
        padded = -(-pos // PAGE_BYTES) * PAGE_BYTES
        self._bounce_arr[pos:padded] = 0
        view = memoryview(self._bounce)
        done = 0
        try:
            for file_off, length in _segments(extents, plan.stream_offset, padded):
                written = os.pwrite(self._direct_fd, view[done : done + length], file_off)
                if written != length:
                    raise OSError(errno.EIO, f"short O_DIRECT write ({written} of {length})")
                done += length
        except OSError as e:
            raise StoreError(f"O_DIRECT write to the slot file failed: {e}") from e

    def _read_chunks(
        self, entry: Entry, dst: Chunks, plans: list[ChunkPlan], label: str, verify: bool
    ) -> None:
        hashed = hashes_stream(entry, verify)
        aside = hashes_aside(entry, dst, hashed) if self.durability is not Durability.DIRECT else None
        if aside is not None:
            read_verified_aside(
                entry, aside, plans, label, lambda plan, out: self._pread_plan(entry, plan, out, None)
            )
            return
        for plan in plans:
            out = np.frombuffer(dst.chunk(plan.index), np.uint8)
            zero_fill_plan(plan, out)
            n = plan.stored_bytes
            if not n:
                dst.filled(plan.index)
                continue
            hasher = Hasher(hashed)
            if self.durability is Durability.DIRECT:
                base = plan.index * CHUNK_BYTES
                pieces = [(s - base, e - s) for s, e in plan.pieces]
                with self._bounce_lock:
                    self._read_direct(entry.extents, plan)
                    for stream_off, dst_off, length in _zip([(0, n)], pieces):
                        chunk = self._bounce_arr[stream_off : stream_off + length]
                        np.copyto(out[dst_off : dst_off + length], chunk)
                    hasher.add(memoryview(self._bounce)[:n])
                    if verify:
                        verify_chunk(entry, plan.index, hasher, label, out)
                dst.filled(plan.index)
                continue
            self._pread_plan(entry, plan, out, hasher if hashed else None)
            if verify:
                verify_chunk(entry, plan.index, hasher, label, out)
            dst.filled(plan.index)

    def _pread_plan(self, entry: Entry, plan: ChunkPlan, out: np.ndarray, hasher: Hasher | None) -> None:
        """Read ``plan``'s stored bytes into ``out``, its chunk, with
        ``preadv``, not a copy out of the mapping: faster for large entries
        without checksums (see LEND_MAX_BYTES), and a file cut short under
        the store is a StoreError, not a SIGBUS. With a ``hasher``, each
        step is hashed where it landed, while it is still in cache."""
        base = plan.index * CHUNK_BYTES
        pieces = [(s - base, e - s) for s, e in plan.pieces]
        segs = list(_segments(entry.extents, plan.stream_offset, plan.stored_bytes))
        dest = out.data
        for file_off, dst_off, length in _zip(segs, pieces):
            for done, step in steps(length, hasher is not None):
                piece = dest[dst_off + done : dst_off + done + step]
                self._pread_all(piece, file_off + done)
                if hasher is not None:
                    hasher.add(piece)

    @contextlib.contextmanager
    def _lend(self, entries: list[Entry], labels: list[str]) -> Iterator[list[LentChunks | None]]:
        # Runs of the mapping, once the file is seen whole. Not for ``direct``,
        # whose reads bypass the page cache.
        if self.durability is Durability.DIRECT:
            yield [None] * len(entries)
            return
        self._mapped.check()
        lent: list[LentChunks | None] = []
        for entry in entries:
            lent.append(
                [
                    [
                        self._view[at : at + n].toreadonly()
                        for at, n in _segments(entry.extents, plan.stream_offset, plan.stored_bytes)
                    ]
                    for plan in plan_chunks(entry.nbytes, None)
                ]
            )
        yield lent

    def _read_direct(self, extents: Extents, plan: ChunkPlan) -> None:
        padded = -(-plan.stored_bytes // PAGE_BYTES) * PAGE_BYTES
        view = memoryview(self._bounce)
        done = 0
        try:
            for file_off, length in _segments(extents, plan.stream_offset, padded):
                got = os.preadv(self._direct_fd, [view[done : done + length]], file_off)
                if got != length:
                    raise OSError(errno.EIO, f"short O_DIRECT read ({got} of {length})")
                done += length
        except OSError as e:
            raise StoreError(f"O_DIRECT read from the slot file failed: {e}") from e

    def _unplace(self, entry: Entry) -> None:
        self._alloc.free(entry.extents)

    def _flush(self, entry: Entry) -> None:
        try:
            if self.durability is Durability.DIRECT:
                os.fdatasync(self._direct_fd)
                return
            os.fdatasync(self._fd)  # one flush of the file, not one per extent
        except OSError as e:
            raise StoreError(f"flushing the slot file failed: {e}") from e

    def _sync_meta(self) -> None:
        return  # the metadata environment syncs every commit

    def _drop_cache(self) -> bool:
        assert self._mmap is not None
        try:
            self._mmap.flush()  # msync: the dirty pages are written back
            self._mmap.madvise(mmap.MADV_DONTNEED)  # unmapped here; the file keeps the bytes
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)  # and the host drops them
        except OSError as e:
            raise StoreError(f"dropping the slot file's cached pages failed: {e}") from e
        return True

    def _fsck_space(self, entries: dict[int, Entry]) -> list[str]:
        used = int(self._alloc.used_mask().sum()) * PAGE_BYTES
        owned = sum(count * PAGE_BYTES for e in entries.values() for _, count in e.extents)
        if used != owned:
            return [f"slot map: {used} bytes of slots in use, entries own {owned}"]
        return []

    def _close_data(self) -> None:
        if getattr(self, "_direct_fd", -1) >= 0:
            os.close(self._direct_fd)
            self._direct_fd = -1
        if getattr(self, "_mmap", None) is not None:
            self._view.release()
            try:
                self._mmap.close()  # type: ignore[union-attr]
            except BufferError:  # a view still alive somewhere: the GC unmaps it
                log.debug("slot file mapping still exported at close")
            self._mmap = None
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)
            self._fd = -1
        if getattr(self, "_bounce", None) is not None:
            self._bounce_arr = np.empty(0, np.uint8)
            try:
                self._bounce.close()
            except BufferError:
                log.debug("bounce buffer still exported at close")
            self._bounce = None  # type: ignore[assignment]

    def chunk_count(self) -> int:
        """Slots in use (for leak checks)."""
        return int(self._alloc.used_mask().sum())
