"""``--sparsify``: a disk whose unused ranges read as zeros.

:func:`sparsified` plans the disk (``inspection/freespace.py``: the ranges no file system on it uses)
and wraps its reader in a :class:`SparsifiedReader`, which reports those ranges as ZERO extents and
reads zeros there, everything else from the source unchanged. The converter and the exporter walk it
as they walk any reader: the unused ranges are never read, so they cost neither reading nor
compressing, and the output holds holes (or unallocated clusters) there.

The wrapper's cost is a bisection per read and per extent of the source's map, over the arrays the
plan holds.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import UsageError
from ..formats.reader import DiskReader, Extent, ExtentKind, ImageInfo
from ..inspection.freespace import SparsifyPlan, UnusedRanges, plan_sparsify


@dataclass
class SparsifiedVolume:
    """One volume of a disk converted with ``--sparsify``, as results report it.

    ``unused_bytes``: the bytes of the volume its file system does not use, which the output reads
    as zeros; ``sparsified_bytes``: of those, the bytes the source held as data (its allocation map's
    DATA extents, or with a content scan its non-zero ranges): what the output no longer carries."""

    name: str
    #: where the volume starts on the disk; None for a logical volume (its extents lie where its
    #: segments map them)
    offset: int | None
    length: int
    file_system: str | None
    sparsified: bool
    #: why the volume was kept byte for byte (None when sparsified)
    reason: str | None
    unused_bytes: int
    sparsified_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SparsifiedReader(DiskReader):
    """``source`` with the plan's unused ranges reading as zeros (ZERO extents in its map). It reads
    through ``source`` and leaves it open: whoever opened the source closes it."""

    def __init__(self, source: DiskReader, ranges: UnusedRanges) -> None:
        super().__init__(source.host, source.virtual_size)
        self.source = source
        self.ranges = ranges
        self.format = source.format
        self.forward_only = source.forward_only

    def info(self) -> ImageInfo:
        return self.source.info()

    @property
    def backing_file(self) -> str | None:
        return self.source.backing_file

    def read_at(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        end = min(offset + length, self.virtual_size)
        if end <= offset:
            return b""
        if end - offset > self.MAX_READ:
            raise ValueError(f"cannot return {end - offset} bytes in one read (the limit is {self.MAX_READ}): read "
                             "the disk in pieces, with read(size), readinto or read_at")
        buffer = bytearray(end - offset)
        self.readinto_at(offset, buffer)
        return bytes(buffer)

    def readinto_at(self, offset: int, buffer: bytearray | memoryview) -> int:
        """Guest bytes at ``offset``: the used pieces read from the source, the unused ones zeroed."""
        view = memoryview(buffer).cast("B")
        end = min(offset + len(view), self.virtual_size)
        starts, ends = self.ranges.starts, self.ranges.ends
        index = self.ranges.first_after(offset)
        position = offset
        while position < end:
            if index < len(starts) and starts[index] <= position:
                stop = min(ends[index], end)
                view[position - offset : stop - offset] = bytes(stop - position)
                index += 1
            else:
                stop = min(starts[index], end) if index < len(starts) else end
                self.source.readinto_at(position, view[position - offset : stop - offset])
            position = stop
        return max(0, end - offset)

    def _unmerged_extents(self, start: int, end: int) -> Iterator[Extent]:
        if start < end:
            yield from carve(self.source.extents(start, end - start), self.ranges)

    def close(self) -> None:
        # the host file is the source's: closing it is for whoever opened the source
        io.RawIOBase.close(self)


def carve(extents: Iterable[Extent], ranges: UnusedRanges) -> Iterator[Extent]:
    """``extents`` (in order) with the parts of their DATA extents inside ``ranges`` turned into ZERO
    extents (unmerged: a caller merges them, as ``DiskReader.extents`` does)."""
    starts, ends = ranges.starts, ranges.ends
    for extent in extents:
        if extent.kind is ExtentKind.ZERO:
            yield extent
            continue
        index = ranges.first_after(extent.start)
        position = extent.start
        while position < extent.end:
            if index < len(starts) and starts[index] <= position:
                stop = min(ends[index], extent.end)
                yield Extent(position, stop - position, ExtentKind.ZERO)
                if stop == ends[index]:
                    index += 1
            else:
                stop = min(starts[index], extent.end) if index < len(starts) else extent.end
                host = None if extent.host_offset is None else extent.host_offset + position - extent.start
                yield Extent(position, stop - position, ExtentKind.DATA, host)
            position = stop


def sparsified_bytes(extents: Iterable[Extent], ranges: UnusedRanges, volumes: int) -> list[int]:
    """For each of the plan's ``volumes``, the bytes of ``extents``' DATA extents inside its unused ranges."""
    counts = [0] * volumes
    starts, ends, owners = ranges.starts, ranges.ends, ranges.volumes
    for extent in extents:
        if extent.kind is ExtentKind.ZERO:
            continue
        index = ranges.first_after(extent.start)
        while index < len(starts) and starts[index] < extent.end:
            counts[owners[index]] += min(ends[index], extent.end) - max(starts[index], extent.start)
            index += 1
    return counts


def sparsified(reader: DiskReader) -> tuple[SparsifiedReader, SparsifyPlan]:
    """The plan of ``reader``'s disk and the reader with its unused ranges reading as zeros. A disk read
    through a compressed stream is refused: the file systems' maps lie all over the disk, and each read
    backwards would cost another decompression pass."""
    if reader.forward_only:
        raise UsageError("--sparsify reads the file systems' allocation maps all over the disk, which a disk "
                         "inside a compressed file or archive cannot give without decompressing it again and again: "
                         "unpack or convert it first, then sparsify that", path=reader.path)
    plan = plan_sparsify(reader)
    return SparsifiedReader(reader, plan.ranges), plan


def report(plan: SparsifyPlan, extents: Iterable[Extent]) -> list[SparsifiedVolume]:
    """The plan's volumes as results report them, ``sparsified_bytes`` counted over ``extents`` (the
    source's map, or the plan a conversion was made with)."""
    freed = sparsified_bytes(extents, plan.ranges, len(plan.volumes))
    return [SparsifiedVolume(volume.name, volume.offset, volume.length, volume.file_system, volume.sparsified,
                             volume.reason, volume.unused_bytes, freed[index])
            for index, volume in enumerate(plan.volumes)]
