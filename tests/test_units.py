"""Size strings are parsed once, at the edge, exactly (no floats)."""

from __future__ import annotations

import pytest

import gpubo


@pytest.mark.parametrize(
    ("text", "nbytes"),
    [
        ("256MiB", 256 << 20),
        ("1.5GiB", 3 << 29),
        ("4096", 4096),
        (4096, 4096),
        (0, 0),
        ("1KB", 1000),
        ("1kb", 1000),
        ("1KiB", 1024),
        ("2k", 2000),
        ("0.5KiB", 512),
        (".5KiB", 512),
        ("3MB", 3_000_000),
        ("1GB", 10**9),
        ("2TiB", 2 << 40),
        ("  64 MiB ", 64 << 20),
        ("17B", 17),
        ("1.25KiB", 1280),
        # exact arithmetic, no float rounding
        ("8.0000001GB", 8_000_000_100),
        ("1.000000000001TB", 10**12 + 1),
    ],
)
def test_parse_bytes_accepts(text: object, nbytes: int) -> None:
    got = gpubo.parse_bytes(text, "size")
    assert got == nbytes
    assert type(got) is int


@pytest.mark.parametrize(
    ("value", "exc"),
    [
        ("1.5B", ValueError),  # fractional bytes
        ("0.3KiB", ValueError),  # 307.2 bytes
        ("-1", ValueError),
        ("-1MiB", ValueError),
        (-1, ValueError),
        ("12 parsecs", ValueError),
        ("x", ValueError),
        ("", ValueError),
        ("MiB", ValueError),
        ("1e3", ValueError),
        ("1..5MiB", ValueError),
        (1.5, TypeError),
        (True, TypeError),
        (None, TypeError),
        (b"4096", TypeError),
    ],
)
def test_parse_bytes_rejects_and_names_the_argument(value: object, exc: type[Exception]) -> None:
    with pytest.raises(exc, match="store_size"):
        gpubo.parse_bytes(value, "store_size")


def test_parse_bytes_single_argument() -> None:
    assert gpubo.parse_bytes("256MiB") == 256 << 20


@pytest.mark.parametrize(
    ("nbytes", "text"),
    [(0, "0B"), (17, "17B"), (1023, "1023B"), (1024, "1.0KiB"), (12 << 20, "12.0MiB"), (3 << 29, "1.5GiB")],
)
def test_format_bytes(nbytes: int, text: str) -> None:
    assert gpubo.format_bytes(nbytes) == text
