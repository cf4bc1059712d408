"""Entries and their layout: chunks, zero pages, checksums, the record
format. Pure data and functions; the stores (:mod:`gpubo.store.base`) hold
the state.
"""

from __future__ import annotations

import base64
import enum
import functools
import json
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import xxhash

__all__ = [
    "CHUNK_BYTES",
    "FORMAT_KEY",
    "FORMAT_VERSION",
    "GENERATION",
    "GENERATION_KEY",
    "HASH_STEP_BYTES",
    "PAGE_BYTES",
    "PAGE_DIGESTS",
    "XXH3",
    "ChunkPlan",
    "Chunks",
    "Durability",
    "Entry",
    "Extents",
    "FsckReport",
    "Hasher",
    "KnownDigest",
    "ViewChunks",
    "batch_zero_flags",
    "no_zero_page_possible",
    "page_digest",
    "plan_chunks",
    "scan_zero_pages",
    "steps",
]

#: Entries are processed (copied, hashed) in chunks of this many bytes.
CHUNK_BYTES = 1 << 20
#: Copies that are hashed go in steps of this size (see :func:`steps`).
HASH_STEP_BYTES = 256 << 10
#: The unit of zero-page detection and of slot allocation.
PAGE_BYTES = 4096
_PAGES_PER_CHUNK = CHUNK_BYTES // PAGE_BYTES
_SMALL_SCAN_BYTES = 64 * PAGE_BYTES
#: Bump when the on-disk layout changes; a store of another version is refused.
#: 4: an entry records how its checksums were computed (``hash``).
FORMAT_VERSION = 4
#: Checksums of an entry: the xxh3-64 of each chunk's stored bytes (computed
#: on the host as they are copied).
XXH3 = "xxh3"
#: Checksums of an entry: per chunk, the XXH64 of the little-endian XXH64s of
#: its pages (4 KiB, the last one possibly short), zero pages included, over
#: the chunk's bytes as the BO holds them. A device computes them where the
#: bytes are (see :func:`page_digest` for the host's bit-identical version).
PAGE_DIGESTS = "xxh64-pages"
_HASHINGS = (XXH3, PAGE_DIGESTS)
Extents = tuple[tuple[int, int], ...]
FORMAT_KEY = b"format"
GENERATION_KEY = b"generation"
GENERATION = struct.Struct(">Q")


class Durability(enum.Enum):
    """When evicted bytes reach stable storage."""

    LAZY = "lazy"  #: in the page cache; the OS writes back later
    SYNC = "sync"  #: flushed before the entry is committed
    DIRECT = "direct"  #: written with O_DIRECT, bypassing the page cache (slotfile only)


@dataclass(frozen=True)
class Entry:
    """An immutable run of stored bytes: one BO's content at one moment.

    ``footprint`` is the store capacity it occupies; ``stored_bytes`` the
    non-zero bytes kept; ``checksums`` one per chunk (None for a chunk with
    no stored bytes) or None when checksums are off, of the kind ``hashing``
    names (:data:`XXH3` or :data:`PAGE_DIGESTS`); ``zeromap``
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
    hashing: str = XXH3

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
            "hash": self.hashing,
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
                hashing=str(rec["hash"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed entry record: {e}") from e
        if entry.hashing not in _HASHINGS:
            raise ValueError(f"malformed entry record: unknown checksum kind {entry.hashing!r}")
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
    if nbytes % PAGE_BYTES == 0 and no_zero_page_possible(view, nbytes):
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


def no_zero_page_possible(view: memoryview, nbytes: int) -> bool:
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


def batch_zero_flags(src: memoryview, layout: Sequence[tuple[int, int]]) -> list[np.ndarray | None]:
    """:func:`scan_zero_pages` of every entry of a batch, with one vectorised
    look at the first word of each page of ``src`` for the common case of no
    candidate zero page at all."""
    aligned = src.nbytes % PAGE_BYTES == 0 and all(off % PAGE_BYTES == 0 for off, _ in layout)
    if aligned and no_zero_page_possible(src, src.nbytes):
        return [None] * len(layout)
    return [scan_zero_pages(src[off : off + n], n) for off, n in layout]


def page_digest(chunk: memoryview | np.ndarray) -> int:
    """The :data:`PAGE_DIGESTS` checksum of one chunk's bytes ``chunk`` (as
    the BO holds them, zero pages in place), computed on the host: bit for
    bit what the device computes (see
    :meth:`gpubo.backends.opencl.OpenCLBackend.chunk_digests`)."""
    view = memoryview(chunk).cast("B")  # type: ignore[arg-type]
    n = view.nbytes
    sums = np.empty(-(-n // PAGE_BYTES), "<u8")
    for page, start in enumerate(range(0, n, PAGE_BYTES)):
        sums[page] = xxhash.xxh64_intdigest(view[start : start + PAGE_BYTES])
    return int(xxhash.xxh64_intdigest(sums.tobytes()))


class Hasher:
    """xxh3-64 of one chunk's stored stream, fed piece by piece as it is
    copied (see :func:`steps`); does nothing when ``enabled`` is false."""

    def __init__(self, enabled: bool = True) -> None:
        self._h = xxhash.xxh3_64() if enabled else None

    def add(self, piece: memoryview) -> None:
        if self._h is not None:
            self._h.update(piece)

    def digest(self) -> int | None:
        return int(self._h.intdigest()) if self._h is not None else None


class KnownDigest:
    """A :class:`Hasher` whose digest was computed elsewhere (by the hash
    worker: :func:`~gpubo.store.hashing.read_hashing_aside`)."""

    def __init__(self, digest: int | None) -> None:
        self._digest = digest

    def digest(self) -> int | None:
        return self._digest


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


class Chunks(Protocol):
    """An entry's bytes, one chunk at a time: what the store writes from or
    reads into. ``chunk(i)`` is the memoryview of bytes ``[i * CHUNK_BYTES,
    min((i + 1) * CHUNK_BYTES, nbytes))``, valid until the next call;
    ``filled(i)`` says that chunk ``i`` of a read is complete and verified
    (a writer ignores it). A store asks for chunks in order, but may start
    again from the first (a retried write)."""

    @property
    def nbytes(self) -> int: ...

    def chunk(self, index: int) -> memoryview: ...

    def filled(self, index: int) -> None: ...


class ViewChunks:
    """:class:`Chunks` over one memoryview of the whole entry."""

    def __init__(self, view: memoryview, nbytes: int) -> None:
        self.view = view
        self.nbytes = nbytes

    def chunk(self, index: int) -> memoryview:
        start = index * CHUNK_BYTES
        return self.view[start : min(start + CHUNK_BYTES, self.nbytes)]

    def filled(self, index: int) -> None:
        pass
