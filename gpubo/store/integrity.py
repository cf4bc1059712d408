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
fault on them (SIGBUS) instead of failing.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass

import xxhash

from gpubo._errors import StoreError

__all__ = ["STATE_NAME", "StoreState", "check_lmdb_file", "read_state", "write_state"]

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
