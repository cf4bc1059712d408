"""Named records: the durable table of name -> entry in a store's LMDB
metadata, its generation (checked against ``gpubo.state`` at open, so that a
rolled-back LMDB is caught), and the record-level calls of a store.

A mixin of :class:`gpubo.store.base.SwapStore`, which owns the fields named
below and the lock that guards them (``_lock``: ``_names``, ``_refs``,
``_generation``; ``_damaged`` and ``problems`` are set at open, constant
after); it is one job cut out of the store so that each class stays
readable.
"""

from __future__ import annotations

import logging
import os
import threading
from abc import abstractmethod

import lmdb

from gpubo._errors import IntegrityError, StoreError, StoreFull
from gpubo.store.entry import FORMAT_VERSION, GENERATION, GENERATION_KEY, Entry
from gpubo.store.integrity import StoreState, write_state

__all__ = ["RecordTable"]

log = logging.getLogger(__name__)


class RecordTable:
    """The named records of a store (see the module docstring)."""

    backend_name: str
    path: str
    problems: list[str]
    _lock: threading.Lock
    _write_lock: threading.Lock
    _names: dict[str, Entry]
    _damaged: dict[str, str]
    _entries: dict[int, Entry]
    _refs: dict[int, int]
    _used_bytes: int
    _next_key: int
    _data_bytes: int
    _generation: int
    _read_only: str | None
    _reclaim_at_open: bool
    _names_db: lmdb._Database
    _meta_db: lmdb._Database

    # -- what the store provides ---------------------------------------------

    @abstractmethod
    def _require_env(self) -> lmdb.Environment: ...

    @abstractmethod
    def _data_file(self) -> str: ...

    @abstractmethod
    def _admit_record(self, name: str, entry: Entry) -> str | None: ...

    @abstractmethod
    def _max_stored_key(self) -> int: ...

    @abstractmethod
    def _reclaim(self, keep: dict[int, Entry]) -> int: ...

    @abstractmethod
    def _check_writable(self) -> None: ...

    @abstractmethod
    def flush(self, entry: Entry) -> None: ...

    @abstractmethod
    def _release_locked(self, entry: Entry) -> None: ...

    # -- opening -------------------------------------------------------------

    def _load_names(self, state: StoreState | None) -> None:
        """Read every record; check the generation against the state file;
        reclaim what a dead process left only in a store proven whole."""
        env = self._require_env()
        keep: dict[int, Entry] = {}
        with env.begin() as txn:
            raw_gen = txn.get(GENERATION_KEY, db=self._meta_db)
            self._generation = GENERATION.unpack(raw_gen)[0] if raw_gen is not None else 0
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

    # -- the records -----------------------------------------------------------

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
                txn.put(GENERATION_KEY, GENERATION.pack(self._generation + 1), db=self._meta_db)
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
