"""Sizes as people write them (``4k``, ``1.5G``, ``2MiB``) and as tools print them."""

from __future__ import annotations

import re

from .errors import UsageError

_SUFFIXES = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtpb]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from ``512``, ``4k``, ``64KiB``, ``1.5G`` (binary multiples, like qemu-img)."""
    match = _SIZE.match(text)
    if not match:
        raise UsageError(f"invalid size {text!r} (examples: 512, 4k, 1M, 2G)")
    value = float(match.group(1)) * _SUFFIXES[match.group(2).lower()]
    if value != int(value):
        raise UsageError(f"size {text!r} is not a whole number of bytes")
    return int(value)


_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def format_size(size: int) -> str:
    """A size as qemu-img prints it: three significant digits in the largest binary unit that keeps
    the number below 1000 (``20 GiB``, ``42.5 KiB``, ``0.977 MiB``, ``512 B``)."""
    unit = 0
    while unit < len(_UNITS) - 1 and size >= 1000 * 1024**unit:
        unit += 1
    if unit < len(_UNITS) - 1 and float(f"{size / 1024**unit:.3g}") >= 1000:
        unit += 1  # 999.7 KiB would print as 1e+03 KiB
    return f"{size / 1024**unit:.3g} {_UNITS[unit]}"
