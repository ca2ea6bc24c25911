"""Read-only access to the file systems inside a disk: one driver per file system (see base.py)."""

from __future__ import annotations

import importlib
from typing import Any

from ..signatures import Disk, probe
from .base import DirEntry, FileType, GuestFileSystem, GuestPathError, Stat

__all__ = ["DirEntry", "FileType", "GuestFileSystem", "GuestPathError", "Stat", "open_filesystem"]

#: file system type (as ``filesystems.probe`` names it) -> "module:Class" of its driver
DRIVERS = {
    "ext2": "ext:ExtFileSystem",
    "ext3": "ext:ExtFileSystem",
    "ext4": "ext:ExtFileSystem",
    "xfs": "xfs:XfsFileSystem",
    "fat12": "fat:FatFileSystem",
    "fat16": "fat:FatFileSystem",
    "fat32": "fat:FatFileSystem",
    "ntfs": "ntfs:NtfsFileSystem",
    "btrfs": "btrfs:BtrfsFileSystem",
}


def open_filesystem(disk: Disk, offset: int, length: int, fs_type: str | None = None) -> GuestFileSystem[Any] | None:
    """A reader for the file system at ``offset`` of ``disk``, or None when diskimg has no driver for it.

    Raises CorruptImage when the file system is recognised but its structures are broken.
    """
    if fs_type is None:
        found = probe(disk, offset, length)
        if found is None:
            return None
        fs_type = found.type
    target = DRIVERS.get(fs_type)
    if target is None:
        return None
    module_name, class_name = target.split(":")
    module = importlib.import_module(f".{module_name}", __name__)
    driver: type[GuestFileSystem[Any]] = getattr(module, class_name)
    return driver(disk, offset, length)  # type: ignore[call-arg]
