"""Sizes: the units shared across the layers, and sizes as people write them (``4k``, ``1.5G``, ``2MiB``)
and as tools print them."""

from __future__ import annotations

import re

from .errors import UsageError

# -- sizes shared across the layers (a format's own units, such as VHD's or VMDK's sector, stay in its module) --

#: bytes of a disk sector: the unit of the LBAs of MBR and GPT partition tables, and the granularity of
#: a disk's size (a RAW disk's size is rounded up to it, as qemu-img does)
SECTOR_SIZE = 512
#: bytes read or decoded in one piece where memory must stay bounded and nothing asks for another size:
#: guest files, compressed input, decompressed streams
READ_CHUNK = 1 << 20

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
