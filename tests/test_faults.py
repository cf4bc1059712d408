"""Fault injection into real store files, in the spirit of SQLite's tests.

For each file of each backend and each damage, a store holding three named
records is closed, damaged, and opened again; every record is read and
``gpubo fsck`` is run. The outcome of each cell is written in ``TABLE``:

* ``OPEN``: a StoreError at open, saying what is wrong (no record is
  trusted, nothing is reclaimed);
* ``FINE``: every record reads back exactly and fsck is clean;
* a set of names: the store opens, those records raise IntegrityError, the
  others read back exactly, and fsck reports the damage (exit 1);
* ``READONLY``: every record reads back, fsck reports the damage.

Never "silently fewer records", never wrong bytes, never a foreign
exception, and fsck changes no file. Damages: delete, truncate to 0,
truncate mid-file, flip a byte in a metadata page (the txnid of LMDB's
current meta page, so that it falls back to the older one; the state
file's body), flip a byte in a data page (a stored chunk; the record's
JSON in the slot file's metadata), no permissions, replaced by a directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import gpubo
from gpubo.cli import main
from gpubo.store import open_existing, open_store

MiB = 1 << 20
PAGE = 4096
OPEN, FINE, READONLY = "open", "fine", "readonly"
ROOT = os.geteuid() == 0
#: Without permissions: root reads the file anyway; anyone else gets a StoreError.
PERM = FINE if ROOT else OPEN

RECORDS = {
    "a": np.random.default_rng(1).integers(1, 256, 64 * 1024, dtype=np.uint8),
    "b": np.random.default_rng(2).integers(1, 256, 3 * MiB + 5, dtype=np.uint8),
    "c": np.random.default_rng(3).integers(1, 256, 4096, dtype=np.uint8),
}

DAMAGES = ["delete", "truncate-0", "truncate-mid", "flip-meta", "flip-data", "no-permissions", "directory"]

TABLE: dict[tuple[str, str], dict[str, object]] = {
    ("lmdb", "data.mdb"): {
        "delete": OPEN,
        "truncate-0": OPEN,
        "truncate-mid": OPEN,
        "flip-meta": OPEN,  # LMDB falls back to the older meta page: records rolled back
        "flip-data": {"a"},
        "no-permissions": PERM,
        "directory": OPEN,
    },
    ("slotfile", "data.mdb"): {
        "delete": OPEN,
        "truncate-0": OPEN,
        "truncate-mid": FINE,  # the preallocated tail holds no page yet
        "flip-meta": OPEN,
        "flip-data": {"a"},  # the record fails its checksum
        "no-permissions": PERM,
        "directory": OPEN,
    },
    ("slotfile", "slots.bin"): {
        "delete": OPEN,
        "truncate-0": OPEN,
        "truncate-mid": {"b"},  # cut at 2 MiB: 'a' and 'c' lie before, 'b' reaches past
        "flip-data": {"a"},
        "no-permissions": PERM,
        "directory": OPEN,
    },
}
for _backend in ("lmdb", "slotfile"):
    TABLE[(_backend, "lock.mdb")] = {
        "delete": FINE,  # LMDB's reader table: rebuilt by the first opener
        "truncate-0": FINE,
        "truncate-mid": FINE,
        "flip-data": FINE,
        "no-permissions": PERM,
        "directory": OPEN,
    }
    TABLE[(_backend, "gpubo.state")] = {
        "delete": OPEN,  # records exist: the store cannot prove it is whole
        "truncate-0": OPEN,
        "truncate-mid": OPEN,
        "flip-meta": OPEN,
        "flip-data": OPEN,
        "no-permissions": PERM,
        "directory": OPEN,
    }
    TABLE[(_backend, "gpubo.lock")] = {
        "delete": FINE,  # an empty file, only flock-ed
        "truncate-0": FINE,
        "no-permissions": PERM,
        "directory": OPEN,
    }

CELLS = [(b, f, d) for (b, f), row in TABLE.items() for d in DAMAGES if d in row]


def _make(path: Path, backend: str) -> None:
    s = open_store(path, 32 * MiB, backend=backend)
    for name, data in RECORDS.items():
        entry = s.write(memoryview(data))
        s.commit_name(name, entry)
        s.release(entry)
    s.close()


def _flip(raw: bytearray, at: int, bit: int = 7) -> None:
    raw[at] ^= 1 << bit


def _flip_everywhere(file: Path, needle: bytes, delta: int) -> None:
    """Flip a byte at ``delta`` after every copy of ``needle`` (LMDB's
    copy-on-write leaves older copies of a page: the live one is among them)."""
    raw = bytearray(file.read_bytes())
    at = raw.find(needle)
    assert at >= 0, "the test did not find the bytes to damage"
    while at >= 0:
        _flip(raw, at + delta)
        at = raw.find(needle, at + 1)
    file.write_bytes(bytes(raw))


def _roll_back_meta(file: Path) -> None:
    """Clear the top bit of the txnid of LMDB's current meta page, so that
    the other (older) one is taken: one committed transaction is lost."""
    raw = bytearray(file.read_bytes())
    txnids = [struct.unpack_from("<Q", raw, page * PAGE + 144)[0] for page in (0, 1)]
    current = 0 if txnids[0] > txnids[1] else 1
    bit = txnids[current].bit_length() - 1
    _flip(raw, current * PAGE + 144 + bit // 8, bit % 8)
    file.write_bytes(bytes(raw))


def _damage(store: Path, backend: str, name: str, how: str) -> None:
    file = store / name
    if how == "delete":
        file.unlink()
    elif how == "truncate-0":
        os.truncate(file, 0)
    elif how == "truncate-mid":
        os.truncate(file, 2 * MiB if name == "slots.bin" else file.stat().st_size // 2)
    elif how == "flip-meta":
        if name == "data.mdb":
            _roll_back_meta(file)
        else:
            raw = bytearray(file.read_bytes())
            _flip(raw, 0)
            file.write_bytes(bytes(raw))
    elif how == "flip-data":
        if name == "data.mdb" and backend == "slotfile":
            _flip_everywhere(file, b'"nbytes":65536', 11)
        elif name in ("data.mdb", "slots.bin"):
            _flip_everywhere(file, RECORDS["a"][:64].tobytes(), 100)
        else:
            raw = bytearray(file.read_bytes())
            _flip(raw, len(raw) // 2)
            file.write_bytes(bytes(raw))
    elif how == "no-permissions":
        file.chmod(0)
    elif how == "directory":
        file.unlink()
        file.mkdir()


def _files(store: Path) -> dict[str, str]:
    """Every file's digest, to show that fsck changed nothing (but LMDB's
    reader table, ``lock.mdb``, which every opener rewrites, and the empty
    ``gpubo.lock``, which an opener creates if it is missing)."""
    out = {}
    for p in sorted(store.rglob("*")):
        if p.is_file() and p.name not in ("lock.mdb", "gpubo.lock") and os.access(p, os.R_OK):
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.mark.parametrize(("backend", "name", "how"), CELLS, ids=[f"{b}-{f}-{d}" for b, f, d in CELLS])
def test_damaged_store_file(tmp_path: Path, backend: str, name: str, how: str) -> None:
    store = tmp_path / "s"
    _make(store, backend)
    _damage(store, backend, name, how)
    want = TABLE[(backend, name)][how]

    before = _files(store)
    result = CliRunner().invoke(main, ["fsck", str(store), "--json"])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert result.exit_code == (0 if want == FINE else 1), result.output
    report = json.loads(result.output)
    assert report["ok"] is (want == FINE)
    assert _files(store) == before, "fsck changed the store"

    try:
        s = open_existing(store)
    except gpubo.StoreError as e:
        assert want == OPEN, f"refused at open: {e}"
        assert str(store) in str(e)
        return
    assert want != OPEN, "a damaged store was opened as if whole"
    try:
        assert s.names() == sorted(RECORDS), "records vanished silently"
        bad = set()
        for record, data in RECORDS.items():
            try:
                entry = s.lookup(record)
                assert entry is not None
                out = np.empty(entry.nbytes, np.uint8)
                try:
                    s.read_into(entry, memoryview(out), record)
                finally:
                    s.release(entry)
            except gpubo.IntegrityError:
                bad.add(record)
                continue
            assert np.array_equal(out, data), f"record {record!r}: wrong bytes"
        assert bad == (want if isinstance(want, set) else set())
        assert s.fsck().ok is (want == FINE)
    finally:
        s.close()


def test_a_damaged_store_opens_read_only_and_the_manager_reads_its_good_records(tmp_path: Path) -> None:
    store = tmp_path / "s"
    _make(store, "slotfile")
    _damage(store, "slotfile", "slots.bin", "truncate-mid")
    with gpubo.Manager(budget="8MiB", store=store) as m:
        assert m.names() == ["a", "b", "c"]
        with pytest.raises(gpubo.IntegrityError, match="'b'"):
            m.open("b")
        bo = m.open("a")
        assert np.array_equal(bo.read(), RECORDS["a"])
        bo.evict()  # clean: its record's copy serves, nothing is written
        bo.write(np.ones(16, np.uint8))
        with pytest.raises(gpubo.StoreError, match="reading only"):
            bo.evict()  # dirty: it would need a write
        assert np.array_equal(bo.read()[16:], RECORDS["a"][16:])  # still resident, intact


def test_a_rolled_back_store_is_never_reclaimed(tmp_path: Path) -> None:
    """The issue's case: a flipped meta page makes the newest records vanish.
    The store refuses to open (instead of reclaiming their bytes as a dead
    process's), and after fsck the bytes are all still there."""
    store = tmp_path / "s"
    _make(store, "lmdb")
    _roll_back_meta(store / "data.mdb")
    before = _files(store)
    with pytest.raises(gpubo.StoreError, match="cannot prove it is whole"):
        gpubo.Manager(budget="8MiB", store=store)
    result = CliRunner().invoke(main, ["fsck", str(store)])
    assert result.exit_code == 1 and "rolled back" in result.output
    stats = CliRunner().invoke(main, ["stats", str(store), "--json"])
    assert stats.exit_code == 0 and any("rolled back" in p for p in json.loads(stats.output)["problems"])
    assert _files(store) == before


def test_stats_lists_damaged_records(tmp_path: Path) -> None:
    store = tmp_path / "s"
    _make(store, "slotfile")
    _damage(store, "slotfile", "slots.bin", "truncate-mid")
    result = CliRunner().invoke(main, ["stats", str(store), "--json"])
    assert result.exit_code == 0, result.output
    records = {r["name"]: r for r in json.loads(result.output)["records"]}
    assert set(records) == {"a", "b", "c"} and "damaged" in records["b"]
    for damaged_store_cmd in (["stats", str(store)], ["fsck", str(store)]):
        out = CliRunner().invoke(main, damaged_store_cmd)
        assert "Traceback" not in out.output


@pytest.mark.parametrize("what", ["data.mdb-truncated", "slots.bin-missing"])
def test_cli_store_commands_never_print_a_traceback(tmp_path: Path, what: str) -> None:
    store = tmp_path / "s"
    backend = "lmdb" if what.startswith("data") else "slotfile"
    _make(store, backend)
    if what == "data.mdb-truncated":
        os.truncate(store / "data.mdb", 0)
    else:
        (store / "slots.bin").unlink()
    for cmd in ("fsck", "stats"):
        result = CliRunner().invoke(main, [cmd, str(store)])
        assert result.exit_code in (1, 3), result.output
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        assert "damaged" in result.output
        assert "store_backend" not in result.output  # it says what is wrong, not what to pass


def test_a_crash_between_the_record_commit_and_the_state_file_is_recovered(tmp_path: Path) -> None:
    """LMDB commits a record first, then the state file follows: a crash in
    between leaves LMDB one generation ahead, which is whole (not damage)."""
    from dataclasses import replace

    from gpubo.store.integrity import read_state, write_state

    store = tmp_path / "s"
    _make(store, "lmdb")
    state = read_state(str(store))
    assert state is not None and state.records == 3
    write_state(str(store), replace(state, generation=state.generation - 1, records=2))
    s = open_existing(store)
    try:
        assert s.names() == sorted(RECORDS) and s.fsck().ok
    finally:
        s.close()
    assert read_state(str(store)) == state  # brought up to date at open
    write_state(str(store), replace(state, generation=state.generation - 2))  # two behind: not a crash
    with pytest.raises(gpubo.StoreError, match="rolled back"):
        open_existing(store)
