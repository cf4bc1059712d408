"""What lets a store prove that it is whole before it trusts itself.

LMDB checksums nothing, its meta pages included: one flipped bit in the
newer meta page makes it fall back to the older one, and every record
committed since is gone without an error; a truncated or deleted data file
is taken for a new, empty store. So the store keeps two facts outside LMDB,
in ``gpubo.state`` (a small file of its own, checksummed):

* what the store is: the backend and the size of its data file, written
  once at creation, so a missing or truncated file is seen as damage, not
  as "no store yet";
* the generation of its records: every commit of a named record bumps a
  counter inside LMDB (in the same transaction) and then, once LMDB is
  flushed, the copy here, with the number of records. At open the two must
  agree (LMDB may be one ahead: a crash between the two writes). LMDB
  behind the state file means committed records were lost.

:func:`check_lmdb_file` reads an LMDB file's meta pages before LMDB maps
it: a file shorter than the pages its meta page names would make LMDB
fault on them (SIGBUS) instead of failing. :class:`MappedFiles` does the
same while the store is open: a file another program cuts short under
the store is a :class:`~gpubo.StoreError` at the next access, not a SIGBUS.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
from dataclasses import dataclass

import xxhash

from gpubo._errors import StoreError

__all__ = [
    "STATE_NAME",
    "MappedFiles",
    "StoreState",
    "check_lmdb_file",
    "check_store_files",
    "read_state",
    "write_state",
]

STATE_NAME = "gpubo.state"
_MAGIC = b"GPUBOST1"
# magic, format version, backend (NUL-padded), data file bytes, generation,
# records, then the xxh3-64 of everything before it.
_STATE = struct.Struct("<8sI12sQQQ")
_DIGEST = struct.Struct("<Q")

# LMDB's meta pages (pages 0 and 1; mdb.c's MDB_meta after a 16-byte page header).
_LMDB_MAGIC = 0xBEEFC0DE
_META = struct.Struct("<II")  # magic, version, at offset 16
_META_LAST_PG_TXNID = struct.Struct("<QQ")  # at offset 136


@dataclass(frozen=True)
class StoreState:
    """The facts ``gpubo.state`` keeps (see the module docstring)."""

    format_version: int
    backend: str
    data_bytes: int
    generation: int
    records: int


def read_state(path: str) -> StoreState | None:
    """The state file of the store directory ``path``; None if there is none.

    Raises:
        StoreError: it exists but cannot be read or is damaged.
    """
    file = os.path.join(path, STATE_NAME)
    try:
        with open(file, "rb") as f:
            raw = f.read(_STATE.size + _DIGEST.size + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StoreError(f"cannot read the store's state file {file!r}: {e}") from e
    if len(raw) != _STATE.size + _DIGEST.size:
        raise StoreError(f"the store's state file {file!r} is damaged ({len(raw)} bytes)")
    body = raw[: _STATE.size]
    (digest,) = _DIGEST.unpack_from(raw, _STATE.size)
    magic, version, backend, data_bytes, generation, records = _STATE.unpack(body)
    if magic != _MAGIC or digest != xxhash.xxh3_64_intdigest(body):
        raise StoreError(f"the store's state file {file!r} is damaged (bad magic or checksum)")
    return StoreState(
        version, backend.rstrip(b"\0").decode(errors="replace"), data_bytes, generation, records
    )


def write_state(path: str, state: StoreState) -> None:
    """Write ``gpubo.state`` in place and flush it (one write of 56 bytes,
    inside one sector: it is never torn).

    Raises:
        StoreError: the write or the flush failed.
    """
    body = _STATE.pack(
        _MAGIC,
        state.format_version,
        state.backend.encode()[:12],
        state.data_bytes,
        state.generation,
        state.records,
    )
    raw = body + _DIGEST.pack(xxhash.xxh3_64_intdigest(body))
    file = os.path.join(path, STATE_NAME)
    try:
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.pwrite(fd, raw, 0) != len(raw):
                raise OSError(errno.EIO, "short write")
            os.fdatasync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise StoreError(f"cannot write the store's state file {file!r}: {e}") from e


def check_lmdb_file(file: str, page_bytes: int) -> None:
    """Check that the LMDB file ``file`` holds every page its newest valid
    meta page names (a no-op for a file that does not exist or is empty).

    Raises:
        StoreError: neither meta page is valid, or the file is shorter than
            the pages the meta page names.
    """
    try:
        with open(file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(2 * page_bytes)
    except FileNotFoundError:
        return
    except OSError as e:
        raise StoreError(f"cannot read {file!r}: {e}") from e
    if size == 0:
        return
    metas = []
    for page in (0, 1):
        base = page * page_bytes
        if len(head) < base + 152:
            continue
        magic, _ = _META.unpack_from(head, base + 16)
        last_pg, txnid = _META_LAST_PG_TXNID.unpack_from(head, base + 136)
        if magic == _LMDB_MAGIC:
            metas.append((txnid, last_pg))
    if not metas:
        raise StoreError(f"{file!r} is damaged: no valid LMDB meta page")
    _, last_pg = max(metas)
    if (last_pg + 1) * page_bytes > size:
        raise StoreError(
            f"{file!r} is truncated: its meta page names {last_pg + 1} pages, the file holds "
            f"{size // page_bytes}"
        )


def check_store_files(
    path: str, state: StoreState | None, backend: str, data_file: str, page_bytes: int
) -> None:
    """Before LMDB maps anything: the files the state file says a
    ``backend`` store at ``path`` has (``data.mdb`` and ``data_file``) are
    there, and no LMDB file is shorter than its meta page says.

    Raises:
        StoreError: a file is missing, truncated or not an LMDB file.
    """
    data = os.path.join(path, "data.mdb")
    if state is not None:
        if state.backend != backend:
            raise StoreError(
                f"store {path!r} is a {state.backend!r} store; open it with store_backend={state.backend!r}"
            )
        for name in {"data.mdb", data_file}:
            if not os.path.isfile(os.path.join(path, name)):
                raise StoreError(
                    f"store {path!r} is damaged: its file {name} is missing (or not a file); "
                    f"its {state.records} record(s) cannot be read"
                )
        if os.path.getsize(data) < 2 * page_bytes:  # LMDB would make a new, empty one of it
            raise StoreError(
                f"store {path!r} is damaged: data.mdb is truncated to {os.path.getsize(data)} "
                f"bytes; its {state.records} record(s) cannot be read"
            )
    if os.path.isdir(data):
        raise StoreError(f"store {path!r} is damaged: data.mdb is a directory")
    check_lmdb_file(data, page_bytes)


class MappedFiles:
    """The files a store maps, each with its size when the store opened it.

    A read or write of a mapping past its file's end is a SIGBUS, which
    kills the process. A store never shrinks its files, so :meth:`check`
    (one ``fstat`` per file, about a microsecond) before each access through
    a mapping turns a file that another program cut short into a typed
    error. It narrows the window, it cannot close it: a cut between the
    check and the access still faults.
    """

    def __init__(self) -> None:
        self._files: list[tuple[int, int, str]] = []  # fd, size at open, what it is

    def watch(self, path: str, what: str) -> None:
        """Check ``path`` (``what`` names it in errors) from now on.

        Raises:
            StoreError: it cannot be opened.
        """
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise StoreError(f"cannot open {path!r}: {e}") from e
        try:
            size = os.fstat(fd).st_size
        except OSError as e:
            os.close(fd)
            raise StoreError(f"cannot stat {path!r}: {e}") from e
        self._files.append((fd, size, what))

    def check(self) -> None:
        """Raises:
        StoreError: a watched file is shorter than it was at open."""
        for fd, size, what in self._files:
            try:
                now = os.fstat(fd).st_size
            except OSError as e:  # the store was closed under this call
                raise StoreError(f"cannot stat the {what}: {e}") from e
            if now < size:
                raise StoreError(
                    f"the {what} ends at byte {now}, short of its {size} bytes: another program "
                    "cut it short while the store had it open (nothing was read or written)"
                )

    def close(self) -> None:
        """Stop watching (idempotent)."""
        files, self._files = self._files, []
        for fd, _, _ in files:
            with contextlib.suppress(OSError):
                os.close(fd)
