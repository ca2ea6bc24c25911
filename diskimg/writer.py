"""The DiskWriter contract: plan, then stream.

A writer is told the virtual size and the planned allocation (the source's extents) first, then
receives data in increasing offset order, then ``finish()``. Knowing the layout up front lets every
format write its output in one forward pass, so the target may be a pipe; on a seekable file a
writer may still seek (to leave holes, or write metadata last).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable

from .errors import OutputError
from .reader import Extent

ZERO_CHUNK = bytes(4 << 20)


class OutputTarget:
    """The file descriptor a writer writes to: a regular file (seekable) or a pipe."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name
        mode = os.fstat(fd).st_mode
        self.seekable = stat.S_ISREG(mode) or stat.S_ISBLK(mode)
        self.position = 0  # for sequential writes
        self.bytes_written = 0

    def write(self, data: bytes | memoryview) -> None:
        """Append at the stream position (the only operation a pipe allows)."""
        view = memoryview(data)
        try:
            while view:
                written = os.write(self.fd, view)
                view = view[written:]
                self.position += written
                self.bytes_written += written
        except OSError as exc:
            raise OutputError(f"cannot write: {exc.strerror}", path=self.name) from None

    def write_zeros(self, length: int) -> None:
        while length > 0:
            step = min(length, len(ZERO_CHUNK))
            self.write(memoryview(ZERO_CHUNK)[:step])
            length -= step

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        view = memoryview(data)
        try:
            while view:
                written = os.pwrite(self.fd, view, offset) if hasattr(os, "pwrite") else self._seek_write(view, offset)
                view = view[written:]
                offset += written
                self.bytes_written += written
        except OSError as exc:
            raise OutputError(f"cannot write: {exc.strerror}", path=self.name) from None

    def _seek_write(self, view: memoryview, offset: int) -> int:
        os.lseek(self.fd, offset, os.SEEK_SET)
        return os.write(self.fd, view)

    def truncate(self, size: int) -> None:
        try:
            os.ftruncate(self.fd, size)
        except OSError as exc:
            raise OutputError(f"cannot set the file size: {exc.strerror}", path=self.name) from None


class DiskWriter:
    """Base of the format writers."""

    format: str = ""

    def __init__(self, target: OutputTarget, virtual_size: int) -> None:
        self.target = target
        self.virtual_size = virtual_size

    def plan(self, extents: Iterable[Extent]) -> None:
        """Take the planned allocation, covering [0, virtual_size) in order, before any data."""

    def write(self, offset: int, data: bytes) -> None:
        """Guest bytes at ``offset``; offsets only increase between calls."""
        raise NotImplementedError

    def finish(self) -> None:
        """Complete the output (trailing metadata, padding)."""
