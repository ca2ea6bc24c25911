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


def format_size(size: int) -> str:
    """``4 GiB`` or ``1.5 MiB``: the largest binary unit, at most one decimal."""
    for unit, name in ((1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if size >= unit:
            value = size / unit
            return f"{value:.0f} {name}" if value == int(value) else f"{value:.1f} {name}"
    return f"{size} B"
