"""The swap-slot store: where evicted buffer objects' bytes live.

Two backends share one contract (:class:`SwapStore`): :class:`LmdbStore`
keeps data and metadata in one LMDB environment; :class:`SlotFileStore`
keeps data in a preallocated slot file and only named records in LMDB.
:func:`open_store` picks one, recognising an existing store's backend.
"""

from __future__ import annotations

import os

from gpubo._errors import StoreError
from gpubo.store.base import CHUNK_BYTES, PAGE_BYTES, Durability, Entry, FsckReport, SwapStore
from gpubo.store.integrity import read_state
from gpubo.store.lmdb_store import LmdbStore
from gpubo.store.slotfile import SlotFileStore

__all__ = [
    "BACKENDS",
    "CHUNK_BYTES",
    "PAGE_BYTES",
    "Durability",
    "Entry",
    "FsckReport",
    "LmdbStore",
    "SlotFileStore",
    "SwapStore",
    "detect_backend",
    "open_existing",
    "open_store",
]

BACKENDS: dict[str, type[SwapStore]] = {"lmdb": LmdbStore, "slotfile": SlotFileStore}


def detect_backend(path: str | os.PathLike[str]) -> str | None:
    """The backend of the store at ``path``, or None if there is none yet.

    Raises:
        StoreError: the store's state file is damaged.
    """
    state = read_state(os.fspath(path))
    if state is not None and state.backend in BACKENDS:
        return state.backend
    if os.path.exists(os.path.join(path, "slots.bin")):
        return "slotfile"
    if os.path.exists(os.path.join(path, "data.mdb")):
        return "lmdb"
    return None


def open_store(
    path: str | os.PathLike[str] | None,
    size_bytes: int,
    *,
    backend: str | None = None,
    checksums: bool = True,
    durability: Durability | str = Durability.LAZY,
) -> SwapStore:
    """Open (or create) a store.

    ``backend`` None means: the backend of the existing store at ``path``,
    else ``lmdb``.

    Raises:
        ValueError: unknown backend, bad size or durability.
        StoreError: see :class:`SwapStore`.
    """
    if backend is None:
        backend = (detect_backend(path) if path is not None else None) or "lmdb"
    cls = BACKENDS.get(backend)
    if cls is None:
        raise ValueError(f"store_backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    return cls(path, size_bytes, checksums=checksums, durability=durability)


def open_existing(path: str | os.PathLike[str], *, reclaim: bool = True) -> SwapStore:
    """Open the store at ``path`` with its own backend and size (for the CLI).

    ``reclaim=False`` keeps what a dead process left, for ``fsck`` to report.

    Raises:
        StoreError: there is no store at ``path``, or it cannot be opened.
    """
    if not os.path.isdir(path):
        raise StoreError(f"no gpubo store at {os.fspath(path)!r} (not a directory)")
    backend = detect_backend(path)
    if backend is None:
        raise StoreError(f"no gpubo store at {os.fspath(path)!r}")
    state = read_state(os.fspath(path))
    if state is not None:
        size = state.data_bytes
    else:
        data = os.path.join(path, "slots.bin" if backend == "slotfile" else "data.mdb")
        try:
            size = os.path.getsize(data)
        except OSError as e:
            raise StoreError(f"cannot open the store at {os.fspath(path)!r}: {e}") from e
    cls = BACKENDS[backend]
    try:
        return cls(path, size, reclaim=reclaim)
    except ValueError as e:  # a size no store can have: the file is damaged
        raise StoreError(f"cannot open the store at {os.fspath(path)!r}: {e}") from e
