"""RAW: the guest disk byte for byte, no metadata.

Holes in a sparse file (found with SEEK_DATA/SEEK_HOLE where the file system supports it) are the
only allocation information; elsewhere the whole file counts as data. Block devices read as RAW.
Like qemu, a file whose size is not a multiple of 512 is a disk rounded up to whole sectors, the
tail reading as zeros (disks have sectors; VHD needs them).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from ..host.files import HostFile
from ..units import SECTOR_SIZE
from .probing import OpenOptions, ParentOpener
from .reader import DiskReader, Extent, ImageInfo, Run, RunKind
from .writer import DiskWriter

NAME = "raw"


class RawReader(DiskReader):
    format = NAME

    @classmethod
    def open(cls, host: HostFile, open_parent: ParentOpener | None, options: OpenOptions) -> RawReader:
        return cls(host, -(-host.size // SECTOR_SIZE) * SECTOR_SIZE)

    def _runs(self, start: int, end: int) -> Iterator[Run]:
        stored_end = min(end, self.host.size)
        if start < stored_end:
            yield Run(start, stored_end - start, RunKind.HOST, start)
        if max(start, stored_end) < end:
            yield Run(max(start, stored_end), end - max(start, stored_end), RunKind.ZERO)

    def _unmerged_extents(self, start: int, end: int) -> Iterator[Extent]:
        return self._identity_extents(start, end, self.host.size)

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

    @classmethod
    def measure(cls, virtual_size: int, extents: Iterable[Extent], options: Mapping[str, str] | None,
                compress: bool = False) -> int:
        return virtual_size

    @property
    def concurrent_writes(self) -> bool:
        return not self.target.streaming

    def write(self, offset: int, data: bytes | memoryview) -> None:
        view = self._accepted(offset, data, self.virtual_size)
        if not self.concurrent_writes:
            self._written_to = offset + len(view)
        if self.target.streaming:
            self.target.skip(offset - self.target.position)
            self.target.write(view)
        else:
            self.target.pwrite(view, offset)

    def finish(self) -> None:
        if self.target.streaming:
            self.target.skip(self.virtual_size - self.target.position)
        self.target.finish(self.virtual_size)
