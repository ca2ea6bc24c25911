"""The DiskReader contract shared by every format driver.

A driver describes its image as *runs*: consecutive guest ranges, each served from one place (zeros,
a contiguous range of the host file, the backing image, or an encoded unit such as a compressed
qcow2 cluster). From that single description this base class derives the three views callers use:
positional ``read_at(offset, length)``, the ``extents()`` allocation map, and a read-only seekable
file (``io.RawIOBase``) for partition and file-system parsers.
"""

from __future__ import annotations

import enum
import io
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

from ..errors import BackingFileError, CorruptImage
from ..host.files import HostFile
from .probing import OpenOptions, ParentOpener


class ExtentKind(str, enum.Enum):
    DATA = "data"
    ZERO = "zero"


@dataclass(frozen=True)
class Extent:
    """A run of the guest disk: allocated data, or zeros known from metadata alone.

    ``host_offset`` is set where the bytes lie contiguously, unencoded, in this image's own file,
    which lets copies go through the kernel (``os.copy_file_range``).
    """

    start: int
    length: int
    kind: ExtentKind
    host_offset: int | None = None

    @property
    def end(self) -> int:
        return self.start + self.length

    def to_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"start": self.start, "length": self.length, "kind": self.kind.value}
        if self.host_offset is not None:
            entry["host_offset"] = self.host_offset
        return entry


class RunKind(enum.IntEnum):
    ZERO = 0
    HOST = 1  # bytes at host_offset in the image file
    BACKING = 2  # the same guest range of the backing image (zeros past its end)
    ENCODED = 3  # a unit the driver decodes itself (_read_encoded)


class Run(NamedTuple):
    start: int
    length: int
    kind: RunKind
    host_offset: int = 0
    extra: int = 0  # driver-specific, e.g. the stored length of a compressed cluster


@dataclass
class Snapshot:
    id: str
    name: str
    virtual_size: int
    date: str
    vm_state_size: int


@dataclass
class ImageInfo:
    """Facts about an image, JSON-able (``to_dict``); keys documented in docs/cli.md."""

    format: str
    virtual_size: int
    file_size: int
    allocated_bytes: int | None = None
    subformat: str | None = None
    version: str | None = None
    cluster_size: int | None = None
    creator: str | None = None
    features: list[str] = field(default_factory=list)
    backing_file: str | None = None
    backing_format: str | None = None
    snapshots: list[Snapshot] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class DiskReader(io.RawIOBase):
    """Guest-visible view of one image. Drivers implement ``_runs`` (and ``_read_encoded``, ``info``)."""

    format: str = ""
    #: the most bytes one read may return (read_at, read, readall), so that no read allocates without
    #: bound; readinto fills a buffer of any size
    MAX_READ = 64 * 1024 * 1024
    #: True for a disk read through a forward-only stream (sources.py): reads in increasing offset
    #: order cost one decompression pass, a read backwards restarts it; read such a disk in order
    forward_only = False

    def __init__(self, host: HostFile, virtual_size: int, parent: DiskReader | None = None) -> None:
        super().__init__()
        self.host = host
        self.virtual_size = virtual_size
        self.parent = parent
        self._position = 0

    # -- what drivers provide -------------------------------------------------------------

    @classmethod
    def open(cls, host: HostFile, open_parent: ParentOpener | None, options: OpenOptions) -> DiskReader:
        """Parse and check the image's metadata; a reader, or a DiskImageError."""
        raise NotImplementedError

    def _runs(self, start: int, end: int) -> Iterator[Run]:
        """Runs covering exactly [start, end) in increasing order."""
        raise NotImplementedError

    def _read_encoded(self, run: Run) -> bytes:
        raise NotImplementedError

    def info(self) -> ImageInfo:
        raise NotImplementedError

    @property
    def backing_file(self) -> str | None:
        """The reference to a parent image recorded in this image, if any."""
        return None

    # -- positional reads --------------------------------------------------------------------

    @property
    def path(self) -> str:
        return self.host.name

    def read_at(self, offset: int, length: int) -> bytes:
        """Guest bytes at ``offset``: holes as zeros, fewer than ``length`` only at the end of the disk;
        the file position is untouched. More than ``MAX_READ`` bytes at once is a ValueError."""
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        end = min(offset + length, self.virtual_size)
        if end <= offset:
            return b""
        if end - offset > self.MAX_READ:
            raise ValueError(f"cannot return {end - offset} bytes in one read (the limit is {self.MAX_READ}): read "
                             "the disk in pieces, with read(size), readinto or read_at")
        runs = self._runs(offset, end)
        first = next(runs)
        if first.kind is RunKind.HOST and first.length == end - offset:
            return self._read_host(first)
        buffer = bytearray(end - offset)
        self._fill_runs(memoryview(buffer), offset, (first, *runs))
        return bytes(buffer)

    def readinto_at(self, offset: int, buffer: bytearray | memoryview) -> int:
        """Fill ``buffer`` with guest bytes at ``offset`` without an intermediate copy; returns the
        byte count (short only at the end of the disk)."""
        view = memoryview(buffer).cast("B")
        end = min(offset + len(view), self.virtual_size)
        # in pieces of at most MAX_READ, so the zeros and decoded units one piece needs stay bounded
        for start in range(offset, end, self.MAX_READ):
            stop = min(start + self.MAX_READ, end)
            self._fill_runs(view[start - offset : stop - offset], start, self._runs(start, stop))
        return max(0, end - offset)

    def _fill_runs(self, view: memoryview, offset: int, runs: Iterable[Run]) -> None:
        for run in runs:
            self._fill(view[run.start - offset : run.start - offset + run.length], run)

    def _read_host(self, run: Run) -> bytes:
        data = self.host.read_at(run.host_offset, run.length)
        if len(data) != run.length:
            raise CorruptImage(
                f"image is truncated: {run.length} bytes of guest offset {run.start} lie past the end of the file",
                path=self.path,
                offset=run.host_offset,
            )
        return data

    def _fill(self, target: memoryview, run: Run) -> None:
        if run.kind is RunKind.ZERO:
            target[:] = bytes(run.length)
        elif run.kind is RunKind.HOST:
            if self.host.readinto_at(run.host_offset, target) != run.length:
                raise CorruptImage(
                    f"image is truncated: guest offset {run.start} maps past the end of the file",
                    path=self.path,
                    offset=run.host_offset,
                )
        elif run.kind is RunKind.BACKING:
            target[:] = self._backing_read(run.start, run.length)
        else:
            data = self._read_encoded(run)
            if len(data) != run.length:
                raise CorruptImage("decoded unit has the wrong length", path=self.path, offset=run.host_offset)
            target[:] = data

    def _backing_read(self, start: int, length: int) -> bytes:
        parent = self._require_parent()
        data = parent.read_at(start, length) if start < parent.virtual_size else b""
        return data + bytes(length - len(data))

    def _require_parent(self) -> DiskReader:
        if self.parent is None:
            raise BackingFileError(
                f"needs its backing file {self.backing_file!r}, which was not opened (pass --allow-backing)",
                path=self.path,
            )
        return self.parent

    # -- allocation map ------------------------------------------------------------------------

    def extents(self, start: int = 0, length: int | None = None) -> Iterator[Extent]:
        """DATA / ZERO extents covering [start, start + length), merged, from metadata only."""
        end = self.virtual_size if length is None else min(self.virtual_size, start + length)
        pending: Extent | None = None
        for extent in self._unmerged_extents(start, end):
            if pending is None:
                pending = extent
            elif _mergeable(pending, extent):
                pending = Extent(pending.start, pending.length + extent.length, pending.kind, pending.host_offset)
            else:
                yield pending
                pending = extent
        if pending is not None:
            yield pending

    def _unmerged_extents(self, start: int, end: int) -> Iterator[Extent]:
        if start >= end:
            return
        for run in self._runs(start, end):
            if run.kind is RunKind.ZERO:
                yield Extent(run.start, run.length, ExtentKind.ZERO)
            elif run.kind is RunKind.HOST:
                yield Extent(run.start, run.length, ExtentKind.DATA, run.host_offset)
            elif run.kind is RunKind.ENCODED:
                yield Extent(run.start, run.length, ExtentKind.DATA)
            else:
                parent = self._require_parent()
                inside = max(run.start, min(run.start + run.length, parent.virtual_size))
                for extent in parent.extents(run.start, inside - run.start):
                    # data of another file: no host offset in ours
                    yield Extent(extent.start, extent.length, extent.kind)
                if inside < run.start + run.length:
                    yield Extent(inside, run.start + run.length - inside, ExtentKind.ZERO)

    def _identity_extents(self, start: int, end: int, stored_end: int) -> Iterator[Extent]:
        """Extents of a disk stored at host offset == guest offset up to ``stored_end`` (RAW, fixed
        VHD): holes of a sparse host file, found with SEEK_DATA/SEEK_HOLE, are ZERO."""
        stored_end = min(end, stored_end)
        regions = self.host.data_regions(start, stored_end)
        if regions is None:
            regions = [(start, stored_end)] if start < stored_end else []
        position = start
        for data_start, data_end in regions:
            if data_start > position:
                yield Extent(position, data_start - position, ExtentKind.ZERO)
            yield Extent(data_start, data_end - data_start, ExtentKind.DATA, data_start)
            position = data_end
        if position < end:
            yield Extent(position, end - position, ExtentKind.ZERO)

    # -- io.RawIOBase ----------------------------------------------------------------------------

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            position = offset
        elif whence == os.SEEK_CUR:
            position = self._position + offset
        elif whence == os.SEEK_END:
            position = self.virtual_size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if position < 0:
            raise ValueError("negative seek position")
        self._position = position
        return position

    def read(self, size: int | None = -1, /) -> bytes:
        """Up to ``size`` bytes from the position (the rest of the disk when ``size`` is negative or
        None); fewer only at the end of the disk. As with ``read_at``, more than ``MAX_READ`` bytes
        at once is a ValueError, never a short read."""
        rest = max(0, self.virtual_size - self._position)
        data = self.read_at(self._position, rest if size is None or size < 0 else min(size, rest))
        self._position += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        """Fill ``buffer`` from the position; short only at the end of the disk."""
        count = self.readinto_at(self._position, buffer)
        self._position += count
        return count

    def readall(self) -> bytes:
        return self.read(-1)

    def close(self) -> None:
        if not self.closed:
            self.host.close()
            if self.parent is not None:
                self.parent.close()
        super().close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path!r} virtual_size={self.virtual_size}>"


def _mergeable(a: Extent, b: Extent) -> bool:
    if a.kind is not b.kind or a.end != b.start:
        return False
    if a.kind is ExtentKind.ZERO:
        return True
    if a.host_offset is None or b.host_offset is None:
        return a.host_offset is None and b.host_offset is None
    return a.host_offset + a.length == b.host_offset
