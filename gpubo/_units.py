"""Parsing of byte sizes at the API edge; inside gpubo sizes are int bytes."""

from __future__ import annotations

import numbers
import re

__all__ = ["format_bytes", "parse_bytes"]

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1 << 10,
    "kib": 1 << 10,
    "mi": 1 << 20,
    "mib": 1 << 20,
    "gi": 1 << 30,
    "gib": 1 << 30,
    "ti": 1 << 40,
    "tib": 1 << 40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: object, name: str = "size") -> int:
    """Return ``value`` as a non-negative int number of bytes.

    Accepts ints (numpy integers too) and strings such as ``"256MiB"``,
    ``"1.5GiB"``, ``"4096"`` (binary units KiB/MiB/GiB/TiB, decimal units
    KB/MB/GB/TB).

    Raises:
        TypeError: ``value`` is neither an integer nor a string (bools and
            floats count as neither).
        ValueError: the string cannot be parsed, the unit is unknown, the
            result is negative or not a whole number of bytes.
    """
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, str)):
        raise TypeError(f"{name} must be an int or a size string like '256MiB', got {value!r}")
    if not isinstance(value, str):
        value = int(value)
        if value < 0:
            raise ValueError(f"{name} must not be negative, got {value}")
        return value
    m = _SIZE_RE.match(value)
    if m is None:
        raise ValueError(f"{name}: cannot parse size {value!r} (try '256MiB' or '4096')")
    number, unit = m.groups()
    factor = _UNITS.get(unit.lower())
    if factor is None:
        raise ValueError(f"{name}: unknown unit {unit!r} in {value!r}")
    whole, _, frac = number.partition(".")
    # Exact arithmetic: "1.5GiB" must not go through a float.
    scaled = int(whole or "0") * factor
    if frac:
        numerator = int(frac) * factor
        denominator = 10 ** len(frac)
        if numerator % denominator:
            raise ValueError(f"{name}: {value!r} is not a whole number of bytes")
        scaled += numerator // denominator
    return scaled


def format_bytes(nbytes: int) -> str:
    """Format ``nbytes`` for humans: ``12.0MiB``, ``4.0KiB``, ``17B``."""
    if abs(nbytes) < 1024:
        return f"{nbytes}B"
    size = nbytes / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if abs(size) < 1024:
            return f"{size:.1f}{unit}"
        size /= 1024
    return f"{size:.1f}TiB"
