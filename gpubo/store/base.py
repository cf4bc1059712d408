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

import base64
import contextlib
import enum
import errno
import fcntl
import functools
import json
import logging
import os
import struct
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import lmdb
import numpy as np
import xxhash

from gpubo._errors import IntegrityError, StoreError, StoreFull
from gpubo.store.integrity import STATE_NAME, StoreState, check_lmdb_file, read_state, write_state
from gpubo.store.private import PrivateDir

__all__ = [
    "CHUNK_BYTES",
    "FORMAT_VERSION",
    "PAGE_BYTES",
    "ChunkPlan",
    "Durability",
    "Entry",
    "FsckReport",
    "SwapStore",
    "plan_chunks",
    "scan_zero_pages",
]

log = logging.getLogger(__name__)

#: Entries are processed (copied, hashed) in chunks of this many bytes.
CHUNK_BYTES = 1 << 20
#: Copies that are hashed go in steps of this size (see :func:`steps`).
HASH_STEP_BYTES = 256 << 10
#: The unit of zero-page detection and of slot allocation.
PAGE_BYTES = 4096
_PAGES_PER_CHUNK = CHUNK_BYTES // PAGE_BYTES
_SMALL_SCAN_BYTES = 64 * PAGE_BYTES
#: Bump when the on-disk layout changes; a store of another version is refused.
FORMAT_VERSION = 3
_LOCK_NAME = "gpubo.lock"
Extents = tuple[tuple[int, int], ...]
_FORMAT_KEY = b"format"
_GENERATION_KEY = b"generation"
#: The files a failed open of a new store removes if it made them (not the
#: lock file: removing it could split the next two openers' locks).
_STORE_FILES = frozenset({STATE_NAME, "data.mdb", "lock.mdb", "slots.bin", "slots.bin.tmp"})
_GENERATION = struct.Struct(">Q")


class Durability(enum.Enum):
    """When evicted bytes reach stable storage."""

    LAZY = "lazy"  #: in the page cache; the OS writes back later
    SYNC = "sync"  #: flushed before the entry is committed
    DIRECT = "direct"  #: written with O_DIRECT, bypassing the page cache (slotfile only)


@dataclass(frozen=True)
class Entry:
    """An immutable run of stored bytes: one BO's content at one moment.

    ``footprint`` is the store capacity it occupies; ``stored_bytes`` the
    non-zero bytes kept; ``checksums`` one xxh3-64 per chunk (None for a
    chunk with no stored bytes) or None when checksums are off; ``zeromap``
    ``numpy.packbits`` of the per-page "all zeros" flags, or None when no page
    is zero; ``extents`` the slot runs ``(first slot, count)`` (slotfile).
    """

    key: int
    nbytes: int
    footprint: int
    stored_bytes: int
    checksums: tuple[int | None, ...] | None
    zeromap: bytes | None
    extents: tuple[tuple[int, int], ...] = ()

    def zero_pages(self) -> np.ndarray | None:
        """The per-page zero flags, or None when no page is zero."""
        if self.zeromap is None:
            return None
        npages = -(-self.nbytes // PAGE_BYTES)
        return np.unpackbits(np.frombuffer(self.zeromap, np.uint8), count=npages).astype(np.bool_)

    def to_record(self, name: str) -> bytes:
        """Serialise for the named record ``name``: JSON, then ``#`` and the
        xxh3-64 of the name and the JSON, so that a damaged record (or a
        record under a damaged name) is seen as such."""
        rec: dict[str, Any] = {
            "key": self.key,
            "nbytes": self.nbytes,
            "footprint": self.footprint,
            "stored_bytes": self.stored_bytes,
            "checksums": None if self.checksums is None else list(self.checksums),
            "zeromap": None if self.zeromap is None else base64.b64encode(self.zeromap).decode(),
            "extents": [list(e) for e in self.extents],
        }
        body = json.dumps(rec, separators=(",", ":")).encode()
        return body + b"#" + b"%016x" % _record_digest(name, body)

    @classmethod
    def from_record(cls, raw: bytes, name: str) -> Entry:
        """Parse the named record ``name``.

        Raises:
            ValueError: the record is malformed or fails its checksum.
        """
        body, sep, digest = raw.rpartition(b"#")
        if not sep or digest != b"%016x" % _record_digest(name, body):
            raise ValueError("the record fails its checksum")
        try:
            rec = json.loads(body)
            entry = cls(
                key=int(rec["key"]),
                nbytes=int(rec["nbytes"]),
                footprint=int(rec["footprint"]),
                stored_bytes=int(rec["stored_bytes"]),
                checksums=None if rec["checksums"] is None else tuple(rec["checksums"]),
                zeromap=None if rec["zeromap"] is None else base64.b64decode(rec["zeromap"]),
                extents=tuple((int(a), int(b)) for a, b in rec["extents"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed entry record: {e}") from e
        if entry.nbytes <= 0 or entry.key <= 0 or not 0 <= entry.stored_bytes <= entry.nbytes:
            raise ValueError(f"malformed entry record: sizes {entry.nbytes}/{entry.stored_bytes}")
        return entry


def _record_digest(name: str, body: bytes) -> int:
    return int(xxhash.xxh3_64_intdigest(name.encode() + b"\0" + body))


@dataclass(frozen=True)
class ChunkPlan:
    """One chunk of an entry: where its non-zero bytes are in the BO
    (``pieces``, byte ranges), where its zero pages are (``zeros``), and
    where its stored bytes start in the entry's stored stream."""

    index: int
    pieces: tuple[tuple[int, int], ...]
    zeros: tuple[tuple[int, int], ...]
    stream_offset: int

    @property
    def stored_bytes(self) -> int:
        return sum(end - start for start, end in self.pieces)


def scan_zero_pages(view: memoryview, nbytes: int) -> np.ndarray | None:
    """Per-page "all zeros" flags of ``view``, or None when no page is zero.

    Cheap for ordinary data: only pages whose first 8 bytes are zero are read
    in full; the others cost one cache line each.
    """
    if nbytes % PAGE_BYTES == 0 and _no_zero_page_possible(view, nbytes):
        return None
    data = np.frombuffer(view, np.uint8, count=nbytes)
    full = nbytes // PAGE_BYTES
    npages = -(-nbytes // PAGE_BYTES)
    zero = np.zeros(npages, np.bool_)
    if full:
        words = data[: full * PAGE_BYTES].view(np.uint64).reshape(full, PAGE_BYTES // 8)
        candidates = np.flatnonzero(words[:, 0] == 0)
        for lo in range(0, len(candidates), _PAGES_PER_CHUNK):  # bounded temporaries
            idx = candidates[lo : lo + _PAGES_PER_CHUNK]
            zero[idx] = ~words[idx].any(axis=1)
    if npages > full:
        zero[-1] = not data[full * PAGE_BYTES :].any()
    return zero if zero.any() else None


def _no_zero_page_possible(view: memoryview, nbytes: int) -> bool:
    """Every page of the first ``nbytes`` (whole pages) of ``view`` starts with
    a non-zero 8-byte word, so none is all zeros: the common case, one look
    per page (a few pages without numpy's per-call overhead)."""
    if nbytes <= _SMALL_SCAN_BYTES:
        return all(view.cast("B")[:nbytes].cast("Q")[:: PAGE_BYTES // 8])
    return bool(np.frombuffer(view, np.uint64, count=nbytes // 8)[:: PAGE_BYTES // 8].all())


def plan_chunks(nbytes: int, zero: np.ndarray | None) -> list[ChunkPlan]:
    """Cut ``nbytes`` into chunk plans, skipping zero pages."""
    if zero is None:
        return list(_plain_plans(nbytes))
    return _plan_chunks(nbytes, zero)


@functools.lru_cache(maxsize=512)
def _plain_plans(nbytes: int) -> tuple[ChunkPlan, ...]:
    """The plans of an entry without zero pages (frozen, so shared: BO sizes repeat)."""
    return tuple(_plan_chunks(nbytes, None))


def _plan_chunks(nbytes: int, zero: np.ndarray | None) -> list[ChunkPlan]:
    plans = []
    stream = 0
    for index, start in enumerate(range(0, nbytes, CHUNK_BYTES)):
        end = min(start + CHUNK_BYTES, nbytes)
        if zero is None:
            pieces: tuple[tuple[int, int], ...] = ((start, end),)
            zeros: tuple[tuple[int, int], ...] = ()
        else:
            first = start // PAGE_BYTES
            flags = zero[first : first + _PAGES_PER_CHUNK]
            pieces = tuple(_ranges(~flags, first, nbytes))
            zeros = tuple(_ranges(flags, first, nbytes))
        plan = ChunkPlan(index, pieces, zeros, stream)
        stream += plan.stored_bytes
        plans.append(plan)
    return plans


def _ranges(flags: np.ndarray, first_page: int, nbytes: int) -> Iterator[tuple[int, int]]:
    """Byte ranges of the runs of True in ``flags`` (pages from ``first_page``)."""
    if not flags.any():
        return
    padded = np.concatenate(([False], flags, [False]))
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    for lo, hi in zip(edges[::2], edges[1::2], strict=True):
        yield (first_page + int(lo)) * PAGE_BYTES, min((first_page + int(hi)) * PAGE_BYTES, nbytes)


def _batch_zero_flags(src: memoryview, layout: Sequence[tuple[int, int]]) -> list[np.ndarray | None]:
    """:func:`scan_zero_pages` of every entry of a batch, with one vectorised
    look at the first word of each page of ``src`` for the common case of no
    candidate zero page at all."""
    aligned = src.nbytes % PAGE_BYTES == 0 and all(off % PAGE_BYTES == 0 for off, _ in layout)
    if aligned and _no_zero_page_possible(src, src.nbytes):
        return [None] * len(layout)
    return [scan_zero_pages(src[off : off + n], n) for off, n in layout]


class _Hasher:
    """xxh3-64 of one chunk's stored stream, fed piece by piece as it is
    copied (see :func:`steps`); does nothing when ``enabled`` is false."""

    def __init__(self, enabled: bool = True) -> None:
        self._h = xxhash.xxh3_64() if enabled else None

    def add(self, piece: memoryview) -> None:
        if self._h is not None:
            self._h.update(piece)

    def digest(self) -> int | None:
        return int(self._h.intdigest()) if self._h is not None else None


def steps(length: int, hashed: bool) -> Iterator[tuple[int, int]]:
    """``(offset, length)`` steps of a copy of ``length`` bytes: one step when
    nothing is hashed, else :data:`HASH_STEP_BYTES` each, so that each step is
    hashed right after it is copied, while it is still in the CPU's cache (a
    whole chunk is not: hashing it after its copy reads memory again)."""
    if not hashed:
        yield 0, length
        return
    for done in range(0, length, HASH_STEP_BYTES):
        yield done, min(HASH_STEP_BYTES, length - done)


@dataclass
class FsckReport:
    """What :meth:`SwapStore.fsck` found; ``ok`` when ``problems`` is empty."""

    path: str
    backend: str
    entries: int = 0
    names: list[str] = field(default_factory=list)
    stored_bytes: int = 0
    used_bytes: int = 0
    capacity_bytes: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class SwapStore(ABC):
    """A swap-slot store; subclasses place the stored bytes.

    Args:
        path: store directory (created, mode 0700, if missing); None for a
            private temporary directory deleted by :meth:`close`.
        size_bytes: the store's size (its data file is preallocated).
        checksums: keep and verify an xxh3-64 per chunk.
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
        data = os.path.join(self.path, "data.mdb")
        if state is not None:
            if state.backend != self.backend_name:
                raise StoreError(
                    f"store {self.path!r} is a {state.backend!r} store; open it with "
                    f"store_backend={state.backend!r}"
                )
            for name in {"data.mdb", self._data_file()}:
                if not os.path.isfile(os.path.join(self.path, name)):
                    raise StoreError(
                        f"store {self.path!r} is damaged: its file {name} is missing (or not a file); "
                        f"its {state.records} record(s) cannot be read"
                    )
            if os.path.getsize(data) < 2 * PAGE_BYTES:  # LMDB would make a new, empty one of it
                raise StoreError(
                    f"store {self.path!r} is damaged: data.mdb is truncated to {os.path.getsize(data)} "
                    f"bytes; its {state.records} record(s) cannot be read"
                )
        if os.path.isdir(data):
            raise StoreError(f"store {self.path!r} is damaged: data.mdb is a directory")
        check_lmdb_file(data, PAGE_BYTES)

    def _admit_record(self, name: str, entry: Entry) -> str | None:
        """Backend check of a record read at open (and claim of its space);
        what is wrong with it, or None."""
        return None

    def _max_stored_key(self) -> int:
        """The largest entry key with bytes in the store (0: none known)."""
        return 0

    def _check_durability(self) -> None:  # noqa: B027 - optional hook
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
        self, key: int, extents: tuple[tuple[int, int], ...], src: memoryview, plans: list[ChunkPlan]
    ) -> list[int | None]:
        """Copy the planned pieces of ``src`` into place; per-chunk checksums."""

    @abstractmethod
    def _read_chunks(self, entry: Entry, dst: memoryview, plans: list[ChunkPlan], label: str) -> None:
        """Copy ``entry``'s stored bytes into ``dst`` and verify them."""

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
            have = txn.get(_FORMAT_KEY)
            if have is None:
                txn.put(_FORMAT_KEY, want)
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

    def _load_names(self, state: StoreState | None) -> None:
        """Read every record; check the generation against the state file;
        reclaim what a dead process left only in a store proven whole."""
        env = self._require_env()
        keep: dict[int, Entry] = {}
        with env.begin() as txn:
            raw_gen = txn.get(_GENERATION_KEY, db=self._meta_db)
            self._generation = _GENERATION.unpack(raw_gen)[0] if raw_gen is not None else 0
            for raw_name, raw in txn.cursor(db=self._names_db):
                try:
                    name = bytes(raw_name).decode()
                except UnicodeDecodeError:
                    name = bytes(raw_name).decode(errors="replace")
                    self._damaged[name] = "its name is not UTF-8"
                    continue
                try:
                    entry = Entry.from_record(bytes(raw), name)
                except ValueError as e:
                    self._damaged[name] = str(e)
                    continue
                self._names[name] = entry
                keep[entry.key] = entry
        for name, entry in sorted(self._names.items()):
            if entry.key in self._entries:
                continue  # several records of one entry: claimed once
            why = self._admit_record(name, entry)
            if why is not None:
                self._damaged[name] = why
                continue
            self._entries[entry.key] = entry
            self._used_bytes += entry.footprint
        for name in self._damaged:
            self._names.pop(name, None)
        for entry in self._entries.values():
            self._refs[entry.key] = sum(1 for e in self._names.values() if e.key == entry.key)
        self._next_key = max([self._max_stored_key(), *self._entries]) + 1
        self._data_bytes = (
            state.data_bytes
            if state is not None
            else os.path.getsize(os.path.join(self.path, self._data_file()))
        )
        self._check_generation(state)
        if self._damaged:
            for name, why in sorted(self._damaged.items()):
                log.warning("store %s: record %r is damaged: %s", self.path, name, why)
            self._read_only = f"{len(self._damaged)} record(s) are damaged (run gpubo fsck)"
        if self._read_only is None and self._reclaim_at_open:
            reclaimed = self._reclaim(keep)
            if reclaimed:
                log.info("store %s: reclaimed %d bytes of anonymous entries", self.path, reclaimed)

    def _check_generation(self, state: StoreState | None) -> None:
        """The records' generation in LMDB against the state file's copy.

        Raises:
            StoreError: LMDB lost committed records (or the state file is
                gone while records exist), when opened to be used; opened
                for fsck (``reclaim=False``), the store is read-only and
                :attr:`problems` says why.
        """
        records = len(self._names) + len(self._damaged)
        lost = None
        if state is None:
            if self._generation or records:
                lost = f"its state file is missing while LMDB holds generation {self._generation}"
        elif self._generation < state.generation or self._generation > state.generation + 1:
            lost = (
                f"LMDB holds records of generation {self._generation} but {state.generation} were "
                f"committed ({state.records} record(s)): LMDB rolled back or was replaced"
            )
        elif self._generation == state.generation and records != state.records:
            lost = f"LMDB holds {records} record(s) but {state.records} were committed"
        if lost is not None:
            message = f"store {self.path!r} cannot prove it is whole: {lost}; nothing was reclaimed"
            if self._reclaim_at_open:
                raise StoreError(message + " (run gpubo fsck)")
            self.problems.append(message)
            self._read_only = lost
            return
        if self._reclaim_at_open and (state is None or self._generation != state.generation):
            self._write_state()  # a new store, or a crash right after a commit (fsck writes nothing)

    def _write_state(self) -> None:
        write_state(
            self.path,
            StoreState(
                FORMAT_VERSION, self.backend_name, self._data_bytes, self._generation, len(self._names)
            ),
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
        return self._write(src, src.nbytes, scan_zero_pages(src, src.nbytes))

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
        flags = _batch_zero_flags(src, layout)
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
                done.append(self._write(src[off : off + n], n, zero))
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

    def _write(self, src: memoryview | None, nbytes: int, zero_flags: np.ndarray | None) -> Entry:
        plans = plan_chunks(nbytes, zero_flags)
        stored = sum(p.stored_bytes for p in plans)
        with self._lock:
            key = self._next_key
            self._next_key += 1
            extents, footprint = self._place(key, nbytes, plans)
            self._used_bytes += footprint
        try:
            if stored:
                assert src is not None
                sums = self._write_chunks(key, extents, src, plans)
            else:
                sums = [None] * len(plans)
            entry = Entry(
                key=key,
                nbytes=nbytes,
                footprint=footprint,
                stored_bytes=stored,
                checksums=tuple(sums) if self.checksums else None,
                zeromap=None if zero_flags is None else np.packbits(zero_flags).tobytes(),
                extents=extents,
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

    def read_into(self, entry: Entry, dst: memoryview, label: str) -> None:
        """Copy ``entry``'s bytes into ``dst`` (zero pages zero-filled) and verify them.

        Raises:
            IntegrityError: stored bytes are missing or fail their checksum;
                ``offset`` names the chunk's first byte, ``label`` the owner.
            StoreError: the store failed.
        """
        plans = plan_chunks(entry.nbytes, entry.zero_pages())
        out = np.frombuffer(dst, np.uint8, count=entry.nbytes)
        for plan in plans:
            for start, end in plan.zeros:
                out[start:end] = 0
        if entry.stored_bytes:
            self._read_chunks(entry, dst, plans, label)

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
        self, entries: Sequence[Entry], labels: Sequence[str]
    ) -> Iterator[list[memoryview | None]]:
        """:meth:`verified_view` of several entries at once (one LMDB read
        transaction for all): every view is verified before any is lent, and
        all stay valid until the ``with`` block ends.

        Raises:
            IntegrityError: an entry's bytes are missing or fail their
                checksum (``bo`` names its label); nothing is lent.
            StoreError: the store failed.
        """
        lendable = [
            i
            for i, e in enumerate(entries)
            if e.nbytes <= CHUNK_BYTES and e.zeromap is None and e.stored_bytes == e.nbytes
        ]
        views: list[memoryview | None] = [None] * len(entries)
        with self._stored_views([entries[i] for i in lendable], [labels[i] for i in lendable]) as lent:
            for i, view in zip(lendable, lent, strict=True):
                entry = entries[i]
                if view is not None and entry.checksums is not None:
                    hasher = _Hasher()
                    hasher.add(view)
                    self._verify(entry, plan_chunks(entry.nbytes, None)[0], hasher, labels[i])
                views[i] = view
            yield views

    @contextlib.contextmanager
    def _stored_views(self, entries: list[Entry], labels: list[str]) -> Iterator[list[memoryview | None]]:
        """Backend part of :meth:`verified_views`: unverified views (or None
        each), valid until the block ends; by default one
        :meth:`_stored_view` each."""
        with contextlib.ExitStack() as stack:
            yield [
                stack.enter_context(self._stored_view(e, label))
                for e, label in zip(entries, labels, strict=True)
            ]

    @contextlib.contextmanager
    def _stored_view(self, entry: Entry, label: str) -> Iterator[memoryview | None]:
        """The unverified view of one entry, or None (the backend has none)."""
        yield None

    def _verify(self, entry: Entry, plan: ChunkPlan, hasher: _Hasher, label: str) -> None:
        if entry.checksums is None:
            return
        if hasher.digest() != entry.checksums[plan.index]:
            offset = plan.index * CHUNK_BYTES
            raise IntegrityError(
                f"{label}: checksum mismatch in the store at byte {offset} (chunk {plan.index})",
                bo=label,
                offset=offset,
            )

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

    # -- named records ------------------------------------------------------

    def commit_name(self, name: str, entry: Entry) -> None:
        """Point the durable record ``name`` at ``entry`` (flushed first), atomically.

        The record takes a reference; the entry it pointed at before loses one
        after the commit (a crash in between leaves unreferenced bytes, which
        the next open reclaims).

        Raises:
            StoreFull: no room is left for the record's metadata; the old
                record stands.
            StoreError: the commit failed, or the store is open for reading
                only; the old record stands.
        """
        self._check_writable()
        self.flush(entry)
        with self._lock:
            old = self._names.get(name)
            if old is not None and old.key == entry.key:
                return
            self._commit_records(name, entry.to_record(name), "committing")
            self._refs[entry.key] += 1
            self._names[name] = entry
            if old is not None:
                self._release_locked(old)
            self._write_state()

    def _commit_records(self, name: str, record: bytes | None, what: str) -> None:
        """Put (or delete, for None) the record ``name`` and bump the records'
        generation, in one transaction, flushed. Holds ``_lock``."""
        env = self._require_env()
        try:
            with self._write_lock, env.begin(write=True, db=self._names_db) as txn:
                if record is None:
                    txn.delete(name.encode())
                else:
                    txn.put(name.encode(), record)
                txn.put(_GENERATION_KEY, _GENERATION.pack(self._generation + 1), db=self._meta_db)
            self._sync_meta()
        except lmdb.MapFullError as e:
            raise StoreFull(f"{what} record {name!r} failed: no room left for the store's records") from e
        except lmdb.Error as e:
            raise StoreError(f"{what} record {name!r} failed: {e}") from e
        self._generation += 1

    def lookup(self, name: str) -> Entry | None:
        """The entry of record ``name`` with a new reference for the caller, or None.

        Raises:
            IntegrityError: the record is damaged (see :meth:`fsck`).
        """
        with self._lock:
            if name in self._damaged:
                raise IntegrityError(
                    f"record {name!r} in the store at {self.path} is damaged: {self._damaged[name]}",
                    bo=repr(name),
                )
            entry = self._names.get(name)
            if entry is not None:
                self._refs[entry.key] += 1
            return entry

    def record_footprint(self, name: str) -> int:
        """Capacity the record ``name`` holds (0 if there is none)."""
        with self._lock:
            entry = self._names.get(name)
            return 0 if entry is None else entry.footprint

    @property
    def record_bytes(self) -> int:
        """Capacity held by the entries of named records."""
        with self._lock:
            return sum({e.key: e.footprint for e in self._names.values()}.values())

    def remove_name(self, name: str) -> bool:
        """Delete record ``name``; False if there was none.

        Raises:
            StoreError: the commit failed, or the store is open for reading only.
        """
        with self._lock:
            old = self._names.get(name)
            if old is None:
                return False
            self._check_writable()
            self._commit_records(name, None, "removing")
            del self._names[name]
            self._release_locked(old)
            self._write_state()
            return True

    def damaged_records(self) -> dict[str, str]:
        """The damaged records found at open: name -> what is wrong."""
        return dict(self._damaged)

    def names(self) -> list[str]:
        """Names of the committed records, sorted; damaged ones too (reading
        them raises IntegrityError)."""
        with self._lock:
            return sorted([*self._names, *self._damaged])

    def _sync_meta(self) -> None:
        """Records are always durable once committed."""
        self._require_env().sync(True)

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
        return self._env

    def _close_data(self) -> None:  # noqa: B027 - optional hook
        """Backend: close data files."""

    def close(self) -> None:
        """Close the store, unlock it, and delete it if temporary. Idempotent."""
        self._close_data()
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
