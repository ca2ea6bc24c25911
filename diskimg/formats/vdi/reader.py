"""Reading dynamic and static VDI images through their block map (rules in structures.py)."""

from __future__ import annotations

from array import array
from collections.abc import Iterator
from typing import Any

from ...errors import CorruptImage, UnsupportedFormat
from ...host.files import HostFile
from ..probing import OpenOptions, ParentOpener
from ..reader import DiskReader, Extent, ExtentKind, ImageInfo, Run, RunKind
from .structures import (
    CLONE_HINT,
    DISCARDED,
    HEADER_READ_SIZE,
    NAME,
    Finding,
    VdiHeader,
    allocated_blocks,
    block_map_findings,
    header_findings,
    parse_block_map,
    parse_header,
)


def raise_finding(finding: Finding, path: str) -> None:
    """The error a reader raises for the first rule an image breaks."""
    if finding.kind == "unsupported":
        raise UnsupportedFormat(
            finding.message,
            path=path,
            format=NAME,
            hint=CLONE_HINT.replace("SOURCE", path),
        )
    raise CorruptImage(finding.message, path=path, offset=finding.offset, structure=finding.structure)


class VdiReader(DiskReader):
    format = NAME

    header: VdiHeader
    _table: array[int]

    @classmethod
    def open(cls, host: HostFile, open_parent: ParentOpener | None, options: OpenOptions) -> VdiReader:
        raw = host.read_at(0, HEADER_READ_SIZE)
        if len(raw) < HEADER_READ_SIZE:
            raise CorruptImage(f"a file of {host.size} bytes is too small to be a VDI", path=host.name, offset=0,
                               structure="header")
        header = parse_header(raw)
        for finding in header_findings(header, host.size)[:1]:
            raise_finding(finding, host.name)
        map_bytes = 4 * header.blocks_in_image
        table = parse_block_map(host.read_at(header.offset_bmap, map_bytes))
        for finding in block_map_findings(header, table, host.size):
            raise_finding(finding, host.name)
        reader = cls(host, header.virtual_size)
        reader.header = header
        reader._table = table
        return reader

    @property
    def subformat(self) -> str:
        return self.header.image_type_name

    @property
    def block_size(self) -> int:
        return self.header.block_size

    def info(self) -> ImageInfo:
        header = self.header
        table = self._table
        details: dict[str, Any] = {
            "image_type": header.image_type_name,
            "image_flags": header.image_flags,
            "header_size": header.header_size,
            "comment": header.comment.split(b"\0", 1)[0].decode("utf-8", "replace") or None,
            "disk_size": header.disk_size,
            "offset_bmap": header.offset_bmap,
            "offset_data": header.offset_data,
            "blocks_in_image": header.blocks_in_image,
            "blocks_allocated": header.blocks_allocated,
            "blocks_mapped": allocated_blocks(table),
            "blocks_discarded": table.count(DISCARDED),
            "uuid_image": str(header.uuid_image),
            "uuid_last_snap": str(header.uuid_last_snap),
        }
        return ImageInfo(
            format=NAME,
            virtual_size=self.virtual_size,
            file_size=self.host.size,
            allocated_bytes=self.host.allocated_bytes,
            subformat=header.image_type_name,
            version=header.version_text,
            cluster_size=header.block_size,
            creator=header.creator_text or None,
            details=details,
        )

    def _unmerged_extents(self, start: int, end: int) -> Iterator[Extent]:
        """Holes of a sparse host file inside allocated blocks (a static image's unwritten blocks)
        are ZERO, found with SEEK_DATA/SEEK_HOLE: the map's cost follows the data, not the size."""
        for extent in super()._unmerged_extents(start, end):
            host = extent.host_offset
            regions = None if host is None else self.host.data_regions(host, host + extent.length)
            if host is None or regions is None:
                yield extent
                continue
            position, host_end = host, host + extent.length
            for data_start, data_end in [*regions, (host_end, host_end)]:
                if data_start > position:
                    yield Extent(extent.start + position - host, data_start - position, ExtentKind.ZERO)
                if data_end > data_start:
                    yield Extent(extent.start + data_start - host, data_end - data_start, ExtentKind.DATA, data_start)
                position = data_end

    def _runs(self, start: int, end: int) -> Iterator[Run]:
        """Consecutive guest blocks stored one after another in the file come out as one run."""
        block_size = self.header.block_size
        data = self.header.offset_data
        table = self._table
        pending: Run | None = None
        position = start
        while position < end:
            block = position // block_size
            stop = min(end, (block + 1) * block_size)
            entry = table[block]
            if entry >= DISCARDED:
                run = Run(position, stop - position, RunKind.ZERO)
            else:
                run = Run(position, stop - position, RunKind.HOST, data + entry * block_size + position % block_size)
            if pending is not None and pending.kind is run.kind and (
                run.kind is RunKind.ZERO or pending.host_offset + pending.length == run.host_offset
            ):
                pending = pending._replace(length=pending.length + run.length)
            else:
                if pending is not None:
                    yield pending
                pending = run
            position = stop
        if pending is not None:
            yield pending
