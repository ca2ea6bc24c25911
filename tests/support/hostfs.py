"""A GuestFileSystem over a directory of the host, for testing guest inspection without images.

It implements the driver side of ``diskimg.inspection.fs.base`` (``_stat``, ``_entries``, ``_read``,
``_readlink``) over host paths, so path lookup and symbolic links go through the base class's
guest-side resolution exactly as with the real readers. Attributes such as ``immutable`` are not
reported (the host cannot set them without privileges): tests of those use real images.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

from diskimg.inspection.fs import DirEntry, FileType, GuestFileSystem, Stat


class HostDirFileSystem(GuestFileSystem[str]):
    type = "hostdir"

    def __init__(self, root: Path) -> None:
        self.base = Path(root)
        self.root = ""

    def _host(self, node: str) -> str:
        return os.path.join(self.base, node) if node else str(self.base)

    def _stat(self, node: str) -> Stat:
        info = os.lstat(self._host(node))
        if stat.S_ISLNK(info.st_mode):
            kind = FileType.SYMLINK
        elif stat.S_ISDIR(info.st_mode):
            kind = FileType.DIRECTORY
        elif stat.S_ISREG(info.st_mode):
            kind = FileType.FILE
        else:
            kind = FileType.OTHER
        return Stat(kind, info.st_size, node, stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid,
                    info.st_mtime, info.st_nlink)

    def _entries(self, node: str) -> Iterator[DirEntry]:
        for entry in sorted(os.scandir(self._host(node)), key=lambda e: e.name):
            yield DirEntry(entry.name, f"{node}/{entry.name}" if node else entry.name)

    def _read(self, node: str, offset: int, length: int) -> bytes:
        with open(self._host(node), "rb") as f:
            f.seek(offset)
            return f.read(length)

    def _readlink(self, node: str) -> str:
        return os.readlink(self._host(node))
