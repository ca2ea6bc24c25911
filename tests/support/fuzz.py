"""Fuzz drivers shared by the format tests: hypothesis draws that damage an image in memory, and the
bounded use of the damaged image that may end only normally or in a DiskImageError."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

from hypothesis import strategies as st

from diskimg.errors import DiskImageError

from .units import MiB

#: what one run reads at most: the head of the disk, its last bytes, and how many extents
HEAD_BYTES = 4 * MiB
TAIL_BYTES = 4096
EXTENTS = 10000


def draw_position(data: st.DataObject, regions: list[tuple[int, int]], size: int) -> int:
    """An offset inside one of ``regions`` ((start, end) pairs) and inside ``size`` bytes."""
    start, end = data.draw(st.sampled_from(regions))
    return data.draw(st.integers(start, min(end, size) - 1))


def poke_bytes(data: st.DataObject, image: bytearray, regions: list[tuple[int, int]],
               count: tuple[int, int] = (1, 8)) -> None:
    """Set a drawn number of bytes (between ``count``'s bounds) inside ``regions`` to drawn values."""
    for _ in range(data.draw(st.integers(*count))):
        image[draw_position(data, regions, len(image))] = data.draw(st.integers(0, 255))


def maybe_cut(data: st.DataObject, image: bytearray) -> None:
    """Half of the time, cut the image at a drawn offset (a truncated download or copy)."""
    if data.draw(st.booleans()):
        del image[data.draw(st.integers(0, len(image) - 1)) :]


def exercise_reader(open_reader: Callable[[], AbstractContextManager], read_tail: bool = True) -> None:
    """Open a damaged image and use it as a conversion would, within bounds: its facts, its first
    4 MiB, (with ``read_tail``) its last 4 KiB, its first 10,000 extents. A DiskImageError anywhere
    is an acceptable end; any other exception fails the test."""
    try:
        with open_reader() as reader:
            reader.info()
            reader.read_at(0, min(reader.virtual_size, HEAD_BYTES))
            if read_tail:
                reader.read_at(max(0, reader.virtual_size - TAIL_BYTES), TAIL_BYTES)
            for _ in zip(range(EXTENTS), reader.extents()):
                pass
    except DiskImageError:
        pass
