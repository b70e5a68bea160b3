"""Human units for the pictures and tables: seconds and bytes scaled to a readable unit."""

from __future__ import annotations

import math

_TIME_UNITS = (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9))
_BYTE_UNITS = (("TiB", 2.0**40), ("GiB", 2.0**30), ("MiB", 2.0**20), ("KiB", 2.0**10), ("B", 1.0))


def time_unit(seconds: float) -> tuple[str, float]:
    """The largest unit (s, ms, µs, ns) in which ``seconds`` is at least 1, and its size in s."""
    for name, size in _TIME_UNITS:
        if abs(seconds) >= size:
            return name, size
    return _TIME_UNITS[-1]


def byte_unit(nbytes: float) -> tuple[str, float]:
    """The largest binary unit (TiB … B) in which ``nbytes`` is at least 1, and its size."""
    for name, size in _BYTE_UNITS:
        if abs(nbytes) >= size:
            return name, size
    return _BYTE_UNITS[-1]


def format_seconds(seconds: float) -> str:
    """E.g. ``0.0123`` → ``"12.3 ms"``, ``0.014`` → ``"14.0 ms"``."""
    name, size = time_unit(seconds)
    return f"{three_digits(seconds / size)} {name}"


def format_bytes(nbytes: float) -> str:
    """E.g. ``3 * 2**30`` → ``"3.00 GiB"``; whole bytes below 1 KiB."""
    name, size = byte_unit(nbytes)
    return f"{three_digits(nbytes / size)} {name}" if name != "B" else f"{nbytes:.0f} B"


def three_digits(value: float) -> str:
    """``value`` rounded to three significant digits, trailing zeros kept: 1 → ``"1.00"``,
    14 → ``"14.0"``, 9.996 → ``"10.0"``, 886.4 → ``"886"``, 1234 → ``"1230"``."""
    rounded = float(f"{value:.3g}")
    if rounded == 0 or not math.isfinite(rounded):
        return f"{rounded:g}"
    decimals = max(0, 2 - math.floor(math.log10(abs(rounded))))
    return f"{rounded:.{decimals}f}"
