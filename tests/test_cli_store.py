"""`gpubo fsck STORE` and `gpubo stats STORE` on real stores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import gpubo
from gpubo.cli import main

MiB = 1 << 20


def _store_with_record(path: Path, backend: str) -> np.ndarray:
    data = np.arange(3 * MiB, dtype=np.uint8) ^ 0x5A
    with gpubo.Manager(budget="4MiB", store=path, store_size="64MiB", store_backend=backend) as mgr:
        bo = mgr.alloc(data.nbytes, name="weights")
        bo.write(data)
        bo.sync()
    return data


@pytest.mark.parametrize("backend", ["lmdb", "slotfile"])
def test_fsck_clean_then_corrupt(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "s"
    data = _store_with_record(path, backend)
    runner = CliRunner()
    result = runner.invoke(main, ["fsck", str(path), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ok"] and report["names"] == ["weights"] and report["problems"] == []

    # Flip one byte of the stored pattern in the real data file.
    data_file = path / ("slots.bin" if backend == "slotfile" else "data.mdb")
    raw = bytearray(data_file.read_bytes())
    at = raw.find(data[4096 : 4096 + 64].tobytes())
    assert at >= 0
    raw[at] ^= 0xFF
    data_file.write_bytes(bytes(raw))
    result = runner.invoke(main, ["fsck", str(path)])
    assert result.exit_code == 1, result.output
    assert "checksum mismatch" in result.output and "weights" in result.output


def test_fsck_reports_what_a_dead_process_left(tmp_path: Path) -> None:
    """Anonymous entries a process could not clean up are leaks until the next open."""
    path = tmp_path / "s"
    mgr = gpubo.Manager(budget="4MiB", store=path, store_size="64MiB")
    bo = mgr.alloc(2 * MiB)
    bo.write(np.ones(2 * MiB, np.uint8))
    bo.evict()
    mgr.store.close()  # as if the process died: the entry stays in the file
    runner = CliRunner()
    result = runner.invoke(main, ["fsck", str(path), "--json"])
    assert result.exit_code == 1
    assert any("leak" in p for p in json.loads(result.output)["problems"])
    gpubo.Manager(budget="4MiB", store=path).close()  # a normal open reclaims it
    assert runner.invoke(main, ["fsck", str(path)]).exit_code == 0


def test_stats_lists_records(tmp_path: Path) -> None:
    path = tmp_path / "s"
    _store_with_record(path, "slotfile")
    result = CliRunner().invoke(main, ["stats", str(path), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["backend"] == "slotfile"
    assert [r["name"] for r in payload["records"]] == ["weights"]
    assert payload["records"][0]["nbytes"] == 3 * MiB
    assert payload["used_bytes"] == payload["records"][0]["footprint"]
    text = CliRunner().invoke(main, ["stats", str(path)])
    assert text.exit_code == 0 and "weights" in text.output


def test_fsck_of_a_directory_without_a_store(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["fsck", str(tmp_path)])
    assert result.exit_code != 0
    assert "no gpubo store" in result.output
