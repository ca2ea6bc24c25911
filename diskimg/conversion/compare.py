"""Comparing the guest content of two images, of any formats, through their allocation maps.

Ranges that both maps call ZERO are never read; a range one side calls ZERO is checked against
zeros without reading that side. With different virtual sizes the images are "identical" when the
extra area of the larger one reads as zeros (as ``qemu-img compare`` does); ``strict`` makes any
size difference a mismatch.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from ..choices import FormatName, VhdSizeRule
from ..detection.image import Source, open_image
from ..formats.reader import DiskReader, Extent, ExtentKind
from .zeroes import is_zero, zero_block

CHUNK = 4 * 1024 * 1024


@dataclass
class CompareResult:
    identical: bool
    #: the first guest offset whose byte differs (None when identical or for a strict size mismatch)
    first_difference: int | None
    size_a: int
    size_b: int
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare(
    a: Source,
    b: Source,
    *,
    format_a: FormatName | None = None,
    format_b: FormatName | None = None,
    strict: bool = False,
    allow_backing: bool = False,
    vhd_size: VhdSizeRule = "auto",
) -> CompareResult:
    """Whether ``a`` and ``b`` hold the same guest content (``vhd_size``: the size rule for either
    one that is a VHD)."""
    with open_image(a, format_a, allow_backing=allow_backing, vhd_size=vhd_size) as first, open_image(
        b, format_b, allow_backing=allow_backing, vhd_size=vhd_size
    ) as second:
        sizes = first.virtual_size, second.virtual_size
        if strict and sizes[0] != sizes[1]:
            return CompareResult(False, None, *sizes, f"image sizes differ: {sizes[0]} and {sizes[1]} bytes")
        common = min(sizes)
        with ThreadPoolExecutor(max_workers=2) as pool:
            offset = _first_difference(first, second, common, pool)
            if offset is None and sizes[0] != sizes[1]:
                larger = first if sizes[0] > sizes[1] else second
                offset = _first_nonzero(larger, common)
        if offset is not None:
            return CompareResult(False, offset, *sizes, f"content mismatch at offset {offset}")
        note = "" if sizes[0] == sizes[1] else " (the larger image's extra area reads as zeros)"
        return CompareResult(True, None, *sizes, f"images are identical{note}")


def _segments(a: DiskReader, b: DiskReader, end: int) -> Iterator[tuple[int, int, bool, bool]]:
    """(start, end, a has data, b has data) over [0, end), split where either map changes."""
    left, right = a.extents(0, end), b.extents(0, end)
    x: Extent | None = next(left, None)
    y: Extent | None = next(right, None)
    position = 0
    while position < end and x is not None and y is not None:
        stop = min(x.end, y.end)
        yield position, stop, x.kind is ExtentKind.DATA, y.kind is ExtentKind.DATA
        position = stop
        if x.end == stop:
            x = next(left, None)
        if y.end == stop:
            y = next(right, None)


def _first_difference(a: DiskReader, b: DiskReader, end: int, pool: ThreadPoolExecutor) -> int | None:
    for start, stop, a_data, b_data in _segments(a, b, end):
        if not (a_data or b_data):
            continue
        for offset in range(start, stop, CHUNK):
            length = min(CHUNK, stop - offset)
            future_a = pool.submit(a.read_at, offset, length) if a_data else None
            future_b = pool.submit(b.read_at, offset, length) if b_data else None
            data_a = future_a.result() if future_a else zero_block(length)
            data_b = future_b.result() if future_b else zero_block(length)
            if data_a != data_b:
                return offset + _first_unequal(data_a, data_b)
    return None


def _first_nonzero(reader: DiskReader, start: int) -> int | None:
    for extent in reader.extents(start):
        if extent.kind is ExtentKind.ZERO:
            continue
        for offset in range(extent.start, extent.end, CHUNK):
            data = reader.read_at(offset, min(CHUNK, extent.end - offset))
            if not is_zero(data):
                return offset + _first_unequal(data, zero_block(len(data)))
    return None


def _first_unequal(x: bytes, y: bytes) -> int:
    """Index of the first differing byte of two equal-length, unequal buffers (narrowing by slices)."""
    low, high = 0, len(x)
    for step in (65536, 512):
        for piece in range(low, high, step):
            if x[piece : piece + step] != y[piece : piece + step]:
                low, high = piece, min(piece + step, high)
                break
    return next(i for i in range(low, high) if x[i] != y[i])
