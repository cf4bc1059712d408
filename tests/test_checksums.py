"""Checksums where they cost least: ``checksums="host"`` (the store hashes as
it copies) and ``"device"`` (a kernel hashes the BO's pages on the device
before they leave and after they come back), on PoCL, with both transfer
strategies and both store backends. The device's hash must be the host's
bit for bit (``gpubo fsck`` checks on the host what a device computed)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import check_budget, pattern

import gpubo
from gpubo.cli import main
from gpubo.store.entry import CHUNK_BYTES, PAGE_DIGESTS, XXH3, page_digest, scan_zero_pages

KiB = 1 << 10
MiB = 1 << 20
MakeMgr = Callable[..., gpubo.Manager]
BACKENDS = ["lmdb", "slotfile"]
TRANSFERS = ["map", "bounce"]

SIZES = [1, 7, 8, 31, 32, 33, 100, 4095, 4096, 4097, 3 * 4096 + 5, 256 * KiB, MiB - 1, MiB, MiB + 1]
SIZES += [2 * MiB + 5 * 4096 + 3, 5 * MiB]


def _data(n: int, seed: int) -> np.ndarray:
    """Random bytes with a zero page and a zero tail where there is room."""
    data = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)
    if n >= 3 * 4096:
        data[4096:8192] = 0
    if n > MiB + 4096:
        data[MiB : MiB + 4096] = 0
    return data


@pytest.mark.parametrize("n", SIZES)
def test_device_digests_are_the_host_digests(make_mgr: MakeMgr, n: int) -> None:
    """Random data of many sizes (partial pages, partial chunks, zero pages,
    garbage past the end of the BO in its buffer): the device's digest of
    each chunk equals :func:`page_digest` of the same bytes on the host, and
    its zero flags equal the host's scan."""
    backend = make_mgr(budget="16MiB").backend
    data = _data(n, n)
    buf = backend.allocate(n + 4096)
    try:
        backend.upload(buf, np.full(n + 4096, 0xA5, np.uint8), 0)  # garbage beyond n
        backend.upload(buf, data, 0)
        zero, digests = backend.chunk_digests(buf, n)
    finally:
        backend.release(buf)
    host = [page_digest(data[at : at + CHUNK_BYTES]) for at in range(0, n, CHUNK_BYTES)]
    assert [int(d) for d in digests] == host
    want = scan_zero_pages(memoryview(data), n)
    if want is None:
        assert zero is None
    else:
        assert zero is not None and np.array_equal(zero, want)


def test_one_flipped_bit_changes_the_digest_of_its_chunk_only(make_mgr: MakeMgr) -> None:
    backend = make_mgr(budget="16MiB").backend
    data = _data(3 * MiB, 1)
    flipped = data.copy()
    flipped[MiB + 12345] ^= 1
    out = []
    for content in (data, flipped):
        buf = backend.allocate(content.nbytes)
        try:
            backend.upload(buf, content, 0)
            out.append([int(d) for d in backend.chunk_digests(buf, content.nbytes)[1]])
        finally:
            backend.release(buf)
    assert out[0][0] == out[1][0] and out[0][2] == out[1][2]
    assert out[0][1] != out[1][1]


@pytest.mark.parametrize(
    ("transfer", "checksums", "where"),
    [
        ("map", True, "host"),
        ("bounce", True, "device"),
        ("map", "device", "device"),
        ("bounce", "host", "host"),
        ("map", False, "off"),
        ("bounce", False, "off"),
    ],
)
def test_stats_and_repr_say_where_checksums_are_computed(
    make_mgr: MakeMgr, transfer: str, checksums: bool | str, where: str
) -> None:
    m = make_mgr(transfer=transfer, checksums=checksums)
    assert m.stats().checksums == where
    assert f"checksums={where}>" in repr(m)


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        ("gpu", ValueError, "checksums must be True, False, 'host' or 'device', got 'gpu'"),
        (1, TypeError, "checksums must be a bool, 'host' or 'device', got int"),
        (None, TypeError, "got NoneType"),
    ],
)
def test_bad_checksums_are_refused_and_leave_nothing_open(
    tmp_path: Path, leak_check: None, value: object, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        gpubo.Manager("4MiB", store=str(tmp_path / "s"), store_size="16MiB", checksums=value)  # type: ignore[arg-type]
    gpubo.Manager("4MiB", store=str(tmp_path / "s"), store_size="16MiB").close()  # not left locked


@pytest.mark.parametrize("transfer", TRANSFERS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_device_checksums_round_trip_and_say_so_in_the_entry(
    make_mgr: MakeMgr, backend: str, transfer: str
) -> None:
    """BOs of a chunk or more get device digests, smaller ones host xxh3;
    both come back intact."""
    m = make_mgr(
        budget="16MiB", store_size="64MiB", store_backend=backend, transfer=transfer, checksums="device"
    )
    sizes = [3 * 4096 + 1, 300 * KiB, MiB, 3 * MiB + 17]
    datas = [_data(n, i) for i, n in enumerate(sizes)]
    bos = [m.alloc(n) for n in sizes]
    for bo, data in zip(bos, datas, strict=True):
        bo.write(data)
        bo.evict()
    kinds = [bo.entry.hashing for bo in bos]  # type: ignore[union-attr]
    assert kinds == [XXH3, XXH3, PAGE_DIGESTS, PAGE_DIGESTS]
    for bo, data in zip(bos, datas, strict=True):
        assert np.array_equal(bo.read(), data)
    check_budget(m)


def _flip_stored_byte(store: Path, backend: str, needle: bytes, delta: int) -> None:
    path = store / ("slots.bin" if backend == "slotfile" else "data.mdb")
    raw = path.read_bytes()
    at = raw.find(needle)
    assert at >= 0, "the evicted bytes are not in the store's file"
    with open(path, "r+b") as f:
        f.seek(at + delta)
        f.write(bytes([raw[at + delta] ^ 0x10]))
        f.flush()
        os.fsync(f.fileno())


@pytest.mark.parametrize(("nbytes", "chunk"), [(MiB, 0), (3 * MiB, 2)])  # lent whole / streamed
@pytest.mark.parametrize("transfer", TRANSFERS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_flipped_byte_in_the_store_is_caught_on_the_device(
    tmp_path: Path, make_mgr: MakeMgr, backend: str, transfer: str, nbytes: int, chunk: int
) -> None:
    """The store does not hash a device-checksummed entry on the way back;
    the device does, after the last copy: the error names the BO and the
    chunk's first byte, and the BO's buffer is not handed out."""
    store = tmp_path / "s"
    m = make_mgr(
        budget="16MiB",
        store=str(store),
        store_size="64MiB",
        store_backend=backend,
        transfer=transfer,
        checksums="device",
    )
    data = pattern(nbytes, 9)
    bo = m.alloc(data.nbytes, name="weights")
    bo.write(data)
    bo.evict()
    at = chunk * MiB + 4096
    _flip_stored_byte(store, backend, data[at : at + 64].tobytes(), 10)
    resident = m.stats().resident_bytes
    with pytest.raises(gpubo.IntegrityError, match=f"on the device at byte {chunk * MiB} ") as info:
        bo.restore()
    assert info.value.offset == chunk * MiB
    assert "weights" in str(info.value)
    assert bo.state is gpubo.State.SWAPPED
    assert m.stats().resident_bytes == resident
    with pytest.raises(gpubo.IntegrityError):
        bo.read()  # still refused: the damaged bytes are never lent
    check_budget(m)


@pytest.mark.parametrize(
    ("nbytes", "chunk"),
    [(3 * MiB, 2), (3 * MiB, 0), (2 * MiB + 64 * KiB, 2), (64 * KiB, 0)],
)  # hashed while the device copies it (>= 256 KiB), or before a blocking copy (the small last chunk)
@pytest.mark.parametrize("transfer", TRANSFERS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_flipped_byte_is_caught_by_the_host_while_the_lent_chunks_copy(
    tmp_path: Path, make_mgr: MakeMgr, backend: str, transfer: str, nbytes: int, chunk: int
) -> None:
    """A restore copies lent store chunks to the device and hashes each one
    as it copies: a flipped byte in any chunk is still an IntegrityError
    naming the BO and that chunk, the BO stays swapped with its budget
    given back, and another BO restored in the same batch is intact."""
    store = tmp_path / "s"
    m = make_mgr(
        budget="32MiB",
        store=str(store),
        store_size="64MiB",
        store_backend=backend,
        transfer=transfer,
        checksums="host",
    )
    data = pattern(nbytes, 11)
    other_data = pattern(nbytes, 12)
    bo = m.alloc(data.nbytes, name="weights")
    bo.write(data)
    other = m.alloc(other_data.nbytes, name="other")
    other.write(other_data)
    m.evict(m.stats().resident_bytes)
    assert bo.state is other.state is gpubo.State.SWAPPED
    at = chunk * MiB + 4096 if nbytes > 4096 * 3 else 4096
    _flip_stored_byte(store, backend, data[at : at + 64].tobytes(), 10)
    resident = m.stats().resident_bytes
    done_other, done_bo = m.prefetch([other, bo])  # restored together when small enough
    done_other.result(timeout=60)
    with pytest.raises(
        gpubo.IntegrityError, match=f"checksum mismatch in the store at byte {chunk * MiB} "
    ) as info:
        done_bo.result(timeout=60)
    assert info.value.offset == chunk * MiB
    assert "weights" in str(info.value)
    assert bo.state is gpubo.State.SWAPPED
    with pytest.raises(gpubo.IntegrityError):
        bo.read()  # still refused: the damaged bytes are never handed out
    assert np.array_equal(other.read(np.uint8), other_data)
    assert m.stats().resident_bytes >= resident
    check_budget(m)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("first", "then"), [("device", "host"), ("host", "device"), ("device", False)])
def test_a_store_written_with_one_setting_reads_with_the_other(
    tmp_path: Path, make_mgr: MakeMgr, backend: str, first: str, then: str | bool
) -> None:
    store = str(tmp_path / "s")
    data = _data(2 * MiB + 4096 + 5, 3)
    small = _data(64 * KiB, 4)
    with make_mgr(budget="16MiB", store=store, store_backend=backend, checksums=first) as m:
        for name, content in (("big", data), ("small", small)):
            bo = m.alloc(content.nbytes, name=name)
            bo.write(content)
        m.hibernate()
    with make_mgr(budget="16MiB", store=store, store_backend=backend, checksums=then) as m:
        assert np.array_equal(m.open("big").read(), data)
        assert np.array_equal(m.open("small").read(), small)


@pytest.mark.parametrize("backend", BACKENDS)
def test_host_checksums_catch_a_flip_in_a_device_written_entry(
    tmp_path: Path, make_mgr: MakeMgr, backend: str
) -> None:
    """A reader with host checksums verifies device digests on the host."""
    store = tmp_path / "s"
    data = pattern(2 * MiB, 5)
    with make_mgr(budget="16MiB", store=str(store), store_backend=backend, checksums="device") as m:
        m.alloc(data.nbytes, name="w").write(data)
        m.hibernate()
    _flip_stored_byte(store, backend, data[MiB + 8192 : MiB + 8192 + 64].tobytes(), 3)
    with make_mgr(budget="16MiB", store=str(store), store_backend=backend, checksums="host") as m:
        bo = m.open("w")
        with pytest.raises(gpubo.IntegrityError, match="checksum mismatch in the store at byte 1048576"):
            bo.read()
        assert bo.state is gpubo.State.SWAPPED


@pytest.mark.parametrize("backend", BACKENDS)
def test_fsck_verifies_device_digests_on_the_host(tmp_path: Path, make_mgr: MakeMgr, backend: str) -> None:
    store = tmp_path / "s"
    data = pattern(3 * MiB, 6)
    with make_mgr(budget="16MiB", store=str(store), store_backend=backend, checksums="device") as m:
        bo = m.alloc(data.nbytes, name="w")
        bo.write(data)
        m.hibernate()
        assert bo.entry is not None and bo.entry.hashing == PAGE_DIGESTS
    runner = CliRunner()
    assert runner.invoke(main, ["fsck", str(store)]).exit_code == 0
    _flip_stored_byte(store, backend, data[2 * MiB + 4096 : 2 * MiB + 4096 + 64].tobytes(), 1)
    result = runner.invoke(main, ["fsck", str(store)])
    assert result.exit_code == 1, result.output
    assert "checksum mismatch" in result.output and "2097152" in result.output
