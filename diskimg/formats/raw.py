"""RAW: the guest disk byte for byte, no metadata.

Holes in a sparse file (found with SEEK_DATA/SEEK_HOLE where the file system supports it) are the
only allocation information; elsewhere the whole file counts as data. Block devices read as RAW.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from ..detection import OpenOptions, ParentOpener
from ..hostfile import HostFile
from ..reader import DiskReader, Extent, ExtentKind, ImageInfo, Run, RunKind
from ..writer import DiskWriter

NAME = "raw"


class RawReader(DiskReader):
    format = NAME

    @classmethod
    def open(cls, host: HostFile, open_parent: ParentOpener | None, options: OpenOptions) -> RawReader:
        return cls(host, host.size)

    def _runs(self, start: int, end: int) -> Iterator[Run]:
        yield Run(start, end - start, RunKind.HOST, start)

    def _unmerged_extents(self, start: int, end: int) -> Iterator[Extent]:
        regions = self.host.data_regions(start, end)
        if regions is None:
            yield Extent(start, end - start, ExtentKind.DATA, start)
            return
        position = start
        for data_start, data_end in regions:
            if data_start > position:
                yield Extent(position, data_start - position, ExtentKind.ZERO)
            yield Extent(data_start, data_end - data_start, ExtentKind.DATA, data_start)
            position = data_end
        if position < end:
            yield Extent(position, end - position, ExtentKind.ZERO)

    def info(self) -> ImageInfo:
        return ImageInfo(
            format=NAME,
            virtual_size=self.virtual_size,
            file_size=self.host.size,
            allocated_bytes=self.host.allocated_bytes,
            details={"block_device": self.host.is_block_device},
        )


class RawWriter(DiskWriter):
    """A sparse file (holes where nothing is written), or every byte, zeros included, on a pipe."""

    format = NAME

    def plan(self, extents: Iterable[Extent]) -> None:
        if self.target.seekable:
            self.target.truncate(self.virtual_size)

    def write(self, offset: int, data: bytes) -> None:
        if self.target.seekable:
            self.target.pwrite(data, offset)
        else:
            self.target.write_zeros(offset - self.target.position)
            self.target.write(data)

    def finish(self) -> None:
        if not self.target.seekable:
            self.target.write_zeros(self.virtual_size - self.target.position)
