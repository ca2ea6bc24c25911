"""Runs of equal bits in the allocation bitmaps of several formats: the sector bitmaps of VHD and
VHDX blocks, ext's block bitmaps, NTFS's $Bitmap. Pure functions over bytes; whole 0x00 and 0xFF
bytes are skipped by the regular expression engine, in C, so a mostly full or empty bitmap costs little.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

#: each byte with its bits in reverse order: VHDX's, ext's and NTFS's bitmaps number their bits from the
#: least significant, ``bitmap_runs`` (VHD's order) from the most
REVERSED_BITS = bytes(int(f"{value:08b}"[::-1], 2) for value in range(256))

_BITMAP_RUNS = re.compile(rb"\x00+|\xff+|[\x01-\xfe]")


def bitmap_runs(bitmap: bytes, sectors: int) -> tuple[list[int], list[int]]:
    """Runs of equal bits in a sector bitmap (MSB of byte 0 = sector 0) over ``sectors`` sectors:
    ``(starts, bits)``, ``starts[0] == 0``. Whole 0x00 / 0xFF byte runs are handled in C."""
    if bitmap == b"\xff" * len(bitmap):
        return [0], [1]
    if not any(bitmap):
        return [0], [0]
    starts: list[int] = []
    bits: list[int] = []

    def add(sector: int, bit: int) -> None:
        if sector < sectors and (not bits or bits[-1] != bit):
            starts.append(sector)
            bits.append(bit)

    for match in _BITMAP_RUNS.finditer(bitmap):
        first = match.start()
        value = bitmap[first]
        if value == 0:
            add(first * 8, 0)
        elif value == 0xFF:
            add(first * 8, 1)
        else:
            for k in range(8):
                add(first * 8 + k, (value >> (7 - k)) & 1)
    return starts, bits


def clear_bit_runs(bitmap: bytes, count: int, first: int = 0) -> Iterator[tuple[int, int]]:
    """(first bit, bits) of each run of clear bits among the first ``count`` bits of an allocation
    bitmap whose bit ``i`` is bit ``i % 8`` of byte ``i // 8`` (ext's block bitmaps, NTFS's $Bitmap),
    ``first`` added to each start. Whole 0x00 and 0xFF bytes are skipped in C."""
    count = min(count, len(bitmap) * 8)
    if count <= 0:
        return
    starts, bits = bitmap_runs(bitmap.translate(REVERSED_BITS), count)
    for index, start in enumerate(starts):
        if not bits[index]:
            end = starts[index + 1] if index + 1 < len(starts) else count
            yield first + start, end - start
