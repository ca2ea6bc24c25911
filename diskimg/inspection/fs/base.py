"""The read-only file system contract: what guest inspection needs of ext, XFS, FAT and NTFS.

A driver knows its on-disk structures and names each file by a ``node`` (an inode number, an MFT
record number, a FAT directory entry: whatever it needs, hashable). It implements four methods:

- ``_stat(node)`` -> :class:`Stat`
- ``_entries(node)`` -> the entries of a directory, '.' and '..' left out
- ``_read(node, offset, length)`` -> up to ``length`` bytes of a regular file's data
- ``_readlink(node)`` -> a symbolic link's target

and sets ``root`` (the root directory's node). The base class turns that into paths: lookup one
component at a time, symbolic links resolved *inside the guest* (an absolute target restarts at the
guest's root, '..' at the root stays there, at most :data:`MAX_SYMLINKS` links per lookup), and
bounded reads. Nothing on the host is ever touched but the disk the driver reads.

Every driver checks each on-disk value before it uses it and raises
:class:`~diskimg.errors.CorruptImage` when a structure is broken; a path that is not there raises
:class:`GuestPathError`. Memory is bounded: directories and files are read in pieces, and
``read_file`` refuses files above ``max_size``.
"""

from __future__ import annotations

import enum
import io
from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

from ...errors import CorruptImage, DiskImageError
from ...units import READ_CHUNK
from ..signatures import Disk

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

#: symbolic links followed in one lookup before giving up (Linux's limit)
MAX_SYMLINKS = 40
#: ``read_file``'s default cap: configuration files, kernels' config, an initramfs
DEFAULT_MAX_FILE = 512 << 20
#: entries a directory may yield before it is taken as corrupt
MAX_DIRECTORY_ENTRIES = 1 << 20


def read_volume(disk: Disk, volume_offset: int, volume_length: int, position: int, length: int,
                structure: str) -> bytes:
    """``length`` bytes at ``position`` of the volume spanning ``volume_length`` bytes from
    ``volume_offset`` of ``disk``: CorruptImage when they lie outside it or the disk ends first."""
    where = volume_offset + position
    if position < 0 or length < 0 or position + length > volume_length:
        raise CorruptImage(f"{length} bytes at {position} lie outside the file system of {volume_length} bytes",
                           offset=where, structure=structure)
    data = disk.read_at(where, length)
    if len(data) != length:
        raise CorruptImage("the disk ends inside the file system", offset=where, structure=structure)
    return data


def join_adjacent(ranges: Iterable[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """(offset, length) ranges given in increasing order, those that touch joined into one; empty ones dropped."""
    pending: tuple[int, int] | None = None
    for start, length in ranges:
        if length <= 0:
            continue
        if pending is not None and pending[0] + pending[1] == start:
            pending = (pending[0], pending[1] + length)
            continue
        if pending is not None:
            yield pending
        pending = (start, length)
    if pending is not None:
        yield pending


class NotSparsifiable(DiskImageError):
    """The file system's allocation maps cannot be trusted or read (``unused_ranges``): its blocks
    are all kept. The message says why, for the report ("the journal needs recovery", ...)."""


class GuestPathError(DiskImageError):
    """A path inside the guest does not exist, is not of the kind asked for, or loops."""


class FileType(str, enum.Enum):
    FILE = "file"
    DIRECTORY = "directory"
    SYMLINK = "symlink"
    OTHER = "other"  # devices, fifos, sockets


@dataclass(frozen=True)
class Stat:
    """What a driver knows of one file. ``mode`` holds the permission bits (0o7777) where the
    file system has them; ``flags`` names attributes such as ``immutable``, ``append``, ``readonly``,
    ``hidden``, ``system``, ``sparse``, ``compressed``, ``encrypted``."""

    type: FileType
    size: int
    node: Hashable
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    mtime: float | None = None
    nlink: int | None = None
    flags: frozenset[str] = field(default_factory=frozenset)

    @property
    def is_dir(self) -> bool:
        return self.type is FileType.DIRECTORY

    @property
    def is_file(self) -> bool:
        return self.type is FileType.FILE

    @property
    def is_symlink(self) -> bool:
        return self.type is FileType.SYMLINK


#: what a driver names a file by (an inode number, an MFT record number, a FAT directory entry)
Node = TypeVar("Node", bound=Hashable)


@dataclass(frozen=True)
class DirEntry(Generic[Node]):
    """One name in a directory; ``type`` is None where the directory does not record it."""

    name: str
    node: Node
    type: FileType | None = None


class GuestFileSystem(ABC, Generic[Node]):
    """A mounted-read-only view of one file system (see the module docstring)."""

    #: e.g. "ext4", "xfs", "fat32", "ntfs"
    type: str = ""
    #: FAT and NTFS compare names without case
    case_insensitive: bool = False
    root: Node

    # -- what a driver implements ----------------------------------------------------------------

    @abstractmethod
    def _stat(self, node: Node) -> Stat: ...

    @abstractmethod
    def _entries(self, node: Node) -> Iterator[DirEntry[Node]]: ...

    @abstractmethod
    def _read(self, node: Node, offset: int, length: int) -> bytes: ...

    @abstractmethod
    def _readlink(self, node: Node) -> str: ...

    def unused_ranges(self) -> Iterator[tuple[int, int]]:
        """The byte ranges of the volume (offset from its start, length) that the file system's own
        allocation structures mark free, in increasing order and disjoint: what ``--sparsify`` leaves
        out. Metadata, journals and anything the maps mark used are never among them.

        Raises NotSparsifiable when the state of the file system means its maps may call used blocks
        free (a journal to replay, a dirty flag, a hibernated system) or the driver cannot read them.
        """
        raise NotSparsifiable(f"diskimg does not read the free-space maps of {self.type or 'this file system'}")

    def _lookup(self, directory: Node, name: str) -> Node | None:
        """The node of ``name`` in ``directory``; drivers with indexed directories may do better."""
        if self.case_insensitive:
            folded = name.casefold()
            for entry in self._entries(directory):
                if entry.name.casefold() == folded:
                    return entry.node
            return None
        for entry in self._entries(directory):
            if entry.name == name:
                return entry.node
        return None

    # -- paths -----------------------------------------------------------------------------------

    def resolve(self, path: str, follow_symlinks: bool = True) -> Node:
        """The node at ``path`` (absolute inside the guest; a relative path starts at the root)."""
        pending = [part for part in path.split("/") if part not in ("", ".")]
        pending.reverse()
        stack: list[Node] = [self.root]  # the directories from the root to the current one
        links = 0
        while pending:
            part = pending.pop()
            if part == "..":
                if len(stack) > 1:
                    stack.pop()
                continue
            directory = self._stat(stack[-1])
            if not directory.is_dir:
                raise GuestPathError(f"{path}: not a directory on the way")
            node = self._lookup(stack[-1], part)
            if node is None:
                raise GuestPathError(f"{path}: no such file in the guest")
            if pending or follow_symlinks:
                info = self._stat(node)
                if info.is_symlink:
                    links += 1
                    if links > MAX_SYMLINKS:
                        raise GuestPathError(f"{path}: too many levels of symbolic links")
                    target = self._readlink(node)
                    if target.startswith("/"):
                        stack = [self.root]
                    parts = [p for p in target.split("/") if p not in ("", ".")]
                    pending.extend(reversed(parts))
                    continue
            stack.append(node)
        return stack[-1]

    def stat(self, path: str, follow_symlinks: bool = True) -> Stat:
        return self._stat(self.resolve(path, follow_symlinks))

    def exists(self, path: str, follow_symlinks: bool = True) -> bool:
        try:
            self.resolve(path, follow_symlinks)
        except GuestPathError:
            return False
        return True

    def is_dir(self, path: str) -> bool:
        return self.exists(path) and self.stat(path).is_dir

    def is_file(self, path: str) -> bool:
        return self.exists(path) and self.stat(path).is_file

    def scandir(self, path: str = "/") -> list[DirEntry[Node]]:
        node = self.resolve(path)
        if not self._stat(node).is_dir:
            raise GuestPathError(f"{path}: not a directory")
        entries = []
        for entry in self._entries(node):
            entries.append(entry)
            if len(entries) > MAX_DIRECTORY_ENTRIES:
                raise GuestPathError(f"{path}: more than {MAX_DIRECTORY_ENTRIES} entries")
        return entries

    def listdir(self, path: str = "/") -> list[str]:
        return [entry.name for entry in self.scandir(path)]

    def readlink(self, path: str) -> str:
        node = self.resolve(path, follow_symlinks=False)
        if not self._stat(node).is_symlink:
            raise GuestPathError(f"{path}: not a symbolic link")
        return self._readlink(node)

    def iter_file(self, path: str, chunk: int = READ_CHUNK) -> Iterator[bytes]:
        """A regular file's data in pieces of at most ``chunk`` bytes (for large files)."""
        node = self.resolve(path)
        info = self._stat(node)
        if not info.is_file:
            raise GuestPathError(f"{path}: not a regular file")
        offset = 0
        while offset < info.size:
            piece = self._read(node, offset, min(chunk, info.size - offset))
            if not piece:
                raise GuestPathError(f"{path}: data ends at {offset} of {info.size} bytes")
            yield piece
            offset += len(piece)

    def open(self, path: str) -> GuestFile:
        """A regular file as a read-only seekable binary file, read on demand (for files too large to
        hold, such as an initramfs)."""
        node = self.resolve(path)
        info = self._stat(node)
        if not info.is_file:
            raise GuestPathError(f"{path}: not a regular file")
        return GuestFile(self, node, info.size, path)

    def read_file(self, path: str, max_size: int = DEFAULT_MAX_FILE) -> bytes:
        info = self.stat(path)
        if info.is_file and info.size > max_size:
            raise GuestPathError(f"{path}: {info.size} bytes, more than the {max_size} read here")
        return b"".join(self.iter_file(path))

    def read_text(self, path: str, max_size: int = 4 << 20) -> str:
        return self.read_file(path, max_size).decode("utf-8", errors="replace")

    def walk(self, path: str = "/") -> Iterator[tuple[str, Stat]]:
        """Every file under ``path`` (depth first, symbolic links not followed) with its Stat."""
        start = self.resolve(path)
        stack: list[tuple[str, Node]] = [(path.rstrip("/") or "/", start)]
        seen: set[Node] = {start}
        while stack:
            where, node = stack.pop()
            for entry in self._entries(node):
                child = f"{where.rstrip('/')}/{entry.name}"
                info = self._stat(entry.node)
                yield child, info
                if info.is_dir and entry.node not in seen:
                    seen.add(entry.node)
                    stack.append((child, entry.node))


class GuestFile(io.RawIOBase):
    """A regular file of a guest file system, as :meth:`GuestFileSystem.open` returns it."""

    def __init__(self, fs: GuestFileSystem[Node], node: Node, size: int, path: str) -> None:
        super().__init__()
        self.fs, self.node, self.size, self.path = fs, node, size, path
        self.position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self.position = base + offset
        return self.position

    def tell(self) -> int:
        return self.position

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        length = min(len(view), self.size - self.position)
        if length <= 0:
            return 0
        data = self.fs._read(self.node, self.position, length)
        if not data:
            raise GuestPathError(f"{self.path}: data ends at {self.position} of {self.size} bytes")
        view[: len(data)] = data
        self.position += len(data)
        return len(data)
